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
