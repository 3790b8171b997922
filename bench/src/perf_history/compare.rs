//! `perf-history compare`: per workload, is the newer run faster, slower, or within noise of the baseline?
//!
//! The quantity compared is the ratio qemu-img/rimg, not rimg's own time: both tools ran side by side in
//! the same run, so a machine that is busier or slower on one day moves both and the ratio stays put.
//! The noise threshold comes from the measured spreads: a run's ratio noise is its two tools' relative
//! half-ranges added in quadrature (`ratio_noise` in the history), and the threshold of a comparison is
//! the baseline's and the new run's noise added in quadrature, times `--noise-factor`, never below
//! `--min-threshold`. A change counts when the ratio moved by more than the threshold either way on a
//! log scale: up by more than `1 + t` times, or down to less than `1 / (1 + t)`.
//!
//! Why a factor (default 1.5): for 5 roughly normal samples the half-range is about twice the standard
//! error of their median, so the plain quadrature sum is a 2-sigma bound, and among 30 workloads one
//! would come out "SLOWER" by chance in about half of the comparisons of a commit with itself. 1.5x
//! makes it about 3 sigma, so a gate that fails is worth a look.

use crate::history::{Entry, Run};

/// The baseline of one workload: one run's entry, or the pooled entries of several runs.
#[derive(Clone, Debug)]
pub(crate) struct Baseline {
    /// Baseline ratio (the median over pooled runs).
    pub(crate) ratio: f64,
    /// Relative noise of that ratio.
    pub(crate) noise: f64,
    /// rimg's median seconds (median over pooled runs).
    pub(crate) rimg_median: Option<f64>,
}

/// Median of a non-empty slice.
fn median(xs: &[f64]) -> f64 {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Pools the measured entries of `workload` over `runs`: the median ratio, and as noise the larger of the
/// runs' median own noise and the relative half-range of their ratios (how much the ratio moved from run
/// to run). `None` when no run measured the workload.
pub(crate) fn baseline(runs: &[&Run], workload: &str) -> Option<Baseline> {
    let entries: Vec<&Entry> = runs
        .iter()
        .filter_map(|r| r.entry(workload))
        .filter(|e| e.ratio.is_some())
        .collect();
    if entries.is_empty() {
        return None;
    }
    let ratios: Vec<f64> = entries.iter().filter_map(|e| e.ratio).collect();
    let ratio = median(&ratios);
    let own = median(&entries.iter().map(|e| e.noise).collect::<Vec<_>>());
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let between = if ratio > 0.0 {
        (hi - lo) / (2.0 * ratio)
    } else {
        0.0
    };
    let rimg: Vec<f64> = entries.iter().filter_map(|e| e.rimg_median).collect();
    Some(Baseline {
        ratio,
        noise: own.max(between),
        rimg_median: (!rimg.is_empty()).then(|| median(&rimg)),
    })
}

/// What a comparison says about one workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// rimg gained on qemu-img by more than the threshold.
    Faster,
    /// rimg lost ground by more than the threshold: a regression.
    Slower,
    /// The change is within the threshold.
    Noise,
    /// Measured before, failed now: a regression.
    NowFails,
    /// Failed in both.
    StillFails,
    /// Failed before, measured now.
    NowWorks,
    /// Only in the new run.
    New,
    /// Only in the baseline.
    Gone,
}

impl Verdict {
    /// The word printed in the table.
    pub(crate) fn word(self) -> &'static str {
        match self {
            Verdict::Faster => "faster",
            Verdict::Slower => "SLOWER",
            Verdict::Noise => "within noise",
            Verdict::NowFails => "FAILS NOW",
            Verdict::StillFails => "still fails",
            Verdict::NowWorks => "works now",
            Verdict::New => "new",
            Verdict::Gone => "not run",
        }
    }

    /// Whether this verdict makes `compare` exit non-zero.
    pub(crate) fn is_regression(self) -> bool {
        matches!(self, Verdict::Slower | Verdict::NowFails)
    }
}

/// One row of the comparison.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    /// Workload.
    pub(crate) workload: String,
    /// Baseline ratio, if measured.
    pub(crate) base: Option<f64>,
    /// New ratio, if measured.
    pub(crate) new: Option<f64>,
    /// Relative change of the ratio (new/base - 1).
    pub(crate) change: Option<f64>,
    /// Relative change of rimg's median time (new/base - 1), for information.
    pub(crate) rimg_change: Option<f64>,
    /// Threshold the change was judged against.
    pub(crate) threshold: Option<f64>,
    /// The verdict.
    pub(crate) verdict: Verdict,
    /// The new run's error, if the workload failed there.
    pub(crate) error: Option<String>,
}

/// How changes are judged.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Thresholds {
    /// The noise of both sides, added in quadrature, is multiplied by this.
    pub(crate) factor: f64,
    /// Smallest threshold, as a fraction.
    pub(crate) min: f64,
}

/// Compares `new` against the baseline made of `base_runs`, workload by workload (the new run's order
/// first, then workloads only the baseline has).
pub(crate) fn compare(base_runs: &[&Run], new: &Run, t: Thresholds) -> Vec<Row> {
    let mut names: Vec<String> = new.entries.iter().map(|e| e.workload.clone()).collect();
    for r in base_runs {
        for e in &r.entries {
            if !names.contains(&e.workload) {
                names.push(e.workload.clone());
            }
        }
    }
    let in_base = |w: &str| base_runs.iter().any(|r| r.entry(w).is_some());
    names
        .into_iter()
        .map(|w| {
            let b = baseline(base_runs, &w);
            let n = new.entry(&w);
            let mut row = Row {
                workload: w.clone(),
                base: b.as_ref().map(|b| b.ratio),
                new: n.and_then(|e| e.ratio),
                change: None,
                rimg_change: None,
                threshold: None,
                verdict: Verdict::Noise,
                error: n.and_then(|e| e.error.clone()),
            };
            row.verdict = match (&b, n, n.and_then(|e| e.ratio)) {
                (_, None, _) => Verdict::Gone,
                (None, Some(_), None) if in_base(&w) => Verdict::StillFails,
                (None, Some(_), Some(_)) if in_base(&w) => Verdict::NowWorks,
                (None, Some(_), _) => Verdict::New,
                (Some(_), Some(_), None) => Verdict::NowFails,
                (Some(b), Some(e), Some(r)) => {
                    let change = r / b.ratio - 1.0;
                    let threshold = (t.factor * b.noise.hypot(e.noise)).max(t.min);
                    row.change = Some(change);
                    row.threshold = Some(threshold);
                    row.rimg_change = b
                        .rimg_median
                        .zip(e.rimg_median)
                        .filter(|(a, _)| *a > 0.0)
                        .map(|(a, c)| c / a - 1.0);
                    // Judged on a log scale, so that twice as fast and twice as slow weigh the
                    // same and a threshold above 100 % still leaves room for a slowdown.
                    let (log_change, log_threshold) = ((r / b.ratio).ln(), threshold.ln_1p());
                    if log_change > log_threshold {
                        Verdict::Faster
                    } else if log_change < -log_threshold {
                        Verdict::Slower
                    } else {
                        Verdict::Noise
                    }
                }
            };
            row
        })
        .collect()
}

/// Prints the comparison table.
pub(crate) fn print(rows: &[Row]) {
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:+.1}%", x * 100.0));
    let rat = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}x"));
    println!(
        "{:<26} {:>9} {:>9} {:>8} {:>9} {:>10}  verdict",
        "workload", "base", "new", "change", "threshold", "rimg time"
    );
    for r in rows {
        println!(
            "{:<26} {:>9} {:>9} {:>8} {:>9} {:>10}  {}",
            r.workload,
            rat(r.base),
            rat(r.new),
            pct(r.change),
            r.threshold
                .map_or("-".to_string(), |t| format!("±{:.1}%", t * 100.0)),
            pct(r.rimg_change),
            r.verdict.word()
        );
    }
    for r in rows.iter().filter(|r| r.verdict == Verdict::NowFails) {
        let why = r.error.as_deref().unwrap_or("no ratio recorded");
        println!("{}: {}", r.workload, why.lines().last().unwrap_or(why));
    }
    println!(
        "(base/new = median qemu-img/rimg ratio, > 1 means rimg is faster; change = new/base - 1 of the ratio; \
         threshold from the measured spreads; rimg time = change of rimg's own median, for information)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, entries: &[(&str, Option<f64>, f64)]) -> Run {
        Run {
            id: id.into(),
            date: String::new(),
            commit: None,
            dirty: false,
            size: 0,
            host: String::new(),
            qemu_version: String::new(),
            entries: entries
                .iter()
                .map(|&(w, ratio, noise)| Entry {
                    workload: w.into(),
                    ratio,
                    noise,
                    rimg_median: Some(1.0),
                    error: ratio.is_none().then(|| "failed".to_string()),
                })
                .collect(),
        }
    }

    #[test]
    fn verdicts_follow_the_noise() {
        let a = run(
            "a",
            &[
                ("fast", Some(1.0), 0.03),
                ("slow", Some(1.0), 0.03),
                ("same", Some(1.0), 0.10),
                ("breaks", Some(1.0), 0.0),
            ],
        );
        let b = run(
            "b",
            &[
                ("fast", Some(1.2), 0.03),
                ("slow", Some(0.8), 0.03),
                ("same", Some(0.9), 0.10),
                ("breaks", None, 0.0),
                ("added", Some(1.0), 0.0),
            ],
        );
        let t = Thresholds {
            factor: 1.0,
            min: 0.02,
        };
        let rows = compare(&[&a], &b, t);
        let v: Vec<_> = rows
            .iter()
            .map(|r| (r.workload.as_str(), r.verdict))
            .collect();
        assert_eq!(
            v,
            [
                ("fast", Verdict::Faster),
                ("slow", Verdict::Slower),
                ("same", Verdict::Noise),
                ("breaks", Verdict::NowFails),
                ("added", Verdict::New),
            ]
        );
        assert!(rows.iter().any(|r| r.verdict.is_regression()));
    }

    #[test]
    fn pooled_baseline_takes_run_to_run_movement_as_noise() {
        let runs = [
            run("1", &[("w", Some(1.0), 0.01)]),
            run("2", &[("w", Some(1.2), 0.01)]),
            run("3", &[("w", Some(1.1), 0.01)]),
        ];
        let b = baseline(&runs.iter().collect::<Vec<_>>(), "w").unwrap();
        assert!((b.ratio - 1.1).abs() < 1e-9);
        assert!((b.noise - 0.1 / 1.1).abs() < 1e-9);
    }
}
