//! `bench`: qemu-img's two output lines (time masked), validation errors and exit codes,
//! and for `-w` the exact bytes written (checked by comparing the images afterwards).

use crate::util::{Checks, Twin, M};

fn mask(s: &str) -> String {
    s.lines()
        .map(|l| {
            if l.starts_with("Run completed in ") {
                "Run completed in T seconds.".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn bench_matches_qemu() {
    let twin = Twin::new();
    twin.each(|d| {
        d.patterned("img", 16 * M, &[(0x11, 0, M), (0x22, 5 * M, 3 * M)]);
    });
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["bench", "-f", "raw", "-c", "2000", "img"],
        &[
            "bench", "-f", "raw", "-c", "500", "-d", "4", "-s", "64k", "-S", "8k", "-o", "1M",
            "img",
        ],
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-c",
            "300",
            "-s",
            "16k",
            "-S",
            "40k",
            "--pattern",
            "7",
            "img",
        ],
        &[
            "bench", "-f", "raw", "-w", "-c", "100", "-o", "15M", "-S", "300k", "img",
        ],
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-c",
            "64",
            "--flush-interval",
            "8",
            "img",
        ],
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-c",
            "64",
            "-d",
            "4",
            "--flush-interval",
            "8",
            "img",
        ],
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-c",
            "64",
            "-d",
            "4",
            "--flush-interval",
            "8",
            "--no-drain",
            "img",
        ],
        &["bench", "-f", "raw", "-q", "-c", "10", "img"],
        &["bench", "-f", "raw", "-t", "none", "-c", "100", "img"],
        &["bench", "-f", "raw", "-o", "16M", "-c", "1", "img"],
        &["bench", "-f", "raw", "-c", "0", "img"],
        &["bench", "-f", "raw", "-c", "x", "img"],
        &["bench", "-f", "raw", "-d", "0", "img"],
        &["bench", "-f", "raw", "-s", "0", "img"],
        &["bench", "-f", "raw", "-i", "bogus", "img"],
        &["bench", "-f", "raw", "-t", "bogus", "img"],
        &["bench", "-f", "raw", "--pattern", "300", "-w", "img"],
        &["bench", "-f", "raw", "--flush-interval", "5", "img"],
        &["bench", "-f", "raw"],
        &["bench", "--quiet", "img"],
    ];
    for args in cases {
        let pair = twin.run(args);
        c.no_panic(&pair.rimg);
        c.check(
            mask(&pair.qemu.out()) == mask(&pair.rimg.out())
                && pair.qemu.err() == pair.rimg.err()
                && pair.qemu.code() == pair.rimg.code(),
            || {
                format!(
                    "`{}` differs\n{}{}",
                    args.join(" "),
                    pair.qemu.describe(),
                    pair.rimg.describe()
                )
            },
        );
        let (q, r) = (
            std::fs::read(twin.q.join("img")).unwrap_or_default(),
            std::fs::read(twin.r.join("img")).unwrap_or_default(),
        );
        c.check(q == r, || {
            format!("`{}`: the image differs afterwards", args.join(" "))
        });
    }
    c.finish();
}

/// rimg's additions: `--output=json` (requests, bytes, IOPS, latency percentiles, engine
/// path) and `--verbose` (qemu-img's two lines, then the latency summary).
#[test]
fn bench_json_and_verbose() {
    let d = crate::util::TestDir::new();
    d.patterned("img", 8 * M, &[(0x11, 0, M)]);
    let mut c = Checks::new();
    let r = d.rimg(&[
        "bench",
        "-f",
        "raw",
        "-c",
        "500",
        "-d",
        "8",
        "--output=json",
        "img",
    ]);
    c.check(r.ok(), || r.describe());
    let v: serde_json::Value = serde_json::from_str(&r.out()).unwrap_or_default();
    c.check(v["requests"] == 500 && v["bytes"] == 500 * 4096, || {
        r.describe()
    });
    for k in ["min", "p50", "p90", "p99", "p99.9", "max"] {
        c.check(v["latency-ns"][k].as_u64().is_some_and(|n| n > 0), || {
            format!("latency {k} missing\n{}", r.describe())
        });
    }
    c.check(
        v["engine"].as_array().is_some_and(|a| !a.is_empty()),
        || r.describe(),
    );
    let r = d.rimg(&["bench", "-f", "raw", "-c", "100", "--verbose", "img"]);
    let lines: Vec<String> = r.out().lines().map(str::to_string).collect();
    c.check(
        r.ok()
            && lines.len() >= 3
            && lines[0].starts_with("Sending 100 read requests")
            && lines[1].starts_with("Run completed in ")
            && lines[2].starts_with("latency (us): min "),
        || r.describe(),
    );
    c.finish();
}

/// `--random` writes a reproducible pattern (same seed, same bytes) inside the image;
/// `--time` runs for about that long and reports the requests it completed.
#[test]
fn bench_random_and_time() {
    let d = crate::util::TestDir::new();
    let mut c = Checks::new();
    for name in ["a", "b"] {
        d.sparse(name, 4 * M);
        let r = d.rimg(&[
            "bench",
            "-f",
            "raw",
            "-w",
            "--random",
            "--seed",
            "42",
            "-c",
            "200",
            "--pattern",
            "5",
            name,
        ]);
        c.check(r.ok(), || r.describe());
    }
    let (a, b) = (
        std::fs::read(d.join("a")).unwrap_or_default(),
        std::fs::read(d.join("b")).unwrap_or_default(),
    );
    c.check(a == b && a.len() == (4 * M) as usize, || {
        "random pattern not reproducible".into()
    });
    c.check(a.contains(&5), || "nothing written".into());
    let r = d.rimg(&["bench", "-f", "raw", "--time", "0.3", "--output=json", "a"]);
    let v: serde_json::Value = serde_json::from_str(&r.out()).unwrap_or_default();
    c.check(
        r.ok()
            && v["requests"].as_u64().is_some_and(|n| n > 0)
            && v["seconds"]
                .as_f64()
                .is_some_and(|s| (0.3..5.0).contains(&s)),
        || r.describe(),
    );
    c.finish();
}

/// `bench` on formats other than raw: reads map through the image, `-w` allocates through
/// its writer. The image must afterwards hold exactly what qemu-img's bench wrote into an
/// identical image (qemu-img compare), and pass qemu-img check.
#[test]
fn bench_on_formatted_images() {
    let twin = Twin::new();
    let mut c = Checks::new();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "qcow2",
            "",
            &["-w", "-c", "3000", "-d", "16", "--pattern", "5"],
        ),
        (
            "qcow2",
            "cluster_size=4k",
            &["-w", "-c", "500", "-s", "12k", "-S", "20k", "-o", "3k"],
        ),
        (
            "qcow2",
            "extended_l2=on",
            &["-w", "-c", "400", "-d", "8", "--flush-interval", "40"],
        ),
        (
            "qcow2",
            "",
            &[
                "-w",
                "-c",
                "400",
                "-d",
                "8",
                "--flush-interval",
                "40",
                "--no-drain",
            ],
        ),
        ("qcow2", "", &["-c", "2000", "-d", "8"]),
        ("vpc", "", &["-w", "-c", "700", "-s", "8k", "-S", "24k"]),
        ("vpc", "subformat=fixed", &["-w", "-c", "300", "-d", "4"]),
    ];
    for (fmt, opts, args) in cases {
        twin.each(|d| {
            let _ = std::fs::remove_file(d.join("img"));
            let mut a = vec!["create", "-q", "-f", fmt];
            if !opts.is_empty() {
                a.extend(["-o", opts]);
            }
            a.extend(["img", "16M"]);
            d.qemu(&a).assert_ok();
            d.qemu_io_fmt(fmt, "img", &["write -P 9 1M 4k", "write -P 3 9M 1M"]);
        });
        let mut full = vec!["bench", "-f", fmt];
        full.extend_from_slice(args);
        full.push("img");
        let pair = twin.run(&full);
        c.no_panic(&pair.rimg);
        c.check(
            mask(&pair.qemu.out()) == mask(&pair.rimg.out())
                && pair.qemu.err() == pair.rimg.err()
                && pair.qemu.code() == pair.rimg.code(),
            || {
                format!(
                    "`{}` differs\n{}{}",
                    full.join(" "),
                    pair.qemu.describe(),
                    pair.rimg.describe()
                )
            },
        );
        let cmp = twin.r.qemu(&[
            "compare",
            "-f",
            fmt,
            "-F",
            fmt,
            "img",
            twin.q.join("img").to_str().unwrap(),
        ]);
        c.check(cmp.ok(), || {
            format!("`{}`: {}", full.join(" "), cmp.describe())
        });
        if *fmt == "qcow2" {
            let chk = twin.r.qemu(&["check", "img"]);
            c.check(chk.ok(), || {
                format!("`{}`: {}", full.join(" "), chk.describe())
            });
        }
    }
    c.finish();
}
