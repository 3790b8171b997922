//! `compare`: identical images, mismatches at various offsets, holes against explicit zeros,
//! different sizes, strict mode, `-q`, errors. stdout, stderr and exit code must equal qemu-img's.

use crate::util::{Checks, TestDir, K, M};

const BASE: &[(u8, u64, u64)] = &[
    (0x11, 0, 64 * K),
    (0x22, 512 * K, 4 * K),
    (0x33, 900 * K, 1),
];

fn build(d: &TestDir) {
    d.patterned("a", M, BASE);
    d.patterned("a_copy", M, BASE);
    for (name, off) in [
        ("mis1000", 1000),
        ("mis4096", 4096),
        ("mis700k", 700 * K),
        ("misend", M - 1),
        ("mis0", 0),
    ] {
        d.patterned(name, M, BASE);
        d.write_patterns(name, &[(0x99, off, 1)]);
    }
    d.sparse("holes", M);
    d.patterned("zeros", M, &[(0x00, 0, M)]);
    d.patterned("halfzeros", M, &[(0x00, 256 * K, 256 * K)]);
    d.patterned("bigzero", 2 * M, BASE);
    d.patterned("bignz", 2 * M, BASE);
    d.write_patterns("bignz", &[(0x44, 3 * M / 2 + 3, 1)]);
    d.patterned("bigzero_alloc", 2 * M, BASE);
    d.write_patterns("bigzero_alloc", &[(0x00, M, M)]);
    d.dense("odd", 5000, 11);
    d.dense("odd_copy", 5000, 11);
    d.dense("odd_mis", 5000, 11);
    d.write_patterns("odd_mis", &[(0x5a, 4999, 1)]);
    d.dense("dense1", 4 * M, 12);
    d.dense("dense2", 4 * M, 12);
    d.write_patterns(
        "dense2",
        &[(0x00, 3 * M + 5, 3), (0x01, 3 * M + 100 * K, 1)],
    );
    d.sparse("empty", 0);
    d.sparse("empty2", 0);
    d.dense("b1000", 1000, 13);
    d.dense("b1024", 1000, 13);
    d.set_len("b1024", 1024);
    d.sparse("hole2m", 2 * M);
    d.patterned("hole2m_end", 2 * M, &[(0x01, 2 * M - 512, 512)]);
    d.patterned("hole2m_zend", 2 * M, &[(0x00, 2 * M - 4 * K, 4 * K)]);
    d.mkdir("adir");
}

fn compare_cases(cases: &[&[&str]]) {
    let dir = TestDir::new();
    build(&dir);
    let mut c = Checks::new();
    for args in cases {
        let mut full = vec!["compare"];
        full.extend_from_slice(args);
        c.same(&dir.both(&full));
    }
    c.finish();
}

#[test]
fn compare_identical() {
    compare_cases(&[
        &["a", "a_copy"],
        &["a", "a"],
        &["-f", "raw", "-F", "raw", "a", "a_copy"],
        &["a", "a_copy", "-f", "raw", "-F", "raw"],
        &["-s", "a", "a_copy"],
        &["odd", "odd_copy"],
        // sizes are compared after rounding up to 512
        &["b1000", "b1024"],
        &["-s", "b1000", "b1024"],
        &["dense1", "dense1"],
        &["empty", "empty2"],
        &["-U", "a", "a_copy"],
        &["--force-share", "a", "a_copy"],
        &[
            "--image-opts",
            "driver=raw,file.filename=a",
            "driver=raw,file.filename=a_copy",
        ],
    ]);
}

#[test]
fn compare_mismatch_offsets() {
    compare_cases(&[
        &["a", "mis1000"],
        &["mis1000", "a"],
        &["a", "mis4096"],
        &["a", "mis700k"],
        &["a", "misend"],
        &["a", "mis0"],
        &["-f", "raw", "-F", "raw", "a", "misend"],
        &["odd", "odd_mis"],
        &["dense1", "dense2"],
        &["holes", "a"],
        &["a", "holes"],
    ]);
}

#[test]
fn compare_holes_and_zeros() {
    compare_cases(&[
        &["holes", "zeros"],
        &["zeros", "holes"],
        &["holes", "halfzeros"],
        &["-s", "holes", "zeros"],
        &["-s", "zeros", "holes"],
        &["-s", "holes", "halfzeros"],
        &["-s", "holes", "holes"],
        &["-s", "a", "mis1000"],
        &["-s", "empty", "holes"],
        // a hole running to EOF against one that does not
        &["-s", "hole2m", "hole2m_zend"],
        &["hole2m", "hole2m_zend"],
        &["-s", "hole2m", "hole2m_end"],
        &["-s", "holes", "hole2m"],
        &["-s", "holes", "hole2m_zend"],
    ]);
}

#[test]
fn compare_different_sizes() {
    compare_cases(&[
        &["a", "bigzero"],
        &["bigzero", "a"],
        &["a", "bignz"],
        &["bignz", "a"],
        &["a", "bigzero_alloc"],
        &["bigzero_alloc", "a"],
        &["-s", "a", "bigzero"],
        &["-s", "bigzero", "a"],
        &["-s", "a", "bignz"],
        &["empty", "a"],
        &["a", "empty"],
        &["odd", "a"],
        &["holes", "bigzero"],
    ]);
}

#[test]
fn compare_quiet() {
    compare_cases(&[
        &["-q", "a", "a_copy"],
        &["-q", "a", "mis1000"],
        &["-q", "a", "bigzero"],
        &["-q", "-s", "a", "bigzero"],
        &["-q", "-s", "holes", "zeros"],
        &["-q", "a", "nonexistent"],
        &["a", "mis4096", "-q"],
    ]);
}

#[test]
fn compare_errors() {
    compare_cases(&[
        &["a", "nonexistent"],
        &["nonexistent", "a"],
        &["-f", "raw", "-F", "raw", "a", "nonexistent"],
        &["a", "adir"],
        &["adir", "a"],
        &["-f", "foo", "a", "a_copy"],
        &["-F", "foo", "a", "a_copy"],
        &["a"],
        &[],
        &["a", "a_copy", "a"],
        &["--bogus", "a", "a_copy"],
        &["-x", "a", "a_copy"],
        &["--image-opts", "-f", "raw", "a", "a_copy"],
        &["-T", "bogus", "a", "a_copy"],
        &["--output=json", "a", "a_copy"],
    ]);
}
