//! `measure -O qcow2`: the space a new qcow2 image needs, computed exactly as qemu-img 10
//! does (`qcow2_measure`): the metadata of a fully allocated image (header, L2 tables, L1
//! table, refcount structures covering everything) plus the data clusters required.

use super::options::{
    bool_opt, check_cluster_size, check_types, number_opt, refcount_bits_ok, size_opt,
    REFCOUNT_WIDTH_MSG,
};
use crate::driver::Preallocation;
use crate::error::{Error, Result};
use crate::opts::OptionMap;

/// Largest L1 table qemu accepts, in bytes.
const MAX_L1_BYTES: u64 = 32 << 20;

/// Bytes of refcount blocks and refcount table needed to refcount `clusters` clusters plus
/// those structures themselves (the fixed point qemu's `qcow2_refcount_metadata_size`
/// finds), and the number of refcount blocks. `generous` lets the table be 1.5 times as
/// large as needed, as qemu does when a table grows.
pub(super) fn refcount_metadata_size(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
    generous: bool,
) -> (u64, u64) {
    let per_table_cluster = u128::from(cluster_size / 8);
    let per_block = u128::from((cluster_size * 8) >> refcount_order);
    let mut clusters = u128::from(clusters);
    let mut generous = generous;
    let (mut table, mut blocks, mut n) = (0u128, 0u128, 0u128);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
            continue;
        }
        if n == last {
            break;
        }
    }
    let bytes = (blocks + table) * u128::from(cluster_size);
    (
        u64::try_from(bytes).unwrap_or(u64::MAX),
        u64::try_from(blocks).unwrap_or(u64::MAX),
    )
}

/// Bytes of a fully allocated image of `size` bytes: data, L2 and L1 tables (each rounded
/// up to whole clusters), header and refcount structures.
fn prealloc_size(size: u64, cluster_bits: u32, refcount_order: u32, extended_l2: bool) -> u64 {
    let cs = 1u128 << cluster_bits;
    let es: u128 = if extended_l2 { 16 } else { 8 };
    let aligned = u128::from(size).div_ceil(cs) * cs;
    let mut meta = cs;
    let l2_entries = (aligned / cs).next_multiple_of(cs / es);
    meta += l2_entries * es;
    let l1_entries = (l2_entries * es / cs).next_multiple_of(cs / 8);
    meta += l1_entries * 8;
    let clusters = u64::try_from((meta + aligned) / cs).unwrap_or(u64::MAX);
    let (rc, _) = refcount_metadata_size(clusters, 1 << cluster_bits, refcount_order, false);
    u64::try_from(meta + u128::from(rc) + aligned).unwrap_or(u64::MAX)
}

/// `(required, fully_allocated)` for a qcow2 image of `size` bytes, as
/// `qemu-img measure -O qcow2` prints them.
///
/// `data` is `None` for `--size` (then `size` is that size); otherwise it lists the guest
/// ranges of the source image holding data, in order, and `size` is the source's virtual
/// size. Every target cluster touched by data counts as required; with `backing_file` set
/// every cluster does (qemu cannot know what the backing file shares), as with
/// `preallocation=falloc|full`.
pub(super) fn measure(
    size: u64,
    data: Option<&[(u64, u64)]>,
    options: &OptionMap,
) -> Result<(u64, u64)> {
    check_types(options)?;
    let extended_l2 = bool_opt(options, "extended_l2", false);
    let cluster_bits = check_cluster_size(size_opt(options, "cluster_size", 65536), extended_l2)?;
    let version = match options.get("compat") {
        None | Some("1.1") => 3,
        Some("0.10") => 2,
        Some(v) => {
            return Err(Error::InvalidArgument(format!(
                "Invalid compatibility level: '{v}'"
            )))
        }
    };
    let refcount_bits = number_opt(options, "refcount_bits", 16);
    if !refcount_bits_ok(refcount_bits) {
        return Err(Error::InvalidArgument(REFCOUNT_WIDTH_MSG.into()));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(Error::InvalidArgument(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use compat=1.1 or greater)"
                .into(),
        ));
    }
    let prealloc = match options.get("preallocation") {
        None => Preallocation::Off,
        Some(v) => Preallocation::parse(v)
            .ok_or_else(|| Error::InvalidArgument(format!("invalid parameter value: {v}")))?,
    };
    let has_backing = options.get("backing_file").is_some();

    let cs = 1u64 << cluster_bits;
    let round = |n: u64| u128::from(n).div_ceil(u128::from(cs)) * u128::from(cs);
    // The size checked is the `size` option: `--size` when measuring a size, `-o size=`
    // (usually absent) when measuring an image.
    let checked = match data {
        None => size,
        Some(_) => size_opt(options, "size", 0),
    };
    let es: u128 = if extended_l2 { 16 } else { 8 };
    let l2_tables = (round(checked) / u128::from(cs)).div_ceil(u128::from(cs) / es);
    if l2_tables * 8 > u128::from(MAX_L1_BYTES) {
        return Err(Error::InvalidArgument(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    let too_large = || Error::InvalidArgument("The image size is too large".into());
    let virtual_size = u64::try_from(round(size)).map_err(|_| too_large())?;
    let mut required = match data {
        None => 0,
        Some(_) if has_backing => virtual_size,
        Some(ranges) => data_clusters(ranges, cs, size) * cs,
    };
    if matches!(prealloc, Preallocation::Falloc | Preallocation::Full) {
        required = virtual_size;
    }
    let full = prealloc_size(
        virtual_size,
        cluster_bits,
        refcount_bits.trailing_zeros(),
        extended_l2,
    );
    Ok((full - virtual_size + required, full))
}

/// Clusters of `cs` bytes touched by the guest `ranges` (sorted) within `size` bytes,
/// each counted once.
fn data_clusters(ranges: &[(u64, u64)], cs: u64, size: u64) -> u64 {
    let mut counted_end = 0u64; // first cluster not yet counted
    let mut n = 0u64;
    for &(start, len) in ranges {
        let end = start.saturating_add(len).min(size);
        if end <= start {
            continue;
        }
        let first = (start / cs).max(counted_end);
        let last = (end - 1) / cs;
        if last >= first {
            n += last - first + 1;
            counted_end = last + 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(size: u64, o: &str) -> (u64, u64) {
        measure(size, None, &OptionMap::parse(o)).unwrap()
    }

    const G: u64 = 1 << 30;

    // Each expectation is `qemu-img measure -O qcow2 -o "$o" --size $size --output=json`
    // of qemu-img 10.0.2: (size, o, required, fully-allocated).
    #[test]
    fn sizes_match_qemu() {
        let cases: &[(u64, &str, u64, u64)] = &[
            (0, "", 196608, 196608),
            (0, "cluster_size=512", 1536, 1536),
            (0, "cluster_size=4k,refcount_bits=1", 12288, 12288),
            (0, "cluster_size=2M,extended_l2=on", 6291456, 6291456),
            (0, "refcount_bits=64,cluster_size=512", 1536, 1536),
            (0, "extended_l2=on,preallocation=full", 196608, 196608),
            (0, "compat=0.10,preallocation=metadata", 196608, 196608),
            (1, "", 327680, 393216),
            (1, "cluster_size=512", 2560, 3072),
            (1, "cluster_size=4k,refcount_bits=1", 20480, 24576),
            (1, "cluster_size=2M,extended_l2=on", 10485760, 12582912),
            (1, "refcount_bits=64,cluster_size=512", 2560, 3072),
            (1, "extended_l2=on,preallocation=full", 393216, 393216),
            (1, "compat=0.10,preallocation=metadata", 327680, 393216),
            (512, "", 327680, 393216),
            (512, "cluster_size=512", 2560, 3072),
            (512, "cluster_size=4k,refcount_bits=1", 20480, 24576),
            (512, "cluster_size=2M,extended_l2=on", 10485760, 12582912),
            (512, "refcount_bits=64,cluster_size=512", 2560, 3072),
            (512, "extended_l2=on,preallocation=full", 393216, 393216),
            (512, "compat=0.10,preallocation=metadata", 327680, 393216),
            (1000, "", 327680, 393216),
            (1000, "cluster_size=512", 2560, 3584),
            (1000, "cluster_size=4k,refcount_bits=1", 20480, 24576),
            (1000, "cluster_size=2M,extended_l2=on", 10485760, 12582912),
            (1000, "refcount_bits=64,cluster_size=512", 2560, 3584),
            (1000, "extended_l2=on,preallocation=full", 393216, 393216),
            (1000, "compat=0.10,preallocation=metadata", 327680, 393216),
            (1 << 20, "", 327680, 1376256),
            (1 << 20, "cluster_size=512", 22528, 1071104),
            (1 << 20, "cluster_size=4k,refcount_bits=1", 20480, 1069056),
            (
                1 << 20,
                "cluster_size=2M,extended_l2=on",
                10485760,
                12582912,
            ),
            (1 << 20, "refcount_bits=64,cluster_size=512", 35328, 1083904),
            (
                1 << 20,
                "extended_l2=on,preallocation=full",
                1376256,
                1376256,
            ),
            (
                1 << 20,
                "compat=0.10,preallocation=metadata",
                327680,
                1376256,
            ),
            (G, "", 393216, 1074135040),
            (G, "cluster_size=512", 21385216, 1095127040),
            (G, "cluster_size=4k,refcount_bits=1", 2146304, 1075888128),
            (G, "cluster_size=2M,extended_l2=on", 10485760, 1084227584),
            (G, "refcount_bits=64,cluster_size=512", 34629120, 1108370944),
            (
                G,
                "extended_l2=on,preallocation=full",
                1074266112,
                1074266112,
            ),
            (G, "compat=0.10,preallocation=metadata", 393216, 1074135040),
            (1 << 40, "", 168034304, 1099679662080),
            (
                1 << 40,
                "cluster_size=4k,refcount_bits=1",
                2185375744,
                1101697003520,
            ),
            (
                1 << 40,
                "cluster_size=2M,extended_l2=on",
                16777216,
                1099528404992,
            ),
            (
                1 << 40,
                "extended_l2=on,preallocation=full",
                1099813879808,
                1099813879808,
            ),
            (
                1 << 40,
                "compat=0.10,preallocation=metadata",
                168034304,
                1099679662080,
            ),
            (1234567, "", 327680, 1572864),
            (1234567, "cluster_size=512", 26112, 1261056),
            (1234567, "cluster_size=4k,refcount_bits=1", 20480, 1257472),
            (
                1234567,
                "cluster_size=2M,extended_l2=on",
                10485760,
                12582912,
            ),
            (1234567, "refcount_bits=64,cluster_size=512", 40960, 1275904),
            (
                1234567,
                "extended_l2=on,preallocation=full",
                1572864,
                1572864,
            ),
            (
                1234567,
                "compat=0.10,preallocation=metadata",
                327680,
                1572864,
            ),
            (10000000000, "", 1769472, 10001776640),
            (10000000000, "cluster_size=512", 199155712, 10199155712),
            (
                10000000000,
                "cluster_size=4k,refcount_bits=1",
                19890176,
                10019893248,
            ),
            (
                10000000000,
                "cluster_size=2M,extended_l2=on",
                10485760,
                10011803648,
            ),
            (
                10000000000,
                "refcount_bits=64,cluster_size=512",
                322502144,
                10322502144,
            ),
            (
                10000000000,
                "extended_l2=on,preallocation=full",
                10003021824,
                10003021824,
            ),
            (
                10000000000,
                "compat=0.10,preallocation=metadata",
                1769472,
                10001776640,
            ),
            (G, "preallocation=falloc", 1074135040, 1074135040),
            (G, "extended_l2=on", 524288, 1074266112),
            (G, "refcount_bits=1", 393216, 1074135040),
            (G, "backing_file=foo", 393216, 1074135040),
            (G, "size=5M", 393216, 1074135040),
            (2 << 50, "", 343650009088, 2252143463694336),
        ];
        for &(size, o, req, full) in cases {
            assert_eq!(m(size, o), (req, full), "--size {size} -o {o}");
        }
    }

    // `qemu-img measure -O qcow2 -o "$o" --size 1G` error messages of qemu-img 10.0.2.
    #[test]
    fn errors_match_qemu() {
        let cases = [
            ("compat=v2", "Invalid compatibility level: 'v2'"),
            ("compat=v3", "Invalid compatibility level: 'v3'"),
            ("cluster_size=3k", "Cluster size must be a power of two between 512 and 2048k"),
            ("extended_l2=on,cluster_size=8k", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
            ("refcount_bits=3", "Refcount width must be a power of two and may not exceed 64 bits"),
            ("refcount_bits=8,compat=0.10", "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"),
            ("preallocation=bogus", "invalid parameter value: bogus"),
            ("preallocation=", "invalid parameter value: "),
            ("extended_l2=maybe", "Parameter 'extended_l2' expects 'on' or 'off'"),
            ("bogus=1", "Invalid parameter 'bogus'"),
        ];
        for (o, want) in cases {
            let e = measure(G, None, &OptionMap::parse(o)).unwrap_err();
            assert_eq!(e.to_string(), want, "-o {o}");
        }
        for (size, o) in [(3u64 << 50, ""), (2 << 50, "cluster_size=512")] {
            let e = measure(size, None, &OptionMap::parse(o)).unwrap_err();
            assert_eq!(
                e.to_string(),
                "The image size is too large (try using a larger cluster size)"
            );
        }
        // These are accepted by measure (create would refuse them).
        for o in [
            "lazy_refcounts=on,compat=0.10",
            "compression_type=zstd,compat=0.10",
            "compression_type=foo",
            "data_file=x,data_file_raw=on",
            "nocow=on",
        ] {
            assert_eq!(m(G, o), (393216, 1074135040), "-o {o}");
        }
    }

    // Each expectation is qemu-img 10.0.2's `measure -f raw -O qcow2 -o "$o" d.raw` of a
    // sparse raw file holding data (bytes 0x5a) exactly at the listed ranges (created with
    // truncate + pwrite; 4 KiB aligned, so SEEK_DATA reports exactly them):
    // (virtual size, data ranges, o, required, fully-allocated).
    #[test]
    fn images_match_qemu() {
        #[allow(clippy::type_complexity)]
        let cases: &[(u64, &[(u64, u64)], &str, u64, u64)] = &[
            (10485760, &[(0, 4096)], "", 393216, 10813440),
            (10485760, &[(0, 4096)], "cluster_size=4k", 45056, 10526720),
            (
                10485760,
                &[(0, 4096)],
                "cluster_size=2M",
                12582912,
                20971520,
            ),
            (10485760, &[(0, 4096)], "backing_file=x", 10813440, 10813440),
            (
                10485760,
                &[(0, 4096)],
                "preallocation=full",
                10813440,
                10813440,
            ),
            (
                10485760,
                &[(0, 4096)],
                "cluster_size=512,refcount_bits=64",
                343552,
                10825216,
            ),
            (10485760, &[(61440, 8192)], "", 458752, 10813440),
            (
                10485760,
                &[(61440, 8192)],
                "cluster_size=4k",
                49152,
                10526720,
            ),
            (
                10485760,
                &[(61440, 8192)],
                "cluster_size=2M",
                12582912,
                20971520,
            ),
            (
                10485760,
                &[(61440, 8192)],
                "backing_file=x",
                10813440,
                10813440,
            ),
            (
                10485760,
                &[(61440, 8192)],
                "preallocation=full",
                10813440,
                10813440,
            ),
            (
                10485760,
                &[(61440, 8192)],
                "cluster_size=512,refcount_bits=64",
                347648,
                10825216,
            ),
            (
                10485760,
                &[(1048576, 65536), (3149824, 4096), (9437184, 1048576)],
                "",
                1507328,
                10813440,
            ),
            (
                10485760,
                &[(1048576, 65536), (3149824, 4096), (9437184, 1048576)],
                "cluster_size=4k",
                1159168,
                10526720,
            ),
            (
                10485760,
                &[(1048576, 65536), (3149824, 4096), (9437184, 1048576)],
                "cluster_size=2M",
                16777216,
                20971520,
            ),
            (
                10485760,
                &[(1048576, 65536), (3149824, 4096), (9437184, 1048576)],
                "backing_file=x",
                10813440,
                10813440,
            ),
            (
                10485760,
                &[(1048576, 65536), (3149824, 4096), (9437184, 1048576)],
                "preallocation=full",
                10813440,
                10813440,
            ),
            (
                10485760,
                &[(1048576, 65536), (3149824, 4096), (9437184, 1048576)],
                "cluster_size=512,refcount_bits=64",
                1457664,
                10825216,
            ),
            (10485760, &[(0, 10485760)], "", 10813440, 10813440),
            (
                10485760,
                &[(0, 10485760)],
                "cluster_size=4k",
                10526720,
                10526720,
            ),
            (
                10485760,
                &[(0, 10485760)],
                "cluster_size=2M",
                20971520,
                20971520,
            ),
            (
                10485760,
                &[(0, 10485760)],
                "backing_file=x",
                10813440,
                10813440,
            ),
            (
                10485760,
                &[(0, 10485760)],
                "preallocation=full",
                10813440,
                10813440,
            ),
            (
                10485760,
                &[(0, 10485760)],
                "cluster_size=512,refcount_bits=64",
                10825216,
                10825216,
            ),
            (10485760, &[], "", 327680, 10813440),
            (10485760, &[], "cluster_size=4k", 40960, 10526720),
            (10485760, &[], "cluster_size=2M", 10485760, 20971520),
            (10485760, &[], "backing_file=x", 10813440, 10813440),
            (10485760, &[], "preallocation=full", 10813440, 10813440),
            (
                10485760,
                &[],
                "cluster_size=512,refcount_bits=64",
                339456,
                10825216,
            ),
            (1000448, &[(0, 4096), (995328, 4672)], "", 458752, 1376256),
            (
                1000448,
                &[(0, 4096), (995328, 4672)],
                "cluster_size=4k",
                32768,
                1024000,
            ),
            (
                1000448,
                &[(0, 4096), (995328, 4672)],
                "cluster_size=2M",
                12582912,
                12582912,
            ),
            (
                1000448,
                &[(0, 4096), (995328, 4672)],
                "backing_file=x",
                1376256,
                1376256,
            ),
            (
                1000448,
                &[(0, 4096), (995328, 4672)],
                "preallocation=full",
                1376256,
                1376256,
            ),
            (
                1000448,
                &[(0, 4096), (995328, 4672)],
                "cluster_size=512,refcount_bits=64",
                43008,
                1034240,
            ),
            (3145728, &[(0, 3145728)], "", 3473408, 3473408),
            (
                3145728,
                &[(0, 3145728)],
                "cluster_size=4k",
                3170304,
                3170304,
            ),
            (
                3145728,
                &[(0, 3145728)],
                "cluster_size=2M",
                14680064,
                14680064,
            ),
            (3145728, &[(0, 3145728)], "backing_file=x", 3473408, 3473408),
            (
                3145728,
                &[(0, 3145728)],
                "preallocation=full",
                3473408,
                3473408,
            ),
            (
                3145728,
                &[(0, 3145728)],
                "cluster_size=512,refcount_bits=64",
                3248640,
                3248640,
            ),
        ];
        for &(size, data, o, req, full) in cases {
            let got = measure(size, Some(data), &OptionMap::parse(o)).unwrap();
            assert_eq!(got, (req, full), "size {size} data {data:?} -o {o}");
        }
    }

    #[test]
    fn counts_touched_clusters_once() {
        let c = 65536;
        assert_eq!(data_clusters(&[], c, 10 * c), 0);
        assert_eq!(data_clusters(&[(0, 1)], c, 10 * c), 1);
        assert_eq!(
            data_clusters(&[(0, 100), (200, 100), (c - 1, 2)], c, 10 * c),
            2
        );
        assert_eq!(data_clusters(&[(c / 2, 3 * c)], c, 10 * c), 4);
        assert_eq!(data_clusters(&[(0, 10 * c)], c, 10 * c), 10);
        assert_eq!(data_clusters(&[(9 * c, 5 * c)], c, 10 * c), 1);
    }
}
