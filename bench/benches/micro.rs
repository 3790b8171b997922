//! criterion micro-benchmarks of rimg's hot CPU paths: `cargo bench -p rimg-bench` (or
//! `cargo bench -p rimg-bench -- qcow2_map` for one group).
//!
//! - `qcow2_map`: `Image::map` over one full L2 table (8192 clusters of 64 KiB = 512 MiB) of a qcow2
//!   made by qemu-img, through the public rimg-formats API: every cluster allocated contiguously
//!   (`preallocation=metadata`, the extents merge into one) and every other cluster allocated (8192
//!   extents that cannot merge). Skipped, with a message, where qemu-img is missing.
//! - `zero_detect`: the engine's zero detection on 64 KiB and 1 MiB of zeros (the whole buffer is
//!   scanned), against the plain `iter().all()` it replaces.
//! - `codec`: zlib (raw deflate, 4 KiB window, default level, reused state) and zstd (level 0)
//!   compression and decompression of one 64 KiB cluster of text-like data.
//! - `arena`: taking and returning buffers of the engine's registered-buffer arena.
//!
//! Zero detection and the codec calls are `pub(crate)` in rimg-engine (`zero::is_zero`,
//! `compress::compress`, `decompress::decode`), so this file benchmarks copies of exactly those calls,
//! with the same crates and settings; keep them in step with engine/src/{zero,compress,decompress}.rs.

use std::hint::black_box;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rimg_engine::io::Arena;
use rimg_formats::driver::{Access, OpenOptions};
use rimg_formats::file::FileOpen;
use rimg_formats::{registry, Extent, FileLayer, GuestOff, Image};

/// Cluster size of the qcow2 images and of the codec benchmarks.
const CLUSTER: u64 = 64 << 10;

/// Guest bytes one L2 table of 64 KiB clusters covers (8192 entries).
const L2_SPAN: u64 = 8192 * CLUSTER;

/// Runs qemu-img; `false` (and a message) when it is missing or fails.
fn qemu_img(args: &[&str]) -> bool {
    match Command::new("qemu-img")
        .args(args)
        .stdout(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "qemu-img {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("qemu-img not runnable ({e})");
            false
        }
    }
}

/// Opens a qcow2 image read-only through rimg-formats.
fn open_qcow2(path: &Path) -> Box<dyn Image> {
    let p = path.to_str().expect("a UTF-8 temp path");
    let file = FileLayer::open(p, &FileOpen::read_only()).expect("open the image file");
    registry::find("qcow2")
        .expect("the qcow2 driver")
        .open(Arc::new(file), &OpenOptions::new(Access::Read))
        .expect("open the qcow2 image")
}

/// Maps the whole image, as convert's planner does, and returns the number of extents.
fn map_all(img: &dyn Image, out: &mut Vec<Extent>) -> usize {
    out.clear();
    let size = img.virtual_size();
    let mut off = 0;
    while off < size {
        let n = img
            .map(GuestOff(off), size - off, out)
            .expect("map the image");
        assert!(n > 0, "map made no progress at {off}");
        off += n;
    }
    out.len()
}

/// `Image::map` over one full L2 table.
fn qcow2_map(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let size = L2_SPAN.to_string();
    let dense = dir.path().join("dense.qcow2");
    let alternating = dir.path().join("alternating.qcow2");
    let raw = dir.path().join("alternating.raw");
    // Every other cluster holds one non-zero byte: qemu-img allocates those and leaves the rest out.
    let made = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        dense.to_str().expect("UTF-8"),
        &size,
    ]) && {
        let f = std::fs::File::create(&raw).expect("create the raw source");
        f.set_len(L2_SPAN).expect("size the raw source");
        for cluster in (0..L2_SPAN / CLUSTER).step_by(2) {
            std::os::unix::fs::FileExt::write_all_at(&f, &[1], cluster * CLUSTER)
                .expect("write the raw source");
        }
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().expect("UTF-8"),
            alternating.to_str().expect("UTF-8"),
        ])
    };
    if !made {
        eprintln!("qcow2_map: skipped (needs qemu-img to build the images)");
        return;
    }
    let mut g = c.benchmark_group("qcow2_map");
    g.throughput(Throughput::Elements(L2_SPAN / CLUSTER));
    for (name, path, want) in [
        ("contiguous", &dense, 1),
        (
            "every-other-cluster",
            &alternating,
            (L2_SPAN / CLUSTER) as usize,
        ),
    ] {
        let img = open_qcow2(path);
        let mut out = Vec::new();
        assert_eq!(map_all(img.as_ref(), &mut out), want, "{name}: extents");
        g.bench_function(name, |b| {
            b.iter(|| black_box(map_all(img.as_ref(), &mut out)))
        });
    }
    g.finish();
}

/// Copy of `rimg_engine::zero::is_zero` (pub(crate)): OR 64-byte blocks word by word.
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Zero detection over all-zero buffers (the worst case: every byte is read).
fn zero_detect(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_detect");
    for len in [CLUSTER as usize, 1 << 20] {
        let buf = vec![0u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("engine", len), &buf, |b, buf| {
            b.iter(|| is_zero(black_box(buf)))
        });
        g.bench_with_input(BenchmarkId::new("iter-all", len), &buf, |b, buf| {
            b.iter(|| black_box(buf).iter().all(|&x| x == 0))
        });
    }
    g.finish();
}

/// One cluster of text-like data (words from a small vocabulary); deflate shrinks it to a little over
/// half.
fn text_cluster() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let words: Vec<Vec<u8>> = (0..4000)
        .map(|_| (0..2 + next(9)).map(|_| b'a' + next(26) as u8).collect())
        .collect();
    let mut out = Vec::with_capacity(CLUSTER as usize + 16);
    while out.len() < CLUSTER as usize {
        out.extend_from_slice(&words[next(words.len() as u64) as usize]);
        out.push(if next(12) == 0 { b'\n' } else { b' ' });
    }
    out.truncate(CLUSTER as usize);
    out
}

/// As `rimg_engine::compress::compress` for `Codec::Zlib`: raw deflate, window bits 12, default level,
/// one reused `Compress` per thread (reset per cluster).
fn deflate(z: &mut flate2::Compress, input: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    z.reset();
    out.reserve(input.len() - 1);
    let st = z
        .compress_vec(input, out, flate2::FlushCompress::Finish)
        .expect("deflate");
    st == flate2::Status::StreamEnd && out.len() < input.len()
}

/// As `rimg_engine::decompress::decode` for `Codec::Zlib`: a fresh raw `Decompress` per cluster.
fn inflate(input: &[u8], out: &mut [u8]) {
    let mut d = flate2::Decompress::new(false);
    while (d.total_out() as usize) < out.len() {
        let (i, o) = (d.total_in() as usize, d.total_out() as usize);
        d.decompress(&input[i..], &mut out[o..], flate2::FlushDecompress::Finish)
            .expect("inflate");
        assert!(
            d.total_in() as usize != i || d.total_out() as usize != o,
            "inflate made no progress"
        );
    }
}

/// As `rimg_engine::decompress::decode` for `Codec::Zstd`: a raw streaming decoder per cluster.
fn zstd_decode(input: &[u8], out: &mut [u8]) {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().expect("zstd decoder");
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    while outb.pos() < outb.capacity() {
        let before = (inb.pos(), outb.pos());
        d.run(&mut inb, &mut outb).expect("zstd decode");
        assert!((inb.pos(), outb.pos()) != before, "zstd made no progress");
    }
}

/// zlib and zstd on one 64 KiB cluster, both ways.
fn codec(c: &mut Criterion) {
    let data = text_cluster();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(CLUSTER));

    let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
    let mut zout = Vec::new();
    assert!(deflate(&mut z, &data, &mut zout));
    g.bench_function("zlib-compress", |b| {
        b.iter(|| deflate(&mut z, black_box(&data), &mut zout))
    });
    let zlib = zout.clone();
    let mut plain = vec![0u8; CLUSTER as usize];
    inflate(&zlib, &mut plain);
    assert_eq!(plain, data, "zlib round trip");
    g.bench_function("zlib-decompress", |b| {
        b.iter(|| inflate(black_box(&zlib), &mut plain))
    });

    g.bench_function("zstd-compress", |b| {
        b.iter(|| zstd::bulk::compress(black_box(&data), 0).expect("zstd"))
    });
    let zst = zstd::bulk::compress(&data, 0).expect("zstd");
    zstd_decode(&zst, &mut plain);
    assert_eq!(plain, data, "zstd round trip");
    g.bench_function("zstd-decompress", |b| {
        b.iter(|| zstd_decode(black_box(&zst), &mut plain))
    });
    g.finish();
    eprintln!(
        "codec: 64 KiB text-like cluster -> zlib {} bytes, zstd {} bytes",
        zlib.len(),
        zst.len()
    );
}

/// The engine's buffer arena (64 MiB of 1 MiB buffers, its default budget and unit).
fn arena(c: &mut Criterion) {
    let mut g = c.benchmark_group("arena");
    let mut a = Arena::new(64 << 20, 1 << 20).expect("an arena");
    g.bench_function("take-put", |b| {
        b.iter(|| {
            let buf = a.take().expect("a free buffer");
            a.put(black_box(buf));
        })
    });
    g.bench_function("take-all-put-all-64", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            while let Some(buf) = a.take() {
                out.push(buf);
            }
            for buf in out.drain(..) {
                a.put(buf);
            }
        })
    });
    g.bench_function("new-64MiB", |b| {
        b.iter(|| Arena::new(black_box(64 << 20), 1 << 20).expect("an arena"))
    });
    g.finish();
}

/// Short runs: these are CPU-bound loops whose numbers settle within a second or two.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = micro;
    config = config();
    targets = qcow2_map, zero_detect, codec, arena
}
criterion_main!(micro);
