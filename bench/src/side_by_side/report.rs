//! Results: medians and spreads, the printed table, and the JSON lines.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::workloads::Workload;
use crate::Result;

/// Timings of one workload.
pub(crate) struct Row {
    /// The workload.
    pub(crate) workload: &'static Workload,
    /// Invocations per sample (startup-bound workloads); samples are per invocation.
    pub(crate) repeat: usize,
    /// Whether the page cache was dropped before every timed run.
    pub(crate) dropped: bool,
    /// rimg wall-clock seconds, one per run, in run order.
    pub(crate) rimg: Vec<f64>,
    /// qemu-img wall-clock seconds, one per run, in run order.
    pub(crate) qemu: Vec<f64>,
    /// rimg CPU seconds (user + system, all threads), one per run; empty if /proc was unreadable.
    pub(crate) rimg_cpu: Vec<f64>,
    /// qemu-img CPU seconds, likewise.
    pub(crate) qemu_cpu: Vec<f64>,
    /// The engine path rimg reported (bench workloads).
    pub(crate) rimg_engine: Option<String>,
    /// Why the workload could not be measured (a tool failed).
    pub(crate) error: Option<String>,
}

impl Row {
    /// An empty row for `workload`.
    pub(crate) fn new(workload: &'static Workload, repeat: usize) -> Row {
        Row {
            workload,
            repeat,
            dropped: false,
            rimg: Vec::new(),
            qemu: Vec::new(),
            rimg_cpu: Vec::new(),
            qemu_cpu: Vec::new(),
            rimg_engine: None,
            error: None,
        }
    }

    /// Whether both tools have samples.
    fn measured(&self) -> bool {
        self.error.is_none() && !self.rimg.is_empty() && !self.qemu.is_empty()
    }
}

/// Relative spread of a sample: half its min-max range over its median (0.05 = the samples lie within
/// about ±5 % of the median). The noise measure `perf-history compare` builds its threshold from.
pub(crate) fn spread(samples: &[f64]) -> f64 {
    let (lo, hi) = min_max(samples);
    let m = median(samples);
    if m > 0.0 {
        (hi - lo) / (2.0 * m)
    } else {
        0.0
    }
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

/// The last non-empty line of a message (a failed tool's own complaint, after the command line).
pub(crate) fn last_line(msg: &str) -> &str {
    msg.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// Seconds in a readable unit (`1.234s`, `12.3ms`).
fn secs(x: f64) -> String {
    if x >= 1.0 {
        format!("{x:.3}s")
    } else if x >= 0.001 {
        format!("{:.1}ms", x * 1e3)
    } else {
        format!("{:.0}us", x * 1e6)
    }
}

/// Prints the results table.
pub(crate) fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<26} {:<4} {:>9} {:>5} {:>9} {:>5} {:>9} {:>8} {:>8}",
        "workload", "", "rimg", "+-", "qemu-img", "+-", "qemu/rimg", "rimg cpu", "qemu cpu"
    );
    for r in rows {
        let cache = if r.dropped { "cold" } else { "warm" };
        if !r.measured() {
            let why = r.error.as_deref().unwrap_or("no samples");
            println!(
                "{:<26} {cache:<4} FAILED: {}",
                r.workload.name,
                last_line(why)
            );
            continue;
        }
        let (rm, qm) = (median(&r.rimg), median(&r.qemu));
        println!(
            "{:<26} {cache:<4} {:>9} {:>5} {:>9} {:>5} {:>9} {:>8} {:>8}",
            r.workload.name,
            secs(rm),
            format!("{:.0}%", spread(&r.rimg) * 100.0),
            secs(qm),
            format!("{:.0}%", spread(&r.qemu) * 100.0),
            ratio(qm, rm).map_or("n/a".to_string(), |x| format!("{x:.2}x")),
            cpu_cell(&r.rimg_cpu),
            cpu_cell(&r.qemu_cpu),
        );
    }
    println!(
        "(median wall clock of each tool per run, startup-bound rows per invocation; +- = half the min-max \
         range over the median; qemu/rimg > 1 means rimg is faster; cpu = median user+sys)"
    );
}

/// A table cell with the median CPU time, or `n/a`.
fn cpu_cell(samples: &[f64]) -> String {
    if samples.is_empty() {
        "n/a".into()
    } else {
        secs(median(samples))
    }
}

/// median(qemu-img) / median(rimg), if defined.
pub(crate) fn ratio(qemu: f64, rimg: f64) -> Option<f64> {
    (rimg > 0.0).then(|| qemu / rimg)
}

/// The machine a run was measured on.
pub(crate) struct Machine {
    /// Host name.
    pub(crate) hostname: String,
    /// CPUs available to the harness.
    pub(crate) nproc: usize,
    /// `MemTotal` in bytes.
    pub(crate) mem_bytes: u64,
    /// Kernel release.
    pub(crate) kernel: String,
    /// CPU model name.
    pub(crate) cpu: String,
}

impl Machine {
    /// One line for the log.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{}, {} CPUs ({}), {} MiB, kernel {}",
            self.hostname,
            self.nproc,
            self.cpu,
            self.mem_bytes >> 20,
            self.kernel
        )
    }
}

/// Reads the machine description from /proc.
pub(crate) fn machine() -> Machine {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mem_bytes = crate::memory::meminfo_bytes(&read("/proc/meminfo"), "MemTotal:").unwrap_or(0);
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Machine {
        hostname: read("/proc/sys/kernel/hostname"),
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_bytes,
        kernel: read("/proc/sys/kernel/osrelease"),
        cpu,
    }
}

/// Context recorded with every JSON line.
pub(crate) struct RunInfo {
    /// Identifies the run: every line of one harness run carries the same id.
    pub(crate) run_id: String,
    /// Image size in bytes.
    pub(crate) size: u64,
    /// Text-like image size in bytes.
    pub(crate) text_size: u64,
    /// Runs per tool.
    pub(crate) runs: usize,
    /// `--quick` run.
    pub(crate) quick: bool,
    /// rimg `--version`, first line.
    pub(crate) rimg_version: String,
    /// qemu-img `--version`, first line.
    pub(crate) qemu_version: String,
    /// UTC start time, ISO 8601.
    pub(crate) date: String,
    /// `git rev-parse HEAD` of the workspace, if available.
    pub(crate) git_commit: Option<String>,
    /// Subject of that commit.
    pub(crate) git_subject: Option<String>,
    /// Whether the work tree had uncommitted changes, if known.
    pub(crate) git_dirty: Option<bool>,
    /// Untimed runs per tool before the timed ones.
    pub(crate) warmup: usize,
    /// Whether the VM reports free pages to its host (see `free_page_reporting` in the harness).
    pub(crate) free_page_reporting: bool,
    /// Whether the harness paused that reporting for the run (see `memory.rs`).
    pub(crate) page_reporting_paused: bool,
    /// Where it ran.
    pub(crate) machine: Machine,
    /// Filesystem type of the scratch directory (`stat -f`).
    pub(crate) scratch_fs: String,
    /// Load averages when the timed part started.
    pub(crate) loadavg_start: String,
    /// Load averages when it ended.
    pub(crate) loadavg_end: String,
}

/// `x` rounded to microseconds (or millionths), for compact JSON.
fn r6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// A JSON array of rounded values.
fn samples_json(samples: &[f64]) -> Value {
    Value::from(samples.iter().map(|&x| r6(x)).collect::<Vec<_>>())
}

/// One history line for `row`.
pub(crate) fn json_line(row: &Row, info: &RunInfo) -> Value {
    let m = &info.machine;
    let mut v = json!({
        "run_id": info.run_id,
        "workload": row.workload.name,
        "args": row.workload.args,
        "cache": row.workload.cache.name(),
        "cache_dropped": row.dropped,
        "repeat": row.repeat,
    });
    let o = v.as_object_mut().expect("an object");
    if row.measured() {
        let (rm, qm) = (median(&row.rimg), median(&row.qemu));
        let (rlo, rhi) = min_max(&row.rimg);
        let (qlo, qhi) = min_max(&row.qemu);
        let (rs, qs) = (spread(&row.rimg), spread(&row.qemu));
        o.insert("rimg_median_s".into(), json!(r6(rm)));
        o.insert("qemu_median_s".into(), json!(r6(qm)));
        o.insert(
            "ratio".into(),
            json!(ratio(qm, rm).map(|x| (x * 1e4).round() / 1e4)),
        );
        o.insert("rimg_spread".into(), json!(r6(rs)));
        o.insert("qemu_spread".into(), json!(r6(qs)));
        o.insert("ratio_noise".into(), json!(r6(rs.hypot(qs))));
        o.insert("rimg_min_s".into(), json!(r6(rlo)));
        o.insert("rimg_max_s".into(), json!(r6(rhi)));
        o.insert("qemu_min_s".into(), json!(r6(qlo)));
        o.insert("qemu_max_s".into(), json!(r6(qhi)));
    }
    o.insert("error".into(), json!(row.error));
    let cpu_median = |s: &[f64]| (!s.is_empty()).then(|| r6(median(s)));
    for (k, val) in [
        ("runs", json!(info.runs)),
        ("warmup", json!(info.warmup)),
        ("size_bytes", json!(info.size)),
        ("text_size_bytes", json!(info.text_size)),
        ("quick", json!(info.quick)),
        ("rimg_version", json!(info.rimg_version)),
        ("qemu_version", json!(info.qemu_version)),
        ("date", json!(info.date)),
        ("git_commit", json!(info.git_commit)),
        ("git_subject", json!(info.git_subject)),
        ("git_dirty", json!(info.git_dirty)),
        (
            "machine",
            json!({
                "hostname": m.hostname,
                "nproc": m.nproc,
                "mem_bytes": m.mem_bytes,
                "kernel": m.kernel,
                "cpu": m.cpu,
            }),
        ),
        ("scratch_fs", json!(info.scratch_fs)),
        ("free_page_reporting", json!(info.free_page_reporting)),
        ("page_reporting_paused", json!(info.page_reporting_paused)),
        ("loadavg_start", json!(info.loadavg_start)),
        ("loadavg_end", json!(info.loadavg_end)),
        ("rimg_engine", json!(row.rimg_engine)),
        ("rimg_samples_s", samples_json(&row.rimg)),
        ("qemu_samples_s", samples_json(&row.qemu)),
        ("rimg_cpu_median_s", json!(cpu_median(&row.rimg_cpu))),
        ("qemu_cpu_median_s", json!(cpu_median(&row.qemu_cpu))),
        ("rimg_cpu_samples_s", samples_json(&row.rimg_cpu)),
        ("qemu_cpu_samples_s", samples_json(&row.qemu_cpu)),
    ] {
        o.insert(k.into(), val);
    }
    v
}

/// Appends the history lines for `rows` to `path` (creating its directory if needed).
pub(crate) fn write_json(path: &Path, rows: &[Row], info: &RunInfo) -> Result<()> {
    let ctx = |e: std::io::Error| format!("writing {}: {e}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(ctx)?;
    }
    let mut text = String::new();
    for row in rows {
        text.push_str(&json_line(row, info).to_string());
        text.push('\n');
    }
    // One write, so an interrupted run never leaves half a run in the history.
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(ctx)?;
    f.write_all(text.as_bytes()).map_err(ctx)?;
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
    fn spreads() {
        assert!((spread(&[0.9, 1.0, 1.1]) - 0.1).abs() < 1e-9);
        assert_eq!(spread(&[2.0]), 0.0);
    }
}
