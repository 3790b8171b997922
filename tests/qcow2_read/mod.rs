//! Reading qcow2: images built by the real `qemu-img create` and `qemu-io` over the qcow2 feature
//! matrix (compat 0.10 and 1.1, 512 B to 2 MiB clusters, extended L2, refcount widths, zlib and
//! zstd, external data files, lazy refcounts), backing chains three deep, and damaged headers and
//! tables. For each, `convert -O raw` must produce the bytes qemu-img produces, `info`, `map` and
//! `compare` must print what qemu-img prints, and a damaged image must give one error line, no
//! panic, no hang and no change to the file.
//!
//! Images live in the twin's shared directory and are named `../s/NAME` from both sides; the
//! tools never write to them. External data files are named by absolute path (qemu resolves a
//! relative `data_file` against the working directory, see [`qcow2_data_file_relative_name`]).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::util::{
    files_equal, skip, Checks, Cmd, Dir, FileState, Pair, Run, Tool, Twin, K, M, QEMU_IO,
};

mod chains;
mod damaged;

/// Virtual size of the matrix images: nine 4 MiB slots and a tail that ends mid-cluster.
const SIZE: u64 = 36 * M + 1536;

/// How long one command on a damaged image may run before it counts as a hang.
const BAD_TIMEOUT: Duration = Duration::from_secs(20);

/// Address-space limit for rimg on damaged images: a table size read from the image must not
/// turn into a giant allocation.
const BAD_AS_LIMIT: &str = "--as=4294967296";

/// `L2`/`L1` entry flag: refcount is exactly one.
const QCOW_OFLAG_COPIED: u64 = 1 << 63;

/// Host offset bits of an L1 or standard L2 entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

// ---------------------------------------------------------------------------------------------
// Building images

/// Run the real qemu-io on `image` (of format `fmt`) in `dir` with `-c` commands.
fn qemu_io(dir: &Dir, fmt: &str, image: &str, commands: &[String]) -> Run {
    let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
    for c in commands {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(image.into());
    Cmd::new(QEMU_IO, "qemu-io", dir.path()).args(&args).run()
}

/// `qemu-img create -f qcow2 -o OPTS NAME SIZE` in `dir`; fails the test on error.
fn create_qcow2(dir: &Dir, name: &str, opts: &str, size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size.as_str()]);
    dir.qemu(&args).assert_ok();
}

/// `qemu-img create -f qcow2 -b BACKING -F BACKING_FMT NAME SIZE` in `dir`.
fn create_overlay(dir: &Dir, name: &str, opts: &str, backing: &str, backing_fmt: &str, size: u64) {
    let size = size.to_string();
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
    ];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size.as_str()]);
    dir.qemu(&args).assert_ok();
}

/// Overwrite bytes of an existing file in place.
fn patch(dir: &Dir, name: &str, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .unwrap_or_else(|e| panic!("open {name} for patching: {e}"));
    f.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("patch {name} at {offset}: {e}"));
}

fn read_at<const N: usize>(dir: &Dir, name: &str, offset: u64) -> [u8; N] {
    let f = std::fs::File::open(dir.join(name)).unwrap_or_else(|e| panic!("open {name}: {e}"));
    let mut b = [0u8; N];
    f.read_exact_at(&mut b, offset)
        .unwrap_or_else(|e| panic!("read {name} at {offset}: {e}"));
    b
}

fn be32(dir: &Dir, name: &str, offset: u64) -> u32 {
    u32::from_be_bytes(read_at::<4>(dir, name, offset))
}

fn be64(dir: &Dir, name: &str, offset: u64) -> u64 {
    u64::from_be_bytes(read_at::<8>(dir, name, offset))
}

fn set_be32(dir: &Dir, name: &str, offset: u64, v: u32) {
    patch(dir, name, offset, &v.to_be_bytes());
}

fn set_be64(dir: &Dir, name: &str, offset: u64, v: u64) {
    patch(dir, name, offset, &v.to_be_bytes());
}

/// Header field offsets (qcow2 spec, all big-endian).
mod hdr {
    pub const VERSION: u64 = 4;
    pub const CLUSTER_BITS: u64 = 20;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const HEADER_LENGTH: u64 = 100;
}

/// The qemu-io commands that fill a matrix image with cluster size `c`: the main script, and
/// the compressed writes (run separately, since qemu-io refuses them for some layouts).
fn scripts(c: u64, size: u64) -> (Vec<String>, Vec<String>) {
    let k = c.max(64 * K);
    let sc = (c / 32).max(512);
    let main = vec![
        // slot 0: aligned, then unaligned across a cluster boundary
        format!("write -P 0x11 0 {k}"),
        format!("write -P 0x22 {} 5000", k + 1000),
        // slot 1: plain zero clusters over nothing
        format!("write -z {} {k}", 4 * M),
        // slot 2: zeroes over allocated data (allocated zero clusters), and unmapped zeroes
        format!("write -P 0x44 {} {}", 8 * M, 2 * k),
        format!("write -z {} {k}", 8 * M),
        format!("write -z -u {} {k}", 8 * M + k),
        // slot 4: data with a discarded cluster, and a partial discard (ignored by qemu)
        format!("write -P 0x66 {} {}", 16 * M, (4 * k).min(4 * M)),
        format!("discard {} {k}", 16 * M + k),
        format!("discard {} 1024", 16 * M + 512),
        // slot 5: partial subcluster writes, a zeroed and a discarded subcluster
        format!("write -P 0x77 {} 1000", 20 * M + 512),
        format!("write -P 0x78 {} {sc}", 20 * M + 3 * sc),
        format!("write -z {} {sc}", 20 * M + 5 * sc),
        format!("write -P 0x79 {} {}", 20 * M + 8 * sc, 4 * sc),
        format!("discard {} {sc}", 20 * M + 9 * sc),
        format!("write -z {} {sc}", 20 * M + 10 * sc),
        // slot 6: 1 MiB of data with unmapped zeroes in its middle
        format!("write -P 0x99 {} {M}", 24 * M),
        format!("write -z -u {} {}", 24 * M + 256 * K, 512 * K),
        // the last 3000 bytes of the disk
        format!("write -P 0x33 {} 3000", size - 3000),
    ];
    let compressed = vec![
        // slot 3: compressed clusters, one of them then partly overwritten
        format!("write -c -P 0x55 {} {}", 12 * M, 2 * k),
        format!("write -P 0x56 {} 200", 12 * M + k + 100),
    ];
    (main, compressed)
}

/// One image of the feature matrix.
struct Spec {
    /// file name in the shared directory
    name: &'static str,
    /// `-o` options of `qemu-img create`; `DATA` stands for the absolute data file path
    opts: &'static str,
    /// cluster size the options select
    cluster: u64,
    /// set the dirty bit afterwards (an image not closed cleanly with lazy refcounts)
    dirty: bool,
}

const fn spec(name: &'static str, opts: &'static str, cluster: u64) -> Spec {
    Spec {
        name,
        opts,
        cluster,
        dirty: false,
    }
}

/// Build `name` (and its data file) in `dir` from `spec` with the matrix scripts, plus `extra`
/// qemu-io commands at the end.
fn build_image(dir: &Dir, spec: &Spec, name: &str, extra: &[String]) {
    let data = dir.join(&format!("{name}.data"));
    let opts = spec.opts.replace("DATA", &data.to_string_lossy());
    create_qcow2(dir, name, &opts, SIZE);
    let (main, compressed) = scripts(spec.cluster, SIZE);
    qemu_io(dir, "qcow2", name, &main).assert_ok();
    let run = qemu_io(dir, "qcow2", name, &compressed);
    if !run.ok() {
        skip(&format!(
            "{name} ({}): qemu-io refused the compressed writes:\n{}",
            spec.opts,
            run.describe()
        ));
    }
    if !extra.is_empty() {
        qemu_io(dir, "qcow2", name, extra).assert_ok();
    }
    if spec.dirty {
        let f = be64(dir, name, hdr::INCOMPATIBLE_FEATURES);
        set_be64(dir, name, hdr::INCOMPATIBLE_FEATURES, f | 1);
    }
}

/// Every file in the shared directory and its state now.
fn shared_states(twin: &Twin) -> Vec<(String, FileState)> {
    let mut names: Vec<String> = std::fs::read_dir(twin.s.path())
        .expect("list the shared dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        if twin.s.join(&n).is_dir() {
            for e in std::fs::read_dir(twin.s.join(&n)).expect("list a sub dir") {
                let sub = format!(
                    "{n}/{}",
                    e.expect("dir entry").file_name().to_string_lossy()
                );
                out.push((sub.clone(), twin.s.state(&sub)));
            }
        } else {
            out.push((n.clone(), twin.s.state(&n)));
        }
    }
    out
}

/// Record a failure for every shared file that is not as it was in `before`.
fn shared_unchanged(c: &mut Checks, twin: &Twin, before: &[(String, FileState)], what: &str) {
    for (name, state) in before {
        let now = twin.s.state(name);
        c.check(now == *state, || {
            format!("`{what}` changed the input file {name}: it was {state}, it is now {now}")
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Differential checks of a readable image

/// The read-only commands compared on every readable image `img` (named from `q`).
fn read_only_commands(img: &str) -> Vec<Vec<String>> {
    let v: Vec<Vec<&str>> = vec![
        vec!["info", img],
        vec!["info", "--output=json", img],
        vec!["info", "--backing-chain", img],
        vec!["info", "--backing-chain", "--output=json", img],
        vec!["info", "-f", "qcow2", "-U", img],
        vec!["map", img],
        vec!["map", "--output=json", img],
        vec![
            "map",
            "-f",
            "qcow2",
            "--output=json",
            "-s",
            "3M",
            "-l",
            "20M",
            img,
        ],
    ];
    v.into_iter()
        .map(|a| a.into_iter().map(String::from).collect())
        .collect()
}

/// `Ok` when the two files hold the same bytes. `cmp` decides (the byte loop of [`files_equal`]
/// is slow in a debug build); [`files_equal`] says where they differ.
fn same_bytes(a: &Path, b: &Path) -> Result<(), String> {
    let same = std::process::Command::new("cmp")
        .arg("-s")
        .args([a, b])
        .status()
        .is_ok_and(|st| st.success());
    if same {
        Ok(())
    } else {
        files_equal(a, b).and(Err(format!(
            "cmp says {} and {} differ",
            a.display(),
            b.display()
        )))
    }
}

/// Run `convert OPTS SRC OUT` with both tools (with `env`), each into its own directory, and
/// require the same outputs and byte-identical targets.
fn check_convert(
    c: &mut Checks,
    twin: &Twin,
    opts: &[&str],
    src: &str,
    out: &str,
    env: &[(&str, &str)],
) {
    let mut args: Vec<&str> = vec!["convert"];
    args.extend_from_slice(opts);
    args.extend([src, out]);
    let pair = twin.run_env(&args, env);
    let what = || {
        let e: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        format!("{}{}", e.concat(), args.join(" "))
    };
    c.same(&pair);
    if pair.both_ok() {
        c.result(
            same_bytes(&twin.q.join(out), &twin.r.join(out))
                .map_err(|e| format!("`{}`: rimg's target differs from qemu-img's: {e}", what())),
        );
    } else {
        c.result(
            twin.same_file(out)
                .map_err(|e| format!("`{}`: {e}", what())),
        );
    }
}

/// Everything the matrix and the chain tests compare on one readable image `../s/NAME`:
/// info, map, convert (default, `-T none`, `RIMG_IO=threads`), compare with qemu-img's
/// conversion (both ways), and compare with `other` (an image that differs), if any.
fn check_readable(c: &mut Checks, twin: &Twin, name: &str, other: Option<&str>) {
    let img = format!("../s/{name}");
    for args in read_only_commands(&img) {
        let pair = twin.q.both(&args);
        c.same(&pair);
        if args.iter().any(|a| a.contains("json")) && pair.rimg.ok() {
            c.check(
                serde_json::from_slice::<serde_json::Value>(&pair.rimg.stdout).is_ok(),
                || format!("rimg's JSON does not parse\n{}", pair.rimg.describe()),
            );
        }
    }
    let out = format!("{name}.raw");
    check_convert(c, twin, &["-O", "raw"], &img, &out, &[]);
    check_convert(
        c,
        twin,
        &["-f", "qcow2", "-T", "none", "-O", "raw"],
        &img,
        &format!("{name}-T-none.raw"),
        &[],
    );
    check_convert(
        c,
        twin,
        &["-O", "raw"],
        &img,
        &format!("{name}-threads.raw"),
        &[("RIMG_IO", "threads")],
    );
    // qemu-img's own conversion (in q) compared with the image
    if twin.q.exists(&out) {
        for args in [
            vec!["compare", img.as_str(), out.as_str()],
            vec![
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                out.as_str(),
                img.as_str(),
            ],
            vec![
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                img.as_str(),
                out.as_str(),
            ],
        ] {
            let pair = twin.q.both(&args);
            c.same(&pair);
            c.check(pair.qemu.code() == Some(0), || {
                format!(
                    "qemu-img does not call its own conversion identical\n{}",
                    pair.qemu.describe()
                )
            });
        }
    }
    if let Some(other) = other {
        let o = format!("../s/{other}");
        for args in [
            vec!["compare", img.as_str(), o.as_str()],
            vec!["compare", o.as_str(), img.as_str()],
        ] {
            let pair = twin.q.both(&args);
            c.same(&pair);
            c.check(pair.qemu.code() == Some(1), || {
                format!(
                    "the two images were meant to differ\n{}",
                    pair.qemu.describe()
                )
            });
        }
    }
}

/// Build every image of `specs` (and a variant that differs in one byte of the compressed slot)
/// and check each.
fn check_matrix(specs: &[Spec]) {
    let twin = Twin::new();
    let mut c = Checks::new();
    let differ = vec![format!("write -P 0xee {} 1", 12 * M + 300)];
    for spec in specs {
        build_image(&twin.s, spec, spec.name, &[]);
        build_image(&twin.s, spec, &format!("{}-b", spec.name), &differ);
    }
    let before = shared_states(&twin);
    for spec in specs {
        check_readable(&mut c, &twin, spec.name, Some(&format!("{}-b", spec.name)));
    }
    shared_unchanged(&mut c, &twin, &before, "the commands above");
    c.finish();
}

#[test]
fn qcow2_read_versions_and_cluster_sizes() {
    check_matrix(&[
        spec("v2", "compat=0.10", 64 * K),
        spec("v2-512", "compat=0.10,cluster_size=512", 512),
        spec("v3", "compat=1.1", 64 * K),
        spec("c512", "cluster_size=512", 512),
        spec("c4k", "cluster_size=4k", 4 * K),
        spec("c2m", "cluster_size=2M", 2 * M),
    ]);
}

#[test]
fn qcow2_read_extended_l2() {
    check_matrix(&[
        spec("ext64k", "extended_l2=on,cluster_size=64k", 64 * K),
        spec("ext2m", "extended_l2=on,cluster_size=2M", 2 * M),
        spec(
            "ext32k-zstd",
            "extended_l2=on,cluster_size=32k,compression_type=zstd",
            32 * K,
        ),
    ]);
}

#[test]
fn qcow2_read_refcounts_compression_lazy() {
    check_matrix(&[
        spec("rc1", "refcount_bits=1", 64 * K),
        spec("rc64", "refcount_bits=64", 64 * K),
        spec("zstd", "compression_type=zstd", 64 * K),
        spec("zstd-4k", "compression_type=zstd,cluster_size=4k", 4 * K),
        spec("lazy", "lazy_refcounts=on", 64 * K),
        Spec {
            dirty: true,
            ..spec("lazy-dirty", "lazy_refcounts=on", 64 * K)
        },
    ]);
}

#[test]
fn qcow2_read_data_file() {
    check_matrix(&[
        spec("df", "data_file=DATA", 64 * K),
        spec("df-raw", "data_file=DATA,data_file_raw=on", 64 * K),
        spec(
            "df-ext",
            "data_file=DATA,extended_l2=on,cluster_size=128k",
            128 * K,
        ),
    ]);
}

/// qemu-img 10.0 resolves a relative `data_file` name against its working directory, not
/// against the image's directory as it does for backing files (`qemu-img create` puts the data
/// file there too), and `info` does not open the data file at all: rimg must find the same file,
/// or fail the same way.
#[test]
fn qcow2_data_file_relative_name() {
    let twin = Twin::new();
    let mut c = Checks::new();
    let s = &twin.s;
    // made from s: the header says `sub/img.data`, which is s/sub/img.data
    s.mkdir("sub");
    create_qcow2(s, "sub/img", "data_file=sub/img.data", 4 * M);
    qemu_io(
        s,
        "qcow2",
        "sub/img",
        &["write -P 0x5a 64k 64k".to_string()],
    )
    .assert_ok();
    // made from s/sub2: the header says `img.data`, which is s/sub2/img.data
    s.mkdir("sub2");
    let sub2 = Dir::at(s.join("sub2"));
    create_qcow2(&sub2, "img", "data_file=img.data", 4 * M);
    qemu_io(&sub2, "qcow2", "img", &["write -P 0x5b 0 64k".to_string()]).assert_ok();
    let before = shared_states(&twin);
    // the names resolve (for qemu-img) from the directory each image was made in, and from
    // nowhere else: `info` still works there, `map` does not
    for (dir, img) in [
        (s, "sub/img"),
        (&twin.q, "../s/sub/img"),
        (&sub2, "img"),
        (s, "sub2/img"),
    ] {
        for args in [
            vec!["info", img],
            vec!["info", "--output=json", img],
            vec!["map", "--output=json", img],
        ] {
            c.same(&dir.both(&args));
        }
    }
    shared_unchanged(&mut c, &twin, &before, "the commands above");
    c.finish();
}

/// Offset of the header extension with `magic` (its 8-byte type and length come first).
fn header_extension(s: &Dir, name: &str, magic: u32) -> Option<u64> {
    // version 2 headers end at 72 bytes, version 3 headers say where they end
    let mut off = match be32(s, name, hdr::VERSION) {
        2 => 72,
        _ => be32(s, name, hdr::HEADER_LENGTH) as u64,
    };
    loop {
        match be32(s, name, off) {
            0 => return None,
            m if m == magic => return Some(off),
            _ => off += 8 + (be32(s, name, off + 4) as u64).div_ceil(8) * 8,
        }
    }
}
