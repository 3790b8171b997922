//! Results: medians and spreads, the printed table, and the JSON lines.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::inputs::Workload;
use crate::Result;

/// Timings of one workload.
pub(crate) struct Row {
    /// The workload.
    pub(crate) workload: Workload,
    /// rimg wall-clock seconds, one per run, in run order.
    pub(crate) rimg: Vec<f64>,
    /// qemu-img wall-clock seconds, one per run, in run order.
    pub(crate) qemu: Vec<f64>,
    /// rimg CPU seconds (user + system, all threads), one per run; empty if /proc was unreadable.
    pub(crate) rimg_cpu: Vec<f64>,
    /// qemu-img CPU seconds, likewise.
    pub(crate) qemu_cpu: Vec<f64>,
}

/// Median of a non-empty sample (mean of the two middle values for an even count).
pub(crate) fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Smallest and largest value of a non-empty sample.
pub(crate) fn min_max(samples: &[f64]) -> (f64, f64) {
    samples
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Prints the results table.
pub(crate) fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>15} {:>15} {:>10} {:>9} {:>9}",
        "workload",
        "rimg med",
        "qemu med",
        "rimg min-max",
        "qemu min-max",
        "qemu/rimg",
        "rimg cpu",
        "qemu cpu"
    );
    for r in rows {
        let (rlo, rhi) = min_max(&r.rimg);
        let (qlo, qhi) = min_max(&r.qemu);
        let (rm, qm) = (median(&r.rimg), median(&r.qemu));
        println!(
            "{:<22} {:>9.3}s {:>9.3}s {:>15} {:>15} {:>10} {:>9} {:>9}",
            r.workload.name(),
            rm,
            qm,
            format!("{rlo:.3}-{rhi:.3}s"),
            format!("{qlo:.3}-{qhi:.3}s"),
            ratio(qm, rm).map_or("n/a".to_string(), |x| format!("{x:.2}x")),
            cpu_cell(&r.rimg_cpu),
            cpu_cell(&r.qemu_cpu),
        );
    }
    println!(
        "(wall-clock medians and spread; qemu/rimg > 1 means rimg is faster; cpu = median user+sys seconds)"
    );
}

/// A table cell with the median CPU seconds, or `n/a`.
fn cpu_cell(samples: &[f64]) -> String {
    if samples.is_empty() {
        "n/a".into()
    } else {
        format!("{:.2}s", median(samples))
    }
}

/// median(qemu-img) / median(rimg), if defined.
pub(crate) fn ratio(qemu: f64, rimg: f64) -> Option<f64> {
    (rimg > 0.0).then(|| qemu / rimg)
}

/// Context recorded with every JSON line.
pub(crate) struct RunInfo {
    /// Image size in bytes.
    pub(crate) size: u64,
    /// Runs per tool.
    pub(crate) runs: usize,
    /// rimg `--version`, first line.
    pub(crate) rimg_version: String,
    /// qemu-img `--version`, first line.
    pub(crate) qemu_version: String,
    /// UTC start time, ISO 8601.
    pub(crate) date: String,
    /// `git rev-parse HEAD` of the workspace, if available.
    pub(crate) git_commit: Option<String>,
    /// Whether the work tree had uncommitted changes, if known.
    pub(crate) git_dirty: Option<bool>,
    /// Whether the page cache was dropped before every run.
    pub(crate) drop_caches: bool,
    /// Untimed runs per tool before the timed ones.
    pub(crate) warmup: usize,
    /// Whether the VM reports free pages to its host (see `free_page_reporting` in the harness).
    pub(crate) free_page_reporting: bool,
    /// Load averages when the timed part started.
    pub(crate) loadavg_start: String,
    /// Load averages when it ended.
    pub(crate) loadavg_end: String,
}

/// A JSON string literal.
pub(crate) fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON array of seconds.
pub(crate) fn json_samples(samples: &[f64]) -> String {
    let items: Vec<String> = samples.iter().map(|s| format!("{s:.6}")).collect();
    format!("[{}]", items.join(","))
}

/// One JSON line for `row`.
pub(crate) fn json_line(row: &Row, info: &RunInfo) -> String {
    let (rlo, rhi) = min_max(&row.rimg);
    let (qlo, qhi) = min_max(&row.qemu);
    let (rm, qm) = (median(&row.rimg), median(&row.qemu));
    let opt = |v: Option<String>| v.unwrap_or_else(|| "null".into());
    format!(
        "{{\"workload\":{},\"rimg_median_s\":{rm:.6},\"qemu_median_s\":{qm:.6},\
         \"rimg_min_s\":{rlo:.6},\"rimg_max_s\":{rhi:.6},\"qemu_min_s\":{qlo:.6},\"qemu_max_s\":{qhi:.6},\
         \"ratio\":{},\"runs\":{},\"size_bytes\":{},\"rimg_version\":{},\"qemu_version\":{},\
         \"date\":{},\"git_commit\":{},\"git_dirty\":{},\"drop_caches\":{},\"warmup\":{},\"free_page_reporting\":{},\
         \"loadavg_start\":{},\"loadavg_end\":{},\
         \"rimg_samples_s\":{},\"qemu_samples_s\":{},\"rimg_cpu_median_s\":{},\"qemu_cpu_median_s\":{},\
         \"rimg_cpu_samples_s\":{},\"qemu_cpu_samples_s\":{}}}",
        json_str(row.workload.name()),
        opt(ratio(qm, rm).map(|x| format!("{x:.4}"))),
        info.runs,
        info.size,
        json_str(&info.rimg_version),
        json_str(&info.qemu_version),
        json_str(&info.date),
        opt(info.git_commit.as_deref().map(json_str)),
        opt(info.git_dirty.map(|d| d.to_string())),
        info.drop_caches,
        info.warmup,
        info.free_page_reporting,
        json_str(&info.loadavg_start),
        json_str(&info.loadavg_end),
        json_samples(&row.rimg),
        json_samples(&row.qemu),
        opt((!row.rimg_cpu.is_empty()).then(|| format!("{:.6}", median(&row.rimg_cpu)))),
        opt((!row.qemu_cpu.is_empty()).then(|| format!("{:.6}", median(&row.qemu_cpu)))),
        json_samples(&row.rimg_cpu),
        json_samples(&row.qemu_cpu),
    )
}

/// Appends the JSON lines for `rows` to `path`.
pub(crate) fn write_json(path: &Path, rows: &[Row], info: &RunInfo) -> Result<()> {
    let ctx = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(ctx)?;
    for row in rows {
        writeln!(f, "{}", json_line(row, info)).map_err(ctx)?;
    }
    Ok(())
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(min_max(&[3.0, 1.0, 2.0]), (1.0, 3.0));
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
    }
}
