//! stderr stays empty on success for `info`, `map`, `convert`, `create`, `compare`, `measure`:
//! Glance fails an image import when `qemu-img info` or `convert` writes anything to stderr.

use crate::util::{Checks, Twin, K, M};

#[test]
fn stderr_empty_on_success() {
    let twin = Twin::new();
    twin.s
        .patterned("img", 8 * M, &[(0x11, 0, 64 * K), (0x22, 5 * M, 4 * K)]);
    twin.s.dense("odd", 5000, 31);
    twin.s
        .patterned("img2", 8 * M, &[(0x11, 0, 64 * K), (0x22, 5 * M, 4 * K)]);
    let cases: &[&[&str]] = &[
        &["info", "../s/img"],
        &["info", "--output=json", "../s/img"],
        &["info", "../s/img", "--force-share", "--output=json"],
        &["info", "-f", "raw", "--output=json", "../s/odd"],
        &["map", "../s/img"],
        &["map", "--output=json", "-f", "raw", "../s/img"],
        &["convert", "-f", "raw", "-O", "raw", "../s/img", "out1"],
        &["convert", "-O", "raw", "../s/img", "out2"],
        &["convert", "../s/odd", "out3"],
        &[
            "convert", "-t", "none", "-T", "none", "-O", "raw", "../s/odd", "out4",
        ],
        &["convert", "-q", "-S", "0", "-O", "raw", "../s/img", "out5"],
        &["create", "-f", "raw", "new1", "1G"],
        &["create", "new2", "1M"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "new3",
            "64k",
        ],
        &["compare", "../s/img", "../s/img2"],
        &["compare", "-f", "raw", "-F", "raw", "../s/img", "../s/img2"],
        &["measure", "-O", "raw", "../s/img"],
        &["measure", "--size", "1G", "-O", "raw", "--output=json"],
    ];
    let mut c = Checks::new();
    for args in cases {
        let pair = twin.run(args);
        let cmd = args.join(" ");
        c.no_panic(&pair.rimg);
        c.check(pair.qemu.ok() && pair.qemu.stderr.is_empty(), || {
            format!(
                "test premise: qemu-img should succeed silently\n{}",
                pair.qemu.describe()
            )
        });
        c.check(pair.rimg.ok() && pair.rimg.stderr.is_empty(), || {
            format!(
                "`{cmd}`: rimg must succeed with an empty stderr\n{}",
                pair.rimg.describe()
            )
        });
    }
    c.finish();
}

/// A reader that stops early (`rimg map ... | head`) ends rimg as it ends qemu-img: by
/// SIGPIPE, with nothing on stderr, never a panic.
#[test]
fn closed_stdout_pipe_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    for args in [&["--help"][..], &["--version"][..], &["info", "--help"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rimg"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before rimg writes
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {:?}",
            out.status
        );
    }
}
