//! Command-line parsing as qemu-img's GNU getopt does it: `--help`/`-h` per command, long option
//! names as the binary accepts them (not as its `--help` lists them), unique-prefix abbreviations,
//! ambiguous prefixes, permutation, repeated options.

use crate::util::{Checks, Twin, K, M};

const COMMANDS: &[&str] = &[
    "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd", "info",
    "map", "measure", "rebase", "resize", "snapshot",
];

fn twin() -> Twin {
    let twin = Twin::new();
    twin.each(|d| {
        d.patterned("img", M, &[(0x11, 0, 4 * K), (0x22, 600 * K, 4 * K)]);
    });
    twin
}

fn check_cases(twin: &Twin, c: &mut Checks, cases: &[Vec<&str>]) {
    for args in cases {
        let files = ["img", "out"];
        let before = twin.states(&files);
        let pair = twin.run(args);
        c.same(&pair);
        c.result(
            twin.files_after(&pair, &files, &before)
                .map_err(|e| format!("`{}`: {e}", args.join(" "))),
        );
        twin.each(|d| {
            let _ = std::fs::remove_file(d.join("out"));
        });
    }
}

#[test]
fn help_per_command() {
    let twin = twin();
    let mut c = Checks::new();
    let mut cases = Vec::new();
    for cmd in COMMANDS {
        cases.push(vec![*cmd, "--help"]);
        cases.push(vec![*cmd, "-h"]);
        cases.push(vec![*cmd, "img", "--help"]);
        cases.push(vec![*cmd, "--help", "--bogus"]);
        cases.push(vec![*cmd, "--bogus", "--help"]);
        cases.push(vec![*cmd, "-f", "raw", "--help", "nosuch"]);
        cases.push(vec![*cmd, "--he"]);
    }
    // The help text itself is rimg's own documentation (qemu-img's has typos and lists option
    // names its binary rejects); what callers rely on is when help is shown, on which stream,
    // with which exit code, and that nothing else happens.
    for args in &cases {
        let pair = twin.run(args);
        c.no_panic(&pair.rimg);
        c.check(
            pair.qemu.code() == pair.rimg.code()
                && pair.qemu.stderr == pair.rimg.stderr
                && pair.qemu.stdout.is_empty() == pair.rimg.stdout.is_empty(),
            || {
                format!(
                    "`qemu-img {}`: exit code, stderr or (non-)empty stdout differ\n{}{}",
                    args.join(" "),
                    pair.qemu.describe(),
                    pair.rimg.describe()
                )
            },
        );
    }
    c.finish();
}

/// Top-level `-h`/`-V`: the text names qemu's build and format list, so only the exit code and
/// stderr are compared (both print on stdout only).
#[test]
fn top_level_help_and_version() {
    let twin = twin();
    let mut c = Checks::new();
    for args in [
        &["-h"][..],
        &["--help"][..],
        &["-V"][..],
        &["--version"][..],
        &["--v"][..],
        &["-V", "info"][..],
        &["--vers=1"][..],
        &["--"][..],
        &["--", "info"][..],
        &["help"][..],
    ] {
        let pair = twin.run(args);
        c.no_panic(&pair.rimg);
        c.check(
            pair.qemu.code() == pair.rimg.code()
                && pair.qemu.stderr == pair.rimg.stderr
                && pair.qemu.stdout.is_empty() == pair.rimg.stdout.is_empty(),
            || {
                format!(
                    "`qemu-img {}`: exit code, stderr or (non-)empty stdout differ\n{}{}",
                    args.join(" "),
                    pair.qemu.describe(),
                    pair.rimg.describe()
                )
            },
        );
    }
    c.finish();
}

#[test]
fn getopt_abbreviations_and_repeats() {
    let twin = twin();
    let mut c = Checks::new();
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", "--out=json", "img"],
        vec!["info", "--outp", "json", "img"],
        vec!["info", "--back", "img"],
        vec!["info", "--force", "img"],
        vec!["info", "--for=raw", "img"],
        vec!["info", "--f=raw", "img"],
        vec!["info", "--form=raw", "img"],
        vec!["info", "--format", "img"],
        vec!["info", "--format"],
        vec!["info", "--backing-chain=1", "img"],
        vec!["info", "--output=json", "--output=human", "img"],
        vec!["info", "-f", "raw", "-f", "raw", "img"],
        vec!["info", "-f", "foo", "-f", "raw", "img"],
        vec!["info", "-Uf", "raw", "img"],
        vec!["info", "-fraw", "img"],
        vec!["info", "--", "img"],
        vec!["info", "--", "--output=json"],
        vec!["map", "--start=4096", "--max=8192", "--output=json", "img"],
        vec!["map", "--st=4096", "img"],
        vec!["measure", "-s", "1M"],
        vec!["measure", "--si", "1M"],
        vec![
            "compare",
            "--left-format=raw",
            "--right-format=raw",
            "img",
            "img",
        ],
        vec!["compare", "--a-format=raw", "--b-format=raw", "img", "img"],
        vec!["compare", "--strict", "img", "img"],
        vec!["check", "-u", "img"],
        vec![
            "create",
            "--format=raw",
            "--options=preallocation=off",
            "out",
            "1M",
        ],
        vec![
            "create",
            "-o",
            "preallocation=off",
            "-o",
            "preallocation=falloc",
            "out",
            "64k",
        ],
    ];
    check_cases(&twin, &mut c, &cases);
    c.finish();
}

/// convert's long option names, as the binary accepts them (some listed in `--help` are rejected).
#[test]
fn convert_long_option_names() {
    let twin = twin();
    let mut c = Checks::new();
    let mut cases: Vec<Vec<&str>> = vec![
        vec![
            "convert",
            "--source-format=raw",
            "--output-format=raw",
            "img",
            "out",
        ],
        vec!["convert", "--output-format", "raw", "img", "out"],
        vec!["convert", "--options=preallocation=off", "img", "out"],
        vec![
            "convert",
            "--output-cache=unsafe",
            "--source-cache=writeback",
            "img",
            "out",
        ],
        vec!["convert", "--sparse-size=64k", "img", "out"],
        vec!["convert", "--parallel=4", "--oob-writes", "img", "out"],
        vec!["convert", "--copy-range-offloading", "img", "out"],
        vec!["convert", "--rate=100M", "img", "out"],
        vec!["convert", "--force-share", "img", "out"],
        vec![
            "convert",
            "--image-opts",
            "driver=raw,file.filename=img",
            "out",
        ],
        vec![
            "convert",
            "--source-image-opts",
            "driver=raw,file.filename=img",
            "out",
        ],
        vec!["convert", "--output=raw", "img", "out"],
        vec!["convert", "--target-format=raw", "img", "out"],
        vec!["convert", "--progress", "img", "out"],
        vec!["convert", "--no-create", "img", "out"],
        vec!["convert", "--compress", "img", "out"],
        vec!["convert", "--target-cache=none", "img", "out"],
        vec![
            "convert",
            "--target-options=preallocation=off",
            "img",
            "out",
        ],
        vec!["convert", "--source-snapshot=x", "img", "out"],
        vec!["convert", "--quiet", "img", "out"],
        vec!["convert", "--salvage", "img", "out"],
    ];
    for cmd in ["resize", "dd", "bitmap"] {
        cases.push(vec![cmd, "--quiet"]);
        cases.push(vec![cmd, "--format=raw"]);
    }
    check_cases(&twin, &mut c, &cases);
    c.finish();
}
