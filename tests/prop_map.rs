//! Property test: random ranges written with qemu-io into a sparse raw image; `rimg map` (JSON and
//! human) must equal `qemu-img map`, and `rimg convert`'s output must compare identical to the
//! source.

use proptest::prelude::*;

use crate::util::{qemu_compare_identical, TestDir, K, M};

fn image_strategy() -> impl Strategy<Value = (u64, Vec<(u64, u64, u8)>)> {
    // (the empty image is covered by map::map_empty)
    let size = prop_oneof![(1u64..=16).prop_map(|n| n * 512 * K), 1u64..=8 * M];
    size.prop_flat_map(|size| {
        let writes = prop::collection::vec((0..size.max(1), 1u64..=300 * K, any::<u8>()), 0..8);
        (Just(size), writes)
    })
    .prop_map(|(size, writes)| {
        let writes = writes
            .into_iter()
            .filter(|(off, _, _)| *off < size)
            .map(|(off, len, p)| (off, len.min(size - off), p))
            .collect();
        (size, writes)
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        max_shrink_iters: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn prop_map_and_convert_match_qemu((size, writes) in image_strategy()) {
        let dir = TestDir::new();
        let w: Vec<(u8, u64, u64)> = writes.iter().map(|&(o, l, p)| (p, o, l)).collect();
        dir.patterned("img", size, &w);
        for args in [
            &["map", "--output=json", "img"][..],
            &["map", "-f", "raw", "img"][..],
        ] {
            let pair = dir.both(args);
            prop_assert!(pair.diff().is_none(), "writes {:?}\n{}", writes, pair.diff().unwrap());
        }
        let conv = dir.rimg(&["convert", "-f", "raw", "-O", "raw", "img", "out"]);
        prop_assert!(conv.ok() && conv.stderr.is_empty(), "writes {:?}\n{}", writes, conv.describe());
        let same = qemu_compare_identical(&dir, "img", "out");
        prop_assert!(same.is_ok(), "writes {:?}\n{}", writes, same.unwrap_err());
        let pair = dir.both(&["map", "--output=json", "out"]);
        prop_assert!(pair.diff().is_none(), "map of rimg's convert output, writes {:?}\n{}", writes, pair.diff().unwrap());
    }
}
