//! Writing vmdk: `create` with every option, `convert -O vmdk` to every subformat (also
//! `-n`, `-c`, `-S 0`, `-B`), laid out as qemu-img lays it out.

use super::*;

/// `convert -S 0` writes every grain, clusters of zeros too (compressed in a
/// streamOptimized image), as qemu-img does.
#[test]
fn convert_sparse_size_0() {
    let t = Twin::new();
    let mut c = Checks::new();
    t.s.sparse("src.raw", 2 * M + 512);
    t.s.qemu_io("src.raw", &["write -P 5 64k 64k"]);
    for sub in ["streamOptimized", "monolithicSparse", "monolithicFlat"] {
        let img = format!("{sub}.vmdk");
        let o = format!("subformat={sub}");
        let pair = t.run(&[
            "convert",
            "-S",
            "0",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &o,
            "../s/src.raw",
            &img,
        ]);
        c.same(&pair);
        let qm = t.q.qemu(&["map", "--output=json", &img]);
        let rm = t.r.qemu(&["map", "--output=json", &img]);
        c.check(qm.out() == rm.out(), || {
            format!("map of {img} differs\n{}{}", qm.describe(), rm.describe())
        });
        let cmp = t.r.qemu(&["compare", "-f", "raw", "../s/src.raw", &img]);
        c.check(cmp.ok(), || format!("compare {img}\n{}", cmp.describe()));
    }
    c.finish();
}

/// `convert -n` into a sparse image holding data: where the source reads zeros qemu-img
/// writes zeros, which allocates grains (or sets zeroed-grain entries): the same map.
#[test]
fn convert_n_allocates_as_qemu() {
    let t = Twin::new();
    let mut c = Checks::new();
    let size = 3 * M;
    t.s.qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "src.qcow2",
        "3M",
    ])
    .assert_ok();
    t.s.qemu_io_fmt(
        "qcow2",
        "src.qcow2",
        &[
            "write -P 1 0 10k",
            "write -z 64k 64k",
            "write -P 3 1000k 70k",
            "write -P 4 3068k 4k",
        ],
    );
    for o in [
        "subformat=monolithicSparse",
        "zeroed_grain=on",
        "subformat=twoGbMaxExtentSparse",
    ] {
        t.each(|d| {
            let _ = std::fs::remove_file(d.join("n.vmdk"));
            let _ = std::fs::remove_file(d.join("n-s001.vmdk"));
            d.qemu(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                o,
                "n.vmdk",
                &size.to_string(),
            ])
            .assert_ok();
            d.qemu_io_fmt(
                "vmdk",
                "n.vmdk",
                &["write -P 7 0 200k", "write -P 8 2M 64k"],
            );
        });
        c.same(&t.run(&["convert", "-n", "-O", "vmdk", "../s/src.qcow2", "n.vmdk"]));
        let qm = t.q.qemu(&["map", "--output=json", "n.vmdk"]);
        let rm = t.r.qemu(&["map", "--output=json", "n.vmdk"]);
        c.check(qm.out() == rm.out(), || {
            format!(
                "map after convert -n ({o})\n{}{}",
                qm.describe(),
                rm.describe()
            )
        });
    }
    c.finish();
}

/// `convert -c`: sparse grains are written plainly, flat extents refuse (no cluster size),
/// streamOptimized compresses as always, as qemu-img does.
#[test]
fn convert_compressed_into_each_subformat() {
    let t = Twin::new();
    let mut c = Checks::new();
    t.s.sparse("src.raw", 2 * M);
    t.s.qemu_io("src.raw", &["write -P 5 64k 100k"]);
    for sub in [
        "monolithicSparse",
        "twoGbMaxExtentSparse",
        "monolithicFlat",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let img = format!("{sub}.vmdk");
        let o = format!("subformat={sub}");
        let pair = t.run(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &o,
            "../s/src.raw",
            &img,
        ]);
        c.same(&pair);
        if pair.both_ok() {
            let qm = t.q.qemu(&["map", "--output=json", &img]);
            let rm = t.r.qemu(&["map", "--output=json", &img]);
            c.check(qm.out() == rm.out(), || {
                format!("map of {img} differs\n{}{}", qm.describe(), rm.describe())
            });
        }
    }
    c.finish();
}

/// Mask the descriptor's `CID=` and `parentCID=` values (random in both tools) and
/// collapse runs of zero bytes (a CID one digit shorter moves the rest of the descriptor
/// by a byte inside its zero-padded area).
fn mask_cid(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let tag: Option<&[u8]> = if bytes[i..].starts_with(b"\nCID=") {
            Some(b"\nCID=")
        } else if bytes[i..].starts_with(b"\nparentCID=") {
            Some(b"\nparentCID=")
        } else {
            None
        };
        if let Some(t) = tag {
            out.extend_from_slice(t);
            out.push(b'x');
            i += t.len();
            while i < bytes.len() && bytes[i].is_ascii_hexdigit() {
                i += 1;
            }
            continue;
        }
        if bytes[i] == 0 {
            if out.last() != Some(&0) {
                out.push(0);
            }
        } else {
            out.push(bytes[i]);
        }
        i += 1;
    }
    out
}

/// `info --output=json` with the random CIDs and the file-system-dependent sizes masked.
fn info_masked(s: &str) -> String {
    s.lines()
        .filter(|l| {
            !l.contains("\"cid\"") && !l.contains("\"parent-cid\"") && !l.contains("actual-size")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn create_every_option() {
    let t = Twin::new();
    let mut c = Checks::new();
    let cases: &[(&str, &[&str])] = &[
        ("ms.vmdk", &["-o", "subformat=monolithicSparse"]),
        ("mf.vmdk", &["-o", "subformat=monolithicFlat"]),
        ("ts.vmdk", &["-o", "subformat=twoGbMaxExtentSparse"]),
        ("tf.vmdk", &["-o", "subformat=twoGbMaxExtentFlat"]),
        ("so.vmdk", &["-o", "subformat=streamOptimized"]),
        (
            "opts.vmdk",
            &[
                "-o",
                "adapter_type=lsilogic,hwversion=7,toolsversion=10,zeroed_grain=on",
            ],
        ),
        ("c6.vmdk", &["-o", "compat6=on,adapter_type=buslogic"]),
        (
            "esx.vmdk",
            &[
                "-o",
                "adapter_type=legacyESX,compat6=off,hwversion=undefined",
            ],
        ),
        (
            "pre.vmdk",
            &["-o", "preallocation=full,nocow=off,extent_size_hint=1M"],
        ),
        ("child.vmdk", &["-b", "ms.vmdk", "-F", "vmdk"]),
        (
            "child2.vmdk",
            &[
                "-o",
                "backing_file=ms.vmdk,backing_fmt=vmdk,zeroed_grain=on",
            ],
        ),
        // refused, with qemu-img's words
        ("e1.vmdk", &["-o", "adapter_type=scsi"]),
        ("e2.vmdk", &["-o", "subformat=sparse"]),
        ("e3.vmdk", &["-o", "compat6=on,hwversion=7"]),
        (
            "e4.vmdk",
            &["-o", "subformat=monolithicFlat,zeroed_grain=on"],
        ),
        (
            "e5.vmdk",
            &[
                "-o",
                "subformat=monolithicFlat",
                "-b",
                "ms.vmdk",
                "-F",
                "vmdk",
            ],
        ),
        ("e6.vmdk", &["-o", "backing_fmt=raw,backing_file=ms.vmdk"]),
        ("e7.vmdk", &["-o", "zeroed_grain=maybe"]),
        ("e8.vmdk", &["-o", "foo=bar"]),
        ("e9.vmdk", &["-o", "preallocation=metadata"]),
        ("e10.vmdk", &["-o", "preallocation=bogus"]),
    ];
    c.same(&t.run(&["create", "-f", "vmdk", "-o", "help"]));
    c.same(&t.run(&["create", "-f", "vmdk", "-o", "help", "h.vmdk"]));
    c.same(&t.run(&["measure", "-O", "vmdk", "--size", "1G"]));
    for (name, opts) in cases {
        let mut args = vec!["create", "-f", "vmdk"];
        args.extend_from_slice(opts);
        args.push(name);
        if !name.starts_with("child") {
            args.push("5243392");
        }
        let pair = t.run(&args);
        c.same(&pair);
        c.check(t.q.exists(name) == t.r.exists(name), || {
            format!(
                "{name}: qemu-img left it: {}, rimg: {}",
                t.q.exists(name),
                t.r.exists(name)
            )
        });
        if !pair.both_ok() {
            continue;
        }
        let stem = name.trim_end_matches(".vmdk");
        for f in [
            name.to_string(),
            format!("{stem}-flat.vmdk"),
            format!("{stem}-s001.vmdk"),
            format!("{stem}-f001.vmdk"),
        ] {
            if !t.q.exists(&f) {
                c.check(!t.r.exists(&f), || {
                    format!("rimg made {f}, qemu-img did not")
                });
                continue;
            }
            // Descriptor files differ in length with the CID's digits.
            c.check(t.q.len(&f) < 65536 || t.r.len(&f) == t.q.len(&f), || {
                format!("{f}: length {} vs qemu-img's {}", t.r.len(&f), t.q.len(&f))
            });
            if t.q.len(&f) <= 4 * M {
                c.check(mask_cid(&t.r.read(&f)) == mask_cid(&t.q.read(&f)), || {
                    format!("{f}: content differs from qemu-img's (CID masked)")
                });
            }
        }
        let qi = t.q.qemu(&["info", "--output=json", name]);
        let ri = t.r.qemu(&["info", "--output=json", name]);
        c.check(info_masked(&qi.out()) == info_masked(&ri.out()), || {
            format!("info of {name} differs\n{}{}", qi.describe(), ri.describe())
        });
    }
    c.finish();
}

/// Whether the allocated grains of a (single grain table) sparse vmdk lie in guest order.
fn grains_in_guest_order(b: &[u8]) -> bool {
    let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let gd = le32(56) as usize * 512;
    let gt = le32(gd) as usize * 512;
    let e: Vec<u32> = (0..512)
        .map(|i| le32(gt + 4 * i))
        .filter(|&v| v > 1)
        .collect();
    !e.is_empty() && e.windows(2).all(|w| w[0] < w[1])
}

#[test]
fn convert_to_every_subformat() {
    let t = Twin::new();
    let mut c = Checks::new();
    let size = 6 * M + 512;
    t.s.sparse("src.raw", size);
    t.s.qemu_io("src.raw", &writes(size));
    t.s.dense("rnd.raw", M, 7);
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        for (src, extra) in [("src.raw", ""), ("rnd.raw", ",zeroed_grain=on")] {
            if sub.ends_with("Flat") && !extra.is_empty() {
                continue;
            }
            let o = format!("subformat={sub}{extra}");
            let name = format!("{sub}-{}", &src[..3]);
            let img = format!("{name}.vmdk");
            let pair = t.run(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                &o,
                &format!("../s/{src}"),
                &img,
            ]);
            c.same(&pair);
            if !pair.both_ok() {
                continue;
            }
            let chk = t.r.qemu(&["check", &img]);
            c.check(chk.ok(), || {
                format!("qemu-img check of rimg's {img}\n{}", chk.describe())
            });
            let cmp = t.r.qemu(&[
                "compare",
                "-f",
                "raw",
                "-F",
                "vmdk",
                &format!("../s/{src}"),
                &img,
            ]);
            c.check(cmp.ok(), || {
                format!("qemu-img compare of rimg's {img}\n{}", cmp.describe())
            });
            let qi = t.q.qemu(&["info", "--output=json", &img]);
            let ri = t.r.qemu(&["info", "--output=json", &img]);
            c.check(info_masked(&qi.out()) == info_masked(&ri.out()), || {
                format!("info of {img} differs\n{}{}", qi.describe(), ri.describe())
            });
            if sub == "streamOptimized" {
                c.check(grains_in_guest_order(&t.r.read(&img)), || {
                    format!("rimg's {img}: grains are not in guest order")
                });
            }
            let qm = t.q.qemu(&["map", "--output=json", &img]);
            let rm = t.r.qemu(&["map", "--output=json", &img]);
            c.check(qm.out() == rm.out(), || {
                format!("map of {img} differs\n{}{}", qm.describe(), rm.describe())
            });
        }
    }
    c.finish();
}

/// `convert -n` into images qemu-img made (some with data already in them), and `-c`:
/// the result passes `qemu-img check` and compares equal to the source.
#[test]
fn convert_into_qemu_created_images() {
    let d = TestDir::new();
    let mut c = Checks::new();
    let size = 4 * M + 1024;
    d.sparse("src.raw", size);
    d.qemu_io("src.raw", &writes(size));
    for (opts, prefill, extra) in [
        ("subformat=monolithicSparse", true, ""),
        ("subformat=monolithicSparse", false, "-c"),
        ("zeroed_grain=on", true, ""),
        ("subformat=twoGbMaxExtentSparse", true, ""),
        ("subformat=monolithicFlat", true, ""),
        ("subformat=twoGbMaxExtentSparse", false, "-c"),
        ("subformat=streamOptimized", false, ""),
        ("subformat=streamOptimized", false, "-c"),
    ] {
        let _ = std::fs::remove_file(d.join("t.vmdk"));
        d.qemu(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            opts,
            "t.vmdk",
            &size.to_string(),
        ])
        .assert_ok();
        if prefill {
            d.qemu_io_fmt(
                "vmdk",
                "t.vmdk",
                &[
                    "write -P 0x77 0 200k",
                    "write -P 0x78 3M 64k",
                    "write -z 1M 64k",
                ],
            );
        }
        let mut args = vec!["convert", "-n", "-f", "raw", "-O", "vmdk"];
        if !extra.is_empty() {
            args.push(extra);
        }
        args.extend_from_slice(&["src.raw", "t.vmdk"]);
        let r = d.rimg(&args);
        c.no_panic(&r);
        c.check(r.ok(), || {
            format!("rimg convert -n ({opts} {extra})\n{}", r.describe())
        });
        let chk = d.qemu(&["check", "t.vmdk"]);
        c.check(chk.ok(), || {
            format!("qemu-img check ({opts} {extra})\n{}", chk.describe())
        });
        let cmp = d.qemu(&["compare", "-f", "raw", "-F", "vmdk", "src.raw", "t.vmdk"]);
        c.check(cmp.ok(), || {
            format!("qemu-img compare ({opts} {extra})\n{}", cmp.describe())
        });
    }
    c.finish();
}

/// `convert -B` into a vmdk delta disk: what the source's top layer holds is written; a
/// grain it fills only in part takes the rest from the source's lower layers (QEMU copies
/// it from the backing file); grains it does not touch stay unallocated.
#[test]
fn convert_with_backing_file() {
    let d = TestDir::new();
    let mut c = Checks::new();
    d.qemu(&["create", "-q", "-f", "vmdk", "base.vmdk", "4M"])
        .assert_ok();
    d.qemu_io_fmt("vmdk", "base.vmdk", &["write -P 1 0 4M"]);
    d.qemu(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        "top.vmdk",
    ])
    .assert_ok();
    d.qemu_io_fmt(
        "vmdk",
        "top.vmdk",
        &["write -P 2 100k 10k", "write -P 3 2M 64k"],
    );
    d.sparse("src.raw", 4 * M);
    d.qemu_io("src.raw", &["write -P 9 100k 10k", "write -P 8 1M 3k"]);
    for (src, fmt, sub) in [
        ("top.vmdk", "vmdk", "monolithicSparse"),
        ("top.vmdk", "vmdk", "streamOptimized"),
        ("src.raw", "raw", "monolithicSparse"),
    ] {
        let _ = std::fs::remove_file(d.join("out.vmdk"));
        let o = format!("subformat={sub}");
        let r = d.rimg(&[
            "convert",
            "-f",
            fmt,
            "-O",
            "vmdk",
            "-o",
            &o,
            "-B",
            "base.vmdk",
            "-F",
            "vmdk",
            src,
            "out.vmdk",
        ]);
        c.no_panic(&r);
        c.check(r.ok(), || {
            format!("convert -B {src} ({sub})\n{}", r.describe())
        });
        let cmp = d.qemu(&["compare", "-f", fmt, "-F", "vmdk", src, "out.vmdk"]);
        c.check(cmp.ok(), || {
            format!("compare {src} ({sub})\n{}", cmp.describe())
        });
        let chk = d.qemu(&["check", "out.vmdk"]);
        c.check(chk.ok(), || {
            format!("check {src} ({sub})\n{}", chk.describe())
        });
    }
    d.qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        "qt.qcow2",
    ])
    .assert_ok();
    d.qemu_io_fmt(
        "qcow2",
        "qt.qcow2",
        &["write -P 9 100k 4k", "write -z 3M 4k"],
    );
    for sub in ["monolithicSparse", "streamOptimized"] {
        let _ = std::fs::remove_file(d.join("out.vmdk"));
        let o = format!("subformat={sub}");
        let r = d.rimg(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &o,
            "-B",
            "base.vmdk",
            "-F",
            "vmdk",
            "qt.qcow2",
            "out.vmdk",
        ]);
        c.no_panic(&r);
        c.check(r.ok(), || {
            format!("convert -B qt.qcow2 ({sub})\n{}", r.describe())
        });
        let cmp = d.qemu(&["compare", "qt.qcow2", "out.vmdk"]);
        c.check(cmp.ok(), || {
            format!("compare qt.qcow2 ({sub})\n{}", cmp.describe())
        });
        let chk = d.qemu(&["check", "out.vmdk"]);
        c.check(chk.ok(), || {
            format!("check qt.qcow2 ({sub})\n{}", chk.describe())
        });
    }
    c.finish();
}
