//! `resize`: grow (`+SIZE` and absolute), shrink with and without `--shrink`, preallocation,
//! `-q`, errors: same output and exit code as qemu-img, same resulting file.

use crate::util::{Checks, Twin, K, M};

fn check_resize(cases: &[&[&str]]) {
    let mut c = Checks::new();
    for args in cases {
        let twin = Twin::new();
        twin.each(|d| {
            d.patterned("img", M, &[(0x11, 0, 4 * K), (0x22, 700 * K, 4 * K)]);
            d.mkdir("adir");
        });
        let mut full = vec!["resize"];
        full.extend_from_slice(args);
        let pair = twin.run(&full);
        c.same(&pair);
        c.result(
            twin.same_file("img")
                .map_err(|e| format!("`{}`: {e}", full.join(" "))),
        );
        if pair.both_ok() && args.iter().any(|a| a.contains("preallocation=f")) {
            let (q, r) = (twin.q.allocated("img"), twin.r.allocated("img"));
            c.check(r + 4 * K >= q, || {
                format!(
                    "`{}`: rimg allocated {r} bytes, qemu-img {q} (must preallocate the new part)",
                    full.join(" ")
                )
            });
        }
    }
    c.finish();
}

#[test]
fn resize_grow() {
    check_resize(&[
        &["-f", "raw", "img", "+1M"],
        &["img", "+1M"],
        &["-f", "raw", "img", "5M"],
        &["-f", "raw", "img", "1M"],
        &["-f", "raw", "img", "+0"],
        &["-f", "raw", "img", "1048583"],
        &["-f", "raw", "img", "+1000"],
        &["img", "+1M", "-f", "raw"],
        &["--image-opts", "driver=raw,file.filename=img", "+64k"],
        &["-q", "-f", "raw", "img", "+1M"],
        &["-q", "img", "+1M"],
    ]);
}

#[test]
fn resize_shrink() {
    check_resize(&[
        &["-f", "raw", "img", "512k"],
        &["-f", "raw", "--shrink", "img", "512k"],
        &["--shrink", "img", "512k"],
        &["-f", "raw", "img", "--", "-512k"],
        &["-f", "raw", "--shrink", "img", "--", "-512k"],
        &["-f", "raw", "img", "1000"],
        &["-f", "raw", "--shrink", "img", "1000"],
        &["-f", "raw", "--shrink", "img", "0"],
        &["-f", "raw", "--shrink", "img", "--", "-2M"],
        &["-q", "-f", "raw", "--shrink", "img", "100k"],
    ]);
}

#[test]
fn resize_preallocation() {
    check_resize(&[
        &["-f", "raw", "--preallocation=falloc", "img", "3M"],
        &["-f", "raw", "--preallocation=full", "img", "4M"],
        &["-f", "raw", "--preallocation=off", "img", "4M"],
        &["-f", "raw", "--preallocation=full", "img", "+5000"],
        &["-f", "raw", "--preallocation", "falloc", "img", "+1M"],
        &["-f", "raw", "--preallocation=falloc", "img", "1M"],
        &[
            "-f",
            "raw",
            "--shrink",
            "--preallocation=full",
            "img",
            "512k",
        ],
        &["-f", "raw", "--preallocation=bogus", "img", "10M"],
        &["-f", "raw", "--preallocation=metadata", "img", "10M"],
    ]);
}

#[test]
fn resize_errors() {
    check_resize(&[
        &["-f", "raw", "img", "12Q"],
        &["-f", "raw", "img", "+12Q"],
        &["-f", "raw", "img", "abc"],
        &["-f", "raw", "img", ""],
        &["-f", "raw", "img"],
        &["-f", "raw"],
        &[],
        &["-f", "raw", "img", "1M", "2M"],
        &["-f", "raw", "nonexistent", "1M"],
        &["-f", "raw", "adir", "1M"],
        &["adir", "1M"],
        &["-f", "foo", "img", "1M"],
        &["--bogus", "img", "1M"],
        &["-x", "img", "1M"],
        &["-f", "raw", "img", "99999999999999999999"],
        &["-f", "raw", "img", "9E"],
        &["--image-opts", "-f", "raw", "img", "1M"],
    ]);
}
