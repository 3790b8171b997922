//! `map` on raw images with several data/hole runs and unaligned sizes: human and JSON output,
//! `--start-offset`/`-s` and `--max-length`/`-l`, and their errors.

use crate::util::{Checks, TestDir, K, M};

fn map_variants(name: &str, size: u64) -> Vec<Vec<String>> {
    let opts = format!("driver=raw,file.filename={name}");
    let size_s = size.to_string();
    let beyond = (size + M).to_string();
    let mid = (size / 2 + 1).to_string();
    let v: Vec<Vec<&str>> = vec![
        vec!["map", name],
        vec!["map", "--output=json", name],
        vec!["map", "--output=human", name],
        vec!["map", "-f", "raw", "--output=json", name],
        vec!["map", name, "--output", "json"],
        vec!["map", "-U", name],
        vec!["map", "--image-opts", &opts, "--output=json"],
        vec![
            "map",
            "--start-offset=4096",
            "--max-length=100000",
            "--output=json",
            name,
        ],
        vec!["map", "--start-offset=4096", "--max-length=100000", name],
        vec!["map", "--start-offset=1M", "--output=json", name],
        vec!["map", "--start-offset", "5000", "-l", "7", name],
        vec!["map", "-s", "1k", "-l", "1M", "--output=json", name],
        vec!["map", "-s", "1k", "-l", "1M", name],
        vec![
            "map",
            "--start-offset=1k",
            "--max-length=3M",
            "--output=json",
            name,
        ],
        vec!["map", "--start-offset", &mid, "--output=json", name],
        vec!["map", "--start-offset", &mid, name],
        vec!["map", "--max-length=0", name],
        vec!["map", "--max-length=0", "--output=json", name],
        vec!["map", "--max-length=1", "--output=json", name],
        vec!["map", "--start-offset", &size_s, "--output=json", name],
        vec!["map", "--start-offset", &size_s, name],
        vec!["map", "--start-offset", &beyond, "--output=json", name],
        vec!["map", "--start-offset", &beyond, name],
    ];
    v.into_iter()
        .map(|a| a.into_iter().map(String::from).collect())
        .collect()
}

fn check_map(size: u64, build: impl FnOnce(&TestDir)) {
    let dir = TestDir::new();
    build(&dir);
    let mut c = Checks::new();
    for args in map_variants("img", size) {
        c.same(&dir.both(&args));
    }
    c.finish();
}

#[test]
fn map_runs_unaligned_size() {
    let size = 4 * M + 1000;
    check_map(size, |d| {
        d.patterned(
            "img",
            size,
            &[
                (0x11, 0, 64 * K),
                (0x22, M, 100 * K),
                // allocated, but all zeros
                (0x00, 2 * M, 64 * K),
                (0x33, 2 * M + 64 * K, 4 * K),
                (0x44, 3 * M + 1, 3),
                (0x55, 4 * M, 1000),
            ],
        );
    });
}

#[test]
fn map_sparse() {
    check_map(M, |d| {
        d.sparse("img", M);
    });
}

#[test]
fn map_empty() {
    check_map(0, |d| {
        d.sparse("img", 0);
    });
}

#[test]
fn map_dense_5000_bytes() {
    check_map(5000, |d| {
        d.dense("img", 5000, 7);
    });
}

#[test]
fn map_64m_start_and_end() {
    check_map(64 * M, |d| {
        d.patterned("img", 64 * M, &[(0x11, 0, M), (0x22, 63 * M, M)]);
    });
}

#[test]
fn map_hole_at_unaligned_end() {
    let size = 2 * M + 3000;
    check_map(size, |d| {
        d.patterned("img", size, &[(0x66, 0, 512), (0x67, M + 512, 512)]);
    });
}

#[test]
fn map_errors() {
    let dir = TestDir::new();
    dir.patterned("img", M, &[(0x11, 0, 4 * K)]);
    let mut c = Checks::new();
    let cases: &[&[&str]] = &[
        &["map", "--start-offset=-1", "img"],
        &["map", "-f", "raw", "--start-offset=-1", "img"],
        &["map", "--start-offset=1x", "img"],
        &["map", "--start-offset=", "img"],
        &["map", "--max-length=-1", "img"],
        &["map", "--max-length=abc", "img"],
        &["map", "-l", "1.5x", "img"],
        &["map", "--output=xml", "img"],
        &["map", "--output=", "img"],
        &["map"],
        &["map", "img", "img"],
        &["map", "nonexistent"],
        &["map", "-f", "foo", "img"],
        &["map", "--image-opts", "-f", "raw", "img"],
        &["map", "--bogus", "img"],
        &["map", "-x", "img"],
        &["map", "--start-offset"],
    ];
    for args in cases {
        c.same(&dir.both(args));
    }
    c.finish();
}
