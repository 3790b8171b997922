//! `perf-history`: reads the history that `side-by-side` appends to and
//! - `compare`s two runs (or the newest against the pooled N-1 before it), saying per workload faster /
//!   slower / within noise, and exits 1 on a regression;
//! - `plot`s the ratio qemu-img/rimg per workload over the runs into an SVG file.

#[path = "perf_history/compare.rs"]
mod compare;
#[path = "perf_history/history.rs"]
mod history;
#[path = "perf_history/plot.rs"]
mod plot;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use history::Run;

/// Errors are one message; `main` prints it.
type Result<T> = std::result::Result<T, String>;

/// `--help` text.
const USAGE: &str = "\
perf-history: read the side-by-side history (one JSON line per workload and run)

USAGE:
  perf-history compare [--history FILE] [--last N | [BASE] [NEW]] [--noise-factor K]
                       [--min-threshold PCT]
  perf-history plot    [--history FILE] [--out FILE.svg] [--last N] [--workloads A,B,...]

Runs are named by position (-1 = newest, -2 = the one before, 1 = oldest) or by a prefix of their
run id or commit. compare's default is -2 against -1; --last N compares the newest run with the
N-1 runs before it, pooled (median ratio; noise = the larger of their own spread and how much the
ratio moved between them). Per workload it prints the ratio qemu-img/rimg of both sides, the
change, the noise threshold (the two sides' measured spreads added in quadrature, times
--noise-factor, default 1.5, at least --min-threshold, default 3%) and a verdict: faster, SLOWER,
within noise, FAILS NOW, ... It exits 1
when any workload is SLOWER or FAILS NOW, 0 otherwise, 2 on bad arguments or an unreadable history.

plot draws one small chart per workload (ratio over the runs, labelled by commit; dashed line at
1 = both tools equal) into an SVG page (default: results/ratio.svg beside the history).

--history defaults to <workspace>/perf-scripts/results/history.jsonl.
";

/// Parsed command line.
struct Args {
    /// `compare` or `plot`.
    cmd: String,
    /// History file.
    history: PathBuf,
    /// `--last N`.
    last: Option<usize>,
    /// Positional run selectors.
    runs: Vec<String>,
    /// `--min-threshold`, as a fraction.
    min_threshold: f64,
    /// `--noise-factor`.
    noise_factor: f64,
    /// `--out` of plot.
    out: Option<PathBuf>,
    /// `--workloads` of plot (names or prefixes ending in `*`).
    workloads: Option<Vec<String>>,
}

/// The workspace root, as known at build time.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Parses the command line; `Ok(None)` means print the help.
fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Args>> {
    let mut it = args.into_iter();
    let cmd = match it.next().as_deref() {
        None | Some("-h" | "--help" | "help") => return Ok(None),
        Some(c @ ("compare" | "plot")) => c.to_string(),
        Some(other) => return Err(format!("unknown command {other:?} (compare or plot)")),
    };
    let mut a = Args {
        cmd,
        history: workspace_root().join("perf-scripts/results/history.jsonl"),
        last: None,
        runs: Vec::new(),
        min_threshold: 0.03,
        noise_factor: 1.5,
        out: None,
        workloads: None,
    };
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--history" => a.history = PathBuf::from(value()?),
            "--last" => {
                let v = value()?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("--last: not a number: {v}"))?;
                if n < 2 && a.cmd == "compare" {
                    return Err("--last needs at least 2 runs to compare".into());
                }
                a.last = Some(n.max(1));
            }
            "--min-threshold" => {
                let v = value()?;
                let pct: f64 = v
                    .trim_end_matches('%')
                    .parse()
                    .map_err(|_| format!("--min-threshold: not a percentage: {v}"))?;
                a.min_threshold = pct / 100.0;
            }
            "--noise-factor" => {
                let v = value()?;
                a.noise_factor = v
                    .parse()
                    .ok()
                    .filter(|f: &f64| *f > 0.0)
                    .ok_or_else(|| format!("--noise-factor: not a positive number: {v}"))?;
            }
            "--out" | "-o" => a.out = Some(PathBuf::from(value()?)),
            "--workloads" => {
                a.workloads = Some(value()?.split(',').map(|s| s.trim().to_string()).collect());
            }
            _ if !arg.starts_with("--") || arg.parse::<i64>().is_ok() => a.runs.push(arg),
            _ => return Err(format!("unknown argument {arg:?} (try --help)")),
        }
    }
    if a.runs.len() > 2 || (a.last.is_some() && !a.runs.is_empty() && a.cmd == "compare") {
        return Err("compare takes --last N or up to two runs, not both".into());
    }
    Ok(Some(a))
}

/// `compare`: returns whether there was a regression.
fn cmd_compare(a: &Args, runs: &[Run]) -> Result<bool> {
    let (base, new): (Vec<&Run>, &Run) = match (a.last, a.runs.as_slice()) {
        (Some(n), _) => {
            let n = n.min(runs.len());
            if n < 2 {
                return Err(format!(
                    "the history holds {} run(s); compare needs 2",
                    runs.len()
                ));
            }
            let new = &runs[runs.len() - 1];
            (runs[runs.len() - n..runs.len() - 1].iter().collect(), new)
        }
        (None, []) => {
            if runs.len() < 2 {
                return Err(format!(
                    "the history holds {} run(s); compare needs 2",
                    runs.len()
                ));
            }
            (vec![&runs[runs.len() - 2]], &runs[runs.len() - 1])
        }
        (None, [one]) => (vec![history::select(runs, one)?], &runs[runs.len() - 1]),
        (None, [b, n, ..]) => (vec![history::select(runs, b)?], history::select(runs, n)?),
    };
    let describe = |r: &Run| {
        format!(
            "{} ({}, {}, {} MiB, {} workloads)",
            r.label(),
            r.date,
            if r.host.is_empty() { "?" } else { &r.host },
            r.size >> 20,
            r.entries.len()
        )
    };
    for (i, r) in base.iter().enumerate() {
        println!("{} {}", if i == 0 { "base:" } else { "     " }, describe(r));
    }
    println!("new:  {}", describe(new));
    for r in &base {
        if r.size != new.size {
            println!(
                "warning: image sizes differ ({} vs {} MiB): ratios may not be comparable",
                r.size >> 20,
                new.size >> 20
            );
        }
        if r.host != new.host {
            println!(
                "warning: measured on different machines ({} vs {})",
                r.host, new.host
            );
        }
        if r.qemu_version != new.qemu_version {
            println!("warning: qemu-img versions differ: the ratio moves with qemu-img too");
        }
    }
    println!();
    let t = compare::Thresholds {
        factor: a.noise_factor,
        min: a.min_threshold,
    };
    let rows = compare::compare(&base, new, t);
    compare::print(&rows);
    let regressions: Vec<&str> = rows
        .iter()
        .filter(|r| r.verdict.is_regression())
        .map(|r| r.workload.as_str())
        .collect();
    if regressions.is_empty() {
        println!("no regression");
    } else {
        println!(
            "REGRESSION in {}: {}",
            regressions.len(),
            regressions.join(", ")
        );
    }
    Ok(!regressions.is_empty())
}

/// `plot`.
fn cmd_plot(a: &Args, runs: &[Run]) -> Result<()> {
    let runs: Vec<&Run> = match a.last {
        Some(n) => runs[runs.len().saturating_sub(n)..].iter().collect(),
        None => runs.iter().collect(),
    };
    let mut all: Vec<String> = Vec::new();
    for r in &runs {
        for e in &r.entries {
            if !all.contains(&e.workload) {
                all.push(e.workload.clone());
            }
        }
    }
    let workloads: Vec<String> = match &a.workloads {
        None => all,
        Some(pats) => all
            .into_iter()
            .filter(|w| {
                pats.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => w.starts_with(prefix),
                    None => w == p,
                })
            })
            .collect(),
    };
    let out = a.out.clone().unwrap_or_else(|| {
        a.history.parent().unwrap_or(Path::new(".")).join(
            match a.history.file_stem().and_then(|s| s.to_str()) {
                Some("history") | None => "ratio.svg".to_string(),
                Some(stem) => format!("{stem}.svg"),
            },
        )
    });
    plot::plot(&runs, &workloads, &out)?;
    println!(
        "wrote {} ({} workloads over {} runs)",
        out.display(),
        workloads.len(),
        runs.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("perf-history: {e}");
            return ExitCode::from(2);
        }
    };
    let result = history::load(&args.history).and_then(|runs| match args.cmd.as_str() {
        "compare" => cmd_compare(&args, &runs),
        _ => cmd_plot(&args, &runs).map(|()| false),
    });
    match result {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("perf-history: {e}");
            ExitCode::from(2)
        }
    }
}
