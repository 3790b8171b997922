//! Nova and Cinder run `qemu-img info` under RLIMIT_AS = 1 GiB, Glance also under RLIMIT_CPU =
//! 2 s: every command must work under those limits (`prlimit --as=1073741824 --cpu=2`).

use std::path::Path;

use crate::util::{files_equal, rimg_link, Checks, Cmd, Pair, Twin, K, M, QEMU_IMG};

const PRLIMIT: &str = "/usr/bin/prlimit";

fn limited(twin: &Twin, args: &[&str], cpu: bool, env: &[(&str, &str)]) -> Pair {
    let mut lim = vec!["--as=1073741824".to_string()];
    if cpu {
        lim.push("--cpu=2".to_string());
    }
    // prlimit finds `qemu-img` in $PATH, so both run with argv[0] = "qemu-img"
    let run = |dir: &crate::util::Dir, bindir: &Path, label: &str| {
        let mut a = lim.clone();
        a.push("qemu-img".to_string());
        a.extend(args.iter().map(|s| s.to_string()));
        let path = format!("{}:/usr/bin:/bin", bindir.display());
        Cmd::new(PRLIMIT, label, dir.path())
            .args(&a)
            .env("PATH", &path)
            .envs(env)
            .run()
    };
    Pair {
        qemu: run(&twin.q, Path::new(QEMU_IMG).parent().unwrap(), "qemu-img"),
        rimg: run(&twin.r, rimg_link().parent().unwrap(), "rimg"),
    }
}

#[test]
fn limits_commands_without_bulk_data() {
    let twin = Twin::new();
    twin.s
        .patterned("img", 64 * M, &[(0x11, 0, M), (0x22, 63 * M, M)]);
    twin.s
        .patterned("img2", 64 * M, &[(0x11, 0, M), (0x22, 63 * M, M)]);
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["info", "../s/img", "--output=json"],
        &["info", "../s/img", "--force-share", "--output=json"],
        &["info", "-f", "raw", "../s/img"],
        &["map", "--output=json", "../s/img"],
        &["measure", "-O", "raw", "../s/img"],
        &["measure", "--size", "10G", "-O", "raw", "--output=json"],
        &["check", "-f", "raw", "../s/img"],
        &["snapshot", "-l", "../s/img"],
        &["create", "-f", "raw", "new", "10G"],
        &["compare", "../s/img", "../s/img2"],
        &["resize", "-f", "raw", "new", "+1G"],
    ];
    for args in cases {
        c.same(&limited(&twin, args, true, &[]));
    }
    c.finish();
}

#[test]
fn limits_convert_64m() {
    let twin = Twin::new();
    twin.s.patterned(
        "img",
        64 * M,
        &[(0x11, 0, M), (0x22, 63 * M, M), (0x33, 20 * M, 4 * K)],
    );
    twin.s.dense("dense", 16 * M, 5);
    let mut c = Checks::new();
    for (i, (src, env)) in [
        ("img", &[][..]),
        ("dense", &[][..]),
        ("img", &[("RIMG_IO", "threads")][..]),
        ("dense", &[("RIMG_IO", "threads")][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = format!("out{i}");
        let src = format!("../s/{src}");
        for extra in [&[][..], &["-S", "0", "-t", "none"][..]] {
            let mut args = vec!["convert", "-f", "raw", "-O", "raw"];
            args.extend_from_slice(extra);
            args.push(&src);
            args.push(&out);
            let pair = limited(&twin, &args, false, env);
            c.same(&pair);
            if pair.both_ok() {
                c.result(files_equal(&twin.q.join(&out), &twin.r.join(&out)));
            }
        }
    }
    c.finish();
}
