//! Writing qcow2: what rimg writes must pass the real `qemu-img check` and compare equal
//! with `qemu-img compare`, and a convert killed at any moment must leave an image that
//! `qemu-img check` finds at most leaks in (exit 0 or 3), never corruption.

use std::time::Duration;

use crate::util::{Checks, Cmd, TestDir, Tool, XorShift, M};

/// A source with data, zeros and holes: 32 MiB, every other MiB random, one MiB of text-like
/// (compressible) data, the rest holes.
fn make_source(d: &TestDir) {
    d.sparse("src.raw", 32 * M);
    let mut cmds = Vec::new();
    for i in (0..32u64).step_by(2) {
        cmds.push(format!("write -P {} {}M 1M", (i * 7 + 1) % 251, i));
    }
    cmds.push("write -z 4M 1M".into());
    d.qemu_io("src.raw", &cmds);
}

fn qemu_img(d: &TestDir, args: &[&str]) -> crate::util::Run {
    d.qemu(args)
}

/// `convert -n -O qcow2` into images qemu-img created, for several layouts: check clean,
/// content identical.
#[test]
fn convert_into_qemu_created_qcow2() {
    let d = TestDir::new();
    make_source(&d);
    let mut c = Checks::new();
    for opts in [
        "cluster_size=65536",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "compat=0.10",
        "compression_type=zstd",
        "data_file=t.data",
    ] {
        for extra in [&[][..], &["-c"][..]] {
            if opts.starts_with("data_file") && !extra.is_empty() {
                continue; // qemu has no compression with external data files
            }
            let _ = std::fs::remove_file(d.join("t.qcow2"));
            qemu_img(
                &d,
                &["create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "32M"],
            )
            .assert_ok();
            let mut args = vec!["convert", "-n", "-f", "raw", "-O", "qcow2"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["src.raw", "t.qcow2"]);
            let r = d.rimg(&args);
            c.no_panic(&r);
            c.check(r.ok(), || {
                format!("rimg convert ({opts} {extra:?}) failed\n{}", r.describe())
            });
            let chk = qemu_img(&d, &["check", "t.qcow2"]);
            c.check(chk.code() == Some(0), || {
                format!(
                    "qemu-img check after rimg convert ({opts} {extra:?})\n{}",
                    chk.describe()
                )
            });
            let cmp = qemu_img(
                &d,
                &["compare", "-f", "raw", "-F", "qcow2", "src.raw", "t.qcow2"],
            );
            c.check(cmp.code() == Some(0), || {
                format!(
                    "qemu-img compare after rimg convert ({opts} {extra:?})\n{}",
                    cmp.describe()
                )
            });
        }
    }
    c.finish();
}

/// Kill rimg at random moments of a rate-limited convert into qcow2: the image must never be
/// corrupt (qemu-img check exit 0 or 3).
#[test]
fn killed_convert_leaves_at_most_leaks() {
    let d = TestDir::new();
    make_source(&d);
    let mut c = Checks::new();
    let mut rng = XorShift::new(42);
    for round in 0..8 {
        let compress = round % 2 == 1;
        let _ = std::fs::remove_file(d.join("k.qcow2"));
        qemu_img(
            &d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "k.qcow2",
                "32M",
            ],
        )
        .assert_ok();
        let mut args = vec!["convert", "-n", "-r", "24M", "-f", "raw", "-O", "qcow2"];
        if compress {
            args.push("-c");
        }
        args.extend_from_slice(&["src.raw", "k.qcow2"]);
        let mut child = Cmd::new(Tool::Rimg.program(), "rimg", d.path())
            .arg0("qemu-img")
            .args(&args)
            .spawn_quiet();
        let wait_ms = 20 + rng.next_u64() % 700;
        std::thread::sleep(Duration::from_millis(wait_ms));
        let _ = child.kill();
        let _ = child.wait();
        let chk = qemu_img(&d, &["check", "k.qcow2"]);
        c.check(matches!(chk.code(), Some(0) | Some(3)), || {
            format!(
                "round {round} (compress {compress}, killed after {wait_ms} ms): qemu-img check found corruption\n{}",
                chk.describe()
            )
        });
    }
    c.finish();
}

/// `create -f qcow2` with many option sets: the same Formatting line, exit code and
/// stderr as qemu-img, and a byte-identical file.
#[test]
fn create_matches_qemu_byte_for_byte() {
    let twin = crate::util::Twin::new();
    twin.each(|d| {
        d.sparse("base.raw", 8 * M);
    });
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "i.qcow2", "1G"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "i.qcow2",
            "100M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            "i.qcow2",
            "30M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M,extended_l2=on",
            "i.qcow2",
            "3G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts,compression_type=zstd",
            "i.qcow2",
            "5M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "i.qcow2",
            "3M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full,cluster_size=4k",
            "i.qcow2",
            "1M",
        ],
        &[
            "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "i.qcow2",
        ],
        &["create", "-f", "qcow2", "-b", "base.raw", "i.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=i.data",
            "i.qcow2",
            "2M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "i.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "i.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "i.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "-o", "i.qcow2", "1M"],
    ];
    for args in cases {
        twin.each(|d| {
            let _ = std::fs::remove_file(d.join("i.qcow2"));
            let _ = std::fs::remove_file(d.join("i.data"));
        });
        let pair = twin.run(args);
        c.same(&pair);
        for f in ["i.qcow2", "i.data"] {
            let (q, r) = (
                std::fs::read(twin.q.join(f)).ok(),
                std::fs::read(twin.r.join(f)).ok(),
            );
            c.check(q == r, || {
                format!("`{}`: {f} differs from qemu-img's", args.join(" "))
            });
        }
    }
    c.finish();
}

/// `measure -O qcow2` and `convert -O qcow2` (plain, `-c`, `-B`) and `resize` of qcow2.
#[test]
fn measure_convert_resize_qcow2() {
    let d = TestDir::new();
    make_source(&d);
    let mut c = Checks::new();
    for args in [
        &["measure", "-O", "qcow2", "--size", "1G"][..],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "--size",
            "3G",
        ][..],
        &["measure", "-O", "qcow2", "-f", "raw", "src.raw"][..],
        &[
            "measure",
            "-O",
            "qcow2",
            "--output=json",
            "-f",
            "raw",
            "src.raw",
        ][..],
    ] {
        c.same(&d.both(args));
    }
    for extra in [
        &[][..],
        &["-c"][..],
        &["-o", "cluster_size=4k,compression_type=zstd", "-c"][..],
    ] {
        let _ = std::fs::remove_file(d.join("o.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["src.raw", "o.qcow2"]);
        let r = d.rimg(&args);
        c.check(r.ok() && r.err().is_empty(), || r.describe());
        let chk = d.qemu(&["check", "o.qcow2"]);
        c.check(chk.code() == Some(0), || chk.describe());
        let cmp = d.qemu(&["compare", "-f", "raw", "src.raw", "o.qcow2"]);
        c.check(cmp.code() == Some(0), || cmp.describe());
    }
    // -B: an overlay of o.qcow2 holding only what differs.
    d.qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "o.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ])
    .assert_ok();
    d.qemu_io_fmt(
        "qcow2",
        "top.qcow2",
        &["write -P 0x5a 3M 100k", "write -z 6M 1M"],
    );
    let r = d.rimg(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "o.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "b.qcow2",
    ]);
    c.check(r.ok(), || r.describe());
    let chk = d.qemu(&["check", "b.qcow2"]);
    c.check(chk.code() == Some(0), || chk.describe());
    let cmp = d.qemu(&["compare", "top.qcow2", "b.qcow2"]);
    c.check(cmp.code() == Some(0), || cmp.describe());
    let size = d.qemu(&["info", "--output=json", "b.qcow2"]).out();
    c.check(size.contains("\"backing-filename\": \"o.qcow2\""), || {
        size.clone()
    });
    // resize: grow and shrink, then check and compare with qemu's own resize.
    for op in [&["+3G"][..], &["--shrink", "20M"][..]] {
        std::fs::copy(d.join("o.qcow2"), d.join("r1.qcow2")).expect("copy");
        std::fs::copy(d.join("o.qcow2"), d.join("r2.qcow2")).expect("copy");
        let mut a = vec!["resize", "-f", "qcow2"];
        let mut b = a.clone();
        a.push("r1.qcow2");
        b.push("r2.qcow2");
        a.extend_from_slice(op);
        b.extend_from_slice(op);
        let (q, r) = (d.qemu(&b), d.rimg(&a));
        c.check(q.out() == r.out() && q.code() == r.code(), || {
            format!("{}\n{}", q.describe(), r.describe())
        });
        let chk = d.qemu(&["check", "r1.qcow2"]);
        c.check(chk.code() == Some(0), || chk.describe());
        let cmp = d.qemu(&["compare", "-s", "r1.qcow2", "r2.qcow2"]);
        c.check(cmp.code() == Some(0), || cmp.describe());
    }
    c.finish();
}

/// A dense raw source with zero-filled MiBs: the qcow2 rimg writes leaves the all-zero
/// clusters unallocated, as qemu-img does (same `map` apart from host offsets).
#[test]
fn zero_clusters_stay_unallocated() {
    let d = TestDir::new();
    let mut rng = XorShift::new(9);
    let mut data = vec![0u8; (16 * M) as usize];
    for mib in (0..16usize).step_by(3) {
        for b in &mut data[mib << 20..(mib + 1) << 20] {
            *b = rng.next_u64() as u8;
        }
    }
    std::fs::write(d.join("dz.raw"), &data).expect("write source");
    let r = d.rimg(&["convert", "-f", "raw", "-O", "qcow2", "dz.raw", "r.qcow2"]);
    let q = d.qemu(&["convert", "-f", "raw", "-O", "qcow2", "dz.raw", "q.qcow2"]);
    let mut c = Checks::new();
    c.check(r.ok() && q.ok(), || {
        format!("{}\n{}", r.describe(), q.describe())
    });
    let strip = |s: String| {
        s.lines()
            .map(|l| match l.find(", \"offset\"") {
                Some(i) => l[..i].to_string(),
                None => l.trim_end_matches('}').trim_end_matches("},").to_string(),
            })
            .collect::<Vec<_>>()
    };
    let rm = strip(d.qemu(&["map", "--output=json", "r.qcow2"]).out());
    let qm = strip(d.qemu(&["map", "--output=json", "q.qcow2"]).out());
    c.check(rm == qm, || {
        format!("map differs:\nrimg {rm:#?}\nqemu {qm:#?}")
    });
    let chk = d.qemu(&["check", "r.qcow2"]);
    c.check(chk.code() == Some(0), || chk.describe());
    c.finish();
}

mod prop {
    use proptest::prelude::*;

    use crate::util::{Checks, TestDir, K, M};

    const SIZE: u64 = 8 * M;

    /// Random 4 KiB-aligned ranges of random bytes (non-zero), applied in rounds.
    fn rounds() -> impl Strategy<Value = Vec<Vec<(u64, u64, u8)>>> {
        let range = (0..SIZE / (4 * K), 1..64u64, 1..=255u8).prop_map(|(blk, n, seed)| {
            let off = blk * 4 * K;
            let len = (n * 4 * K).min(SIZE - off);
            (off, len, seed)
        });
        proptest::collection::vec(proptest::collection::vec(range, 1..5), 1..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        /// Write random ranges through rimg's qcow2 writer (`convert -n --target-is-zero`
        /// of sources holding only those ranges) and hold the image against a byte array
        /// and `qemu-img check`.
        #[test]
        fn qcow2_writer_matches_a_byte_array(
            rounds in rounds(),
            cluster in prop_oneof![Just("512"), Just("4k"), Just("64k")],
            ext in any::<bool>(),
        ) {
            let d = TestDir::new();
            let mut model = vec![0u8; SIZE as usize];
            let opts = if ext && cluster == "64k" {
                "cluster_size=64k,extended_l2=on".to_string()
            } else {
                format!("cluster_size={cluster}")
            };
            d.rimg(&["create", "-q", "-f", "qcow2", "-o", &opts, "t.qcow2", "8M"]).assert_ok();
            for (i, round) in rounds.iter().enumerate() {
                let src = format!("r{i}.raw");
                d.sparse(&src, SIZE);
                let f = std::fs::OpenOptions::new().write(true).open(d.join(&src)).expect("open");
                for &(off, len, seed) in round {
                    let bytes: Vec<u8> = (0..len)
                        .map(|k| ((k as u8).wrapping_mul(31) ^ seed) | 1)
                        .collect();
                    std::os::unix::fs::FileExt::write_all_at(&f, &bytes, off).expect("write");
                    model[off as usize..(off + len) as usize].copy_from_slice(&bytes);
                }
                drop(f);
                d.rimg(&[
                    "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "qcow2", &src, "t.qcow2",
                ])
                .assert_ok();
            }
            std::fs::write(d.join("model.raw"), &model).expect("model");
            let mut c = Checks::new();
            let chk = d.qemu(&["check", "t.qcow2"]);
            c.check(chk.code() == Some(0), || chk.describe());
            let cmp = d.qemu(&["compare", "-f", "raw", "-F", "qcow2", "model.raw", "t.qcow2"]);
            c.check(cmp.code() == Some(0), || cmp.describe());
            let out = d.rimg(&["convert", "-f", "qcow2", "-O", "raw", "t.qcow2", "back.raw"]);
            c.check(out.ok(), || out.describe());
            let back = std::fs::read(d.join("back.raw")).unwrap_or_default();
            c.check(back == model, || "rimg reads back something else than it wrote".into());
            c.finish();
        }
    }
}

/// `check` on qcow2: human and JSON output, stderr and exit code equal to qemu-img's, for
/// clean images (qemu-made and rimg-made, compressed, snapshots, small clusters, data file)
/// and for a leak plus an OFLAG_COPIED corruption.
#[test]
fn check_matches_qemu() {
    let d = TestDir::new();
    make_source(&d);
    let mut c = Checks::new();
    let mut images: Vec<String> = Vec::new();
    for (name, opts) in [
        ("c64.qcow2", "cluster_size=64k"),
        ("c512.qcow2", "cluster_size=512"),
        ("ext.qcow2", "extended_l2=on"),
        ("v2.qcow2", "compat=0.10"),
        ("df.qcow2", "data_file=df.data"),
    ] {
        d.qemu(&["create", "-q", "-f", "qcow2", "-o", opts, name, "32M"])
            .assert_ok();
        d.qemu_io_fmt(
            "qcow2",
            name,
            &[
                "write -P 1 0 100k",
                "write -P 2 3M 64k",
                "write -z 5M 1M",
                "write -P 3 31M 1M",
            ],
        );
        images.push(name.into());
    }
    d.qemu_io_fmt("qcow2", "c64.qcow2", &["write -c -P 9 8M 64k"]);
    d.qemu(&["snapshot", "-c", "s1", "c64.qcow2"]).assert_ok();
    d.qemu_io_fmt("qcow2", "c64.qcow2", &["write -P 4 0 64k"]);
    for extra in [&[][..], &["-c"][..]] {
        let name = format!("rimg{}.qcow2", extra.len());
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["src.raw", &name]);
        d.rimg(&args).assert_ok();
        images.push(name);
    }
    // A leak and a refcount-2 data cluster still flagged COPIED.
    std::fs::copy(d.join("c64.qcow2"), d.join("bad.qcow2")).expect("copy");
    let img = std::fs::read(d.join("bad.qcow2")).expect("read");
    let be64 = |o: usize| u64::from_be_bytes(img[o..o + 8].try_into().expect("8 bytes"));
    let rb = be64(be64(48) as usize) as usize;
    let mut patched = img.clone();
    patched[rb + 2 * 60..rb + 2 * 61].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(d.join("bad.qcow2"), &patched).expect("write");
    images.push("bad.qcow2".into());
    for img in &images {
        for o in [&[][..], &["--output=json"][..]] {
            let mut args = vec!["check"];
            args.extend_from_slice(o);
            args.push(img);
            c.same(&d.both(&args));
        }
    }
    c.finish();
}

/// Persistent bitmaps: `info` lists them as qemu-img does; writing is refused (it would
/// leave them stale) and the image is left unchanged.
#[test]
fn bitmaps_listed_and_protected() {
    let d = TestDir::new();
    make_source(&d);
    d.qemu(&["create", "-q", "-f", "qcow2", "bm.qcow2", "32M"])
        .assert_ok();
    d.qemu(&["bitmap", "--add", "bm.qcow2", "b0"]).assert_ok();
    d.qemu(&["bitmap", "--add", "-g", "128k", "bm.qcow2", "b1"])
        .assert_ok();
    d.qemu(&["bitmap", "--disable", "bm.qcow2", "b1"])
        .assert_ok();
    let mut c = Checks::new();
    for o in [&[][..], &["--output=json"][..]] {
        let mut args = vec!["info"];
        args.extend_from_slice(o);
        args.push("bm.qcow2");
        c.same(&d.both(&args));
    }
    let before = std::fs::read(d.join("bm.qcow2")).expect("read");
    let r = d.rimg(&[
        "convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", "bm.qcow2",
    ]);
    c.check(!r.ok() && r.err().lines().count() == 1, || r.describe());
    let after = std::fs::read(d.join("bm.qcow2")).expect("read");
    c.check(before == after, || "image changed".into());
    c.finish();
}

/// `measure -O qcow2` from qcow2 sources: the `bitmaps` figure and data counted at the host
/// file's allocation, for several target cluster sizes.
#[test]
fn measure_from_qcow2_sources() {
    let d = TestDir::new();
    d.qemu(&["create", "-q", "-f", "qcow2", "s.qcow2", "64M"])
        .assert_ok();
    d.qemu_io_fmt(
        "qcow2",
        "s.qcow2",
        &[
            "write -P 1 0 64k",
            "write -c -P 2 1M 64k",
            "write -P 3 3M 100k",
            "write -P 4 63M 1M",
        ],
    );
    d.qemu(&["bitmap", "--add", "s.qcow2", "b0"]).assert_ok();
    let mut c = Checks::new();
    for cs in ["64k", "4k", "512", "2M"] {
        for o in [&[][..], &["--output=json"][..]] {
            let opt = format!("cluster_size={cs}");
            let mut args = vec!["measure", "-O", "qcow2", "-o", &opt];
            args.extend_from_slice(o);
            args.push("s.qcow2");
            c.same(&d.both(&args));
        }
    }
    c.same(&d.both(&["measure", "-O", "raw", "s.qcow2"]));
    c.finish();
}
