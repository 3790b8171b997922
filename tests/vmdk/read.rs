//! Reading vmdk: every subformat qemu-img makes, descriptors with several extents, delta
//! disks, hand-built VMware streamOptimized/COWD/seSparse extents, and damaged images.

use super::*;

#[test]
fn read_every_subformat() {
    let d = TestDir::new();
    let mut c = Checks::new();
    let size = 5 * M + 3 * 512;
    for (name, opts) in [
        ("ms.vmdk", "subformat=monolithicSparse"),
        ("mf.vmdk", "subformat=monolithicFlat"),
        ("ts.vmdk", "subformat=twoGbMaxExtentSparse"),
        ("tf.vmdk", "subformat=twoGbMaxExtentFlat"),
        ("zg.vmdk", "zeroed_grain=on,adapter_type=lsilogic"),
    ] {
        d.qemu(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            opts,
            name,
            &size.to_string(),
        ])
        .assert_ok();
        d.qemu_io_fmt("vmdk", name, &writes(size));
        same_reads(&mut c, &d, name);
    }
    // streamOptimized: compressed grains with markers, written by qemu-img convert.
    d.sparse("src.raw", size);
    d.qemu_io("src.raw", &writes(size));
    d.qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "src.raw",
        "so.vmdk",
    ])
    .assert_ok();
    same_reads(&mut c, &d, "so.vmdk");
    c.finish();
}

/// A hand-written descriptor with several extents of every kind QEMU reads (and lines it
/// skips: ZERO, RDONLY, unknown types), in a sub-directory.
#[test]
fn descriptor_with_many_extents() {
    let d = TestDir::new();
    let mut c = Checks::new();
    d.mkdir("sub");
    d.patterned(
        "sub/a.bin",
        2 * M,
        &[(0x61, 0, 4096), (0x62, 1536 * 1024, 8192)],
    );
    d.patterned("sub/b.bin", 3 * M, &[(0x63, 1024 * 1024, 65536)]);
    d.qemu(&["create", "-q", "-f", "vmdk", "sub/s.vmdk", "1M"])
        .assert_ok();
    d.qemu_io_fmt("vmdk", "sub/s.vmdk", &["write -P 0x64 4096 70000"]);
    let desc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                createType=\"monolithicFlat\"\n\n# Extent description\n\
                RW 2048 FLAT \"a.bin\" 1024\nRW 100 ZERO\nRDONLY 8 FLAT \"a.bin\" 0\n\
                RW 2048 SPARSE \"s.vmdk\"\nRW 4096 VMFS \"b.bin\"\nRW 4 FOO \"x\"\n";
    d.write_bytes("sub/multi.vmdk", desc.as_bytes());
    same_reads(&mut c, &d, "sub/multi.vmdk");
    c.finish();
}

/// A delta disk: `parentFileNameHint` is the backing file.
#[test]
fn delta_disk_backing_chain() {
    let d = TestDir::new();
    let mut c = Checks::new();
    d.qemu(&["create", "-q", "-f", "vmdk", "base.vmdk", "4M"])
        .assert_ok();
    d.qemu_io_fmt(
        "vmdk",
        "base.vmdk",
        &["write -P 1 0 1M", "write -P 2 3M 1M"],
    );
    d.qemu(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        "top.vmdk",
    ])
    .assert_ok();
    d.qemu_io_fmt(
        "vmdk",
        "top.vmdk",
        &[
            "write -P 3 64k 64k",
            "write -P 4 3M 1000",
            "write -P 5 2M 64k",
        ],
    );
    same_reads(&mut c, &d, "top.vmdk");
    c.same(&d.both(&["info", "--backing-chain", "top.vmdk"]));
    // A write to the parent gives it a new CID: QEMU no longer reads through it.
    d.qemu_io_fmt("vmdk", "base.vmdk", &["write -P 6 1M 64k"]);
    c.same(&d.both(&["map", "--output=json", "top.vmdk"]));
    let pair = d.both(&["convert", "-O", "raw", "top.vmdk", "x.raw"]);
    c.no_panic(&pair.rimg);
    let first = |s: String| s.lines().next().unwrap_or("").to_string();
    c.check(
        !pair.rimg.ok()
            && pair.qemu.code() == pair.rimg.code()
            && first(pair.qemu.err()) == first(pair.rimg.err()),
        || {
            format!(
                "convert over a changed parent\n{}{}",
                pair.qemu.describe(),
                pair.rimg.describe()
            )
        },
    );
    c.finish();
}

/// Damaged images: one clear line on stderr, a non-zero exit, no panic, the file unchanged;
/// qemu-img's exact words where they do not depend on its internals.
#[test]
fn damaged_images() {
    let d = TestDir::new();
    let mut c = Checks::new();
    d.qemu(&["create", "-q", "-f", "vmdk", "good.vmdk", "4M"])
        .assert_ok();
    d.qemu_io_fmt("vmdk", "good.vmdk", &["write -P 7 0 256k"]);
    let good = d.read("good.vmdk");
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let gd = le32(&good, 56) as usize * 512;
    let gt = le32(&good, gd) as usize * 512;
    // (name, bytes, compare stderr with qemu-img's)
    let mut cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("tiny.vmdk", b"KD".to_vec(), false),
        ("hdr.vmdk", good[..40].to_vec(), true),
        ("short.vmdk", good[..1000].to_vec(), true),
    ];
    let mut gd_past = good.clone();
    gd_past[56..64].copy_from_slice(&(1u64 << 30).to_le_bytes());
    cases.push(("gdpast.vmdk", gd_past, false));
    let mut gt_past = good.clone();
    gt_past[gd..gd + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    cases.push(("gtpast.vmdk", gt_past, false));
    let mut grain_past = good.clone();
    grain_past[gt..gt + 4].copy_from_slice(&0x00ff_0000u32.to_le_bytes());
    cases.push(("grainpast.vmdk", grain_past, false));
    let descs: &[(&str, &str)] = &[
        ("nodesc.vmdk", "version=1\nCID=1\nparentCID=ffffffff\n"),
        (
            "badtype.vmdk",
            "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"weird\"\n",
        ),
        (
            "badline.vmdk",
            "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"good.vmdk\"\n",
        ),
        (
            "missing.vmdk",
            "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"nothere.bin\" 0\n",
        ),
        (
            "badcid.vmdk",
            "version=1\nCID=zz\nparentCID=zz\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"good.vmdk\" 0\n",
        ),
        (
            "notvmdk.vmdk",
            "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\nRW 8 SPARSE \"tiny.vmdk\"\n",
        ),
    ];
    for (n, text) in descs {
        cases.push((n, text.as_bytes().to_vec(), true));
    }
    for (name, bytes, _) in &cases {
        d.write_bytes(name, bytes);
    }
    for (name, _, exact) in &cases {
        let before = d.state(name);
        for cmd in [
            vec!["info", *name],
            vec!["convert", "-O", "raw", *name, "out.raw"],
            vec!["map", "--output=json", *name],
        ] {
            let pair = d.both(&cmd);
            let r = &pair.rimg;
            c.no_panic(r);
            if *exact && cmd[0] == "info" {
                c.same(&pair);
                continue;
            }
            if pair.qemu.ok() {
                continue; // qemu reads zeros past the end of the file here
            }
            c.check(!r.ok(), || {
                format!("rimg accepted {name}\n{}", r.describe())
            });
            c.check(r.err().trim_end().lines().count() == 1, || {
                format!("rimg's error on {name} is not one line\n{}", r.describe())
            });
        }
        c.check(d.state(name) == before, || format!("{name} changed"));
    }
    // Reads past the end of the file: rimg refuses where qemu-img reads zeros.
    for name in ["gdpast.vmdk", "gtpast.vmdk", "grainpast.vmdk"] {
        let r = d.rimg(&["convert", "-O", "raw", name, "out.raw"]);
        c.no_panic(&r);
        c.check(!r.ok() && r.err().trim_end().lines().count() == 1, || {
            format!("rimg on {name}\n{}", r.describe())
        });
    }
    // check: qemu-img's own words for a grain past the end.
    c.same(&d.both(&["check", "grainpast.vmdk"]));
    c.finish();
}

/// A zlib stream of `data` in stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let n = c.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(c);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// A streamOptimized image as VMware writes it: the header's grain directory offset says
/// "at the end", grains, grain table and grain directory each follow a marker, and a
/// footer (a copy of the header with the real offset) precedes the end-of-stream marker.
fn vmware_stream(capacity: u64, grains: &[(u64, u8)]) -> Vec<u8> {
    let header = |gd: u64| {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&0x0003_0001u32.to_le_bytes());
        h[12..20].copy_from_slice(&capacity.to_le_bytes());
        h[20..28].copy_from_slice(&128u64.to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&20u64.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[56..64].copy_from_slice(&gd.to_le_bytes());
        h[64..72].copy_from_slice(&128u64.to_le_bytes());
        h[73..77].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
        h
    };
    let marker = |val: u64, kind: u32| {
        let mut m = vec![0u8; 512];
        m[0..8].copy_from_slice(&val.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        m
    };
    let mut f = header(u64::MAX);
    let desc = "# Disk DescriptorFile\nversion=1\nCID=2a2a2a2a\nparentCID=ffffffff\n\
                createType=\"streamOptimized\"\n\n# Extent description\n\
                RW 2048 SPARSE \"vmware.vmdk\"\n";
    let mut d = desc.as_bytes().to_vec();
    d.resize(20 * 512, 0);
    f.extend_from_slice(&d);
    f.resize(128 * 512, 0);
    let mut gt = vec![0u8; 2048];
    for &(g, byte) in grains {
        let start = g * 65536;
        let len = (capacity * 512 - start).min(65536) as usize;
        let data: Vec<u8> = (0..len).map(|i| byte ^ (i / 512) as u8).collect();
        let z = zlib_stored(&data);
        gt[g as usize * 4..g as usize * 4 + 4]
            .copy_from_slice(&((f.len() / 512) as u32).to_le_bytes());
        f.extend_from_slice(&(start / 512).to_le_bytes());
        f.extend_from_slice(&(z.len() as u32).to_le_bytes());
        f.extend_from_slice(&z);
        f.resize(f.len().div_ceil(512) * 512, 0);
    }
    f.extend_from_slice(&marker(4, 1));
    let gt_sector = f.len() / 512;
    f.extend_from_slice(&gt);
    f.extend_from_slice(&marker(1, 2));
    let gd_sector = (f.len() / 512) as u64;
    let mut gd = vec![0u8; 512];
    gd[0..4].copy_from_slice(&(gt_sector as u32).to_le_bytes());
    f.extend_from_slice(&gd);
    f.extend_from_slice(&marker(1, 3));
    f.extend_from_slice(&header(gd_sector));
    f.extend_from_slice(&marker(0, 0));
    f
}

#[test]
fn stream_optimized_with_footer() {
    let d = TestDir::new();
    let mut c = Checks::new();
    d.write_bytes(
        "vmware.vmdk",
        &vmware_stream(2048 + 7, &[(0, 0x10), (5, 0x20), (16, 0x30)]),
    );
    same_reads(&mut c, &d, "vmware.vmdk");
    // Damaged footer: qemu-img's words.
    let mut bad = vmware_stream(2048, &[(1, 0x40)]);
    let n = bad.len();
    bad[n - 1024] = b'X';
    d.write_bytes("badfooter.vmdk", &bad);
    c.same(&d.both(&["info", "badfooter.vmdk"]));
    c.finish();
}

/// An ESX sparse (`COWD`) extent file: grain directory at sector 4, one grain table of 4096
/// entries after it, grains of `gran` sectors after that.
fn cowd_extent(sectors: u32, gran: u32, grains: &[(u32, u8)]) -> Vec<u8> {
    let gd_entries = sectors.div_ceil(4096 * gran);
    let mut f = vec![0u8; 2048];
    f[0..4].copy_from_slice(b"COWD");
    for (i, v) in [1u32, 3, sectors, gran, 4, gd_entries].iter().enumerate() {
        f[4 + i * 4..8 + i * 4].copy_from_slice(&v.to_le_bytes());
    }
    let gt_sector = 4 + gd_entries.div_ceil(128);
    f.resize(gt_sector as usize * 512, 0);
    f[2048..2052].copy_from_slice(&gt_sector.to_le_bytes());
    let mut gt = vec![0u8; 4096 * 4];
    let mut next = gt_sector + 32;
    let mut data = Vec::new();
    for &(g, byte) in grains {
        gt[g as usize * 4..g as usize * 4 + 4].copy_from_slice(&next.to_le_bytes());
        data.extend(std::iter::repeat_n(byte, gran as usize * 512));
        next += gran;
    }
    f.extend_from_slice(&gt);
    f.extend_from_slice(&data);
    f
}

#[test]
fn vmfs_sparse_extents() {
    let d = TestDir::new();
    let mut c = Checks::new();
    d.write_bytes(
        "d-delta.vmdk",
        &cowd_extent(4096, 8, &[(0, 1), (7, 2), (300, 3)]),
    );
    d.write_bytes("e-delta.vmdk", &cowd_extent(2048, 2, &[(5, 4)]));
    let desc = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                createType=\"vmfsSparse\"\n\n# Extent description\n\
                RW 4096 VMFSSPARSE \"d-delta.vmdk\"\nRW 2048 VMFSSPARSE \"e-delta.vmdk\"\n";
    d.write_bytes("d.vmdk", desc.as_bytes());
    same_reads(&mut c, &d, "d.vmdk");
    c.finish();
}

/// An seSparse extent of `sectors`: const header, volatile header, a one-sector grain
/// directory, one grain table, then 4 KiB grains. `grains`: (grain index, table entry
/// kind: 3 = allocated with this fill byte, 2 = zero, 1 = unmapped).
fn sesparse_extent(sectors: u64, grains: &[(u64, u8, u8)]) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    let fields: [(usize, u64); 14] = [
        (0, 0xcafe_babe),
        (1, 0x0000_0002_0000_0001),
        (2, sectors),
        (3, 8),
        (4, 64),
        (10, 1),
        (11, 1),
        (16, 2),
        (17, 1),
        (18, 3),
        (19, 64),
        (24, 67),
        (25, 1024),
        (12, 0),
    ];
    for (i, v) in fields {
        f[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    let mut vol = vec![0u8; 512];
    vol[0..8].copy_from_slice(&0xcafe_cafeu64.to_le_bytes());
    f.extend_from_slice(&vol);
    let mut gd = vec![0u8; 512];
    gd[0..8].copy_from_slice(&0x1000_0000_0000_0000u64.to_le_bytes());
    f.extend_from_slice(&gd);
    let mut gt = vec![0u8; 4096 * 8];
    let mut data = Vec::new();
    let mut next = 0u64;
    for &(g, kind, byte) in grains {
        let v = match kind {
            3 => {
                data.extend(std::iter::repeat_n(byte, 4096));
                next += 1;
                0x3000_0000_0000_0000 | ((next - 1) << 48)
            }
            k => u64::from(k) << 60,
        };
        gt[g as usize * 8..g as usize * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&gt);
    f.extend_from_slice(&data);
    f
}

#[test]
fn sesparse_extent_reads() {
    let d = TestDir::new();
    let mut c = Checks::new();
    d.write_bytes(
        "se-sesparse.vmdk",
        &sesparse_extent(8192, &[(0, 3, 9), (1, 2, 0), (2, 1, 0), (100, 3, 8)]),
    );
    let desc = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                createType=\"seSparse\"\n\n# Extent description\n\
                RW 8192 SESPARSE \"se-sesparse.vmdk\"\n";
    d.write_bytes("se.vmdk", desc.as_bytes());
    same_reads(&mut c, &d, "se.vmdk");
    c.finish();
}
