//! Command line of the side-by-side harness: `--help` text, options, size parsing, default binaries.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::workloads::{Workload, ALL};
use crate::Result;

/// `--help` text (the workload list comes from the table).
pub(crate) fn usage() -> String {
    let mut u = String::from(
        "\
side-by-side: time rimg and qemu-img on the same workloads, alternately, and keep a history

USAGE: side-by-side [OPTIONS]
       (perf-scripts/side-by-side.sh compare|plot ... reads the history; see its --help)

OPTIONS:
  --rimg PATH          rimg binary (default: $RIMG, else the rimg next to this binary,
                       else <workspace>/target/release/rimg)
  --qemu-img PATH      qemu-img binary (default: $QEMU_IMG, else qemu-img from PATH)
  --quick              smoke test: --size 64M --runs 3 --startup-repeat 5, and the history
                       goes to history-quick.jsonl (explicit options still win)
  --size SIZE          image size, bytes or with a k/M/G/T suffix (default: 2G)
  --text-size SIZE     size of the compressible text-like image (default: a quarter of --size)
  --runs N             timed runs per tool and workload (default: 5)
  --warmup N           untimed runs per tool before the timed ones (default: 1)
  --startup-repeat N   runs of a startup-bound command per sample (default: 20); the sample
                       is the time of one run
  --workloads A,B,...  workloads to run (default: all); a name ending in * selects by prefix
                       (bench-*, convert-qcow2*)
  --drop-caches        drop the page cache before every timed run, whatever the workload says
  --no-drop-caches     never drop it (cold workloads then run warm; recorded in the history)
  --history FILE       append one JSON line per workload to FILE (default:
                       <workspace>/perf-scripts/results/history.jsonl, or history-quick.jsonl
                       with --quick); --json FILE is the same
  --no-history         do not append to any history file
  --dir DIR            scratch directory (default: a new directory under $TMPDIR, else /var/tmp);
                       the harness removes what it created there at the end unless --keep
  --keep               keep the scratch images and outputs
  --keep-page-reporting
                       on a VM whose balloon reports free pages to the host, leave that on
                       (by default it is paused for the run and restored at the end, so
                       buffered converts do not time the host faulting memory back in)
  -h, --help           print this help

WORKLOADS (cold: the page cache is dropped before every timed run; warm: it is not):
",
    );
    for w in ALL {
        let _ = writeln!(
            u,
            "  {:<26} {}  {}{}",
            w.name,
            w.cache.name(),
            w.args,
            if w.startup { "  (startup-bound)" } else { "" }
        );
    }
    u.push_str(
        "
@name is a generated input, @OUT.fmt each tool's output, @FRESH.qcow2 an empty qcow2 made
before every run; %N4K = min(size/4k, 131072), %N1M = size/1M requests.

Runs alternate: rimg first on odd runs, qemu-img first on even runs. Every convert output is checked
once with `qemu-img compare`. The ratio is median(qemu-img) / median(rimg): above 1 means rimg is
faster.
",
    );
    u
}

/// When to drop the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DropPolicy {
    /// As each workload says (cold ones only).
    PerWorkload,
    /// Before every timed run.
    Always,
    /// Never.
    Never,
}

/// Parsed command line.
#[derive(Debug)]
pub(crate) struct Options {
    /// rimg binary.
    pub(crate) rimg: PathBuf,
    /// qemu-img binary (a bare name is looked up in PATH by the OS).
    pub(crate) qemu_img: PathBuf,
    /// Scratch directory given with `--dir`, if any.
    pub(crate) dir: Option<PathBuf>,
    /// Keep the scratch files at the end.
    pub(crate) keep: bool,
    /// Leave free page reporting on (see `memory.rs`).
    pub(crate) keep_page_reporting: bool,
    /// `--quick` was given.
    pub(crate) quick: bool,
    /// Image size in bytes.
    pub(crate) size: u64,
    /// Size of the text-like image in bytes.
    pub(crate) text_size: u64,
    /// Timed runs per tool and workload.
    pub(crate) runs: usize,
    /// Untimed runs per tool before the timed ones.
    pub(crate) warmup: usize,
    /// Runs per sample of a startup-bound workload.
    pub(crate) startup_repeat: usize,
    /// Selected workloads, in run order.
    pub(crate) workloads: Vec<&'static Workload>,
    /// When to drop the page cache.
    pub(crate) drop: DropPolicy,
    /// History file (JSON lines), if any.
    pub(crate) history: Option<PathBuf>,
}

/// What the command line asked for.
pub(crate) enum Parsed {
    /// Run with these options.
    Run(Options),
    /// Print the help and exit successfully.
    Help,
}

/// Parses a positive count for `flag`.
fn count(flag: &str, v: &str, min: usize) -> Result<usize> {
    let n: usize = v
        .parse()
        .map_err(|_| format!("{flag}: not a number: {v}"))?;
    if n < min {
        return Err(format!("{flag} must be at least {min}"));
    }
    Ok(n)
}

/// Parses the arguments after the program name. Accepts `--opt VALUE` and `--opt=VALUE`.
pub(crate) fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Parsed> {
    let mut rimg = None;
    let mut qemu_img = None;
    let mut dir = None;
    let mut keep = false;
    let mut keep_page_reporting = false;
    let mut quick = false;
    let mut size = None;
    let mut text_size = None;
    let mut runs = None;
    let mut warmup = 1;
    let mut startup_repeat = None;
    let mut workloads: Vec<&'static Workload> = ALL.iter().collect();
    let mut drop = DropPolicy::PerWorkload;
    let mut history = None;
    let mut no_history = false;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--rimg" => rimg = Some(PathBuf::from(value()?)),
            "--qemu-img" => qemu_img = Some(PathBuf::from(value()?)),
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--keep" => keep = true,
            "--keep-page-reporting" => keep_page_reporting = true,
            "--quick" => quick = true,
            "--size" => size = Some(parse_size(&value()?)?),
            "--text-size" => text_size = Some(parse_size(&value()?)?),
            "--runs" => runs = Some(count("--runs", &value()?, 1)?),
            "--warmup" => warmup = count("--warmup", &value()?, 0)?,
            "--startup-repeat" => startup_repeat = Some(count("--startup-repeat", &value()?, 1)?),
            "--workloads" => {
                let v = value()?;
                workloads = Vec::new();
                for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let found = Workload::select(name);
                    if found.is_empty() {
                        let all: Vec<_> = ALL.iter().map(|w| w.name).collect();
                        return Err(format!(
                            "unknown workload {name:?} (known: {})",
                            all.join(", ")
                        ));
                    }
                    for w in found {
                        if !workloads.iter().any(|o| o.name == w.name) {
                            workloads.push(w);
                        }
                    }
                }
                if workloads.is_empty() {
                    return Err("--workloads: no workload given".into());
                }
            }
            "--drop-caches" => drop = DropPolicy::Always,
            "--no-drop-caches" => drop = DropPolicy::Never,
            "--history" | "--json" => history = Some(PathBuf::from(value()?)),
            "--no-history" => no_history = true,
            _ => return Err(format!("unknown argument {arg:?} (try --help)")),
        }
    }

    let rimg = rimg
        .or_else(|| std::env::var_os("RIMG").map(PathBuf::from))
        .unwrap_or_else(default_rimg);
    let qemu_img = qemu_img
        .or_else(|| std::env::var_os("QEMU_IMG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("qemu-img"));
    let size = size.unwrap_or(if quick { 64 << 20 } else { 2 << 30 });
    let history = if no_history {
        None
    } else {
        Some(history.unwrap_or_else(|| {
            workspace_root()
                .join("perf-scripts/results")
                .join(if quick {
                    "history-quick.jsonl"
                } else {
                    "history.jsonl"
                })
        }))
    };
    Ok(Parsed::Run(Options {
        rimg,
        qemu_img,
        dir,
        keep,
        keep_page_reporting,
        quick,
        size,
        text_size: text_size.unwrap_or((size / 4).max(1 << 20)),
        runs: runs.unwrap_or(if quick { 3 } else { 5 }),
        warmup,
        startup_repeat: startup_repeat.unwrap_or(if quick { 5 } else { 20 }),
        workloads,
        drop,
        history,
    }))
}

/// The rimg built next to this binary (same target directory), else `<workspace>/target/release/rimg`.
pub(crate) fn default_rimg() -> PathBuf {
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("rimg")))
        .filter(|p| p.is_file())
    {
        return sibling;
    }
    workspace_root().join("target/release/rimg")
}

/// The workspace root, as known at build time.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Parses a size: digits, optionally followed by a binary suffix k/K, M, G or T (and an optional `B`/`iB`).
pub(crate) fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("--size: not a size: {s:?}"))?;
    let suffix = suffix.trim_end_matches("iB").trim_end_matches('B');
    let shift = match suffix {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        _ => {
            return Err(format!(
                "--size: unknown suffix in {s:?} (use k, M, G or T)"
            ))
        }
    };
    let size = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("--size: too large: {s:?}"))?;
    if size == 0 {
        return Err("--size must be greater than 0".into());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("0").is_err());
        assert!(parse_size("2X").is_err());
        assert!(parse_size("G").is_err());
    }

    #[test]
    fn options_anywhere_and_inline_values() {
        let args = [
            "--runs=3",
            "--workloads",
            "compare-sparse,convert-dense",
            "--size",
            "1G",
        ];
        let Parsed::Run(o) = parse_args(args.map(String::from)).unwrap() else {
            panic!("expected a run");
        };
        assert_eq!((o.runs, o.size), (3, 1 << 30));
        let names: Vec<_> = o.workloads.iter().map(|w| w.name).collect();
        assert_eq!(names, ["compare-sparse", "convert-dense"]);
        let Parsed::Run(q) = parse_args(["--quick".to_string()]).unwrap() else {
            panic!("expected a run");
        };
        assert_eq!((q.runs, q.size, q.startup_repeat), (3, 64 << 20, 5));
        assert!(q.history.unwrap().ends_with("history-quick.jsonl"));
        assert!(parse_args(["--runs".to_string()]).is_err());
        assert!(parse_args(["--bogus".to_string()]).is_err());
    }
}
