//! `dd`: `bs=`, `count=`, `skip=`, `if=`, `of=`, `-f`, `-O`, with qemu-img's own `count`
//! semantics. Each tool writes its own output file; both files must be identical, and the
//! outputs and exit codes equal.

use crate::util::{Checks, Twin, K, M};

fn twin() -> Twin {
    let twin = Twin::new();
    twin.s.patterned(
        "src",
        8 * M,
        &[
            (0x11, 0, 64 * K),
            (0x22, 3 * M + 100, 5000),
            (0x33, 8 * M - 4 * K, 4 * K),
        ],
    );
    twin.s.dense("odd", 5000, 21);
    twin.s.mkdir("adir");
    twin.each(|d| {
        d.mkdir("adir");
    });
    twin
}

fn check_dd(cases: &[&[&str]], prepare: impl Fn(&Twin)) {
    let twin = twin();
    let mut c = Checks::new();
    for args in cases {
        prepare(&twin);
        let mut full = vec!["dd"];
        full.extend_from_slice(args);
        let files = ["out", "adir"];
        let before = twin.states(&files);
        let pair = twin.run(&full);
        c.same(&pair);
        c.result(
            twin.files_after(&pair, &files, &before)
                .map_err(|e| format!("`{}`: {e}", full.join(" "))),
        );
        twin.each(|d| {
            let _ = std::fs::remove_file(d.join("out"));
        });
    }
    c.finish();
}

#[test]
fn dd_copies() {
    check_dd(
        &[
            &["if=../s/src", "of=out"],
            &["if=../s/src", "of=out", "bs=64k", "count=10"],
            &[
                "-f",
                "raw",
                "-O",
                "raw",
                "if=../s/src",
                "of=out",
                "bs=1M",
                "skip=6",
            ],
            &["if=../s/src", "of=out", "bs=1000", "count=3", "skip=2"],
            &["if=../s/src", "of=out", "count=1"],
            &["if=../s/src", "of=out", "skip=1000"],
            &["if=../s/src", "of=out", "bs=4k", "skip=768", "count=3"],
            &["if=../s/src", "of=out", "bs=1k", "count=0"],
            &["if=../s/src", "of=out", "skip=999999"],
            &["if=../s/src", "of=out", "bs=64k", "count=100000"],
            &["if=../s/src", "of=out", "bs=8M"],
            &["if=../s/src", "of=out", "bs=16M"],
            &["of=out", "if=../s/src", "bs=3M"],
            &["if=../s/odd", "of=out"],
            &["if=../s/odd", "of=out", "bs=4k"],
            &["if=../s/odd", "of=out", "bs=7", "count=10", "skip=3"],
            &["if=../s/odd", "of=out", "bs=1000", "skip=4"],
            &["if=../s/odd", "of=out", "bs=1000", "skip=5"],
            &["-U", "if=../s/odd", "of=out"],
            &["if=../s/src", "of=out", "-f", "raw"],
        ],
        |_| {},
    );
}

#[test]
fn dd_over_existing_output() {
    check_dd(
        &[
            &["if=../s/src", "of=out", "bs=64k", "count=2"],
            &["if=../s/odd", "of=out"],
            &["if=../s/src", "of=out", "count=0"],
        ],
        |t| {
            t.each(|d| {
                d.filled("out", 9 * M + 3, 0xfe);
            });
        },
    );
}

#[test]
fn dd_errors() {
    check_dd(
        &[
            &["if=../s/src", "of=out", "bs=0"],
            &["if=../s/src", "of=out", "bs=-1"],
            &["if=../s/src", "of=out", "bs=abc"],
            &["if=../s/src", "of=out", "bs=3G"],
            &["if=../s/src", "of=out", "count=-1"],
            &["if=../s/src", "of=out", "count=x"],
            &["if=../s/src", "of=out", "skip=-1"],
            &["if=../s/src", "of=out", "skip=1x"],
            &["if=../s/src", "of=out", "foo=1"],
            &["if=../s/src", "of=out", "conv=notrunc"],
            &["if=../s/src", "of=out", "bs"],
            &["if=../s/src", "of=out", "extra"],
            &["if=../s/src"],
            &["of=out"],
            &[],
            &["if=nonexistent", "of=out"],
            &["if=../s/adir", "of=out"],
            &["if=../s/src", "of=adir"],
            &["if=../s/src", "of=nodir/out"],
            &["-O", "foo", "if=../s/src", "of=out"],
            &["-f", "foo", "if=../s/src", "of=out"],
            &["--bogus", "if=../s/src", "of=out"],
            &["-x", "if=../s/src", "of=out"],
        ],
        |_| {},
    );
}
