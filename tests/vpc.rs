//! vpc (VHD): images built by the real qemu-img and qemu-io (dynamic, fixed, `force_size`,
//! Hyper-V's creator) must read as qemu-img reads them (`convert -O raw`, `info`, `map`,
//! `compare`); images rimg creates or converts into must match qemu-img's byte for byte
//! (apart from the timestamp, UUID and checksum) and compare identical; damaged images get
//! qemu-img's error and stay unchanged.

use crate::util::{Checks, Dir, FileState, Twin, M};

/// Byte ranges of a footer that differ between two runs of qemu-img itself: the timestamp,
/// the checksum and the UUID.
const FOOTER_VOLATILE: [(usize, usize); 3] = [(24, 28), (64, 68), (68, 84)];

/// The file's bytes with every footer copy's volatile fields blanked.
fn normalized(d: &Dir, name: &str) -> Option<Vec<u8>> {
    let mut b = std::fs::read(d.join(name)).ok()?;
    let mut starts = vec![0usize];
    if b.len() >= 512 {
        starts.push(b.len() - 512);
    }
    for s in starts {
        if b.len() >= s + 512 && &b[s..s + 8] == b"conectix" {
            for (a, e) in FOOTER_VOLATILE {
                b[s + a..s + e].fill(0);
            }
        }
    }
    Some(b)
}

/// Rewrite the footer checksum at `at` after a patch.
fn fix_checksum(b: &mut [u8], at: usize) {
    b[at + 64..at + 68].fill(0);
    let sum = !b[at..at + 512]
        .iter()
        .fold(0u32, |s, &x| s.wrapping_add(x as u32));
    b[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn create_matches_qemu() {
    let twin = Twin::new();
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["create", "-f", "vpc", "i.vhd", "1G"],
        &["create", "-f", "vpc", "i.vhd", "1000"],
        &["create", "-f", "vpc", "-o", "force_size=on", "i.vhd", "1G"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "i.vhd",
            "10M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on,preallocation=off",
            "i.vhd",
            "5M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            "i.vhd",
            "200G",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "preallocation=full",
            "i.vhd",
            "3M",
        ],
        &["create", "-f", "vpc", "-o", "subformat=foo", "i.vhd", "1M"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "preallocation=metadata",
            "i.vhd",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "preallocation=bogus",
            "i.vhd",
            "1M",
        ],
        &["create", "-f", "vpc", "-o", "force_size=xyz", "i.vhd", "1M"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "cluster_size=4k",
            "i.vhd",
            "1M",
        ],
        &["create", "-f", "vpc", "i.vhd", "3000G"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            "i.vhd",
            "2041G",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "i.vhd",
            "3000G",
        ],
        &["measure", "-O", "vpc", "--size", "1G"],
    ];
    for args in cases {
        twin.each(|d| {
            let _ = std::fs::remove_file(d.join("i.vhd"));
        });
        let pair = twin.run(args);
        c.same(&pair);
        let (q, r) = (normalized(&twin.q, "i.vhd"), normalized(&twin.r, "i.vhd"));
        c.check(q == r, || {
            format!("`{}`: i.vhd differs from qemu-img's", args.join(" "))
        });
        if pair.qemu.ok() && twin.q.exists("i.vhd") {
            // qemu-img must read rimg's image as it reads its own.
            let norm = |d: &Dir| {
                let r = d.qemu(&["info", "--output=json", "i.vhd"]);
                r.out()
            };
            let (qi, ri) = (norm(&twin.q), norm(&twin.r));
            c.check(qi == ri, || {
                format!("`{}`: qemu-img info differs:\n{qi}\n{ri}", args.join(" "))
            });
        }
    }
    c.finish();
}

/// Build the read matrix in `s` with qemu-img and qemu-io.
fn build_images(s: &Dir) -> Vec<(&'static str, &'static str)> {
    let writes = [
        "write -P 1 0 64k",
        "write -P 2 1536 3k",
        "write -P 3 5M 4k",
        "write -z 7M 1M",
        "write -P 4 8388096 512",
    ];
    let mut out = Vec::new();
    for (name, opts, size) in [
        ("dyn.vhd", "subformat=dynamic", "9M"),
        ("fixed.vhd", "subformat=fixed", "9M"),
        ("forced.vhd", "force_size=on", "9M"),
        ("fixedforced.vhd", "subformat=fixed,force_size=on", "9M"),
        ("empty.vhd", "subformat=dynamic", "3M"),
    ] {
        s.qemu(&["create", "-q", "-f", "vpc", "-o", opts, name, size])
            .assert_ok();
        if name != "empty.vhd" {
            s.qemu_io_fmt("vpc", name, &writes);
        }
        // The last sector of the disk, wherever CHS put the end.
        out.push((name, "vpc"));
    }
    // A disk that says Hyper-V made it: the footer's current size wins over CHS.
    let mut b = std::fs::read(s.join("forced.vhd")).unwrap();
    for at in [0, b.len() - 512] {
        b[at + 28..at + 32].copy_from_slice(b"win ");
        // CHS of a smaller disk, which Hyper-V's creator must not use.
        b[at + 56..at + 58].copy_from_slice(&100u16.to_be_bytes());
        fix_checksum(&mut b, at);
    }
    s.write_bytes("hyperv.vhd", &b);
    out.push(("hyperv.vhd", "vpc"));
    out
}

#[test]
fn reads_like_qemu() {
    let twin = Twin::new();
    let images = build_images(&twin.s);
    let mut c = Checks::new();
    for (name, fmt) in &images {
        let img = format!("../s/{name}");
        for args in [
            vec!["info", "-f", fmt, img.as_str()],
            vec!["info", "--output=json", "-f", fmt, img.as_str()],
            vec!["info", img.as_str()],
            vec!["map", "-f", fmt, img.as_str()],
            vec!["map", "--output=json", "-f", fmt, img.as_str()],
            vec!["map", "--output=json", img.as_str()],
            vec!["check", "-f", fmt, img.as_str()],
            vec!["resize", "-f", fmt, img.as_str(), "+1M"],
        ] {
            c.same(&twin.run(&args));
        }
        let args = ["convert", "-f", fmt, "-O", "raw", img.as_str(), "out.raw"];
        let pair = twin.run(&args);
        if c.same(&pair) {
            c.result(twin.same_file("out.raw"));
        }
        c.same(&twin.run(&["compare", "-f", fmt, "-F", "raw", img.as_str(), "out.raw"]));
    }
    c.finish();
}

#[test]
fn convert_into_vpc() {
    let twin = Twin::new();
    twin.s.sparse("src.raw", 9 * M);
    twin.s.write_patterns(
        "src.raw",
        &[
            (1, 0, 65536),
            (2, 3 * M, 2 * M + 4096),
            (3, 9 * M - 4096, 4096),
        ],
    );
    let mut c = Checks::new();
    for opts in [
        "subformat=dynamic",
        "subformat=fixed",
        "force_size=on",
        "subformat=fixed,force_size=on",
    ] {
        twin.each(|d| {
            let _ = std::fs::remove_file(d.join("t.vhd"));
        });
        let args = [
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            opts,
            "../s/src.raw",
            "t.vhd",
        ];
        let pair = twin.run(&args);
        c.same(&pair);
        // Same layout as qemu-img's, so qemu-img maps both alike.
        let map = |d: &Dir| {
            d.qemu(&["map", "--output=json", "-f", "vpc", "t.vhd"])
                .out()
        };
        let (qm, rm) = (map(&twin.q), map(&twin.r));
        c.check(qm == rm, || format!("{opts}: map differs:\n{qm}\n{rm}"));
        let cmp = twin
            .r
            .qemu(&["compare", "-f", "raw", "-F", "vpc", "../s/src.raw", "t.vhd"]);
        c.check(cmp.ok(), || format!("{opts}: {}", cmp.describe()));
        let (q, r) = (normalized(&twin.q, "t.vhd"), normalized(&twin.r, "t.vhd"));
        c.check(q == r, || format!("{opts}: t.vhd differs from qemu-img's"));
    }
    // A dense source with zero blocks (found by reading): they stay unallocated.
    twin.s.dense("dense.raw", 6 * M, 7);
    twin.s.write_patterns("dense.raw", &[(0, 2 * M, 2 * M)]);
    let _ = std::fs::remove_file(twin.r.join("t.vhd"));
    let r = twin.r.rimg(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "../s/dense.raw",
        "t.vhd",
    ]);
    c.check(r.ok(), || r.describe());
    let cmp = twin.r.qemu(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vpc",
        "../s/dense.raw",
        "t.vhd",
    ]);
    c.check(cmp.ok(), || cmp.describe());
    let m = twin.r.qemu(&["map", "--output=json", "t.vhd"]).out();
    c.check(m.contains("\"start\": 2097152, \"length\": 2097152, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), || {
        format!("the zero block was allocated:\n{m}")
    });
    c.finish();
}

#[test]
fn damaged_vpc_is_refused_like_qemu() {
    let twin = Twin::new();
    let s = &twin.s;
    s.qemu(&["create", "-q", "-f", "vpc", "good.vhd", "5M"])
        .assert_ok();
    s.qemu_io_fmt("vpc", "good.vhd", &["write -P 9 0 1M"]);
    let good = std::fs::read(s.join("good.vhd")).unwrap();
    let be32 = |v: u32| v.to_be_bytes();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("tiny.vhd", b"conect".to_vec()));
    cases.push(("short.vhd", vec![0u8; 100]));
    let mut b = good.clone();
    b[40] ^= 1;
    cases.push(("checksum.vhd", b));
    let mut b = good.clone();
    b[512] = b'X';
    cases.push(("magic.vhd", b));
    let mut b = good.clone();
    b[512 + 32..512 + 36].copy_from_slice(&be32(3000));
    cases.push(("blocksize.vhd", b));
    let mut b = good.clone();
    b[512 + 28..512 + 32].copy_from_slice(&be32(1));
    cases.push(("smalltable.vhd", b));
    let mut b = good.clone();
    b[512 + 28..512 + 32].copy_from_slice(&be32(0x4000_0000));
    cases.push(("hugetable.vhd", b));
    let mut b = good.clone();
    b[512 + 28..512 + 32].copy_from_slice(&be32(0x1000_0000));
    cases.push(("bigtable.vhd", b));
    let mut b = good.clone();
    b[1536..1540].copy_from_slice(&be32(0x0100_0000));
    cases.push(("batpastend.vhd", b));
    let mut b = good.clone();
    b.truncate(good.len() - 1024);
    cases.push(("truncated.vhd", b));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
    fix_checksum(&mut b, 0);
    cases.push(("dataoffset.vhd", b));
    let mut b = vec![0u8; 4096];
    b[4096 - 512..].copy_from_slice(&good[..512]);
    cases.push(("fixedtype.vhd", b));
    let mut b = good.clone();
    b[56..58].copy_from_slice(&0xffffu16.to_be_bytes());
    b[58] = 255;
    b[59] = 255;
    b[28..32].copy_from_slice(b"vpc ");
    fix_checksum(&mut b, 0);
    cases.push(("toolarge.vhd", b));
    let mut c = Checks::new();
    for (name, bytes) in &cases {
        s.write_bytes(name, bytes);
        let img = format!("../s/{name}");
        let before = s.state(name);
        for args in [
            vec!["info", "-f", "vpc", img.as_str()],
            vec!["map", "-f", "vpc", img.as_str()],
            vec!["convert", "-f", "vpc", "-O", "raw", img.as_str(), "o.raw"],
        ] {
            let pair = twin.run(&args);
            c.same(&pair);
        }
        let after: FileState = s.state(name);
        c.check(before == after, || format!("{name} changed"));
    }
    c.finish();
}
