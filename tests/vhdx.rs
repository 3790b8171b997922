//! vhdx: images built by the real `qemu-img create` / `qemu-io` (dynamic and fixed, 1 MiB to
//! 256 MiB blocks, `block_state_zero` on and off, larger logs), read by rimg exactly as
//! qemu-img reads them (`convert -O raw` byte-identical, `info`, `map`, `check` output equal);
//! images rimg creates and converts into pass `qemu-img check`, compare identical and report
//! the same `info --output=json` as qemu-img's own; a log left to replay is refused read-only
//! and replayed by `check -r all` as qemu-img does, and qemu-img replays the log of a convert
//! rimg was killed in; damaged images give qemu-img's one error and are left unchanged.

use std::os::unix::fs::FileExt;

use crate::util::{files_equal, Checks, Cmd, Dir, TestDir, Twin, K, M, QEMU_IO};

/// Virtual size of the read matrix: not a multiple of the block size, nor of 1 MiB.
const SIZE: u64 = 20 * M + 1536;

/// Guest writes (pattern, offset, length) at aligned, unaligned and end-of-disk offsets.
fn writes() -> Vec<(u8, u64, u64)> {
    vec![
        (0x11, 0, 64 * K),
        (0x22, M + 512, 3 * K),
        (0x33, 8 * M - 4 * K, 8 * K),
        (0x44, 9 * M + 123 * 512, 100 * K),
        (0x00, 12 * M, 64 * K),
        (0x55, SIZE - 4 * K, 4 * K),
        (0x66, SIZE - 512, 512),
    ]
}

fn qemu_io(dir: &Dir, image: &str, cmds: &[String]) {
    let mut args: Vec<String> = vec!["-f".into(), "vhdx".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(image.into());
    Cmd::new(QEMU_IO, "qemu-io", dir.path())
        .args(&args)
        .run()
        .assert_ok();
}

/// `qemu-img create -f vhdx [-o OPTS] NAME SIZE`, then the matrix writes with qemu-io.
fn make_image(dir: &Dir, name: &str, opts: &str, size: u64, data: bool) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "vhdx"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size.as_str()]);
    dir.qemu(&args).assert_ok();
    if data {
        let cmds: Vec<String> = writes()
            .iter()
            .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
            .collect();
        qemu_io(dir, name, &cmds);
    }
}

/// Drop the host-usage fields (`actual-size`, `disk size`) that differ with the log writes.
fn without_disk_usage(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("\"actual-size\"") && !l.contains("disk size:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// CRC-32C and header patching (independent of rimg's own code)

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn read_at(dir: &Dir, name: &str, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(dir.join(name)).expect("open image");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).expect("read image");
    b
}

fn patch(dir: &Dir, name: &str, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .expect("open image for patching");
    f.write_all_at(bytes, off).expect("patch image");
}

/// Rewrite the checksum of the `size`-byte structure at `off` (CRC field at `off + 4`).
fn fix_checksum(dir: &Dir, name: &str, off: u64, size: usize) {
    let mut b = read_at(dir, name, off, size);
    b[4..8].fill(0);
    let c = crc32c(&b);
    patch(dir, name, off + 4, &c.to_le_bytes());
}

/// File offset of the current header (higher sequence number) of a qemu-made image.
fn current_header(dir: &Dir, name: &str) -> u64 {
    let s1 = u64::from_le_bytes(read_at(dir, name, 64 * K + 8, 8).try_into().unwrap());
    let s2 = u64::from_le_bytes(read_at(dir, name, 128 * K + 8, 8).try_into().unwrap());
    if s1 > s2 {
        64 * K
    } else {
        128 * K
    }
}

/// The metadata item `guid_prefix` (first 4 stored bytes of its GUID): its file offset.
fn metadata_item(dir: &Dir, name: &str, guid_prefix: [u8; 4]) -> u64 {
    // qemu puts the metadata region at 3 MiB for a 1 MiB log and a 1 MiB BAT.
    let md = 3 * M;
    let table = read_at(dir, name, md, 64 * 1024);
    let n = u16::from_le_bytes([table[10], table[11]]) as usize;
    for i in 0..n {
        let e = 32 + 32 * i;
        if table[e..e + 4] == guid_prefix {
            let off = u32::from_le_bytes(table[e + 16..e + 20].try_into().unwrap());
            return md + u64::from(off);
        }
    }
    panic!("metadata item not found");
}

const FILE_PARAMS: [u8; 4] = [0x37, 0x67, 0xa1, 0xca];
const LOGICAL_SECTOR: [u8; 4] = [0x1d, 0xbf, 0x41, 0x81];

// ---------------------------------------------------------------------------------------------
// Reading

/// Every layout qemu-img creates, with data at aligned, unaligned and end-of-disk offsets:
/// `convert -O raw` gives qemu-img's bytes; `info`, `map` and `check` print the same.
#[test]
fn vhdx_read_matrix() {
    let t = Twin::new();
    let mut c = Checks::new();
    let layouts = [
        ("dyn", ""),
        ("dyn-nozero", "block_state_zero=off"),
        ("fixed", "subformat=fixed"),
        ("fixed-nozero", "subformat=fixed,block_state_zero=off"),
        ("b1m", "block_size=1M"),
        ("b256m", "block_size=256M"),
        ("log4m", "log_size=4M,block_size=2M"),
    ];
    for (name, opts) in layouts {
        for data in [false, true] {
            let img = format!("{name}-{}.vhdx", if data { "data" } else { "empty" });
            make_image(&t.s, &img, opts, SIZE, data);
            let src = format!("../s/{img}");
            for args in [
                vec!["info", src.as_str()],
                vec!["info", "--output=json", src.as_str()],
                vec!["map", src.as_str()],
                vec!["map", "--output=json", src.as_str()],
                vec![
                    "map",
                    "--output=json",
                    "-f",
                    "vhdx",
                    "-s",
                    "1M",
                    "-l",
                    "5M",
                    &src,
                ],
                vec!["check", src.as_str()],
                vec!["check", "--output=json", src.as_str()],
                vec!["compare", "-f", "vhdx", src.as_str(), src.as_str()],
                vec!["measure", "-O", "qcow2", src.as_str()],
            ] {
                c.same(&t.run(&args));
            }
            let p = t.run(&["convert", "-O", "raw", src.as_str(), "out.raw"]);
            c.same(&p);
            c.result(files_equal(&t.q.join("out.raw"), &t.r.join("out.raw")));
            c.same(&t.run(&["compare", "-s", src.as_str(), "out.raw"]));
            // Into qcow2 too (the engine's zero detection over vhdx extents).
            let p = t.run(&["convert", "-O", "qcow2", src.as_str(), "out.qcow2"]);
            c.same(&p);
            let cmp = t.r.qemu(&["compare", "out.qcow2", src.as_str()]);
            c.check(cmp.ok(), || format!("compare\n{}", cmp.describe()));
        }
    }
    // A qcow2 overlay over a vhdx: the vhdx layer shows as data with no offset.
    let ov = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "dyn-data.vhdx",
        "-F",
        "vhdx",
        "ov.qcow2",
    ];
    t.s.qemu(&ov).assert_ok();
    Cmd::new(QEMU_IO, "qemu-io", t.s.path())
        .args(&["-f", "qcow2", "-c", "write -P 0x77 2M 64k", "ov.qcow2"])
        .run()
        .assert_ok();
    for args in [
        vec!["map", "--output=json", "../s/ov.qcow2"],
        vec!["info", "--backing-chain", "../s/ov.qcow2"],
        vec!["compare", "-s", "../s/ov.qcow2", "../s/dyn-data.vhdx"],
        vec!["compare", "-s", "../s/dyn-data.vhdx", "../s/b1m-data.vhdx"],
        vec!["measure", "-O", "qcow2", "../s/ov.qcow2"],
    ] {
        c.same(&t.run(&args));
    }
    c.same(&t.run(&["convert", "-O", "raw", "../s/ov.qcow2", "ov.raw"]));
    c.result(files_equal(&t.q.join("ov.raw"), &t.r.join("ov.raw")));
}

// ---------------------------------------------------------------------------------------------
// Creating and writing

/// `create -f vhdx` with each option: the same `Formatting` line and messages; the image
/// passes `qemu-img check`, compares identical with qemu-img's and has the same `info`.
#[test]
fn vhdx_create_matches_qemu() {
    let t = Twin::new();
    let mut c = Checks::new();
    for (opts, size) in [
        ("", "64M"),
        ("subformat=dynamic", "1000"),
        ("subformat=fixed", "24M"),
        ("subformat=fixed,block_state_zero=off", "24M"),
        ("block_state_zero=off", "5G"),
        ("block_size=1M,log_size=2M", "3G"),
        ("block_size=1.5M,log_size=1.5M", "30M"),
        ("block_size=300M", "30M"),
        ("block_size=0", "200G"),
        ("", "0"),
        ("subformat=foo", "1M"),
        ("block_size=3M", "1M"),
        ("log_size=0", "1M"),
        ("log_size=5G", "1M"),
        ("block_state_zero=maybe", "1M"),
        ("foo=bar", "1M"),
        ("", "65T"),
        ("help", "1M"),
        ("preallocation=full", "8M"),
        ("subformat=fixed,preallocation=falloc", "8M"),
        ("nocow=on,extent_size_hint=1M", "8M"),
    ] {
        let mut args = vec!["create", "-f", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend(["new.vhdx", size]);
        let p = t.run(&args);
        c.same(&p);
        if !p.qemu.ok() || opts == "help" {
            continue;
        }
        for args in [
            vec!["info", "--output=json", "new.vhdx"],
            vec!["info", "new.vhdx"],
        ] {
            c.same_normalized(&t.run(&args), without_disk_usage);
        }
        let chk = t.r.qemu(&["check", "new.vhdx"]);
        c.check(chk.ok(), || format!("qemu-img check\n{}", chk.describe()));
        // qemu-img reads every byte of a vhdx (it has no allocation status): compare the
        // small ones only.
        if ["0", "1000", "8M", "24M", "30M", "64M"].contains(&size) {
            let r = t.r.join("new.vhdx");
            let cmp = t.q.qemu(&["compare", "new.vhdx", r.to_str().unwrap()]);
            c.check(cmp.ok(), || format!("qemu-img compare\n{}", cmp.describe()));
        }
        c.check(t.q.len("new.vhdx") == t.r.len("new.vhdx"), || {
            format!("file length differs for -o {opts}")
        });
        for f in [&t.q, &t.r] {
            let _ = std::fs::remove_file(f.join("new.vhdx"));
        }
    }
    // What vhdx cannot do, worded as qemu-img words it.
    t.each(|d| {
        d.qemu(&["create", "-q", "-f", "raw", "base.raw", "1M"])
            .assert_ok();
    });
    for args in [
        vec![
            "create", "-f", "vhdx", "-b", "base.raw", "-F", "raw", "ov.vhdx", "1M",
        ],
        vec!["convert", "-c", "-O", "vhdx", "base.raw", "c.vhdx"],
        vec!["measure", "-O", "vhdx", "--size", "1G"],
        vec!["create", "-f", "vhdx", "-o", "help"],
    ] {
        c.same(&t.run(&args));
    }
}

/// `convert -O vhdx` from a qcow2 with data, zeros and holes, for each subformat and block
/// size: qemu-img's check passes, the content equals the source, the layout (file length)
/// and `info` equal qemu-img's; and back from vhdx to vhdx.
#[test]
fn vhdx_convert_into_vhdx() {
    let t = Twin::new();
    let mut c = Checks::new();
    t.s.qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "src.qcow2",
        &SIZE.to_string(),
    ])
    .assert_ok();
    // No block of written zeros here: rimg reserves its space before the engine finds the
    // zeros, so a later block may land one slot further on than qemu-img puts it.
    let cmds: Vec<String> = writes()
        .iter()
        .filter(|(p, _, _)| *p != 0)
        .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
        .chain(["write -z 16M 1M".to_string()])
        .collect();
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for cmd in &cmds {
        args.extend(["-c".into(), cmd.clone()]);
    }
    args.push("src.qcow2".into());
    Cmd::new(QEMU_IO, "qemu-io", t.s.path())
        .args(&args)
        .run()
        .assert_ok();
    for opts in [
        "",
        "subformat=fixed",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M",
        "block_state_zero=off",
        "log_size=3M,block_size=4M",
    ] {
        let mut args = vec!["convert", "-O", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend(["../s/src.qcow2", "t.vhdx"]);
        c.same(&t.run(&args));
        let chk = t.r.qemu(&["check", "t.vhdx"]);
        c.check(chk.ok(), || {
            format!("qemu-img check ({opts})\n{}", chk.describe())
        });
        let cmp = t.r.qemu(&["compare", "../s/src.qcow2", "t.vhdx"]);
        c.check(cmp.ok(), || format!("compare ({opts})\n{}", cmp.describe()));
        // The same disk usage too: rimg writes its BAT updates through the log as qemu does.
        c.same(&t.run(&["info", "--output=json", "t.vhdx"]));
        c.check(t.q.len("t.vhdx") == t.r.len("t.vhdx"), || {
            format!(
                "layout differs ({opts}): qemu-img's file {} bytes, rimg's {}",
                t.q.len("t.vhdx"),
                t.r.len("t.vhdx")
            )
        });
        // vhdx to vhdx, and back to raw.
        c.same(&t.run(&["convert", "-O", "vhdx", "t.vhdx", "u.vhdx"]));
        let chk = t.r.qemu(&["check", "u.vhdx"]);
        c.check(chk.ok(), || format!("qemu-img check\n{}", chk.describe()));
        c.same(&t.run(&["convert", "-O", "raw", "u.vhdx", "u.raw"]));
        c.result(files_equal(&t.q.join("u.raw"), &t.r.join("u.raw")));
        for d in [&t.q, &t.r] {
            for f in ["t.vhdx", "u.vhdx", "u.raw"] {
                let _ = std::fs::remove_file(d.join(f));
            }
        }
    }
}

/// `convert -n` into vhdx images qemu-img created (fixed blocks written in place, ZERO blocks
/// allocated), and qemu-io writes into images rimg created: both compare equal to the source.
#[test]
fn vhdx_convert_into_existing_images() {
    let d = TestDir::new();
    let mut c = Checks::new();
    d.patterned("src.raw", SIZE, &writes());
    for opts in [
        "subformat=fixed,block_state_zero=off",
        "subformat=fixed",
        "block_state_zero=off",
    ] {
        let _ = std::fs::remove_file(d.join("t.vhdx"));
        d.qemu(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            opts,
            "t.vhdx",
            &SIZE.to_string(),
        ])
        .assert_ok();
        let r = d.rimg(&[
            "convert", "-n", "-f", "raw", "-O", "vhdx", "src.raw", "t.vhdx",
        ]);
        c.check(r.ok(), || format!("convert -n ({opts})\n{}", r.describe()));
        let chk = d.qemu(&["check", "t.vhdx"]);
        c.check(chk.ok(), || format!("check ({opts})\n{}", chk.describe()));
        let cmp = d.qemu(&["compare", "-f", "raw", "src.raw", "t.vhdx"]);
        c.check(cmp.ok(), || format!("compare ({opts})\n{}", cmp.describe()));
        // And the other way round: qemu-io writes into an image rimg created.
        let _ = std::fs::remove_file(d.join("u.vhdx"));
        let r = d.rimg(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            opts,
            "u.vhdx",
            &SIZE.to_string(),
        ]);
        c.check(r.ok(), || format!("create ({opts})\n{}", r.describe()));
        let cmds: Vec<String> = writes()
            .iter()
            .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
            .collect();
        qemu_io(&d, "u.vhdx", &cmds);
        let chk = d.qemu(&["check", "u.vhdx"]);
        c.check(chk.ok(), || format!("check ({opts})\n{}", chk.describe()));
        let cmp = d.qemu(&["compare", "-f", "raw", "src.raw", "u.vhdx"]);
        c.check(cmp.ok(), || format!("compare ({opts})\n{}", cmp.describe()));
    }
}

// ---------------------------------------------------------------------------------------------
// The log

/// Make `name` (written by qemu-io) need a log replay: qemu leaves its last log entry in the
/// log; put that entry's log GUID back into the current header and undo the BAT update it
/// carries, so only a replay shows the data.
fn make_dirty(dir: &Dir, name: &str) {
    let log_guid = read_at(dir, name, M + 32, 16);
    assert_eq!(&read_at(dir, name, M, 4), b"loge", "qemu left a log entry");
    let h = current_header(dir, name);
    patch(dir, name, h + 48, &log_guid);
    fix_checksum(dir, name, h, 4096);
    // The BAT (at 2 MiB): every block back to the ZERO state qemu created it with.
    let bat = read_at(dir, name, 2 * M, 4096);
    let mut zeroed = bat.clone();
    for e in zeroed.chunks_exact_mut(8) {
        if e[0] & 7 == 6 {
            e.copy_from_slice(&2u64.to_le_bytes());
        }
    }
    patch(dir, name, 2 * M, &zeroed);
}

/// A log to replay: read-only commands are refused with qemu-img's message and leave the
/// file alone; `check -r all` replays it as qemu-img does (same output, same content).
#[test]
fn vhdx_log_replay() {
    let t = Twin::new();
    let mut c = Checks::new();
    t.each(|d| {
        d.qemu(&["create", "-q", "-f", "vhdx", "dirty.vhdx", "16M"])
            .assert_ok();
    });
    // One image written by qemu-io, copied to both sides (the GUIDs must be the same).
    qemu_io(&t.q, "dirty.vhdx", &["write -P 0xab 4k 60k".to_string()]);
    make_dirty(&t.q, "dirty.vhdx");
    std::fs::copy(t.q.join("dirty.vhdx"), t.r.join("dirty.vhdx")).unwrap();
    let before = t.states(&["dirty.vhdx"]);
    for args in [
        vec!["info", "dirty.vhdx"],
        vec!["info", "--output=json", "dirty.vhdx"],
        vec!["check", "dirty.vhdx"],
        vec!["map", "--output=json", "dirty.vhdx"],
        vec!["convert", "-O", "raw", "dirty.vhdx", "x.raw"],
        vec!["compare", "dirty.vhdx", "dirty.vhdx"],
    ] {
        let p = t.run(&args);
        c.same(&p);
        c.result(t.files_after(&p, &["dirty.vhdx"], &before));
    }
    // Damaged entries, checksums kept valid: a bad descriptor fails every open, a data
    // sector of another sequence fails the replay, a data sector's signature is not read,
    // changed leading bytes are replayed as they are.
    let variants: [(&str, u64, u8); 4] = [
        ("bad-desc", M + 66, b'x'),
        ("bad-data-seq", M + 8191, 0x40),
        ("data-sig", M + 4096 + 1, b'x'),
        ("leading-bytes", M + 72, 0x5a),
    ];
    for (name, off, byte) in variants {
        let f = format!("{name}.vhdx");
        t.each(|d| {
            std::fs::copy(d.join("dirty.vhdx"), d.join(&f)).unwrap();
            patch(d, &f, off, &[byte]);
            fix_checksum(d, &f, M, 8192);
        });
        c.same(&t.run(&["info", f.as_str()]));
        c.same(&t.run(&["check", "-r", "all", f.as_str()]));
        let p = t.run(&["convert", "-O", "raw", f.as_str(), "v.raw"]);
        c.same(&p);
        if p.both_ok() {
            c.result(files_equal(&t.q.join("v.raw"), &t.r.join("v.raw")));
        }
    }
    for d in [&t.q, &t.r] {
        std::fs::copy(d.join("dirty.vhdx"), d.join("dirty2.vhdx")).unwrap();
    }
    c.same(&t.run(&["check", "-r", "all", "dirty.vhdx"]));
    c.same(&t.run(&["check", "-r", "all", "--output=json", "dirty2.vhdx"]));
    c.same(&t.run(&["check", "dirty.vhdx"]));
    let p = t.run(&["convert", "-O", "raw", "dirty.vhdx", "out.raw"]);
    c.same(&p);
    c.result(files_equal(&t.q.join("out.raw"), &t.r.join("out.raw")));
    let data = read_at(&t.r, "out.raw", 4 * K, 4);
    c.check(data == [0xab; 4], || "the replayed log's data".into());
    // The replayed image reads back with qemu-io.
    let rd = Cmd::new(QEMU_IO, "qemu-io", t.r.path())
        .args(&[
            "-r",
            "-f",
            "vhdx",
            "-c",
            "read -P 0xab 4k 60k",
            "dirty2.vhdx",
        ])
        .run();
    c.check(rd.ok() && !rd.out().contains("fail"), || rd.describe());
}

// ---------------------------------------------------------------------------------------------
// Damaged images

/// Damaged images: each command gives qemu-img's error (or its check report), no panic,
/// no hang, and the file is left unchanged.
#[test]
fn vhdx_damaged_inputs() {
    let t = Twin::new();
    let mut c = Checks::new();
    let base = "base.vhdx";
    // Small: 1 MiB blocks at 8 MiB (block 0) and 9 MiB (block 2) of a 10 MiB file.
    make_image(&t.s, base, "block_size=1M", 4 * M, false);
    qemu_io(
        &t.s,
        base,
        &["write -P 1 0 64k".into(), "write -P 2 2M 64k".into()],
    );
    let src = std::fs::read(t.s.join(base)).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("short-8", src[..8].to_vec()),
        ("short-100k", src[..100_000].to_vec()),
        ("short-200k", src[..200 * 1024].to_vec()),
        ("no-region", src[..3 * 64 * 1024 + 10].to_vec()),
    ];
    let flip = |off: usize| {
        let mut b = src.clone();
        b[off] ^= 1;
        b
    };
    cases.push(("bad-header1", flip(64 * 1024 + 100)));
    let mut both = flip(64 * 1024 + 100);
    both[128 * 1024 + 100] ^= 1;
    cases.push(("bad-headers", both));
    cases.push(("bad-region", flip(192 * 1024 + 100)));
    cases.push(("bad-metadata", flip(3 * M as usize)));
    cases.push(("bat-past-eof", src[..(8 * M + 4 * K) as usize].to_vec()));
    cases.push(("bat-end-past-eof", src[..(9 * M + 4 * K) as usize].to_vec()));
    for (name, bytes) in &cases {
        t.each(|d| std::fs::write(d.join(&format!("{name}.vhdx")), bytes).unwrap());
    }
    // Structures patched in place (checksums kept valid where there are any).
    let patched: [(&str, u64, Vec<u8>); 4] = [
        ("sector-4k", 0, 4096u32.to_le_bytes().to_vec()),
        ("sector-1k", 0, 1024u32.to_le_bytes().to_vec()),
        ("has-parent", 1, 2u32.to_le_bytes().to_vec()),
        ("block-3m", 2, (3 * M as u32).to_le_bytes().to_vec()),
    ];
    for (name, what, bytes) in &patched {
        t.each(|d| {
            let f = format!("{name}.vhdx");
            std::fs::write(d.join(&f), &src).unwrap();
            let off = match what {
                0 => metadata_item(d, &f, LOGICAL_SECTOR),
                1 => metadata_item(d, &f, FILE_PARAMS) + 4,
                _ => metadata_item(d, &f, FILE_PARAMS),
            };
            patch(d, &f, off, bytes);
        });
    }
    // Header rules: equal sequence numbers with different contents; a log far past the end
    // of the file (a non-zero log GUID, nothing there to replay); a BAT with every block
    // state QEMU reads as zeros.
    t.each(|d| {
        let f = "equal-seq.vhdx";
        std::fs::write(d.join(f), &src).unwrap();
        let h = current_header(d, f);
        let other = if h == 64 * K { 128 * K } else { 64 * K };
        patch(d, f, other + 8, &read_at(d, f, h + 8, 8));
        patch(d, f, other + 16, &[0x5a; 16]);
        fix_checksum(d, f, other, 4096);
        let f = "log-far-away.vhdx";
        std::fs::write(d.join(f), &src).unwrap();
        let h = current_header(d, f);
        patch(d, f, h + 48, &[0x11; 16]);
        patch(d, f, h + 72, &(1u64 << 40).to_le_bytes());
        fix_checksum(d, f, h, 4096);
        let f = "zero-states.vhdx";
        std::fs::write(d.join(f), &src).unwrap();
        // Blocks 0 and 2 hold data (1 MiB blocks at 8 and 9 MiB); 1 and 3 are ZERO.
        let bat = 2 * M;
        let e = |mb: u64, st: u64| ((mb * M) | st).to_le_bytes();
        patch(d, f, bat, &e(8, 1));
        patch(d, f, bat + 8, &e(0, 3));
        patch(d, f, bat + 16, &e(9, 5));
        patch(d, f, bat + 24, &e(0, 0));
    });
    // A differencing image: has_parent with a parent locator (QEMU reads none).
    t.each(|d| {
        let f = "differencing.vhdx";
        std::fs::write(d.join(f), &src).unwrap();
        let md = 3 * M;
        let n = u16::from_le_bytes(read_at(d, f, md + 10, 2).try_into().unwrap());
        let mut e = Vec::new();
        e.extend_from_slice(&0xa8d3_5f2du32.to_le_bytes());
        e.extend_from_slice(&0xb30bu16.to_le_bytes());
        e.extend_from_slice(&0x454du16.to_le_bytes());
        e.extend_from_slice(&[0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c]);
        for v in [64 * 1024 + 40u32, 24, 6, 0] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        patch(d, f, md + 32 + 32 * u64::from(n), &e);
        patch(d, f, md + 10, &(n + 1).to_le_bytes());
        patch(
            d,
            f,
            metadata_item(d, f, FILE_PARAMS) + 4,
            &2u32.to_le_bytes(),
        );
    });
    // A log whose entry needs a longer file than there is (flushed file offset past EOF).
    t.each(|d| {
        std::fs::write(d.join("log-past-eof.vhdx"), &src).unwrap();
        make_dirty(d, "log-past-eof.vhdx");
        patch(d, "log-past-eof.vhdx", M + 48, &(1u64 << 40).to_le_bytes());
        // The entry's checksum covers the whole entry (its length is at offset 8).
        let len = u32::from_le_bytes(
            read_at(d, "log-past-eof.vhdx", M + 8, 4)
                .try_into()
                .unwrap(),
        );
        fix_checksum(d, "log-past-eof.vhdx", M, len as usize);
    });
    let names: Vec<String> = cases
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(patched.iter().map(|(n, _, _)| n.to_string()))
        .chain(
            [
                "log-past-eof",
                "differencing",
                "equal-seq",
                "log-far-away",
                "zero-states",
            ]
            .map(String::from),
        )
        .collect();
    for name in &names {
        let f = format!("{name}.vhdx");
        let before = t.states(&[f.as_str()]);
        for args in [
            vec!["info", f.as_str()],
            vec!["info", "-f", "vhdx", "--output=json", f.as_str()],
            vec!["check", f.as_str()],
            vec!["check", "--output=json", f.as_str()],
            vec!["map", "--output=json", f.as_str()],
            vec!["convert", "-O", "raw", f.as_str(), "out.raw"],
        ] {
            let p = t.run(&args);
            c.no_panic(&p.rimg);
            c.same(&p);
            c.result(t.files_after(&p, &[f.as_str()], &before));
            let lines = p.rimg.err().lines().count();
            c.check(p.rimg.ok() || lines >= 1, || {
                format!("no error\n{}", p.rimg.describe())
            });
            if args[0] == "convert" && p.both_ok() {
                c.result(files_equal(&t.q.join("out.raw"), &t.r.join("out.raw")));
            }
        }
        for d in [&t.q, &t.r] {
            let _ = std::fs::remove_file(d.join("out.raw"));
        }
    }
    // Sizes QEMU counts in 32 bits (a short BAT) or cannot count in sectors, and a BAT
    // offset that overflows: info and check only (a convert would make a huge file).
    t.each(|d| {
        for (f, byte7) in [("huge.vhdx", 1u8), ("too-large.vhdx", 128)] {
            std::fs::write(d.join(f), &src).unwrap();
            let vs = metadata_item(d, f, FILE_PARAMS) + 8;
            patch(d, f, vs + 7, &[byte7]);
        }
        std::fs::write(d.join("bat-overflow.vhdx"), &src).unwrap();
        patch(d, "bat-overflow.vhdx", 2 * M + 7, &[0x80]);
    });
    for f in ["huge.vhdx", "too-large.vhdx", "bat-overflow.vhdx"] {
        let before = t.states(&[f]);
        for args in [
            vec!["info", f],
            vec!["check", f],
            vec!["check", "--output=json", f],
        ] {
            let p = t.run(&args);
            c.no_panic(&p.rimg);
            c.same(&p);
            c.result(t.files_after(&p, &[f], &before));
        }
    }
    // Replaying that log is refused before anything is written.
    let r = t.r.rimg(&["check", "-r", "all", "log-past-eof.vhdx"]);
    c.no_panic(&r);
    c.check(!r.ok(), || {
        format!("replay past EOF accepted\n{}", r.describe())
    });
    c.check(
        std::fs::read(t.r.join("log-past-eof.vhdx")).unwrap()
            == std::fs::read(t.q.join("log-past-eof.vhdx")).unwrap(),
        || "rimg changed the image whose log it refused to replay".into(),
    );
}

/// rimg's own log: a convert killed at each metadata sync leaves an image that qemu-img either
/// opens as it is or replays (`check -r all`); a replayed image holds all the data. At least
/// one kill must land between the log write and the BAT update.
#[test]
fn vhdx_killed_convert_replays_in_qemu() {
    if !std::path::Path::new("/usr/bin/strace").exists() {
        crate::util::skip("strace is not installed");
        return;
    }
    let d = TestDir::new();
    let mut c = Checks::new();
    d.patterned("src.raw", SIZE, &writes());
    let mut replayed = 0;
    for k in 1..=8 {
        let _ = std::fs::remove_file(d.join("t.vhdx"));
        let rimg = crate::util::rimg_link().to_str().unwrap().to_string();
        let when = format!("inject=fsync:signal=SIGKILL:when={k}");
        Cmd::new("/usr/bin/strace", "strace", d.path())
            .args(&[
                "-f",
                "-o",
                "/dev/null",
                "-e",
                &when,
                &rimg,
                "convert",
                "-f",
                "raw",
                "-O",
                "vhdx",
                "src.raw",
                "t.vhdx",
            ])
            .run();
        if !d.exists("t.vhdx") {
            continue;
        }
        let info = d.qemu(&["info", "t.vhdx"]);
        let needs_replay = info.err().contains("needs to be replayed");
        let rep = d.qemu(&["check", "-r", "all", "t.vhdx"]);
        c.check(rep.ok(), || {
            format!("kill {k}: check -r all\n{}", rep.describe())
        });
        if needs_replay {
            replayed += 1;
            let cmp = d.qemu(&["compare", "-f", "raw", "-F", "vhdx", "src.raw", "t.vhdx"]);
            c.check(cmp.ok(), || {
                format!("kill {k}: replayed image\n{}", cmp.describe())
            });
        }
    }
    c.check(replayed > 0, || "no kill left a log to replay".into());
}
