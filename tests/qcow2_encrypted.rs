//! Encrypted qcow2 (LUKS and legacy AES) made by the real qemu-img: `info` (human, JSON,
//! `--backing-chain`) must print what qemu-img prints, including the `encrypt` block and
//! `encrypted: yes`, without the key; commands that read data need the key secret and are
//! refused with qemu-img's message.

use crate::util::{Checks, Twin};

#[test]
fn encrypted_qcow2_info_without_the_key() {
    let twin = Twin::new();
    let s = &twin.s;
    let secret = "secret,id=sec0,data=abc";
    for (name, opts, extra) in [
        (
            "luks.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            None,
        ),
        (
            "cbc.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
            None,
        ),
        ("aes.qcow2", "encrypt.format=aes,encrypt.key-secret=sec0", None),
        (
            "overlay.qcow2",
            "encrypt.format=aes,encrypt.key-secret=sec0",
            Some("luks.qcow2"),
        ),
    ] {
        let mut a = vec!["create", "-q", "-f", "qcow2", "--object", secret, "-o", opts];
        if let Some(b) = extra {
            a.extend(["-b", b, "-F", "qcow2", "-u"]);
        }
        a.extend([name, "8M"]);
        s.qemu(&a).assert_ok();
    }
    let mut c = Checks::new();
    for name in ["luks.qcow2", "cbc.qcow2", "aes.qcow2", "overlay.qcow2"] {
        let img = format!("../s/{name}");
        for args in [
            vec!["info", img.as_str()],
            vec!["info", "--output=json", img.as_str()],
            vec!["info", "--backing-chain", img.as_str()],
            vec!["map", img.as_str()],
            vec!["check", img.as_str()],
            vec!["compare", img.as_str(), img.as_str()],
            vec!["convert", "-O", "raw", img.as_str(), "out.raw"],
        ] {
            c.same(&twin.run(&args));
        }
    }
    c.finish();
}

/// With the key (`--object secret` and `--image-opts ...,encrypt.key-secret=`), LUKS
/// encrypted qcow2 reads as qemu-img reads it: convert -O raw byte for byte, compare, map
/// (no host offsets for encrypted data), and a wrong password gets qemu-img's error.
#[test]
fn encrypted_qcow2_reads_with_the_key() {
    let twin = Twin::new();
    let s = &twin.s;
    let secret = "secret,id=sec0,data=abc";
    let cases = [
        ("xts.qcow2", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"),
        (
            "cbc.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
        ),
        (
            "plain.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,cluster_size=4k",
        ),
    ];
    for (name, opts) in cases {
        s.qemu(&[
            "create", "-q", "-f", "qcow2", "--object", secret, "-o", opts, name, "8M",
        ])
        .assert_ok();
        let io = crate::util::Cmd::new(crate::util::QEMU_IO, "qemu-io", s.path())
            .args(&[
                "--object",
                secret,
                "--image-opts",
                &format!("driver=qcow2,file.filename={name},encrypt.key-secret=sec0"),
                "-c",
                "write -P 7 0 1M",
                "-c",
                "write -P 9 3M 100k",
                "-c",
                "write -z 5M 64k",
                "-c",
                "write -P 3 8388096 512",
            ])
            .run();
        io.assert_ok();
    }
    let mut c = Checks::new();
    for (name, _) in cases {
        let opts = format!("driver=qcow2,file.filename=../s/{name},encrypt.key-secret=sec0");
        let bad = opts.replace("sec0", "sec1");
        for args in [
            vec![
                "convert",
                "--object",
                secret,
                "--image-opts",
                &opts,
                "-O",
                "raw",
                "out.raw",
            ],
            vec!["map", "--object", secret, "--image-opts", &opts],
            vec![
                "map",
                "--output=json",
                "--object",
                secret,
                "--image-opts",
                &opts,
            ],
            vec!["check", "--object", secret, "--image-opts", &opts],
            vec![
                "convert",
                "--object",
                "secret,id=sec1,data=abd",
                "--image-opts",
                &bad,
                "-O",
                "raw",
                "o.raw",
            ],
        ] {
            let pair = twin.run(&args);
            c.same(&pair);
            if args[0] == "convert" && pair.both_ok() {
                c.result(twin.same_file("out.raw"));
            }
        }
    }
    c.finish();
}
