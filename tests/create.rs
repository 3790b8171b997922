//! `create -f raw`: sizes, `-o` options, preallocation (the `Formatting ...` line, file length and
//! allocation), `-q`, and errors (stderr and exit code exactly; no file left or changed where
//! qemu-img leaves none).

use crate::util::{Checks, Twin, K, M};

/// Compare a create (or any other writing command) run in twin directories: same output, and the
/// files in `names` in the same state afterwards. Large files are compared by length only.
fn check_create(c: &mut Checks, twin: &Twin, args: &[&str], names: &[&str]) {
    let before = twin.states(names);
    let pair = twin.run(args);
    c.same(&pair);
    for (name, before) in names.iter().zip(&before) {
        if twin.q.exists(name) && twin.q.len(name) > 64 * M {
            c.check(
                twin.r.exists(name) && twin.r.len(name) == twin.q.len(name),
                || {
                    format!(
                        "`{}`: {name} has length {} with qemu-img, {} with rimg",
                        args.join(" "),
                        twin.q.len(name),
                        if twin.r.exists(name) {
                            twin.r.len(name).to_string()
                        } else {
                            "<no file>".into()
                        }
                    )
                },
            );
        } else {
            c.result(
                twin.files_after(&pair, &[name], std::slice::from_ref(before))
                    .map_err(|e| format!("`{}`: {e}", args.join(" "))),
            );
        }
    }
}

#[test]
fn create_sizes() {
    let mut c = Checks::new();
    for size in [
        "1G", "1.5k", "0", "512", "100", "1M", "5000", "1T", "64k", "1.5M", "0x1000", "0x100",
        "010", "+1M", " 1M", "1M ", "512b", "1B", "1", "513", "1000", "1m", "1g", "2t",
    ] {
        let twin = Twin::new();
        check_create(
            &mut c,
            &twin,
            &["create", "-f", "raw", "img", size],
            &["img"],
        );
        if twin.r.exists("img") && twin.q.exists("img") {
            let (q, r) = (twin.q.allocated("img"), twin.r.allocated("img"));
            c.check(r <= q + 64 * K, || {
                format!("create {size}: rimg allocated {r} bytes, qemu-img only {q}")
            });
        }
    }
    c.finish();
}

#[test]
fn create_option_forms() {
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["create", "img", "1M"],
        &["create", "img", "1M", "-f", "raw"],
        &["create", "-f", "raw", "-o", "size=2M", "img"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=off,size=2M",
            "img",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=off",
            "-o",
            "size=3M",
            "img",
        ],
        &["create", "--format=raw", "img", "1M"],
        &["create", "-f", "raw", "-o", "nocow=on", "img", "1M"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "extent_size_hint=1M",
            "img",
            "1M",
        ],
        &["create", "-f", "raw", "-u", "img", "1M"],
        &["create", "-f", "raw", "img", "--", "1M"],
    ];
    for args in cases {
        let twin = Twin::new();
        check_create(&mut c, &twin, args, &["img"]);
    }
    c.finish();
}

#[test]
fn create_help() {
    let twin = Twin::new();
    let mut c = Checks::new();
    check_create(
        &mut c,
        &twin,
        &["create", "-f", "raw", "-o", "help"],
        &["help"],
    );
    check_create(
        &mut c,
        &twin,
        &["create", "-f", "raw", "-o", "help", "img", "1M"],
        &["img"],
    );
    check_create(&mut c, &twin, &["create", "-f", "raw", "-o", "?"], &["?"]);
    c.finish();
}

#[test]
fn create_preallocation() {
    let mut c = Checks::new();
    for mode in ["off", "falloc", "full"] {
        for size in [M, 5000, 0, 16 * M, 512] {
            let twin = Twin::new();
            let opt = format!("preallocation={mode}");
            let size_s = size.to_string();
            let args = ["create", "-f", "raw", "-o", &opt, "img", &size_s];
            check_create(&mut c, &twin, &args, &["img"]);
            if !(twin.q.exists("img") && twin.r.exists("img")) {
                continue;
            }
            let (q, r) = (twin.q.allocated("img"), twin.r.allocated("img"));
            if mode == "off" {
                c.check(r <= q + 64 * K, || {
                    format!("create {opt} {size}: rimg allocated {r} bytes, qemu-img {q}")
                });
            } else {
                c.check(r + 4 * K >= q && (q == 0 || r > 0), || {
                    format!(
                        "create {opt} {size}: rimg allocated {r} bytes, qemu-img {q} (must preallocate like qemu-img)"
                    )
                });
            }
        }
    }
    c.finish();
}

#[test]
fn create_quiet() {
    let mut c = Checks::new();
    for args in [
        &["create", "-q", "-f", "raw", "img", "1M"][..],
        &["create", "-f", "raw", "img", "1M", "-q"][..],
        &[
            "create",
            "-q",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "img",
            "64k",
        ][..],
        &["create", "-q", "-f", "raw", "img", "12Q"][..],
    ] {
        let twin = Twin::new();
        check_create(&mut c, &twin, args, &["img"]);
    }
    c.finish();
}

#[test]
fn create_over_existing_file() {
    let mut c = Checks::new();
    for args in [
        &["create", "-f", "raw", "existing", "1M"][..],
        &["create", "-f", "raw", "existing", "0"][..],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "existing",
            "8k",
        ][..],
    ] {
        let twin = Twin::new();
        twin.each(|d| {
            d.dense("existing", 100 * K, 9);
        });
        check_create(&mut c, &twin, args, &["existing"]);
    }
    c.finish();
}

#[test]
fn create_errors() {
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["create", "-f", "raw", "new", "12Q"],
        &["create", "-f", "raw", "new", "-5"],
        &["create", "-f", "raw", "new", "--", "-5"],
        &["create", "-f", "raw", "new", "99999999999999999999"],
        &["create", "-f", "raw", "new", "9E"],
        &["create", "-f", "raw", "new", "8E"],
        &["create", "-f", "raw", "new", "1.5"],
        &["create", "-f", "raw", "new", "1x"],
        &["create", "-f", "raw", "new", "0.5"],
        &["create", "-f", "raw", "new", "1e3"],
        &["create", "-f", "raw", "new", "1kB"],
        &["create", "-f", "raw", "new", "1KiB"],
        &["create", "-f", "raw", "new", "18446744073709551615"],
        // too large for a raw file: parsed, then creation fails
        &["create", "-f", "raw", "new", "1E"],
        &["create", "-f", "raw", "new", "1p"],
        &["create", "-f", "raw", "new", "8388607T"],
        &["create", "-f", "raw", "new", "9223372036854775807"],
        &["create", "-f", "raw", "new", ""],
        &["create", "-f", "raw", "-o", "foo=1", "new", "1M"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=bogus",
            "new",
            "1M",
        ],
        &["create", "-f", "raw", "-o", "preallocation", "new", "1M"],
        &["create", "-f", "raw", "-o", "size=2M", "new", "3M"],
        &["create", "-f", "raw", "-o", "size=abc", "new"],
        &["create", "-f", "raw", "new"],
        &["create", "-f", "raw"],
        &["create"],
        &["create", "-f", "raw", "new", "1M", "2M"],
        &["create", "-f", "foo", "new", "1M"],
        &["create", "-f", "raw", "-b", "existing", "new", "1M"],
        &["create", "-f", "raw", "-F", "raw", "new", "1M"],
        &["create", "--bogus", "-f", "raw", "new", "1M"],
        &["create", "-f", "raw", "adir", "1M"],
        &["create", "-f", "raw", "nodir/new", "1M"],
        &["create", "-f", "raw", "existing", "12Q"],
        &["create", "-f", "raw", "-o", "foo=1", "existing", "1M"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=bogus",
            "existing",
            "1M",
        ],
        &["create", "-f"],
    ];
    for args in cases {
        let twin = Twin::new();
        twin.each(|d| {
            d.dense("existing", 100 * K, 10);
            d.mkdir("adir");
        });
        check_create(&mut c, &twin, args, &["new", "existing", "adir"]);
    }
    c.finish();
}
