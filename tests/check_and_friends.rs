//! `check` (exit 63 for raw), `amend`, `snapshot`, `bitmap`, `commit`, `rebase` on raw images:
//! the same messages and exit codes as qemu-img, and the image left unchanged.

use crate::util::{normalize_node_names, Checks, Twin, K, M};

fn check_cmds(cases: &[&[&str]]) {
    let mut c = Checks::new();
    for args in cases {
        let twin = Twin::new();
        twin.each(|d| {
            d.patterned("img", M, &[(0x11, 0, 4 * K)]);
            d.patterned("other", M, &[(0x22, 0, 4 * K)]);
            d.mkdir("adir");
        });
        let pair = twin.run(args);
        // qemu names anonymous nodes `#block123`, differently from one run to the next
        c.same_normalized(&pair, normalize_node_names);
        for f in ["img", "other"] {
            c.result(
                twin.same_file(f)
                    .map_err(|e| format!("`{}`: {e}", args.join(" "))),
            );
        }
    }
    c.finish();
}

#[test]
fn check_raw() {
    check_cmds(&[
        &["check", "img"],
        &["check", "-f", "raw", "img"],
        &["check", "-f", "raw", "--output=json", "img"],
        &["check", "-f", "raw", "--output=human", "img"],
        &["check", "-r", "all", "-f", "raw", "img"],
        &["check", "-r", "leaks", "-f", "raw", "img"],
        &["check", "-q", "-f", "raw", "img"],
        &["check", "-U", "-f", "raw", "img"],
        &["check", "img", "-f", "raw", "--output=json"],
        &["check", "--image-opts", "driver=raw,file.filename=img"],
        &["check", "-f", "raw", "--output=xml", "img"],
        &["check", "-r", "bogus", "-f", "raw", "img"],
        &["check", "nonexistent"],
        &["check", "-f", "raw", "adir"],
        &["check"],
        &["check", "img", "other"],
        &["check", "-f", "foo", "img"],
        &["check", "--bogus", "img"],
    ]);
}

#[test]
fn amend_raw() {
    check_cmds(&[
        &["amend", "-f", "raw", "-o", "size=2M", "img"],
        &["amend", "-o", "size=2M", "img"],
        &["amend", "-f", "raw", "-o", "preallocation=full", "img"],
        &["amend", "-f", "raw", "-o", "help", "img"],
        &["amend", "-f", "raw", "img"],
        &["amend", "-f", "raw", "-o", "size=2M"],
        &["amend", "-f", "raw", "-o", "size=2M", "nonexistent"],
        &["amend", "-f", "raw", "-o", "size=2M", "adir"],
        &["amend", "--bogus", "img"],
    ]);
}

#[test]
fn snapshot_raw() {
    check_cmds(&[
        &["snapshot", "-l", "img"],
        &["snapshot", "-f", "raw", "-l", "img"],
        &["snapshot", "-U", "-l", "img"],
        &["snapshot", "-f", "raw", "img"],
        &["snapshot", "-c", "s1", "-f", "raw", "img"],
        &["snapshot", "-a", "s1", "-f", "raw", "img"],
        &["snapshot", "-d", "s1", "-f", "raw", "img"],
        &["snapshot", "-l", "--output=json", "-f", "raw", "img"],
        &["snapshot", "-l", "nonexistent"],
        &["snapshot", "-l", "adir"],
        &["snapshot", "-l"],
        &["snapshot", "-l", "-c", "s1", "img"],
        &["snapshot", "--bogus", "img"],
    ]);
}

#[test]
fn bitmap_raw() {
    check_cmds(&[
        &["bitmap", "--add", "-f", "raw", "img", "b0"],
        &["bitmap", "--add", "img", "b0"],
        &["bitmap", "--remove", "-f", "raw", "img", "b0"],
        &["bitmap", "--clear", "-f", "raw", "img", "b0"],
        &["bitmap", "--enable", "-f", "raw", "img", "b0"],
        &["bitmap", "--disable", "-f", "raw", "img", "b0"],
        &["bitmap", "-f", "raw", "img", "b0"],
        &["bitmap", "--add", "-f", "raw", "img"],
        &["bitmap", "--add", "-f", "raw", "nonexistent", "b0"],
        &["bitmap", "--bogus", "img", "b0"],
    ]);
}

#[test]
fn commit_raw() {
    check_cmds(&[
        &["commit", "-f", "raw", "img"],
        &["commit", "img"],
        &["commit", "-f", "raw", "-d", "img"],
        &["commit", "-f", "raw", "-q", "img"],
        &["commit", "-b", "other", "-f", "raw", "img"],
        &["commit", "-f", "raw", "nonexistent"],
        &["commit", "-f", "raw", "adir"],
        &["commit"],
        &["commit", "--bogus", "img"],
    ]);
}

#[test]
fn rebase_raw() {
    check_cmds(&[
        &["rebase", "-f", "raw", "-b", "other", "img"],
        &["rebase", "-f", "raw", "-b", "other", "-F", "raw", "img"],
        &[
            "rebase", "-u", "-f", "raw", "-b", "other", "-F", "raw", "img",
        ],
        &["rebase", "-u", "-f", "raw", "-b", "", "img"],
        &["rebase", "-f", "raw", "-b", "", "img"],
        &["rebase", "-f", "raw", "img"],
        &[
            "rebase",
            "-f",
            "raw",
            "-b",
            "other",
            "-F",
            "raw",
            "nonexistent",
        ],
        &["rebase"],
        &["rebase", "--bogus", "img"],
    ]);
}

/// `check -r leaks|all` on qcow2: a leaked cluster (an L2 entry dropped) and a refcount
/// set too low (a corruption) are repaired as qemu-img repairs them — the same lines on
/// stderr, the same report (human and JSON), the same exit code and the same file bytes.
#[test]
fn check_repair_qcow2() {
    let twin = Twin::new();
    let s = &twin.s;
    s.qemu(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"])
        .assert_ok();
    s.qemu_io_fmt("qcow2", "base.qcow2", &["write -P 1 0 256k"]);
    let mut b = std::fs::read(s.join("base.qcow2")).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rt = be64(&b, 48) as usize;
    let rb = (be64(&b, rt)) as usize;
    // Leak: forget the second data cluster.
    let mut leak = b.clone();
    leak[l2 + 8..l2 + 16].fill(0);
    s.write_bytes("leak.qcow2", &leak);
    // Corruption: the third data cluster's refcount (16-bit entries) dropped to 0.
    let third = (be64(&b, l2 + 16) & 0x00ff_ffff_ffff_fe00) / 65536;
    b[rb + third as usize * 2..rb + third as usize * 2 + 2].fill(0);
    b[l2 + 8..l2 + 16].fill(0);
    s.write_bytes("both.qcow2", &b);
    let mut c = Checks::new();
    // Corruptions: qemu-img rebuilds the refcount structures; rimg refuses, one line,
    // the image unchanged.
    std::fs::copy(s.join("both.qcow2"), twin.r.join("t.qcow2")).unwrap();
    let before = twin.r.state("t.qcow2");
    let r = twin.r.rimg(&["check", "-r", "all", "t.qcow2"]);
    c.no_panic(&r);
    c.check(
        !r.ok() && r.err().contains("not supported by rimg yet"),
        || r.describe(),
    );
    c.check(twin.r.state("t.qcow2") == before, || {
        "the image changed".into()
    });
    for (img, args) in [
        ("leak.qcow2", vec!["check", "-r", "leaks"]),
        ("leak.qcow2", vec!["check", "-r", "all", "--output=json"]),
        ("leak.qcow2", vec!["check", "-q", "-r", "leaks"]),
        ("leak.qcow2", vec!["check", "-r", "all"]),
    ] {
        twin.each(|d| {
            std::fs::copy(s.join(img), d.join("t.qcow2")).unwrap();
        });
        let mut a = args.clone();
        a.push("t.qcow2");
        c.same(&twin.run(&a));
        c.result(twin.same_file("t.qcow2"));
    }
    c.finish();
}
