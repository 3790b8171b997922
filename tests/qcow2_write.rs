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
