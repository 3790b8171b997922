//! The `luks` format: volumes made by the real qemu-img must read as qemu-img reads them
//! with the key (`--object secret` + `--image-opts ...,key-secret=`), `info` works without
//! it, and volumes rimg creates or converts into must open in qemu-img and compare
//! identical; create's errors are qemu-img's.

use crate::util::{Checks, Twin, M};

const SECRET: &str = "secret,id=sec0,data=abc";

#[test]
fn luks_reads_like_qemu() {
    let twin = Twin::new();
    let s = &twin.s;
    for (name, opts) in [
        ("xts.luks", "key-secret=sec0,iter-time=10"),
        (
            "cbc.luks",
            "key-secret=sec0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
        ),
    ] {
        s.qemu(&["create", "-q", "-f", "luks", "--object", SECRET, "-o", opts, name, "6M"])
            .assert_ok();
        crate::util::Cmd::new(crate::util::QEMU_IO, "qemu-io", s.path())
            .args(&[
                "--object",
                SECRET,
                "--image-opts",
                &format!("driver=luks,file.filename={name},key-secret=sec0"),
                "-c",
                "write -P 7 0 1M",
                "-c",
                "write -P 9 3M 100k",
                "-c",
                "write -P 3 6290944 512",
            ])
            .run()
            .assert_ok();
    }
    let mut c = Checks::new();
    for name in ["xts.luks", "cbc.luks"] {
        let img = format!("../s/{name}");
        let opts = format!("driver=luks,file.filename=../s/{name},key-secret=sec0");
        let bad = opts.replace("sec0", "sec1");
        for args in [
            vec!["info", img.as_str()],
            vec!["info", "--output=json", img.as_str()],
            vec!["map", img.as_str()],
            vec!["convert", "-O", "raw", img.as_str(), "o.raw"],
            vec![
                "map",
                "--output=json",
                "--object",
                SECRET,
                "--image-opts",
                &opts,
            ],
            vec!["check", "--object", SECRET, "--image-opts", &opts],
            vec![
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &opts,
                "-O",
                "raw",
                "out.raw",
            ],
            vec![
                "convert",
                "--object",
                "secret,id=sec1,data=x",
                "--image-opts",
                &bad,
                "-O",
                "raw",
                "o.raw",
            ],
        ] {
            let pair = twin.run(&args);
            c.same(&pair);
            if args.contains(&"out.raw") && pair.both_ok() {
                c.result(twin.same_file("out.raw"));
            }
        }
    }
    c.finish();
}

#[test]
fn luks_writes_that_qemu_reads() {
    let twin = Twin::new();
    twin.s.sparse("src.raw", 5 * M);
    twin.s
        .write_patterns("src.raw", &[(1, 0, 65536), (2, 2 * M, M + 4096)]);
    let mut c = Checks::new();
    // create: errors and the Formatting line as qemu-img's.
    for args in [
        vec!["create", "-f", "luks", "e.luks", "1M"],
        vec![
            "create",
            "-f",
            "luks",
            "-o",
            "key-secret=sec9",
            "e.luks",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            "key-secret=sec0,cipher-alg=aes-999",
            "e.luks",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            "key-secret=sec0,detached-header=off",
            "e.luks",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            "key-secret=sec0,iter-time=10,hash-alg=sha1",
            "e.luks",
            "3M",
        ],
    ] {
        c.same(&twin.run(&args));
    }
    let check = |name: &str, c: &mut Checks| {
        let opts = format!("driver=luks,file.filename={name},key-secret=sec0");
        let r = twin.r.qemu(&[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &opts,
            "driver=raw,file.filename=../s/src.raw",
        ]);
        c.check(r.ok(), || format!("{name}: {}", r.describe()));
    };
    for opts in [
        "key-secret=sec0,iter-time=10",
        "key-secret=sec0,iter-time=10,cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64",
    ] {
        let _ = std::fs::remove_file(twin.r.join("t.luks"));
        let r = twin.r.rimg(&[
            "convert",
            "--object",
            SECRET,
            "-f",
            "raw",
            "-O",
            "luks",
            "-o",
            opts,
            "../s/src.raw",
            "t.luks",
        ]);
        c.check(r.ok(), || r.describe());
        check("t.luks", &mut c);
    }
    // bench -w encrypts what it writes: qemu-io reads the pattern back.
    let opts = "driver=luks,file.filename=t.luks,key-secret=sec0";
    let r = twin.r.rimg(&[
        "bench",
        "--object",
        SECRET,
        "--image-opts",
        opts,
        "-w",
        "-c",
        "100",
        "-d",
        "8",
        "--pattern",
        "5",
    ]);
    c.check(r.ok(), || r.describe());
    let io = crate::util::Cmd::new(crate::util::QEMU_IO, "qemu-io", twin.r.path())
        .args(&[
            "--object",
            SECRET,
            "--image-opts",
            opts,
            "-c",
            "read -P 5 0 409600",
        ])
        .run();
    c.check(io.ok() && !io.out().contains("verification failed"), || {
        io.describe()
    });
    c.finish();
}

/// Damaged LUKS headers get qemu-img's message (with and without the key), and stay as
/// they were.
#[test]
fn damaged_luks_refused_like_qemu() {
    let twin = Twin::new();
    let s = &twin.s;
    s.qemu(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        SECRET,
        "-o",
        "key-secret=sec0,iter-time=10",
        "good.luks",
        "4M",
    ])
    .assert_ok();
    let good = std::fs::read(s.join("good.luks")).unwrap();
    let patch = |name: &str, at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        s.write_bytes(name, &b);
    };
    patch("version.luks", 6, &2u16.to_be_bytes());
    patch("keylen.luks", 108, &100_000u32.to_be_bytes());
    patch("stripes.luks", 208 + 44, &u32::MAX.to_be_bytes());
    patch("slotoff.luks", 208 + 40, &0x7fff_ffffu32.to_be_bytes());
    patch("header.luks", 208 + 40, &1u32.to_be_bytes());
    patch("state.luks", 208 + 48, &7u32.to_be_bytes());
    let mut c = Checks::new();
    for name in [
        "version.luks",
        "keylen.luks",
        "stripes.luks",
        "slotoff.luks",
        "header.luks",
        "state.luks",
    ] {
        let before = s.state(name);
        let img = format!("../s/{name}");
        let opts = format!("driver=luks,file.filename=../s/{name},key-secret=sec0");
        for args in [
            vec!["info", "-f", "luks", img.as_str()],
            vec![
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &opts,
                "-O",
                "raw",
                "o.raw",
            ],
        ] {
            c.same(&twin.run(&args));
        }
        c.check(s.state(name) == before, || format!("{name} changed"));
    }
    c.finish();
}
