//! vmdk: images of every subformat the real qemu-img makes (and qemu-io writes into) read
//! the same in rimg (`info`, `map`, `check`, `convert -O raw`); `create -f vmdk` lays files
//! out as qemu-img does (CID masked: it is random); what `convert -O vmdk` writes passes
//! `qemu-img check` and `compare`; damaged images fail with one line and no panic.

use crate::util::{Checks, Dir, TestDir, Twin, M};

mod read;
mod write;

/// Writes at aligned, unaligned and end-of-disk offsets of a `size`-byte disk.
fn writes(size: u64) -> Vec<String> {
    vec![
        "write -P 0x11 0 64k".into(),
        "write -P 0x22 100000 3000".into(),
        "write -P 0x33 1M 130k".into(),
        "write -z 2M 64k".into(),
        format!("write -P 0x44 {} 4096", size - 4096),
        format!("write -P 0x55 {} 512", size - 70000),
    ]
}

/// Read-only commands both tools must answer identically on `img`, then `convert -O raw`
/// byte-identical.
fn same_reads(c: &mut Checks, d: &Dir, img: &str) {
    for args in [
        vec!["info", img],
        vec!["info", "--output=json", img],
        vec!["info", "--backing-chain", "--output=json", img],
        vec!["map", img],
        vec!["map", "--output=json", img],
        vec!["check", img],
        vec!["check", "--output=json", img],
        vec!["check", "-r", "all", img],
    ] {
        c.same(&d.both(&args));
    }
    let q = d.qemu(&["convert", "-O", "raw", img, "q.raw"]);
    let r = d.rimg(&["convert", "-O", "raw", img, "r.raw"]);
    c.no_panic(&r);
    if c.check(q.ok() && r.ok(), || {
        format!("convert -O raw of {img}\n{}{}", q.describe(), r.describe())
    }) {
        c.check(d.read("q.raw") == d.read("r.raw"), || {
            format!("convert -O raw of {img}: rimg's raw differs from qemu-img's")
        });
    }
}

mod prop {
    use proptest::prelude::*;

    use crate::util::{TestDir, K, M};

    const SUBFORMATS: [&str; 4] = [
        "subformat=monolithicSparse",
        "zeroed_grain=on",
        "subformat=twoGbMaxExtentSparse",
        "subformat=monolithicFlat",
    ];

    /// (offset, length, pattern byte, write zeros instead)
    type Write = (u64, u64, u8, bool);

    fn strategy() -> impl Strategy<Value = (usize, u64, Vec<Write>)> {
        (0..SUBFORMATS.len(), 1u64..=6 * M / 512).prop_flat_map(|(sub, sectors)| {
            let size = sectors * 512;
            let writes =
                prop::collection::vec((0..size, 1u64..=200 * K, any::<u8>(), any::<bool>()), 0..6);
            (Just(sub), Just(size), writes)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 8,
            max_shrink_iters: 16,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Random writes (data or zeros) by qemu-io into a vmdk of a random subformat:
        /// `map` equals qemu-img's, `convert -O raw` and `convert -O vmdk` keep the content.
        #[test]
        fn prop_vmdk_map_and_convert((sub, size, writes) in strategy()) {
            let d = TestDir::new();
            d.qemu(&["create", "-q", "-f", "vmdk", "-o", SUBFORMATS[sub], "p.vmdk", &size.to_string()])
                .assert_ok();
            let cmds: Vec<String> = writes
                .iter()
                .map(|&(o, l, p, z)| {
                    let l = l.min(size - o).max(1).min(size - o);
                    if z { format!("write -z {o} {l}") } else { format!("write -P {p} {o} {l}") }
                })
                .collect();
            if !cmds.is_empty() {
                d.qemu_io_fmt("vmdk", "p.vmdk", &cmds);
            }
            for args in [&["map", "--output=json", "p.vmdk"][..], &["map", "p.vmdk"][..]] {
                let pair = d.both(args);
                prop_assert!(pair.diff().is_none(), "{}: {cmds:?}\n{}", SUBFORMATS[sub], pair.diff().unwrap());
            }
            let r = d.rimg(&["convert", "-O", "raw", "p.vmdk", "r.raw"]);
            prop_assert!(r.ok(), "{}", r.describe());
            let q = d.qemu(&["compare", "-f", "vmdk", "-F", "raw", "p.vmdk", "r.raw"]);
            prop_assert!(q.ok(), "{cmds:?}\n{}", q.describe());
            let r = d.rimg(&["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "p.vmdk", "s.vmdk"]);
            prop_assert!(r.ok(), "{}", r.describe());
            let q = d.qemu(&["compare", "p.vmdk", "s.vmdk"]);
            prop_assert!(q.ok(), "{cmds:?}\n{}", q.describe());
        }
    }
}
