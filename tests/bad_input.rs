//! Bad input for every command: a missing file, a directory as the image, an unknown format, an
//! unknown option, missing arguments, `--output=xml`, an empty file name. rimg must print what
//! qemu-img prints and exit with its code; it must never panic, and the input image must be left
//! unchanged.

use crate::util::{skip, Checks, FileState, Twin, K, M};

/// One command line per command, with `X` standing for the image under test.
const TEMPLATES: &[&[&str]] = &[
    &["info", "X"],
    &["map", "X"],
    &["check", "X"],
    &["create", "-f", "raw", "X", "1M"],
    &["commit", "X"],
    &["compare", "X", "img"],
    &["compare", "img", "X"],
    &["convert", "X", "out"],
    &["convert", "-O", "raw", "img", "X"],
    &["amend", "-o", "size=2M", "X"],
    &["measure", "-O", "raw", "X"],
    &["snapshot", "-l", "X"],
    &["rebase", "-u", "-b", "", "X"],
    &["resize", "X", "2M"],
    &["dd", "if=X", "of=out"],
    &["dd", "if=img", "of=X"],
    &["bitmap", "--add", "X", "b0"],
    &["bench", "-c", "1", "X"],
];

/// Commands rimg need not implement yet: a difference is printed as a note, not a failure (a
/// panic or a changed input still fails).
const OPTIONAL: &[&str] = &["bench"];

fn subst(template: &[&str], x: &str) -> Vec<String> {
    template
        .iter()
        .map(|a| {
            if *a == "X" {
                x.to_string()
            } else {
                a.replace("=X", &format!("={x}"))
            }
        })
        .collect()
}

/// `template` with `extra` inserted right after the command name.
fn with_option(template: &[&str], extra: &[&str], x: &str) -> Vec<String> {
    let mut v = subst(template, x);
    let tail = v.split_off(1);
    v.extend(extra.iter().map(|s| s.to_string()));
    v.extend(tail);
    v
}

fn cases() -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for t in TEMPLATES {
        for x in ["nonexistent", "adir", "nodir/img", ""] {
            out.push(subst(t, x));
        }
        out.push(with_option(t, &["-f", "foo"], "img"));
        out.push(with_option(t, &["--bogus"], "img"));
        out.push(with_option(t, &["-Z"], "img"));
        out.push(with_option(t, &["--output=xml"], "img"));
        out.push(with_option(t, &["--image-opts", "-f", "raw"], "img"));
        out.push(vec![t[0].to_string()]);
        out.push(vec![t[0].to_string(), "-f".to_string()]);
    }
    out
}

fn build(twin: &Twin) {
    twin.each(|d| {
        d.patterned("img", M, &[(0x11, 0, 4 * K), (0x22, 512 * K, 512)]);
        d.mkdir("adir");
    });
}

fn check_bad_input(filter: impl Fn(&str) -> bool) {
    let twin = Twin::new();
    build(&twin);
    let before = twin.q.state("img");
    let mut c = Checks::new();
    for args in cases().into_iter().filter(|a| filter(&a[0])) {
        let files = ["img", "out", "nonexistent", "adir", "nodir"];
        let before_files = twin.states(&files);
        let pair = twin.run(&args);
        let cmd = args.join(" ");
        c.no_panic(&pair.rimg);
        if OPTIONAL.contains(&args[0].as_str()) {
            if let Some(d) = pair.diff() {
                skip(&format!("`{cmd}` differs (command optional for now):\n{d}"));
            }
        } else {
            c.same(&pair);
        }
        // where qemu-img leaves the image alone, rimg must too
        c.check(
            twin.q.state("img") != before || twin.r.state("img") == before,
            || format!("`{cmd}`: rimg changed the input image, qemu-img did not"),
        );
        c.result(
            twin.files_after(&pair, &files, &before_files)
                .map_err(|e| format!("`{cmd}`: {e}")),
        );
        // restore, so one case cannot affect the next
        for d in [&twin.q, &twin.r] {
            let _ = std::fs::remove_file(d.join("out"));
            let _ = std::fs::remove_file(d.join("nonexistent"));
            if d.state("img") != before {
                d.patterned("img", M, &[(0x11, 0, 4 * K), (0x22, 512 * K, 512)]);
            }
        }
        assert_eq!(twin.q.state("adir"), FileState::Directory);
    }
    c.finish();
}

#[test]
fn bad_input_info_map_check() {
    check_bad_input(|c| matches!(c, "info" | "map" | "check"));
}

#[test]
fn bad_input_create_commit_amend() {
    check_bad_input(|c| matches!(c, "create" | "commit" | "amend"));
}

#[test]
fn bad_input_compare_convert() {
    check_bad_input(|c| matches!(c, "compare" | "convert"));
}

#[test]
fn bad_input_measure_snapshot_rebase() {
    check_bad_input(|c| matches!(c, "measure" | "snapshot" | "rebase"));
}

#[test]
fn bad_input_resize_dd_bitmap_bench() {
    check_bad_input(|c| matches!(c, "resize" | "dd" | "bitmap" | "bench"));
}

#[test]
fn bad_input_global() {
    let twin = Twin::new();
    build(&twin);
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["frobnicate", "img"],
        &["--bogus"],
        &["-x"],
        &["-T"],
        &["info", "--output"],
        &["info", "-f"],
        &["convert", "-O"],
        &["create", "-o"],
    ];
    for args in cases {
        let pair = twin.run(args);
        c.same(&pair);
        c.result(twin.same_file("img"));
    }
    c.finish();
}
