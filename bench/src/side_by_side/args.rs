//! Command line of the side-by-side harness: `--help` text, options, size parsing, default binaries.

use std::path::{Path, PathBuf};

use crate::inputs::Workload;
use crate::Result;

/// `--help` text.
pub(crate) const USAGE: &str = "\
side-by-side: time rimg and qemu-img on the same raw-image workloads, alternately

USAGE: side-by-side [OPTIONS]

OPTIONS:
  --rimg PATH          rimg binary (default: $RIMG, else the rimg next to this binary,
                       else <workspace>/target/release/rimg)
  --qemu-img PATH      qemu-img binary (default: qemu-img from PATH)
  --dir DIR            scratch directory (default: a new directory under the system temp dir);
                       the harness removes what it created there at the end unless --keep
  --keep               keep the scratch images and outputs
  --size SIZE          image size, bytes or with a k/M/G/T suffix (default: 2G)
  --runs N             timed runs per tool and workload (default: 5)
  --warmup N           untimed runs per tool before the timed ones (default: 1); the first
                       run after the inputs are written or the cache is cold is often an outlier
  --workloads A,B,...  workloads to run (default: all), from:
                         convert-dense          convert -f raw -O raw dense.raw out
                         convert-sparse         convert -f raw -O raw sparse.raw out
                         convert-dense-direct   the same with -t none -T none
                         convert-sparse-direct  the same with -t none -T none
                         compare-identical      compare -f raw -F raw dense.raw dense-copy.raw
                         compare-sparse         compare -f raw -F raw sparse.raw sparse-copy.raw
  --drop-caches        write 3 to /proc/sys/vm/drop_caches before each timed run (needs root)
  --json FILE          append one JSON line per workload to FILE
  -h, --help           print this help

Runs alternate: rimg first on odd runs, qemu-img first on even runs. Every convert output is checked
once (first run) with `qemu-img compare`. The ratio is median(qemu-img) / median(rimg): above 1 means
rimg is faster.
";

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
    /// Image size in bytes.
    pub(crate) size: u64,
    /// Timed runs per tool and workload.
    pub(crate) runs: usize,
    /// Untimed runs per tool before the timed ones.
    pub(crate) warmup: usize,
    /// Selected workloads, in run order.
    pub(crate) workloads: Vec<Workload>,
    /// Drop the page cache before each timed run.
    pub(crate) drop_caches: bool,
    /// JSON-lines results file.
    pub(crate) json: Option<PathBuf>,
}

/// What the command line asked for.
pub(crate) enum Parsed {
    /// Run with these options.
    Run(Options),
    /// Print the help and exit successfully.
    Help,
}

/// Parses the arguments after the program name. Accepts `--opt VALUE` and `--opt=VALUE`.
pub(crate) fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Parsed> {
    let mut rimg = None;
    let mut qemu_img = PathBuf::from("qemu-img");
    let mut dir = None;
    let mut keep = false;
    let mut size = 2 << 30;
    let mut runs = 5;
    let mut warmup = 1;
    let mut workloads = Workload::ALL.to_vec();
    let mut drop_caches = false;
    let mut json = None;

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
            "--qemu-img" => qemu_img = PathBuf::from(value()?),
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--keep" => keep = true,
            "--size" => size = parse_size(&value()?)?,
            "--runs" => {
                let v = value()?;
                runs = v
                    .parse()
                    .map_err(|_| format!("--runs: not a number: {v}"))?;
                if runs == 0 {
                    return Err("--runs must be at least 1".into());
                }
            }
            "--warmup" => {
                let v = value()?;
                warmup = v
                    .parse()
                    .map_err(|_| format!("--warmup: not a number: {v}"))?;
            }
            "--workloads" => {
                let v = value()?;
                workloads = Vec::new();
                for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let w = Workload::from_name(name).ok_or_else(|| {
                        let all: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
                        format!("unknown workload {name:?} (known: {})", all.join(", "))
                    })?;
                    if !workloads.contains(&w) {
                        workloads.push(w);
                    }
                }
                if workloads.is_empty() {
                    return Err("--workloads: no workload given".into());
                }
            }
            "--drop-caches" => drop_caches = true,
            "--json" => json = Some(PathBuf::from(value()?)),
            _ => return Err(format!("unknown argument {arg:?} (try --help)")),
        }
    }

    let rimg = rimg
        .or_else(|| std::env::var_os("RIMG").map(PathBuf::from))
        .unwrap_or_else(default_rimg);
    Ok(Parsed::Run(Options {
        rimg,
        qemu_img,
        dir,
        keep,
        size,
        runs,
        warmup,
        workloads,
        drop_caches,
        json,
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
        assert_eq!(
            o.workloads,
            [Workload::CompareSparse, Workload::ConvertDense]
        );
        assert!(parse_args(["--runs".to_string()]).is_err());
        assert!(parse_args(["--bogus".to_string()]).is_err());
    }
}
