//! The named workloads: the command line each runs (the same for both tools), the generated inputs it
//! reads, whether it is timed with a cold or a warm page cache, and how its result is checked.
//!
//! A workload's arguments are a template. Tokens that stand for files and counts are expanded per run:
//! - `@NAME` (e.g. `@dense.raw`): a generated input in the scratch directory (see [`Input`]);
//! - `@OUT.raw`, `@OUT.qcow2`: the tool's own convert output, removed before every run and checked with
//!   `qemu-img compare` against the input just before it after the tool's first timed run;
//! - `@FRESH.qcow2`: the tool's own empty qcow2 image of the configured size, created (untimed, by
//!   qemu-img) before every run, so that `bench -w` on it allocates every cluster it writes;
//! - `%N4K`, `%N1M`: request counts for `bench` with 4 KiB and 1 MiB requests (see [`Counts`]).

use std::path::{Path, PathBuf};

use crate::inputs::{path_str, Input, Scratch};

/// The page-cache state a workload is timed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cache {
    /// Inputs may sit in the page cache (dirty pages are still synced before every run).
    Warm,
    /// The page cache is dropped before every timed run (`/proc/sys/vm/drop_caches`, needs root).
    Cold,
}

impl Cache {
    /// `warm` or `cold`, for the table and the JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cache::Warm => "warm",
            Cache::Cold => "cold",
        }
    }
}

/// One timed workload.
#[derive(Debug)]
pub(crate) struct Workload {
    /// The name used on the command line, in the table and in the history.
    pub(crate) name: &'static str,
    /// The tool arguments, as a template (see the module docs), separated by spaces (no argument
    /// contains one).
    pub(crate) args: &'static str,
    /// Cold or warm page cache.
    pub(crate) cache: Cache,
    /// A startup-bound command: each sample runs it `--startup-repeat` times and reports the time of one.
    pub(crate) startup: bool,
    /// The exit status both tools must give (`compare` of differing images exits 1).
    pub(crate) expect_exit: i32,
}

/// Shorthand for the table below.
const fn w(name: &'static str, cache: Cache, args: &'static str) -> Workload {
    Workload {
        name,
        args,
        cache,
        startup: false,
        expect_exit: 0,
    }
}

/// A startup-bound workload.
const fn s(name: &'static str, args: &'static str) -> Workload {
    Workload {
        startup: true,
        ..w(name, Cache::Warm, args)
    }
}

use Cache::{Cold, Warm};

/// `bench` options shared by every bench workload: O_DIRECT through io_uring (the targets are
/// stated "with io_uring"); the page cache plays no part, so they are timed warm.
macro_rules! bench {
    ($a:literal) => {
        concat!("bench -t none -i io_uring ", $a)
    };
}

/// Every workload, in run order.
#[rustfmt::skip]
pub(crate) static ALL: &[Workload] = &[
    // raw -> raw
    w("convert-dense", Warm, "convert -f raw -O raw @dense.raw @OUT.raw"),
    w("convert-sparse", Warm, "convert -f raw -O raw @sparse.raw @OUT.raw"),
    w("convert-dense-direct", Cold, "convert -f raw -O raw -t none -T none @dense.raw @OUT.raw"),
    w("convert-sparse-direct", Cold, "convert -f raw -O raw -t none -T none @sparse.raw @OUT.raw"),
    w("convert-dense-cold", Cold, "convert -f raw -O raw @dense.raw @OUT.raw"),
    // raw -> qcow2
    w("convert-raw-qcow2", Warm, "convert -f raw -O qcow2 @dense.raw @OUT.qcow2"),
    w("convert-raw-qcow2-sparse", Warm, "convert -f raw -O qcow2 @sparse.raw @OUT.qcow2"),
    w("convert-raw-qcow2-direct", Cold, "convert -f raw -O qcow2 -t none -T none @dense.raw @OUT.qcow2"),
    // qcow2 -> raw
    w("convert-qcow2-raw", Warm, "convert -f qcow2 -O raw @dense.qcow2 @OUT.raw"),
    w("convert-qcow2-raw-direct", Cold, "convert -f qcow2 -O raw -t none -T none @dense.qcow2 @OUT.raw"),
    // compression, on text-like data
    w("convert-qcow2-zlib", Warm, "convert -c -f qcow2 -O qcow2 @text.qcow2 @OUT.qcow2"),
    w("convert-qcow2-zstd", Warm, "convert -c -o compression_type=zstd -f qcow2 -O qcow2 @text.qcow2 @OUT.qcow2"),
    w("convert-zlib-raw", Warm, "convert -f qcow2 -O raw @text-zlib.qcow2 @OUT.raw"),
    w("convert-zstd-raw", Warm, "convert -f qcow2 -O raw @text-zstd.qcow2 @OUT.raw"),
    // VMware and Hyper-V sources and targets
    w("convert-vmdk-qcow2", Warm, "convert -f vmdk -O qcow2 @dense.vmdk @OUT.qcow2"),
    w("convert-stream-vmdk-raw", Warm, "convert -f vmdk -O raw @text-stream.vmdk @OUT.raw"),
    w("convert-vhdx-qcow2", Warm, "convert -f vhdx -O qcow2 @dense.vhdx @OUT.qcow2"),
    w("convert-raw-stream-vmdk", Warm, "convert -f raw -O vmdk -o subformat=streamOptimized @text.raw @OUT.vmdk"),
    // compare
    w("compare-identical", Warm, "compare -f raw -F raw @dense.raw @dense-copy.raw"),
    w("compare-sparse", Warm, "compare -f raw -F raw @sparse.raw @sparse-copy.raw"),
    Workload { expect_exit: 1, ..w("compare-differ-end", Warm, "compare -f raw -F raw @dense.raw @dense-end.raw") },
    w("compare-qcow2-raw", Warm, "compare -f qcow2 -F raw @dense.qcow2 @dense.raw"),
    w("compare-identical-cold", Cold, "compare -f raw -F raw @dense.raw @dense-copy.raw"),
    // startup-bound commands on a small image
    s("info", "info @small.qcow2"),
    s("info-json", "info --output=json @small.qcow2"),
    s("map", "map --output=json @small.qcow2"),
    s("check", "check @small.qcow2"),
    // bench, raw
    w("bench-raw-read-4k-qd32", Warm, bench!("-f raw -d 32 -s 4096 -c %N4K @dense.raw")),
    w("bench-raw-write-4k-qd32", Warm, bench!("-w -f raw -d 32 -s 4096 -c %N4K @bench-w.raw")),
    w("bench-raw-read-1m-qd4", Warm, bench!("-f raw -d 4 -s 1048576 -c %N1M @dense.raw")),
    w("bench-raw-write-1m-qd4", Warm, bench!("-w -f raw -d 4 -s 1048576 -c %N1M @bench-w.raw")),
    // bench, qcow2 (writes go to a fresh image: allocation and metadata commit are part of the work)
    w("bench-qcow2-read-4k-qd32", Warm, bench!("-f qcow2 -d 32 -s 4096 -c %N4K @dense.qcow2")),
    w("bench-qcow2-write-4k-qd32", Warm, bench!("-w -f qcow2 -d 32 -s 4096 -c %N4K @FRESH.qcow2")),
    w("bench-qcow2-read-1m-qd4", Warm, bench!("-f qcow2 -d 4 -s 1048576 -c %N1M @dense.qcow2")),
    w("bench-qcow2-write-1m-qd4", Warm, bench!("-w -f qcow2 -d 4 -s 1048576 -c %N1M @FRESH.qcow2")),
];

/// Request counts of the bench workloads, from the image size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Counts {
    /// 4 KiB requests: the whole image, at most 128 Ki requests (512 MiB).
    pub(crate) n4k: u64,
    /// 1 MiB requests: the whole image.
    pub(crate) n1m: u64,
}

impl Counts {
    /// Counts for images of `size` bytes.
    pub(crate) fn for_size(size: u64) -> Counts {
        Counts {
            n4k: (size / 4096).clamp(1, 128 << 10),
            n1m: (size >> 20).max(1),
        }
    }
}

impl Workload {
    /// The template's words.
    pub(crate) fn words(&self) -> impl Iterator<Item = &'static str> {
        self.args.split_whitespace()
    }

    /// Looks a workload up by name.
    pub(crate) fn by_name(name: &str) -> Option<&'static Workload> {
        ALL.iter().find(|w| w.name == name)
    }

    /// Selects workloads by a name, or by a prefix ending in `*` (`bench-*`, `convert-qcow2*`).
    pub(crate) fn select(pattern: &str) -> Vec<&'static Workload> {
        match pattern.strip_suffix('*') {
            Some(prefix) => ALL.iter().filter(|w| w.name.starts_with(prefix)).collect(),
            None => Workload::by_name(pattern).into_iter().collect(),
        }
    }

    /// The generated inputs this workload reads (not its outputs).
    pub(crate) fn inputs(&self) -> Vec<Input> {
        self.words()
            .filter_map(|a| a.strip_prefix('@'))
            .filter_map(Input::from_file)
            .collect()
    }

    /// Whether this workload writes a per-tool output (`@OUT.*`).
    pub(crate) fn has_output(&self) -> bool {
        self.words().any(|a| a.starts_with("@OUT."))
    }

    /// Whether this workload needs a fresh empty qcow2 per run (`@FRESH.qcow2`).
    pub(crate) fn needs_fresh(&self) -> bool {
        self.words().any(|a| a == "@FRESH.qcow2")
    }

    /// For a convert: the input it reads, its format, and the output's format (for `qemu-img compare`).
    pub(crate) fn verify_pair(&self) -> Option<(Input, &'static str, &'static str)> {
        let words: Vec<&'static str> = self.words().collect();
        let pos = words.iter().position(|a| a.starts_with("@OUT."))?;
        let out_fmt = words[pos].strip_prefix("@OUT.")?;
        let src = Input::from_file(words.get(pos.checked_sub(1)?)?.strip_prefix('@')?)?;
        Some((src, src.format(), out_fmt))
    }

    /// The command line for the tool labelled `tool`.
    pub(crate) fn args(&self, scratch: &Scratch, tool: &str, counts: Counts) -> Vec<String> {
        self.words()
            .map(|a| match a {
                "%N4K" => counts.n4k.to_string(),
                "%N1M" => counts.n1m.to_string(),
                _ => match a.strip_prefix('@') {
                    Some(file) => path_str(&resolve(scratch, tool, file)),
                    None => a.to_string(),
                },
            })
            .collect()
    }

    /// Paths of this tool's per-run files (outputs and fresh images).
    pub(crate) fn tool_files(&self, scratch: &Scratch, tool: &str) -> Vec<PathBuf> {
        self.words()
            .filter_map(|a| a.strip_prefix('@'))
            .filter(|f| f.starts_with("OUT.") || f.starts_with("FRESH."))
            .map(|f| resolve(scratch, tool, f))
            .collect()
    }

    /// This tool's output path, if the workload has one.
    pub(crate) fn output(&self, scratch: &Scratch, tool: &str) -> Option<PathBuf> {
        let f = self.words().find_map(|a| a.strip_prefix("@OUT."))?;
        Some(scratch.dir.join(format!("out-{tool}.{f}")))
    }

    /// This tool's fresh image path, if the workload has one.
    pub(crate) fn fresh(&self, scratch: &Scratch, tool: &str) -> Option<PathBuf> {
        self.needs_fresh()
            .then(|| scratch.dir.join(format!("fresh-{tool}.qcow2")))
    }
}

/// The path a `@`-token names.
fn resolve(scratch: &Scratch, tool: &str, file: &str) -> PathBuf {
    if let Some(ext) = file.strip_prefix("OUT.") {
        return scratch.dir.join(format!("out-{tool}.{ext}"));
    }
    if let Some(ext) = file.strip_prefix("FRESH.") {
        return scratch.dir.join(format!("fresh-{tool}.{ext}"));
    }
    scratch.dir.join(Path::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_inputs_known() {
        for (i, w) in ALL.iter().enumerate() {
            assert!(ALL[..i].iter().all(|o| o.name != w.name), "{}", w.name);
            for a in w.words().filter_map(|a| a.strip_prefix('@')) {
                assert!(
                    Input::from_file(a).is_some()
                        || a.starts_with("OUT.")
                        || a.starts_with("FRESH."),
                    "{}: unknown file {a}",
                    w.name
                );
            }
        }
    }

    #[test]
    fn selection_by_prefix() {
        assert_eq!(Workload::select("bench-raw-*").len(), 4);
        assert_eq!(Workload::select("info").len(), 1);
        assert!(Workload::select("nope").is_empty());
    }

    #[test]
    fn convert_verification_pair() {
        let w = Workload::by_name("convert-zlib-raw").unwrap();
        assert_eq!(w.verify_pair(), Some((Input::TextZlib, "qcow2", "raw")));
        assert_eq!(
            Workload::by_name("compare-sparse").unwrap().verify_pair(),
            None
        );
    }
}
