//! Damaged qcow2 images: bad headers, tables past the end or inside the header, absurd
//! sizes, backing loops — one error line, no panic, no hang, the file unchanged.

use super::*;

// ---------------------------------------------------------------------------------------------
// Damaged images

/// A valid 4 MiB image with 64 KiB clusters: data at 0 and 1 MiB, a compressed cluster at
/// 2 MiB, zeroes at 3 MiB.
fn build_valid(s: &Dir, name: &str) {
    create_qcow2(s, name, "", 4 * M);
    qemu_io(
        s,
        "qcow2",
        name,
        &[
            "write -P 0x11 0 64k".into(),
            "write -P 0x12 1M 4k".into(),
            "write -c -P 0x13 2M 64k".into(),
            "write -z 3M 64k".into(),
        ],
    )
    .assert_ok();
}

/// Host offset of the L2 table of guest cluster 0.
fn l2_offset(s: &Dir, name: &str) -> u64 {
    let l1 = be64(s, name, hdr::L1_TABLE_OFFSET);
    be64(s, name, l1) & OFFSET_MASK
}

/// Offset of the 48-byte feature name table entry for (`kind`, `bit`).
fn feature_entry(s: &Dir, name: &str, kind: u8, bit: u8) -> u64 {
    let ext = header_extension(s, name, 0x6803_f857)
        .unwrap_or_else(|| panic!("no feature name table in {name}"));
    let len = be32(s, name, ext + 4) as u64;
    (0..len / 48)
        .map(|i| ext + 8 + i * 48)
        .find(|&e| read_at::<2>(s, name, e) == [kind, bit])
        .unwrap_or_else(|| panic!("no feature name entry ({kind}, {bit}) in {name}"))
}

/// One damaged image.
struct Bad {
    /// file name in the shared directory
    name: &'static str,
    /// builds it there
    build: fn(&Dir, &str),
    /// qemu-img reads the image anyway (it reads a table past the end of the file as zeroes, and
    /// never looks at the refcount table when reading) but rimg may refuse it: a refusal is
    /// noted, not a failure
    may_refuse: bool,
    /// commands (by name) qemu-img never finishes on this image: run with rimg alone
    qemu_hangs: &'static [&'static str],
}

/// A damaged image qemu-img refuses: rimg must refuse it in the same words.
const fn bad(name: &'static str, build: fn(&Dir, &str)) -> Bad {
    Bad {
        name,
        build,
        may_refuse: false,
        qemu_hangs: &[],
    }
}

/// A damaged image qemu-img reads anyway: rimg may refuse it.
const fn lenient(name: &'static str, build: fn(&Dir, &str)) -> Bad {
    Bad {
        may_refuse: true,
        ..bad(name, build)
    }
}

/// An odd image qemu-img reads: rimg must read it the same way.
const fn odd(name: &'static str, build: fn(&Dir, &str)) -> Bad {
    bad(name, build)
}

/// The commands run on every damaged image (`X` stands for it).
const BAD_COMMANDS: &[&[&str]] = &[
    &["info", "X"],
    &["info", "--output=json", "--backing-chain", "X"],
    &["map", "X"],
    &["map", "--output=json", "X"],
    &["convert", "-O", "raw", "X", "out.raw"],
    &["compare", "X", "X"],
];

/// rimg run under an address-space limit (through prlimit, keeping `qemu-img` as the name it
/// is called by).
fn rimg_limited(dir: &Dir, args: &[String]) -> Run {
    let mut a: Vec<String> = vec![BAD_AS_LIMIT.into(), "--".into()];
    a.push(Tool::Rimg.program().to_string_lossy().into_owned());
    a.extend(args.iter().cloned());
    Cmd::new("/usr/bin/prlimit", "rimg", dir.path())
        .args(&a)
        .timeout(BAD_TIMEOUT)
        .run()
}

/// rimg failed: it must have said so in one `qemu-img: ` line.
fn check_refusal(c: &mut Checks, rimg: &Run, what: &str) {
    let err = rimg.err();
    c.check(!rimg.ok(), || {
        format!("`{what}`: rimg succeeded\n{}", rimg.describe())
    });
    c.check(
        err.starts_with("qemu-img: ") && err.ends_with('\n') && err.lines().count() == 1,
        || {
            format!(
                "`{what}`: rimg's error is not one `qemu-img: ` line\n{}",
                rimg.describe()
            )
        },
    );
}

fn check_bad(cases: &[Bad]) {
    let twin = Twin::new();
    build_valid(&twin.s, "valid");
    let mut c = Checks::new();
    for case in cases {
        (case.build)(&twin.s, case.name);
        let before = shared_states(&twin);
        let img = format!("../s/{}", case.name);
        for template in BAD_COMMANDS {
            let args: Vec<String> = template
                .iter()
                .map(|a| {
                    if *a == "X" {
                        img.clone()
                    } else {
                        a.to_string()
                    }
                })
                .collect();
            let cmd = args.join(" ");
            let rimg = rimg_limited(&twin.r, &args);
            c.no_panic(&rimg);
            c.check(!rimg.timed_out, || {
                format!("`{cmd}`: rimg hung\n{}", rimg.describe())
            });
            if case.qemu_hangs.contains(&template[0]) {
                // qemu-img gives no answer: rimg's must be a clear refusal
                check_refusal(&mut c, &rimg, &cmd);
                skip(&format!(
                    "`{cmd}`: qemu-img does not finish; rimg says {}",
                    rimg.err().trim_end()
                ));
                shared_unchanged(&mut c, &twin, &before, &cmd);
                let _ = std::fs::remove_file(twin.r.join("out.raw"));
                continue;
            }
            let qemu = twin.q.cmd(Tool::Qemu, &args).timeout(BAD_TIMEOUT).run();
            let pair = Pair { qemu, rimg };
            if case.may_refuse && !pair.rimg.ok() {
                check_refusal(&mut c, &pair.rimg, &cmd);
                if let Some(d) = pair.diff() {
                    skip(&format!("`{cmd}`: rimg refuses what qemu-img reads\n{d}"));
                }
            } else if pair.qemu.ok() {
                c.same(&pair);
                if pair.both_ok() && args[0] == "convert" {
                    c.result(
                        same_bytes(&twin.q.join("out.raw"), &twin.r.join("out.raw"))
                            .map_err(|e| format!("`{cmd}`: {e}")),
                    );
                }
            } else {
                // qemu-img refuses: so must rimg, in qemu-img's words, and leave no target
                // where qemu-img leaves none
                if !c.same(&pair) {
                    check_refusal(&mut c, &pair.rimg, &cmd);
                }
                if twin.q.state("out.raw") == FileState::Absent {
                    c.check(twin.r.state("out.raw") == FileState::Absent, || {
                        format!("`{cmd}`: rimg left out.raw behind, qemu-img did not")
                    });
                }
            }
            shared_unchanged(&mut c, &twin, &before, &cmd);
            for d in [&twin.q, &twin.r] {
                let _ = std::fs::remove_file(d.join("out.raw"));
            }
        }
    }
    c.finish();
}

/// A copy of the valid image, then `f` applied to it.
fn patched(s: &Dir, name: &str, f: impl FnOnce(&Dir, &str)) {
    std::fs::copy(s.join("valid"), s.join(name)).expect("copy the valid image");
    f(s, name);
}

#[test]
fn qcow2_bad_header() {
    check_bad(&[
        bad("truncated-header", |s, n| {
            let mut b = s.read("valid");
            b.truncate(50);
            s.write_bytes(n, &b);
        }),
        bad("cluster-bits-8", |s, n| {
            patched(s, n, |s, n| set_be32(s, n, hdr::CLUSTER_BITS, 8))
        }),
        bad("cluster-bits-22", |s, n| {
            patched(s, n, |s, n| set_be32(s, n, hdr::CLUSTER_BITS, 22))
        }),
        bad("version-4", |s, n| {
            patched(s, n, |s, n| set_be32(s, n, hdr::VERSION, 4))
        }),
        bad("unknown-incompat-unnamed", |s, n| {
            patched(s, n, |s, n| {
                let f = be64(s, n, hdr::INCOMPATIBLE_FEATURES);
                set_be64(s, n, hdr::INCOMPATIBLE_FEATURES, f | (1 << 20));
            })
        }),
        bad("unknown-incompat-named", |s, n| {
            patched(s, n, |s, n| {
                let f = be64(s, n, hdr::INCOMPATIBLE_FEATURES);
                set_be64(s, n, hdr::INCOMPATIBLE_FEATURES, f | (1 << 5));
                // turn the entry of compatible bit 0 (lazy refcounts) into incompatible bit 5
                let e = feature_entry(s, n, 1, 0);
                let mut entry = [0u8; 48];
                entry[0] = 0;
                entry[1] = 5;
                entry[2..15].copy_from_slice(b"fancy feature");
                patch(s, n, e, &entry);
            })
        }),
        // read-only use of a corrupt image is allowed
        odd("corrupt-bit", |s, n| {
            patched(s, n, |s, n| {
                let f = be64(s, n, hdr::INCOMPATIBLE_FEATURES);
                set_be64(s, n, hdr::INCOMPATIBLE_FEATURES, f | 2);
            })
        }),
    ]);
}

#[test]
fn qcow2_bad_tables() {
    check_bad(&[
        lenient("l1-past-eof", |s, n| {
            patched(s, n, |s, n| set_be64(s, n, hdr::L1_TABLE_OFFSET, 1 << 32))
        }),
        bad("l1-size-absurd", |s, n| {
            patched(s, n, |s, n| set_be32(s, n, hdr::L1_SIZE, 0x7fff_ffff))
        }),
        bad("l1-unaligned", |s, n| {
            patched(s, n, |s, n| {
                let l1 = be64(s, n, hdr::L1_TABLE_OFFSET);
                set_be64(s, n, hdr::L1_TABLE_OFFSET, l1 + 0x200);
            })
        }),
        lenient("refcount-table-past-eof", |s, n| {
            patched(s, n, |s, n| {
                set_be64(s, n, hdr::REFCOUNT_TABLE_OFFSET, 1 << 32)
            })
        }),
        lenient("l2-past-eof", |s, n| {
            patched(s, n, |s, n| {
                let l1 = be64(s, n, hdr::L1_TABLE_OFFSET);
                set_be64(s, n, l1, QCOW_OFLAG_COPIED | (1 << 32));
            })
        }),
        bad("l2-entry-unaligned", |s, n| {
            patched(s, n, |s, n| {
                let l2 = l2_offset(s, n);
                let e = be64(s, n, l2);
                set_be64(s, n, l2, e + 0x200);
            })
        }),
        bad("l2-entry-past-eof", |s, n| {
            patched(s, n, |s, n| {
                let l2 = l2_offset(s, n);
                set_be64(s, n, l2, QCOW_OFLAG_COPIED | (1 << 32));
            })
        }),
        // guest cluster 0 mapped onto the L1 table: qemu reads it as data
        odd("l2-entry-into-metadata", |s, n| {
            patched(s, n, |s, n| {
                let l1 = be64(s, n, hdr::L1_TABLE_OFFSET);
                let l2 = l2_offset(s, n);
                set_be64(s, n, l2, QCOW_OFLAG_COPIED | l1);
            })
        }),
        // the compressed cluster at 2 MiB pointed past the end of the file
        bad("compressed-past-eof", |s, n| {
            patched(s, n, |s, n| {
                let l2 = l2_offset(s, n);
                let at = l2 + 8 * (2 * M / (64 * K));
                let e = be64(s, n, at);
                // 64 KiB clusters: host offset in bits 0..54, sector count above
                let x = 62 - (16 - 8);
                let sectors = e & !((1u64 << x) - 1) & !(3 << 62);
                set_be64(s, n, at, (1 << 62) | sectors | (1 << 32));
            })
        }),
    ]);
}

/// qemu-img 10.0 opens a looping backing chain over and over (for minutes, growing) for every
/// command that reads data; only `info --backing-chain` detects the loop.
const LOOP_HANGS: &[&str] = &["map", "convert", "compare"];

#[test]
fn qcow2_bad_backing_loops() {
    check_bad(&[
        // `info` without `--backing-chain` does not open the backing file: qemu-img shows it
        Bad {
            qemu_hangs: LOOP_HANGS,
            ..odd("self-backed", |s, n| {
                build_valid(s, n);
                s.qemu(&["rebase", "-u", "-b", n, "-F", "qcow2", n])
                    .assert_ok();
            })
        },
        Bad {
            qemu_hangs: LOOP_HANGS,
            ..odd("loop-a", |s, n| {
                build_valid(s, n);
                build_valid(s, "loop-b");
                s.qemu(&["rebase", "-u", "-b", "loop-b", "-F", "qcow2", n])
                    .assert_ok();
                s.qemu(&["rebase", "-u", "-b", n, "-F", "qcow2", "loop-b"])
                    .assert_ok();
            })
        },
    ]);
}
