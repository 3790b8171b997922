//! Image locking interoperates with QEMU's: while a real `qemu-nbd` holds an image, rimg's
//! commands succeed or fail exactly like qemu-img's; and while a (rate-limited, so slow)
//! `convert` writes an image, real QEMU tools see the same locks whether that convert is run by
//! qemu-img or by rimg.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{
    files_equal, has_ofd_locks, skip, Checks, Cmd, Dir, KillOnDrop, Run, Tool, Twin, K, M,
    QEMU_IMG, QEMU_IO, QEMU_NBD,
};

/// Start `qemu-nbd --fork` on `image` (relative to `dir`); the guard stops it.
fn start_nbd(dir: &Dir, image: &str, tag: &str) -> Result<KillOnDrop, Box<Run>> {
    let sock = dir.join(&format!("nbd-{tag}.sock"));
    let pidfile = dir.join(&format!("nbd-{tag}.pid"));
    let run = Cmd::new(QEMU_NBD, "qemu-nbd", dir.path())
        .args(&[
            "--fork",
            "--persistent",
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            &format!("--pid-file={}", pidfile.display()),
            image,
        ])
        .timeout(Duration::from_secs(30))
        .run();
    if !run.ok() {
        return Err(Box::new(run));
    }
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("qemu-nbd wrote no pid file\n{}", run.describe()));
    Ok(KillOnDrop::pid("qemu-nbd", pid))
}

fn qemu_nbd_available() -> bool {
    if Path::new(QEMU_NBD).exists() {
        true
    } else {
        skip(&format!(
            "{QEMU_NBD} is not installed: locking tests need it"
        ));
        false
    }
}

#[test]
fn locking_image_held_by_qemu_nbd() {
    if !qemu_nbd_available() {
        return;
    }
    let twin = Twin::new();
    twin.s
        .patterned("held", M, &[(0x11, 0, 4 * K), (0x22, 700 * K, 4 * K)]);
    twin.s.patterned("src", M, &[(0x33, 0, 8 * K)]);
    let nbd = start_nbd(&twin.s, "held", "a").unwrap_or_else(|r| {
        panic!("cannot start qemu-nbd:\n{}", r.describe());
    });
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["info", "../s/held"],
        &["info", "-U", "../s/held"],
        &["info", "../s/held", "--force-share", "--output=json"],
        &["info", "-f", "raw", "--output=json", "../s/held"],
        &["map", "../s/held"],
        &["map", "-U", "--output=json", "../s/held"],
        &["convert", "-f", "raw", "-O", "raw", "../s/held", "out"],
        &[
            "convert",
            "-U",
            "-f",
            "raw",
            "-O",
            "raw",
            "../s/held",
            "out-u",
        ],
        &["compare", "-f", "raw", "-F", "raw", "../s/held", "../s/src"],
        &["compare", "-U", "../s/held", "../s/src"],
        &["dd", "if=../s/held", "of=out-dd", "count=8"],
        &["check", "-f", "raw", "../s/held"],
        &["measure", "-O", "raw", "../s/held"],
        &["snapshot", "-l", "../s/held"],
        &["resize", "-f", "raw", "../s/held", "2M"],
        &["resize", "-f", "raw", "--shrink", "../s/held", "512k"],
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            "../s/src",
            "../s/held",
        ],
        &["create", "-f", "raw", "../s/held", "1M"],
    ];
    for args in cases {
        let before = twin.s.state("held");
        let pair = twin.run(args);
        c.same(&pair);
        for f in ["out", "out-u", "out-dd"] {
            c.result(
                twin.same_file(f)
                    .map_err(|e| format!("`{}`: {e}", args.join(" "))),
            );
        }
        if !pair.qemu.ok() {
            c.check(twin.s.state("held") == before, || {
                format!(
                    "`{}`: the held image changed although the command failed",
                    args.join(" ")
                )
            });
        }
    }
    drop(nbd);
    c.finish();
}

/// What real QEMU tools see while `holder` runs a slow `convert` into `T` in `dir`.
struct Probe {
    label: String,
    run: Run,
}

fn probe_while_converting(dir: &Dir, holder: Tool, c: &mut Checks) -> Vec<Probe> {
    let mut conv = KillOnDrop::child(
        holder.label(),
        dir.cmd(
            holder,
            &[
                "convert", "-r", "1M", "-f", "raw", "-O", "raw", "../s/big", "T",
            ],
        )
        .spawn_quiet(),
    );
    // wait until the target is open and locked
    let start = Instant::now();
    while !has_ofd_locks(&dir.join("T")) && start.elapsed() < Duration::from_secs(10) {
        if conv.has_exited() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    c.check(has_ofd_locks(&dir.join("T")), || {
        format!(
            "{} convert into T: no OFD lock on T was seen (QEMU-compatible locking missing?)",
            holder.label()
        )
    });
    let mut probes = Vec::new();
    let mut add = |label: &str, cmd: Cmd| {
        probes.push(Probe {
            label: label.to_string(),
            run: cmd.timeout(Duration::from_secs(30)).run(),
        });
    };
    add(
        "qemu-img info T",
        Cmd::new(QEMU_IMG, "qemu-img", dir.path()).args(&["info", "T"]),
    );
    add(
        "qemu-img info -U T",
        Cmd::new(QEMU_IMG, "qemu-img", dir.path()).args(&["info", "-U", "T"]),
    );
    add(
        "qemu-img convert T probe-out",
        Cmd::new(QEMU_IMG, "qemu-img", dir.path()).args(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            "T",
            "probe-out",
        ]),
    );
    add(
        "qemu-io -f raw -r -c 'read 0 512' T",
        Cmd::new(QEMU_IO, "qemu-io", dir.path()).args(&[
            "-f",
            "raw",
            "-r",
            "-c",
            "read 0 512",
            "T",
        ]),
    );
    {
        let nbd = start_nbd(dir, "T", holder.label());
        let (ok, run_desc) = match &nbd {
            Ok(_) => (true, String::new()),
            Err(r) => (false, r.err()),
        };
        probes.push(Probe {
            label: format!("qemu-nbd -f raw T: started={ok} {run_desc}"),
            run: Cmd::new("/bin/true", "true", dir.path()).run(),
        });
    }
    c.check(!conv.has_exited(), || {
        format!(
            "{} convert -r 1M of a 16 MiB image finished within the probes (rate limit not applied?)",
            holder.label()
        )
    });
    drop(conv);
    probes
}

#[test]
fn locking_image_written_by_convert() {
    if !qemu_nbd_available() {
        return;
    }
    let twin = Twin::new();
    twin.s.dense("big", 16 * M, 77);
    let mut c = Checks::new();
    let q = probe_while_converting(&twin.q, Tool::Qemu, &mut c);
    let r = probe_while_converting(&twin.r, Tool::Rimg, &mut c);
    for (pq, pr) in q.iter().zip(r.iter()) {
        // stdout of `info` shows a disk size that grows while the convert runs: compare how the
        // probe ended and what it said on stderr
        c.check(
            pq.label == pr.label
                && pq.run.code() == pr.run.code()
                && pq.run.stderr == pr.run.stderr,
            || {
                format!(
                    "while a convert writes T, `{}` behaves differently when the writer is rimg:\n\
                     with qemu-img writing: {}\nwith rimg writing: {}\n{}{}",
                    pq.label,
                    pq.label,
                    pr.label,
                    pq.run.describe(),
                    pr.run.describe()
                )
            },
        );
    }
    c.finish();
}

/// `convert -U` of a held image produces the same bytes as qemu-img's.
#[test]
fn locking_force_share_convert_output() {
    if !qemu_nbd_available() {
        return;
    }
    let twin = Twin::new();
    twin.s
        .patterned("held", 4 * M, &[(0x11, 0, 64 * K), (0x22, 3 * M, 4 * K)]);
    let _nbd = start_nbd(&twin.s, "held", "b").unwrap_or_else(|r| {
        panic!("cannot start qemu-nbd:\n{}", r.describe());
    });
    let pair = twin.run(&[
        "convert",
        "-U",
        "-f",
        "raw",
        "-O",
        "raw",
        "../s/held",
        "out",
    ]);
    pair.assert_same();
    if pair.both_ok() {
        files_equal(&twin.q.join("out"), &twin.r.join("out")).unwrap();
    }
}

/// Take a shared OFD lock on one byte of `path`, the way another QEMU process holding (100 + bit)
/// or unsharing (200 + bit) a permission does. The lock lives as long as the returned file.
fn hold_byte(path: &Path, byte: i64) -> std::fs::File {
    use nix::fcntl::{fcntl, FcntlArg};
    let file = std::fs::File::open(path).expect("open for locking");
    let lock = libc::flock {
        l_type: libc::F_RDLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_OFD_SETLK(&lock)).expect("F_OFD_SETLK");
    file
}

/// With a foreign shared lock on any one of QEMU's permission bytes, every command succeeds or
/// fails exactly like qemu-img's (the byte-level conflict matrix).
#[test]
fn locking_single_byte_matrix() {
    let cases: &[&[&str]] = &[
        &["info", "-f", "raw", "L"],
        &["map", "-f", "raw", "L"],
        &["map", "-U", "-f", "raw", "L"],
        &["compare", "-f", "raw", "-F", "raw", "L", "src"],
        &["convert", "-f", "raw", "-O", "raw", "L", "out"],
        &["convert", "-U", "-f", "raw", "-O", "raw", "L", "out"],
        &["convert", "-n", "-f", "raw", "-O", "raw", "src", "L"],
        &["convert", "-f", "raw", "-O", "raw", "src", "L"],
        &["resize", "-f", "raw", "L", "2M"],
        &["create", "-f", "raw", "L", "1M"],
        &["dd", "-f", "raw", "if=L", "of=out"],
        &["dd", "-f", "raw", "if=src", "of=L"],
        &["snapshot", "-l", "-f", "raw", "L"],
        &["measure", "-O", "raw", "-f", "raw", "L"],
        &["check", "-f", "raw", "L"],
    ];
    let mut c = Checks::new();
    let build = |d: &Dir| {
        d.patterned("L", M, &[(0x11, 0, 4 * K), (0x22, 900 * K, 4 * K)]);
    };
    for byte in [100, 101, 102, 103, 104, 200, 201, 202, 203, 204] {
        let twin = Twin::new();
        twin.each(|d| {
            build(d);
            d.patterned("src", M, &[(0x33, 0, 8 * K)]);
        });
        let pristine = twin.q.state("L");
        for args in cases {
            // restore what the previous case changed
            for d in [&twin.q, &twin.r] {
                let _ = std::fs::remove_file(d.join("out"));
                if d.state("L") != pristine {
                    build(d);
                }
            }
            let _q = hold_byte(&twin.q.join("L"), byte);
            let _r = hold_byte(&twin.r.join("L"), byte);
            let files = ["L", "out"];
            let before = twin.states(&files);
            let pair = twin.run(args);
            if !c.same(&pair) {
                c.fail(format!(
                    "(the case above ran with a foreign lock on byte {byte})"
                ));
            }
            c.result(
                twin.files_after(&pair, &files, &before)
                    .map_err(|e| format!("byte {byte}: `{}`: {e}", args.join(" "))),
            );
        }
    }
    c.finish();
}
