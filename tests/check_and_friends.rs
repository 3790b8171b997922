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
