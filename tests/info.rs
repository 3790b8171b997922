//! `info` on raw images: human and JSON output, probed and explicit format, options after the
//! file name (as Nova runs it), `-U`, `--image-opts`. Both tools look at the same file, so even
//! "disk size" / "actual-size" must be equal.

use crate::util::{Checks, TestDir, K, M};

/// Every way callers run `info` on one image, compared with qemu-img.
fn info_variants(name: &str) -> Vec<Vec<String>> {
    let opts = format!("driver=raw,file.filename={name}");
    let v: Vec<Vec<&str>> = vec![
        vec!["info", name],
        vec!["info", "-f", "raw", name],
        vec!["info", "--output=json", name],
        vec!["info", "--output", "json", name],
        vec!["info", "--output=human", name],
        vec!["info", "-f", "raw", "--output=json", name],
        vec!["info", "--format=raw", "--output=json", name],
        // Nova: options after the file name (GNU getopt permutes).
        vec!["info", name, "--force-share", "--output=json"],
        vec!["info", name, "-f", "raw"],
        vec!["info", "-U", name],
        vec!["info", "-U", "--output=json", "-f", "raw", name],
        vec!["info", "--backing-chain", name],
        vec!["info", "--backing-chain", "--output=json", name],
        vec!["info", "--image-opts", &opts],
        vec!["info", "--image-opts", "--output=json", &opts],
    ];
    v.into_iter()
        .map(|a| a.into_iter().map(String::from).collect())
        .collect()
}

fn check_info(build: impl FnOnce(&TestDir)) {
    let dir = TestDir::new();
    build(&dir);
    let mut c = Checks::new();
    for args in info_variants("img") {
        let pair = dir.both(&args);
        c.same(&pair);
        if args.iter().any(|a| a.contains("json")) && pair.rimg.ok() {
            c.check(
                serde_json::from_slice::<serde_json::Value>(&pair.rimg.stdout).is_ok(),
                || format!("rimg's JSON does not parse\n{}", pair.rimg.describe()),
            );
        }
    }
    c.finish();
}

#[test]
fn info_empty_file() {
    check_info(|d| {
        d.sparse("img", 0);
    });
}

#[test]
fn info_100_bytes() {
    check_info(|d| {
        d.dense("img", 100, 1);
    });
}

#[test]
fn info_5000_bytes() {
    check_info(|d| {
        d.dense("img", 5000, 2);
    });
}

#[test]
fn info_1m_sparse() {
    check_info(|d| {
        d.sparse("img", M);
    });
}

#[test]
fn info_1m_data_at_several_offsets() {
    check_info(|d| {
        d.patterned(
            "img",
            M,
            &[
                (0xab, 0, 4 * K),
                (0x01, 100 * K, 512),
                (0x00, 256 * K, 64 * K),
                (0xcd, 512 * K, 64 * K),
                (0xef, M - 512, 512),
            ],
        );
    });
}

#[test]
fn info_64m_data_at_start_and_end() {
    check_info(|d| {
        d.patterned("img", 64 * M, &[(0x11, 0, M), (0x22, 63 * M, M)]);
    });
}

#[test]
fn info_unaligned_size_with_data_at_end() {
    check_info(|d| {
        d.patterned("img", 3 * M + 7, &[(0x5a, 3 * M - 512, 512)]);
    });
}

/// The human size format (`%0.3g` with a binary unit: `1e+03 KiB`, `0.977 MiB`...) on sparse
/// files of many sizes, 512-rounded or not.
#[test]
fn info_human_sizes() {
    let dir = TestDir::new();
    let mut c = Checks::new();
    for size in [
        1u64,
        511,
        512,
        513,
        1000,
        1023,
        1024,
        1536,
        10240,
        102400,
        1022976,
        1023488,
        1024000,
        1047552,
        1048064,
        1048575,
        1234944,
        1572864,
        10485760,
        104857600,
        1047527424,
        1048576000,
        1072693248,
        1073217536,
        1073741824,
        1610612736,
        1099511627776,
        1099511627776 + 7,
    ] {
        let name = format!("s{size}");
        dir.sparse(&name, size);
        c.same(&dir.both(&["info", &name]));
        c.same(&dir.both(&["info", "--output=json", &name]));
        c.same(&dir.both(&["map", &name]));
    }
    c.finish();
}
