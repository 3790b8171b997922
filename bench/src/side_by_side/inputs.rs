//! The generated inputs: the scratch directory, the raw images written there at run time (dense random
//! data, 25 % sparse, compressible text-like data) and the images derived from them with qemu-img.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
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

/// Fixed PRNG seed of the text-like image.
pub(crate) const TEXT_SEED: u64 = 0x6a09_e667_f3bc_c908;

/// Virtual size of the small qcow2 image of the startup-bound workloads.
pub(crate) const SMALL_SIZE: u64 = 256 << 20;

/// A file the workloads read, generated once per harness run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    /// `dense.raw`: random (incompressible) data over the whole size.
    Dense,
    /// `sparse.raw`: random data in a random 25 % of the 1 MiB chunks, holes elsewhere.
    Sparse,
    /// `text.raw`: compressible text-like data (words and lines), `--text-size` bytes.
    Text,
    /// `dense-copy.raw`: byte-identical to `dense.raw`.
    DenseCopy,
    /// `sparse-copy.raw`: byte-identical to `sparse.raw`, holes included.
    SparseCopy,
    /// `dense-end.raw`: `dense.raw` with its last 4 KiB changed.
    DenseEnd,
    /// `dense.qcow2`: `qemu-img convert -O qcow2 dense.raw`.
    DenseQcow2,
    /// `text.qcow2`: `qemu-img convert -O qcow2 text.raw`.
    TextQcow2,
    /// `text-zlib.qcow2`: `qemu-img convert -c -O qcow2 text.raw`.
    TextZlib,
    /// `text-zstd.qcow2`: the same with `-o compression_type=zstd`.
    TextZstd,
    /// `small.qcow2`: a 256 MiB qcow2 with a quarter of its 1 MiB chunks allocated.
    Small,
    /// `bench-w.raw`: the target of `bench -w` on raw, fully allocated (`preallocation=full`).
    BenchW,
    /// `dense.vmdk`: `qemu-img convert -O vmdk dense.raw` (monolithicSparse).
    DenseVmdk,
    /// `text-stream.vmdk`: `qemu-img convert -O vmdk -o subformat=streamOptimized text.raw`.
    TextStreamVmdk,
    /// `dense.vhdx`: `qemu-img convert -O vhdx dense.raw` (dynamic).
    DenseVhdx,
}

impl Input {
    /// Every input, in generation order (an input's prerequisites come before it).
    pub(crate) const ALL: [Input; 15] = [
        Input::Dense,
        Input::Sparse,
        Input::Text,
        Input::DenseCopy,
        Input::SparseCopy,
        Input::DenseEnd,
        Input::DenseQcow2,
        Input::TextQcow2,
        Input::TextZlib,
        Input::TextZstd,
        Input::Small,
        Input::BenchW,
        Input::DenseVmdk,
        Input::TextStreamVmdk,
        Input::DenseVhdx,
    ];

    /// The file name in the scratch directory (what workloads write after `@`).
    pub(crate) fn file(self) -> &'static str {
        match self {
            Input::Dense => "dense.raw",
            Input::Sparse => "sparse.raw",
            Input::Text => "text.raw",
            Input::DenseCopy => "dense-copy.raw",
            Input::SparseCopy => "sparse-copy.raw",
            Input::DenseEnd => "dense-end.raw",
            Input::DenseQcow2 => "dense.qcow2",
            Input::TextQcow2 => "text.qcow2",
            Input::TextZlib => "text-zlib.qcow2",
            Input::TextZstd => "text-zstd.qcow2",
            Input::Small => "small.qcow2",
            Input::BenchW => "bench-w.raw",
            Input::DenseVmdk => "dense.vmdk",
            Input::TextStreamVmdk => "text-stream.vmdk",
            Input::DenseVhdx => "dense.vhdx",
        }
    }

    /// The input named `file`, if any.
    pub(crate) fn from_file(file: &str) -> Option<Input> {
        Input::ALL.into_iter().find(|i| i.file() == file)
    }

    /// The image format of the file (from its extension).
    pub(crate) fn format(self) -> &'static str {
        let f = self.file();
        if f.ends_with(".qcow2") {
            "qcow2"
        } else if f.ends_with(".vmdk") {
            "vmdk"
        } else if f.ends_with(".vhdx") {
            "vhdx"
        } else {
            "raw"
        }
    }

    /// Inputs this one is made from.
    fn prerequisites(self) -> &'static [Input] {
        match self {
            Input::DenseQcow2 | Input::DenseVmdk | Input::DenseVhdx => &[Input::Dense],
            Input::TextQcow2 | Input::TextZlib | Input::TextZstd | Input::TextStreamVmdk => {
                &[Input::Text]
            }
            _ => &[],
        }
    }

    /// Rough bytes on disk, for the free-space check.
    fn disk_bytes(self, opts: &Options) -> u64 {
        match self {
            Input::Dense
            | Input::DenseCopy
            | Input::DenseEnd
            | Input::DenseQcow2
            | Input::DenseVmdk
            | Input::DenseVhdx
            | Input::BenchW => opts.size,
            Input::TextStreamVmdk => opts.text_size / 2,
            Input::Sparse | Input::SparseCopy => opts.size / 4,
            Input::Text | Input::TextQcow2 => opts.text_size,
            Input::TextZlib | Input::TextZstd => opts.text_size / 2,
            Input::Small => SMALL_SIZE / 4,
        }
    }
}

/// Raw data patterns of [`generate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Every chunk holds random data.
    Dense,
    /// A random quarter of the 1 MiB chunks holds random data, the rest are holes.
    Sparse,
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
                let d = default_parent().join(format!(
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

    /// The path of a generated input.
    pub(crate) fn image(&self, input: Input) -> PathBuf {
        self.dir.join(input.file())
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
        for input in Input::ALL {
            let _ = fs::remove_file(self.image(input));
        }
        for tool in ["rimg", "qemu-img"] {
            for f in ["out-{}.raw", "out-{}.qcow2", "fresh-{}.qcow2"] {
                let _ = fs::remove_file(self.dir.join(f.replace("{}", tool)));
            }
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
pub(crate) fn generate(path: &Path, size: u64, kind: Fill, seed: u64) -> Result<u64> {
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
        Fill::Dense => (0..chunks).collect(),
        Fill::Sparse => {
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

/// Where the scratch directory goes by default: `$TMPDIR`, else `/var/tmp` (disk-backed by convention,
/// where `/tmp` is often a tmpfs, on which O_DIRECT fails and "disk" reads come from memory).
pub(crate) fn default_parent() -> PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// The type of the filesystem holding `dir` (`ext4`, `xfs`, `tmpfs` ...), from `stat -f`.
pub(crate) fn fs_type(dir: &Path) -> Option<String> {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
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

/// Writes `size` bytes of text-like data at `path`: lines of words drawn from a fixed random vocabulary of
/// lower-case words, which deflate shrinks to about 55 % and zstd to about 45 %.
/// Deterministic for a given `seed`. Returns the bytes written.
pub(crate) fn generate_text(path: &Path, size: u64, seed: u64) -> Result<u64> {
    let ctx = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(ctx)?;
    let mut rng = XorShift(seed | 1);
    let words: Vec<Vec<u8>> = (0..4000)
        .map(|_| {
            let len = 2 + rng.below(9);
            (0..len).map(|_| b'a' + rng.below(26) as u8).collect()
        })
        .collect();
    let mut buf = Vec::with_capacity(CHUNK as usize + 64);
    let mut off = 0;
    while off < size {
        buf.clear();
        while buf.len() < CHUNK as usize {
            for _ in 0..1 + rng.below(16) {
                buf.extend_from_slice(&words[rng.below(words.len() as u64) as usize]);
                buf.push(b' ');
            }
            buf.push(b'\n');
        }
        let len = CHUNK.min(size - off) as usize;
        file.write_all_at(&buf[..len], off).map_err(ctx)?;
        off += len as u64;
    }
    file.sync_all().map_err(ctx)?;
    Ok(size)
}

/// Runs qemu-img (the reference tool) to derive an input; fails with its stderr.
fn qemu_img(opts: &Options, args: &[&str]) -> Result<()> {
    let out = Command::new(&opts.qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", opts.qemu_img.display()))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Creates one input (its prerequisites exist already).
fn make(input: Input, opts: &Options, scratch: &Scratch) -> Result<()> {
    let path = scratch.image(input);
    let p = path_str(&path);
    let src = |i: Input| path_str(&scratch.image(i));
    let size = opts.size.to_string();
    match input {
        Input::Dense | Input::DenseCopy => {
            generate(&path, opts.size, Fill::Dense, DENSE_SEED)?;
        }
        Input::Sparse | Input::SparseCopy => {
            generate(&path, opts.size, Fill::Sparse, SPARSE_SEED)?;
        }
        Input::DenseEnd => {
            generate(&path, opts.size, Fill::Dense, DENSE_SEED)?;
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| format!("opening {p}: {e}"))?;
            let tail = opts.size.min(4096);
            file.write_all_at(&vec![0x5a; tail as usize], opts.size - tail)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("writing {p}: {e}"))?;
        }
        Input::Text => {
            generate_text(&path, opts.text_size, TEXT_SEED)?;
        }
        Input::DenseQcow2 => qemu_img(
            opts,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                &src(Input::Dense),
                &p,
            ],
        )?,
        Input::TextQcow2 => qemu_img(
            opts,
            &["convert", "-f", "raw", "-O", "qcow2", &src(Input::Text), &p],
        )?,
        Input::DenseVmdk => qemu_img(
            opts,
            &["convert", "-f", "raw", "-O", "vmdk", &src(Input::Dense), &p],
        )?,
        Input::TextStreamVmdk => qemu_img(
            opts,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                &src(Input::Text),
                &p,
            ],
        )?,
        Input::DenseVhdx => qemu_img(
            opts,
            &["convert", "-f", "raw", "-O", "vhdx", &src(Input::Dense), &p],
        )?,
        Input::TextZlib => qemu_img(
            opts,
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                &src(Input::Text),
                &p,
            ],
        )?,
        Input::TextZstd => qemu_img(
            opts,
            &[
                "convert",
                "-c",
                "-o",
                "compression_type=zstd",
                "-f",
                "raw",
                "-O",
                "qcow2",
                &src(Input::Text),
                &p,
            ],
        )?,
        Input::Small => {
            let raw = scratch.dir.join("small.raw");
            generate(&raw, SMALL_SIZE, Fill::Sparse, SPARSE_SEED ^ 1)?;
            let made = qemu_img(
                opts,
                &["convert", "-f", "raw", "-O", "qcow2", &path_str(&raw), &p],
            );
            let _ = fs::remove_file(&raw);
            made?;
        }
        Input::BenchW => qemu_img(
            opts,
            &[
                "create",
                "-q",
                "-f",
                "raw",
                "-o",
                "preallocation=full",
                &p,
                &size,
            ],
        )?,
    }
    Ok(())
}

/// Creates the inputs the selected workloads need, after checking there is room for them and the outputs.
pub(crate) fn prepare_inputs(opts: &Options, scratch: &Scratch) -> Result<()> {
    let mut wanted: Vec<Input> = opts.workloads.iter().flat_map(|w| w.inputs()).collect();
    let direct = wanted.clone();
    for i in direct {
        wanted.extend_from_slice(i.prerequisites());
    }
    let plan: Vec<Input> = Input::ALL
        .into_iter()
        .filter(|i| wanted.contains(i))
        .collect();
    let data: u64 = plan.iter().map(|i| i.disk_bytes(opts)).sum();
    let outputs = if opts
        .workloads
        .iter()
        .any(|w| w.has_output() || w.needs_fresh())
    {
        2 * opts.size.max(opts.text_size)
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
    for input in plan {
        let start = Instant::now();
        make(input, opts, scratch)?;
        let meta = fs::metadata(scratch.image(input))
            .map_err(|e| format!("stat {}: {e}", scratch.image(input).display()))?;
        println!(
            "generated {} ({} MiB, {} MiB allocated) in {:.1} s",
            input.file(),
            meta.len() >> 20,
            (meta.blocks() * 512) >> 20,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_names_round_trip() {
        for i in Input::ALL {
            assert_eq!(Input::from_file(i.file()), Some(i));
            for p in i.prerequisites() {
                let pos = |x: &Input| Input::ALL.iter().position(|y| y == x);
                assert!(
                    pos(p) < pos(&i),
                    "{i:?} is made from {p:?}, which must come first"
                );
            }
        }
    }

    #[test]
    fn sparse_image_is_a_quarter_allocated_and_reproducible() {
        let dir = std::env::temp_dir().join(format!("rimg-sbs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
        let size = 16 * CHUNK + 4096;
        assert_eq!(generate(&a, size, Fill::Sparse, 7).unwrap(), 4 * CHUNK);
        generate(&b, size, Fill::Sparse, 7).unwrap();
        assert_eq!(fs::metadata(&a).unwrap().len(), size);
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert_eq!(generate(&a, size, Fill::Dense, 7).unwrap(), size);
        generate_text(&a, 3 * CHUNK + 5, 7).unwrap();
        let text = fs::read(&a).unwrap();
        assert_eq!(text.len() as u64, 3 * CHUNK + 5);
        assert!(text
            .iter()
            .all(|&c| c == b' ' || c == b'\n' || c.is_ascii_lowercase()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
