//! `convert` raw → raw: the same command is run by qemu-img and by rimg, each into its own target.
//! rimg's target must be byte-identical to qemu-img's, `qemu-img compare` must call it identical to
//! the source, and it must be about as sparse as qemu-img's (fully allocated with `-S 0`).

use crate::util::{
    files_equal, io_uring_available, qemu_compare_identical, skip, Checks, Dir, Pair, Twin, K, M,
};

/// The sources, built in the twin's shared directory and named `../s/NAME` from both sides.
const SOURCES: &[&str] = &["sparse", "dense", "odd", "zeroes"];

/// `-f raw -O raw`
const RAW: &[&str] = &["-f", "raw", "-O", "raw"];

/// Slack allowed on top of qemu-img's allocation for a sparse target.
const ALLOC_SLACK: u64 = 256 * K;

fn make_sources(d: &Dir) {
    // sparse 64 MiB with a few written ranges, one of them all zeros, an unaligned tail
    d.patterned(
        "sparse",
        64 * M,
        &[
            (0x11, 0, 64 * K),
            (0x22, M + 512, 100 * K),
            (0x33, 10 * M, M),
            (0x00, 20 * M, M),
            (0x44, 40 * M + 4 * K + 17, 3 * K),
            (0x55, 64 * M - 1000, 1000),
        ],
    );
    // dense pseudo-random 16 MiB
    d.dense("dense", 16 * M, 42);
    // size not a multiple of 512
    d.dense("odd", 5000, 5);
    // zero-filled but allocated regions around a little data
    d.patterned(
        "zeroes",
        8 * M,
        &[
            (0x00, 0, 4 * M),
            (0x77, 4 * M, 4 * K),
            (0x00, 5 * M, 2 * M),
            (0x78, 8 * M - 512, 512),
        ],
    );
}

fn twin_with_sources() -> Twin {
    let twin = Twin::new();
    make_sources(&twin.s);
    twin
}

/// What a target's allocation must look like next to qemu-img's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Alloc {
    /// at most qemu-img's plus [`ALLOC_SLACK`] (sparse detection works)
    Sparse,
    /// at least qemu-img's (less one 4 KiB block): `-S 0`, preallocation
    Full,
    /// not checked (a pre-filled `-n` target: zeroing may keep or punch the blocks)
    Any,
}

fn src_path(src: &str) -> String {
    format!("../s/{src}")
}

/// Run `convert OPTS ../s/SRC... OUT` with both tools (with `env`) and check outputs, the targets
/// and their allocation. Returns the pair for more checks.
fn check_convert_env(
    c: &mut Checks,
    twin: &Twin,
    opts: &[&str],
    srcs: &[&str],
    out: &str,
    alloc: Alloc,
    env: &[(&str, &str)],
) -> Pair {
    let mut args: Vec<String> = vec!["convert".into()];
    args.extend(opts.iter().map(|s| s.to_string()));
    args.extend(srcs.iter().map(|s| src_path(s)));
    args.push(out.into());
    let pair = twin.run_env(&args, env);
    let what = || {
        let e: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        format!("{}{}", e.concat(), args.join(" "))
    };
    c.same(&pair);
    if !pair.both_ok() {
        c.result(
            twin.same_file(out)
                .map_err(|e| format!("`{}`: {e}", what())),
        );
        return pair;
    }
    c.result(
        files_equal(&twin.q.join(out), &twin.r.join(out))
            .map_err(|e| format!("`{}`: rimg's target differs from qemu-img's: {e}", what())),
    );
    if srcs.len() == 1 && !opts.contains(&"-n") {
        c.result(
            qemu_compare_identical(&twin.r, &src_path(srcs[0]), out)
                .map_err(|e| format!("`{}`: {e}", what())),
        );
    }
    let (q, r) = (twin.q.allocated(out), twin.r.allocated(out));
    match alloc {
        Alloc::Sparse => c.check(r <= q + ALLOC_SLACK, || {
            format!(
                "`{}`: rimg's target is less sparse: {r} bytes allocated, qemu-img's {q}",
                what()
            )
        }),
        Alloc::Full => c.check(r + 4 * K >= q, || {
            format!(
                "`{}`: rimg's target is not fully allocated: {r} bytes allocated, qemu-img's {q}",
                what()
            )
        }),
        Alloc::Any => true,
    };
    pair
}

fn check_convert(c: &mut Checks, twin: &Twin, opts: &[&str], src: &str, out: &str, alloc: Alloc) {
    check_convert_env(c, twin, opts, &[src], out, alloc, &[]);
}

/// Convert every source with `opts` (plus `-f raw -O raw`).
fn convert_all(extra: &[&str], alloc: Alloc) {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    let mut opts: Vec<&str> = RAW.to_vec();
    opts.extend_from_slice(extra);
    for src in SOURCES {
        check_convert(&mut c, &twin, &opts, src, &format!("out-{src}"), alloc);
    }
    c.finish();
}

#[test]
fn convert_default() {
    convert_all(&[], Alloc::Sparse);
}

#[test]
fn convert_probe_and_default_output_format() {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    for src in SOURCES {
        check_convert(
            &mut c,
            &twin,
            &[],
            src,
            &format!("probe-{src}"),
            Alloc::Sparse,
        );
        check_convert(
            &mut c,
            &twin,
            &["-f", "raw"],
            src,
            &format!("nofmt-{src}"),
            Alloc::Sparse,
        );
    }
    // options after the file names
    let pair = twin.run(&["convert", "../s/odd", "perm", "-O", "raw", "-f", "raw"]);
    c.same(&pair);
    if pair.both_ok() {
        c.result(files_equal(&twin.q.join("perm"), &twin.r.join("perm")));
    }
    c.finish();
}

#[test]
fn convert_sparse_size_0_fully_allocates() {
    convert_all(&["-S", "0"], Alloc::Full);
}

#[test]
fn convert_sparse_size_64k() {
    convert_all(&["-S", "64k"], Alloc::Sparse);
}

#[test]
fn convert_sparse_size_4k_and_512() {
    convert_all(&["-S", "4k"], Alloc::Sparse);
    convert_all(&["-S", "512"], Alloc::Sparse);
}

#[test]
fn convert_existing_prefilled_target_n() {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    for src in SOURCES {
        let len = twin.s.len(src).div_ceil(512) * 512;
        let out = format!("pre-{src}");
        twin.each(|d| {
            d.filled(&out, len, 0xff);
        });
        check_convert_env(
            &mut c,
            &twin,
            &["-n", "-f", "raw", "-O", "raw"],
            &[src],
            &out,
            Alloc::Any,
            &[],
        );
        // the garbage must be gone: the target now reads exactly like the source
        c.result(qemu_compare_identical(&twin.r, &src_path(src), &out));
        // a larger pre-filled target: the tail past the source is left alone, like qemu-img
        let out = format!("big-{src}");
        twin.each(|d| {
            d.filled(&out, len + M, 0xee);
        });
        check_convert_env(
            &mut c,
            &twin,
            &["-n", "-f", "raw", "-O", "raw"],
            &[src],
            &out,
            Alloc::Any,
            &[],
        );
    }
    c.finish();
}

#[test]
fn convert_n_into_sparse_target() {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    for src in SOURCES {
        let len = twin.s.len(src).div_ceil(512) * 512;
        let out = format!("n-{src}");
        twin.each(|d| {
            d.sparse(&out, len);
        });
        check_convert_env(
            &mut c,
            &twin,
            &["-n", "-f", "raw", "-O", "raw"],
            &[src],
            &out,
            Alloc::Sparse,
            &[],
        );
        c.result(qemu_compare_identical(&twin.r, &src_path(src), &out));
    }
    c.finish();
}

#[test]
fn convert_n_target_is_zero() {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    for src in SOURCES {
        let len = twin.s.len(src).div_ceil(512) * 512;
        let out = format!("tz-{src}");
        twin.each(|d| {
            d.sparse(&out, len);
        });
        check_convert_env(
            &mut c,
            &twin,
            &["-n", "--target-is-zero", "-f", "raw", "-O", "raw"],
            &[src],
            &out,
            Alloc::Sparse,
            &[],
        );
        c.result(qemu_compare_identical(&twin.r, &src_path(src), &out));
    }
    // --target-is-zero without -n is an error
    let pair = twin.run(&[
        "convert",
        "--target-is-zero",
        "-f",
        "raw",
        "-O",
        "raw",
        "../s/odd",
        "tz",
    ]);
    c.same(&pair);
    c.result(twin.same_file("tz"));
    c.finish();
}

#[test]
fn convert_several_sources_concatenated() {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    check_convert_env(
        &mut c,
        &twin,
        RAW,
        &["odd", "sparse", "zeroes"],
        "cat1",
        Alloc::Sparse,
        &[],
    );
    check_convert_env(
        &mut c,
        &twin,
        RAW,
        &["odd", "odd", "odd"],
        "cat2",
        Alloc::Sparse,
        &[],
    );
    check_convert_env(
        &mut c,
        &twin,
        RAW,
        &["dense", "odd", "sparse"],
        "cat3",
        Alloc::Sparse,
        &[],
    );
    check_convert_env(
        &mut c,
        &twin,
        &["-S", "0", "-f", "raw", "-O", "raw"],
        &["zeroes", "odd"],
        "cat4",
        Alloc::Full,
        &[],
    );
    c.finish();
}

#[test]
fn convert_coroutines_1() {
    convert_all(&["-m", "1"], Alloc::Sparse);
}

#[test]
fn convert_coroutines_16() {
    convert_all(&["-m", "16"], Alloc::Sparse);
}

#[test]
fn convert_out_of_order_writes() {
    convert_all(&["-W"], Alloc::Sparse);
    convert_all(&["-W", "-m", "16"], Alloc::Sparse);
}

#[test]
fn convert_copy_offload() {
    convert_all(&["-C"], Alloc::Sparse);
}

#[test]
fn convert_cache_none() {
    convert_all(&["-t", "none", "-T", "none"], Alloc::Sparse);
}

#[test]
fn convert_cache_writeback() {
    convert_all(&["-t", "writeback"], Alloc::Sparse);
}

#[test]
fn convert_cache_unsafe() {
    convert_all(&["-t", "unsafe"], Alloc::Sparse);
}

#[test]
fn convert_cache_other_modes() {
    convert_all(&["-t", "writethrough", "-T", "writeback"], Alloc::Sparse);
    convert_all(&["-t", "directsync", "-T", "directsync"], Alloc::Sparse);
}

#[test]
fn convert_quiet() {
    convert_all(&["-q"], Alloc::Sparse);
}

#[test]
fn convert_rate_limit() {
    convert_all(&["-r", "100M"], Alloc::Sparse);
}

#[test]
fn convert_salvage() {
    convert_all(&["--salvage"], Alloc::Sparse);
}

#[test]
fn convert_preallocation() {
    convert_all(&["-o", "preallocation=falloc"], Alloc::Full);
    convert_all(&["-o", "preallocation=full"], Alloc::Full);
    convert_all(&["-S", "0", "-o", "preallocation=full"], Alloc::Full);
    convert_all(&["-o", "preallocation=off"], Alloc::Sparse);
}

#[test]
fn convert_over_existing_file() {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    for src in SOURCES {
        let out = format!("old-{src}");
        twin.each(|d| {
            d.filled(&out, 20 * M + 3, 0xab);
        });
        check_convert(&mut c, &twin, RAW, src, &out, Alloc::Sparse);
    }
    c.finish();
}

/// `-p`: the progress line is written with `\r`s whose count depends on timing; only check that it
/// succeeds, reaches 100 %, and that stderr and exit code match.
#[test]
fn convert_progress() {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    for src in SOURCES {
        let out = format!("p-{src}");
        let args = [
            "convert",
            "-p",
            "-f",
            "raw",
            "-O",
            "raw",
            &src_path(src),
            &out,
        ];
        let pair = twin.run(&args);
        c.no_panic(&pair.rimg);
        c.check(
            pair.qemu.code() == pair.rimg.code() && pair.qemu.stderr == pair.rimg.stderr,
            || {
                format!(
                    "convert -p: exit code or stderr differ\n{}{}",
                    pair.qemu.describe(),
                    pair.rimg.describe()
                )
            },
        );
        c.check(pair.rimg.out().contains("100.00/100%"), || {
            format!(
                "convert -p: rimg's stdout lacks the final 100.00/100% progress\n{}{}",
                pair.qemu.describe(),
                pair.rimg.describe()
            )
        });
        if pair.both_ok() {
            c.result(files_equal(&twin.q.join(&out), &twin.r.join(&out)));
        }
    }
    c.finish();
}

/// The io_uring and the thread-pool back ends give the same results as qemu-img.
#[test]
fn convert_io_backends() {
    let twin = twin_with_sources();
    let mut c = Checks::new();
    let mut backends = vec!["threads"];
    match io_uring_available() {
        Ok(()) => backends.push("uring"),
        Err(e) => skip(&format!("RIMG_IO=uring: {e}")),
    }
    for backend in backends {
        for extra in [&[][..], &["-t", "none", "-T", "none"][..], &["-S", "0"][..]] {
            let mut opts: Vec<&str> = RAW.to_vec();
            opts.extend_from_slice(extra);
            let alloc = if extra.contains(&"-S") {
                Alloc::Full
            } else {
                Alloc::Sparse
            };
            for src in SOURCES {
                let out = format!("{backend}-{}-{src}", extra.len());
                check_convert_env(
                    &mut c,
                    &twin,
                    &opts,
                    &[src],
                    &out,
                    alloc,
                    &[("RIMG_IO", backend)],
                );
            }
        }
    }
    c.finish();
}

#[test]
fn convert_errors() {
    let twin = twin_with_sources();
    twin.each(|d| {
        d.mkdir("adir");
        d.dense("small", 4 * K, 8);
    });
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["convert"],
        &["convert", "../s/odd"],
        &["convert", "-O", "foo", "../s/odd", "out"],
        &["convert", "-f", "foo", "-O", "raw", "../s/odd", "out"],
        &["convert", "-f", "raw", "-O", "raw", "nonexistent", "out"],
        &["convert", "-f", "raw", "-O", "raw", "adir", "out"],
        &["convert", "-f", "raw", "-O", "raw", "../s/odd", "adir"],
        &["convert", "-f", "raw", "-O", "raw", "../s/odd", "nodir/out"],
        &[
            "convert", "-m", "17", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-m", "0", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-m", "x", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-S", "1000", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-S", "1", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-S", "-1", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-S", "32M", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-S", "abc", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-C", "-S", "0", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-r", "-1", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-r", "abc", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-t", "bogus", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-T", "bogus", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &["convert", "-c", "-f", "raw", "-O", "raw", "../s/odd", "out"],
        &[
            "convert", "-o", "foo=1", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert",
            "-o",
            "preallocation=bogus",
            "-f",
            "raw",
            "-O",
            "raw",
            "../s/odd",
            "out",
        ],
        &[
            "convert", "-B", "../s/odd", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert", "-l", "snap", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            "../s/odd",
            "missing-target",
        ],
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            "../s/sparse",
            "small",
        ],
        &[
            "convert",
            "-n",
            "-o",
            "preallocation=full",
            "-f",
            "raw",
            "-O",
            "raw",
            "../s/odd",
            "small",
        ],
        &[
            "convert", "--bogus", "-f", "raw", "-O", "raw", "../s/odd", "out",
        ],
        &["convert", "--image-opts", "-f", "raw", "../s/odd", "out"],
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            "../s/odd",
            "nonexistent",
            "out",
        ],
    ];
    for args in cases {
        let files = ["out", "small", "adir", "missing-target"];
        let before = twin.states(&files);
        let pair = twin.run(args);
        c.same(&pair);
        c.result(
            twin.files_after(&pair, &files, &before)
                .map_err(|e| format!("`{}`: {e}", args.join(" "))),
        );
        // a command that left a target behind must not affect the next case
        twin.each(|d| {
            let _ = std::fs::remove_file(d.join("out"));
        });
    }
    c.finish();
}
