//! `side-by-side`: times `rimg` and `qemu-img` on the same named workloads (see `workloads.rs`),
//! alternately, reports the median of each and the ratio qemu-img/rimg (> 1 means rimg is faster), and
//! appends one JSON line per workload to a history file (read by `perf-history compare|plot`).
//!
//! The harness builds its own inputs at run time in a scratch directory (`inputs.rs`): dense random raw
//! data, a 25 % sparse raw image, compressible text-like data, copies for `compare`, and qcow2 images
//! derived from them with qemu-img. Each timed run starts from the same state: both tools' previous outputs
//! are removed and `sync` is run (untimed) so that writeback left by one tool is never charged to the
//! other; cold workloads also drop the page cache. Wall clock decides the ratio; each run's CPU time
//! (user + system) is reported beside it.
//!
//! Apart from serde_json for the history lines it is std only, on purpose: it must build wherever rimg
//! builds and must not perturb what it measures.

#[path = "side_by_side/args.rs"]
mod args;
#[path = "side_by_side/inputs.rs"]
mod inputs;
#[path = "side_by_side/memory.rs"]
mod memory;
#[path = "side_by_side/report.rs"]
mod report;
#[path = "side_by_side/workloads.rs"]
mod workloads;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use args::{parse_args, usage, workspace_root, DropPolicy, Options, Parsed};
use inputs::{path_str, prepare_inputs, Scratch};
use report::{machine, print_table, utc_now, write_json, Row, RunInfo};
use workloads::{Cache, Counts, Workload};

/// Harness errors are reported as one message and a non-zero exit; a `String` carries enough context.
type Result<T> = std::result::Result<T, String>;

/// CPU time (user + system) of all reaped children so far, from `/proc/self/stat` (`cutime`, `cstime`), in
/// seconds. The kernel counts in clock ticks (`tick` seconds each, normally 10 ms), so a delta around one run
/// is that run's CPU time to within a tick. `None` when /proc is unreadable.
fn children_cpu_s(tick: f64) -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name start at field 3 (state); cutime is 16, cstime 17.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(13);
    let cutime: u64 = fields.next()?.parse().ok()?;
    let cstime: u64 = fields.next()?.parse().ok()?;
    Some((cutime + cstime) as f64 * tick)
}

/// Seconds per clock tick (`getconf CLK_TCK`, 100 Hz if that fails).
fn clock_tick_s() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|&hz| hz > 0.0)
        .map_or(0.01, |hz| 1.0 / hz)
}

/// One timed run's measurements.
struct Sample {
    /// Wall clock from spawn to exit.
    wall: Duration,
    /// User + system CPU seconds of the tool (all its threads), if measurable.
    cpu_s: Option<f64>,
    /// What the tool wrote to stderr (it succeeded).
    stderr: String,
}

/// A tool under test.
struct Tool {
    /// Short label: `rimg` or `qemu-img`.
    label: &'static str,
    /// Binary to run.
    path: PathBuf,
    /// First line of `--version`.
    version: String,
    /// Seconds per clock tick, for CPU times.
    tick: f64,
}

impl Tool {
    /// Finds the tool and reads its version; fails if it cannot be run.
    fn new(label: &'static str, path: PathBuf) -> Result<Tool> {
        let out = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {label} ({}): {e}", path.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{label} --version failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(Tool {
            label,
            path,
            version,
            tick: clock_tick_s(),
        })
    }

    /// Runs the tool once with `args`, timing wall clock from spawn to exit and its CPU time. An exit status
    /// other than `expect` is an error carrying the tool's stderr. Anything written to stderr on success is
    /// returned so the caller can mention it.
    fn run_timed(&self, args: &[String], expect: i32) -> Result<Sample> {
        let cpu_before = children_cpu_s(self.tick);
        let start = Instant::now();
        let out = Command::new(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.path.display()))?;
        let wall = start.elapsed();
        let cpu_s = children_cpu_s(self.tick)
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() != Some(expect) {
            return Err(format!(
                "{} {} failed ({}, expected exit {expect}):\n{}",
                self.label,
                args.join(" "),
                out.status,
                stderr.trim_end()
            ));
        }
        Ok(Sample {
            wall,
            cpu_s,
            stderr,
        })
    }
}

/// Flushes dirty pages (untimed) and drops the page cache when the policy and the workload say so.
struct CacheControl {
    /// When to drop.
    policy: DropPolicy,
    /// Dropping works here (cleared after the first failure, which is reported once).
    can_drop: bool,
}

impl CacheControl {
    /// Whether runs of a workload with `cache` are to be timed cold.
    fn wants_drop(&self, cache: Cache) -> bool {
        self.can_drop
            && match self.policy {
                DropPolicy::Always => true,
                DropPolicy::Never => false,
                DropPolicy::PerWorkload => cache == Cache::Cold,
            }
    }

    /// Brings the system to the same state before every timed run; returns whether the cache was dropped.
    fn settle(&mut self, cache: Cache) -> bool {
        let _ = Command::new("sync").status();
        if !self.wants_drop(cache) {
            return false;
        }
        if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "3\n") {
            eprintln!(
                "warning: could not drop caches (writing /proc/sys/vm/drop_caches: {e}; \
                 needs root and a writable /proc/sys); cold workloads are timed with a warm cache"
            );
            self.can_drop = false;
            return false;
        }
        true
    }
}

/// Checks with `qemu-img compare` that `out` has the same content as `src`, and returns the output's
/// allocated bytes (for the log: a sparse source should give a sparse output).
fn verify(qemu: &Tool, src: &Path, fmts: (&str, &str), out: &Path) -> Result<u64> {
    let res = Command::new(&qemu.path)
        .args(["compare", "-f", fmts.0, "-F", fmts.1])
        .arg(src)
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run qemu-img compare: {e}"))?;
    if !res.status.success() {
        return Err(format!(
            "verification failed: qemu-img compare {} {} ({}):\n{}{}",
            src.display(),
            out.display(),
            res.status,
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        ));
    }
    let meta = fs::metadata(out).map_err(|e| format!("stat {}: {e}", out.display()))?;
    Ok(meta.blocks() * 512)
}

/// Removes both tools' per-run files (convert outputs, fresh images), so every timed run starts from the
/// same state: no output file, and none of the other tool's output left in the page cache.
fn remove_outputs(w: &Workload, scratch: &Scratch, tools: [&Tool; 2]) -> Result<()> {
    for tool in tools {
        for f in w.tool_files(scratch, tool.label) {
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing {}: {e}", f.display())),
            }
        }
    }
    Ok(())
}

/// Prepares (untimed) one run of `tool`: removes both tools' outputs and creates the tool's fresh image if
/// the workload writes to one.
fn prepare_run(
    w: &Workload,
    opts: &Options,
    scratch: &Scratch,
    tools: [&Tool; 2],
    tool: &Tool,
) -> Result<()> {
    remove_outputs(w, scratch, tools)?;
    if let Some(fresh) = w.fresh(scratch, tool.label) {
        let out = Command::new(&opts.qemu_img)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&fresh)
            .arg(opts.size.to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run qemu-img create: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img create {} failed: {}",
                fresh.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// For a bench workload: the engine path rimg reports (`--output=json`, key `engine`), from one more
/// untimed run, so the history says what was measured (io_uring or threads, O_DIRECT, registered buffers).
fn rimg_engine(rimg: &Tool, args: &[String]) -> Option<String> {
    if args.first().map(String::as_str) != Some("bench") {
        return None;
    }
    let out = Command::new(&rimg.path)
        .args(args)
        .arg("--output=json")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The `engine` value is an array of strings; keep its text (one line per item) without parsing JSON.
    let start = text.find("\"engine\"")?;
    let open = start + text[start..].find('[')?;
    let close = open + text[open..].find(']')?;
    let items: Vec<&str> = text[open + 1..close]
        .split("\",")
        .map(|s| s.trim().trim_matches('"').trim())
        .filter(|s| !s.is_empty())
        .collect();
    Some(items.join("; "))
}

/// Pauses free page reporting and touches enough memory for the buffered workloads (see `memory.rs`).
/// Returns the pause (restoring the old setting when dropped), or `None` with a note if it cannot be
/// paused here.
fn steady_memory(opts: &Options, info: &mut RunInfo) -> Option<memory::ReportingPause> {
    let pause = match memory::ReportingPause::start() {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            println!("note: could not pause free page reporting ({e}; needs root)");
            return None;
        }
    };
    info.page_reporting_paused = true;
    // Room for the largest outputs and cold reads (a convert writes `size`, compare-cold reads 2 x size),
    // leaving a GiB free.
    let want = opts.size.saturating_mul(4).saturating_add(1 << 30);
    let bytes = memory::mem_free()
        .map(|f| f.saturating_sub(1 << 30))
        .unwrap_or(0)
        .min(want);
    let took = memory::prefault(bytes);
    println!(
        "note: this VM reports freed memory to its host (virtio-balloon free page reporting); paused for \
         the run (restored at the end; --keep-page-reporting to leave it on), {} MiB touched in {:.1} s \
         so both tools start from host-backed free memory",
        bytes >> 20,
        took.as_secs_f64()
    );
    Some(pause)
}

/// The 1-, 5- and 15-minute load averages, for judging how busy the machine was.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// One timed run of `tool`: `repeat` invocations back to back, reported per invocation.
fn sample(tool: &Tool, args: &[String], expect: i32, repeat: usize) -> Result<Sample> {
    let mut total = tool.run_timed(args, expect)?;
    for _ in 1..repeat {
        let s = tool.run_timed(args, expect)?;
        total.wall += s.wall;
        total.cpu_s = total.cpu_s.zip(s.cpu_s).map(|(a, b)| a + b);
    }
    total.wall /= repeat as u32;
    total.cpu_s = total.cpu_s.map(|c| c / repeat as f64);
    Ok(total)
}

/// Runs one workload `warmup` times untimed and `runs` times timed per tool, alternating the order, and
/// verifies convert outputs once. A tool failing gives a row with the error (the run goes on).
fn run_workload(
    w: &'static Workload,
    opts: &Options,
    scratch: &Scratch,
    tools: [&Tool; 2],
    cache: &mut CacheControl,
) -> Row {
    let mut row = Row::new(w, if w.startup { opts.startup_repeat } else { 1 });
    if let Err(e) = time_workload(&mut row, opts, scratch, tools, cache) {
        println!("   FAILED: {}", report::last_line(&e));
        eprintln!("side-by-side: {}: {e}", w.name);
        row.error = Some(e);
    }
    if !opts.keep {
        let _ = remove_outputs(w, scratch, tools);
    }
    row
}

/// The measuring part of [`run_workload`], filling `row`.
fn time_workload(
    row: &mut Row,
    opts: &Options,
    scratch: &Scratch,
    tools: [&Tool; 2],
    cache: &mut CacheControl,
) -> Result<()> {
    let w = row.workload;
    let [rimg, qemu] = tools;
    let counts = Counts::for_size(opts.size);
    let mut wall: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut stderr_noted = Vec::new();
    let args = |tool: &Tool| w.args(scratch, tool.label, counts);
    println!(
        "== {} ({}{})",
        w.name,
        if cache.wants_drop(w.cache) {
            "cold: page cache dropped before each run"
        } else {
            "warm page cache"
        },
        if row.repeat > 1 {
            format!(", {} runs per sample", row.repeat)
        } else {
            String::new()
        }
    );
    for tool in tools {
        println!("   {} {}", tool.label, args(tool).join(" "));
    }
    for _ in 0..opts.warmup {
        for tool in tools {
            prepare_run(w, opts, scratch, tools, tool)?;
            cache.settle(Cache::Warm);
            tool.run_timed(&args(tool), w.expect_exit)?;
        }
    }
    row.dropped = cache.wants_drop(w.cache);
    for run in 1..=opts.runs {
        let order = if run % 2 == 1 {
            [rimg, qemu]
        } else {
            [qemu, rimg]
        };
        let mut line = format!("   run {run}/{}:", opts.runs);
        for tool in order {
            prepare_run(w, opts, scratch, tools, tool)?;
            row.dropped &= cache.settle(w.cache);
            let Sample {
                wall: elapsed,
                cpu_s,
                stderr,
            } = sample(tool, &args(tool), w.expect_exit, row.repeat)?;
            let secs = elapsed.as_secs_f64();
            wall.entry(tool.label).or_default().push(secs);
            let _ = write!(line, "  {} {secs:.3} s", tool.label);
            if let Some(c) = cpu_s {
                cpu.entry(tool.label).or_default().push(c);
                let _ = write!(line, " (cpu {c:.2})");
            }
            if !stderr.trim().is_empty() && !stderr_noted.contains(&tool.label) {
                stderr_noted.push(tool.label);
                eprintln!(
                    "note: {} wrote to stderr on success: {}",
                    tool.label,
                    stderr.trim()
                );
            }
            if let (Some((src, src_fmt, out_fmt)), 1) = (w.verify_pair(), run) {
                let out = w
                    .output(scratch, tool.label)
                    .ok_or("convert workload without an output")?;
                let allocated = verify(qemu, &scratch.image(src), (src_fmt, out_fmt), &out)?;
                let _ = write!(
                    line,
                    " (verified, {} MiB allocated)",
                    allocated.div_ceil(1 << 20)
                );
            }
        }
        println!("{line}");
    }
    row.rimg_engine = rimg_engine(rimg, &args(rimg))
        .map(|e| e.replace(&format!("{}/", path_str(&scratch.dir)), ""));
    if let Some(e) = &row.rimg_engine {
        println!("   rimg engine: {e}");
    }
    row.rimg = wall.remove(rimg.label).unwrap_or_default();
    row.qemu = wall.remove(qemu.label).unwrap_or_default();
    row.rimg_cpu = cpu.remove(rimg.label).unwrap_or_default();
    row.qemu_cpu = cpu.remove(qemu.label).unwrap_or_default();
    Ok(())
}

/// Runs git in the workspace root and returns its trimmed stdout on success.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(workspace_root())
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The whole run; `main` only maps its error to a message and an exit code.
fn run(opts: Options) -> Result<()> {
    if !opts.rimg.is_file() {
        return Err(format!(
            "rimg not found at {} (build it with `cargo build --release -p rimg-cli`, or pass --rimg / set RIMG)",
            opts.rimg.display()
        ));
    }
    let rimg = Tool::new("rimg", opts.rimg.clone())?;
    let qemu = Tool::new("qemu-img", opts.qemu_img.clone())?;
    let date = utc_now();
    let mut info = RunInfo {
        run_id: format!("{date}-{}", std::process::id()),
        size: opts.size,
        text_size: opts.text_size,
        runs: opts.runs,
        quick: opts.quick,
        rimg_version: rimg.version.clone(),
        qemu_version: qemu.version.clone(),
        date,
        git_commit: git(&["rev-parse", "HEAD"]),
        git_subject: git(&["log", "-1", "--format=%s"]),
        git_dirty: git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
        warmup: opts.warmup,
        free_page_reporting: memory::free_page_reporting(),
        page_reporting_paused: false,
        machine: machine(),
        scratch_fs: String::new(),
        loadavg_start: String::new(),
        loadavg_end: String::new(),
    };
    let scratch = Scratch::new(opts.dir.as_deref(), opts.keep)?;
    println!("rimg:     {} ({})", rimg.path.display(), rimg.version);
    println!("qemu-img: {} ({})", qemu.path.display(), qemu.version);
    println!(
        "size {} MiB (text {} MiB), {} runs per tool after {} warm-up, scratch {}, git {}{}, {}",
        opts.size >> 20,
        opts.text_size >> 20,
        opts.runs,
        opts.warmup,
        scratch.dir.display(),
        info.git_commit.as_deref().unwrap_or("unknown"),
        if info.git_dirty == Some(true) {
            " (dirty)"
        } else {
            ""
        },
        match opts.drop {
            DropPolicy::PerWorkload => "cold workloads drop the page cache",
            DropPolicy::Always => "dropping the page cache before every run",
            DropPolicy::Never => "never dropping the page cache",
        }
    );
    println!("machine:  {}", info.machine.summary());
    let fs = inputs::fs_type(&scratch.dir).unwrap_or_else(|| "unknown".into());
    println!("scratch filesystem: {fs}");
    info.scratch_fs = fs.clone();
    if fs == "tmpfs" || fs == "ramfs" {
        println!(
            "note: the scratch directory is in memory ({fs}): O_DIRECT workloads fail there and nothing \
             touches a disk; pass --dir on a disk-backed filesystem"
        );
    }
    prepare_inputs(&opts, &scratch)?;
    // Kept until the end of the run, when it puts the reporting order back.
    let _pause = if info.free_page_reporting && !opts.keep_page_reporting {
        steady_memory(&opts, &mut info)
    } else {
        None
    };
    if info.free_page_reporting && !info.page_reporting_paused {
        println!(
            "note: this VM reports freed memory to its host (virtio-balloon free page reporting) and it \
             was not paused: buffered converts also time the host faulting page-cache memory back in, \
             and come out bimodal for both tools; trust the cpu columns and the -direct rows more"
        );
    }

    let mut cache = CacheControl {
        policy: opts.drop,
        can_drop: true,
    };
    let mut rows = Vec::new();
    info.loadavg_start = loadavg();
    for &w in &opts.workloads {
        rows.push(run_workload(w, &opts, &scratch, [&rimg, &qemu], &mut cache));
    }
    info.loadavg_end = loadavg();
    print_table(&rows);
    println!(
        "load average (1/5/15 min): {} at start, {} at end",
        info.loadavg_start, info.loadavg_end
    );
    if let Some(path) = &opts.history {
        write_json(path, &rows, &info)?;
        println!("appended {} JSON lines to {}", rows.len(), path.display());
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| r.error.is_some())
        .map(|r| r.workload.name)
        .collect();
    if !failed.is_empty() {
        return Err(format!(
            "{} workload(s) failed: {}",
            failed.len(),
            failed.join(", ")
        ));
    }
    Ok(())
}

/// Parses the arguments, runs, and maps errors to exit codes (2: bad arguments, 1: the run failed).
fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(opts)) => opts,
        Ok(Parsed::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("side-by-side: {e}");
            return ExitCode::from(2);
        }
    };
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("side-by-side: {e}");
            ExitCode::FAILURE
        }
    }
}
