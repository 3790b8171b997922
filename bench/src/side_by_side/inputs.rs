//! The workloads and their inputs: the scratch directory, and the dense and sparse raw images generated
//! there at run time.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::args::Options;
use crate::Result;

/// Size of one generated data chunk and of the sparse image's allocation granule.
pub(crate) const CHUNK: u64 = 1 << 20;

/// Fixed PRNG seed of the dense image (and its copy), so runs on different days time the same bytes.
pub(crate) const DENSE_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Fixed PRNG seed of the sparse image's data and chunk choice.
pub(crate) const SPARSE_SEED: u64 = 0xd1b5_4a32_d192_ed03;

/// One timed workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// `convert -f raw -O raw` of the dense image.
    ConvertDense,
    /// `convert -f raw -O raw` of the sparse image.
    ConvertSparse,
    /// `convert -f raw -O raw -t none -T none` of the dense image.
    ConvertDenseDirect,
    /// `convert -f raw -O raw -t none -T none` of the sparse image.
    ConvertSparseDirect,
    /// `compare -f raw -F raw` of the dense image against its copy.
    CompareIdentical,
    /// `compare -f raw -F raw` of the sparse image against its copy.
    CompareSparse,
}

/// Which generated input a workload reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    /// Fully allocated, incompressible.
    Dense,
    /// 25% of 1 MiB chunks allocated, holes elsewhere.
    Sparse,
}

impl Workload {
    /// Every workload, in the order they run.
    pub(crate) const ALL: [Workload; 6] = [
        Workload::ConvertDense,
        Workload::ConvertSparse,
        Workload::ConvertDenseDirect,
        Workload::ConvertSparseDirect,
        Workload::CompareIdentical,
        Workload::CompareSparse,
    ];

    /// The name used on the command line, in the table and in the JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Workload::ConvertDense => "convert-dense",
            Workload::ConvertSparse => "convert-sparse",
            Workload::ConvertDenseDirect => "convert-dense-direct",
            Workload::ConvertSparseDirect => "convert-sparse-direct",
            Workload::CompareIdentical => "compare-identical",
            Workload::CompareSparse => "compare-sparse",
        }
    }

    /// Parses a command-line name.
    pub(crate) fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }

    /// The input image this workload reads.
    pub(crate) fn input(self) -> Input {
        match self {
            Workload::ConvertDense | Workload::ConvertDenseDirect | Workload::CompareIdentical => {
                Input::Dense
            }
            Workload::ConvertSparse | Workload::ConvertSparseDirect | Workload::CompareSparse => {
                Input::Sparse
            }
        }
    }

    /// Whether this workload writes an output image (and so needs removing and verifying).
    pub(crate) fn is_convert(self) -> bool {
        !matches!(self, Workload::CompareIdentical | Workload::CompareSparse)
    }

    /// The tool arguments, identical for both tools. `out` is the convert target (ignored by compares).
    pub(crate) fn args(self, scratch: &Scratch, out: &Path) -> Vec<String> {
        let src = scratch.image(self.input());
        let mut args: Vec<String> = Vec::new();
        if self.is_convert() {
            args.extend(["convert", "-f", "raw", "-O", "raw"].map(String::from));
            if matches!(
                self,
                Workload::ConvertDenseDirect | Workload::ConvertSparseDirect
            ) {
                args.extend(["-t", "none", "-T", "none"].map(String::from));
            }
            args.push(path_str(&src));
            args.push(path_str(out));
        } else {
            args.extend(["compare", "-f", "raw", "-F", "raw"].map(String::from));
            args.push(path_str(&src));
            args.push(path_str(&scratch.copy(self.input())));
        }
        args
    }
}

/// A path as a `String` for a command line (lossy only for non-UTF-8 paths, which the harness never makes).
pub(crate) fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The scratch directory and the files the harness creates in it.
pub(crate) struct Scratch {
    /// The directory.
    pub(crate) dir: PathBuf,
    /// Whether the harness created the directory (then it removes the whole directory).
    pub(crate) created_dir: bool,
    /// Leave everything in place on drop.
    pub(crate) keep: bool,
}

impl Scratch {
    /// Opens `dir` (created if missing) or a new directory under the system temp dir.
    pub(crate) fn new(dir: Option<&Path>, keep: bool) -> Result<Scratch> {
        let (dir, created_dir) = match dir {
            Some(d) => {
                let existed = d.exists();
                fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
                (d.to_path_buf(), !existed)
            }
            None => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let d = std::env::temp_dir().join(format!(
                    "rimg-side-by-side-{}-{nanos:08x}",
                    std::process::id()
                ));
                fs::create_dir(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
                (d, true)
            }
        };
        Ok(Scratch {
            dir,
            created_dir,
            keep,
        })
    }

    /// The generated input image of `kind`.
    pub(crate) fn image(&self, kind: Input) -> PathBuf {
        self.dir.join(match kind {
            Input::Dense => "dense.raw",
            Input::Sparse => "sparse.raw",
        })
    }

    /// The byte-identical copy of the input image of `kind`, for the compare workloads.
    pub(crate) fn copy(&self, kind: Input) -> PathBuf {
        self.dir.join(match kind {
            Input::Dense => "dense-copy.raw",
            Input::Sparse => "sparse-copy.raw",
        })
    }

    /// The convert output of the tool labelled `tool`.
    pub(crate) fn output(&self, tool: &str) -> PathBuf {
        self.dir.join(format!("out-{tool}.raw"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept scratch files in {}", self.dir.display());
            return;
        }
        if self.created_dir {
            let _ = fs::remove_dir_all(&self.dir);
            return;
        }
        for kind in [Input::Dense, Input::Sparse] {
            let _ = fs::remove_file(self.image(kind));
            let _ = fs::remove_file(self.copy(kind));
        }
        for tool in ["rimg", "qemu-img"] {
            let _ = fs::remove_file(self.output(tool));
        }
    }
}

/// xorshift64* — fast, good enough to make data that no compressor or zero-detector can exploit.
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    /// Next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` (a multiple of 8 bytes long) with random bytes.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
    }

    /// A uniform-enough index in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Writes a raw image of `size` bytes at `path`. Dense: every chunk holds random data. Sparse: a random
/// quarter of the 1 MiB chunks holds random data and the rest are holes. The same `seed` gives the same
/// bytes and the same holes. The file is fsynced before returning. Returns the bytes of data written.
pub(crate) fn generate(path: &Path, size: u64, kind: Input, seed: u64) -> Result<u64> {
    let ctx = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(ctx)?;
    file.set_len(size).map_err(ctx)?;
    let chunks = size.div_ceil(CHUNK);
    let mut rng = XorShift(seed | 1);
    let selected: Vec<u64> = match kind {
        Input::Dense => (0..chunks).collect(),
        Input::Sparse => {
            // Partial Fisher-Yates: the first `want` slots become a uniform random subset.
            let want = (chunks / 4).max(1);
            let mut idx: Vec<u64> = (0..chunks).collect();
            for i in 0..want {
                let j = i + rng.below(chunks - i);
                idx.swap(i as usize, j as usize);
            }
            idx.truncate(want as usize);
            idx.sort_unstable();
            idx
        }
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0;
    for chunk in selected {
        let off = chunk * CHUNK;
        let len = CHUNK.min(size - off) as usize;
        rng.fill(&mut buf);
        file.write_all_at(&buf[..len], off).map_err(ctx)?;
        written += len as u64;
    }
    file.sync_all().map_err(ctx)?;
    Ok(written)
}

/// Free bytes on the filesystem holding `dir`, from `df` (None if df is missing or its output is odd).
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["-P", "-B1"])
        .arg(dir)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// Creates the inputs the selected workloads need, after checking there is room for them and the outputs.
pub(crate) fn prepare_inputs(opts: &Options, scratch: &Scratch) -> Result<()> {
    let wants = |pred: &dyn Fn(Workload) -> bool| opts.workloads.iter().any(|&w| pred(w));
    let sparse_data = (opts.size.div_ceil(CHUNK) / 4).max(1) * CHUNK;
    let mut plan: Vec<(PathBuf, Input, u64)> = Vec::new();
    for (kind, seed) in [(Input::Dense, DENSE_SEED), (Input::Sparse, SPARSE_SEED)] {
        if wants(&|w| w.input() == kind) {
            plan.push((scratch.image(kind), kind, seed));
        }
        if wants(&|w| w.input() == kind && !w.is_convert()) {
            plan.push((scratch.copy(kind), kind, seed));
        }
    }
    let data: u64 = plan
        .iter()
        .map(|&(_, kind, _)| match kind {
            Input::Dense => opts.size,
            Input::Sparse => sparse_data.min(opts.size),
        })
        .sum();
    let outputs = if wants(&Workload::is_convert) {
        2 * opts.size
    } else {
        0
    };
    let need = data + outputs;
    if let Some(free) = free_bytes(&scratch.dir) {
        let margin = 512 << 20;
        if free < need + margin {
            return Err(format!(
                "not enough space in {}: need about {} MiB (inputs and two outputs) plus a margin, {} MiB free",
                scratch.dir.display(),
                need >> 20,
                free >> 20
            ));
        }
    }
    for (path, kind, seed) in plan {
        let start = Instant::now();
        let written = generate(&path, opts.size, kind, seed)?;
        println!(
            "generated {} ({} MiB, {} MiB data) in {:.1} s",
            path.display(),
            opts.size >> 20,
            written >> 20,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(Workload::from_name(w.name()), Some(w));
        }
    }

    #[test]
    fn sparse_image_is_a_quarter_allocated_and_reproducible() {
        let dir = std::env::temp_dir().join(format!("rimg-sbs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
        let size = 16 * CHUNK + 4096;
        assert_eq!(generate(&a, size, Input::Sparse, 7).unwrap(), 4 * CHUNK);
        generate(&b, size, Input::Sparse, 7).unwrap();
        assert_eq!(fs::metadata(&a).unwrap().len(), size);
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert_eq!(generate(&a, size, Input::Dense, 7).unwrap(), size);
        fs::remove_dir_all(&dir).unwrap();
    }
}
