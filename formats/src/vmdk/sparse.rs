//! Sparse extent headers: hosted sparse (`KDMV`, VMDK4, including streamOptimized with its
//! footer), ESX sparse (`COWD`, VMDK3) and seSparse; and their grain directories.

use super::{Extent, ExtentKind, SparseExtent};
use crate::error::{Error, Result};
use crate::file::FileLayer;
use crate::types::FileId;

/// `KDMV` read big-endian.
pub const VMDK4_MAGIC: u32 = 0x4b44_4d56;
/// `COWD` read big-endian.
pub const VMDK3_MAGIC: u32 = 0x434f_5744;

/// Header flag: a redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Header flag: newline detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Header flag: grain table entry 1 means "reads as zeros".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESS: u32 = 1 << 16;
/// Header flag: grains carry markers.
pub const FLAG_MARKER: u32 = 1 << 17;
/// `gd_offset` meaning "the grain directory is found through the footer".
pub const GD_AT_END: u64 = u64::MAX;

const SE_CONST_MAGIC: u64 = 0xcafe_babe;
const SE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// The VMDK4 header fields (the 75 bytes after the magic), offsets from the file start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vmdk4Header {
    /// format version (1..3)
    pub version: u32,
    /// `FLAG_*` bits
    pub flags: u32,
    /// size in sectors
    pub capacity: u64,
    /// grain size in sectors
    pub granularity: u64,
    /// embedded descriptor, sectors
    pub desc_offset: u64,
    /// embedded descriptor size, sectors
    pub desc_size: u64,
    /// entries per grain table
    pub num_gtes_per_gt: u32,
    /// redundant grain directory, sectors
    pub rgd_offset: u64,
    /// grain directory, sectors
    pub gd_offset: u64,
    /// first grain, sectors
    pub grain_offset: u64,
    /// 1 = deflate
    pub compress_algorithm: u16,
}

impl Vmdk4Header {
    /// Parse from a buffer holding the magic and the header (at least 79 bytes).
    pub fn parse(b: &[u8]) -> Vmdk4Header {
        Vmdk4Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            granularity: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            num_gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            grain_offset: le64(b, 64),
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        }
    }

    /// The 512-byte header sector (magic included), as QEMU writes it.
    pub fn to_sector(self) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(&VMDK4_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.grain_offset.to_le_bytes());
        b[73..77].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }
}

/// Read `len` bytes at `off`, zero-filling past the end of the file (as QEMU's block layer
/// does for reads beyond EOF).
pub fn read_padded(f: &FileLayer, off: u64, len: usize, what: &str) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    f.read_at_most(&mut b, off, what)?;
    Ok(b)
}

fn corrupt(f: &FileLayer, what: impl Into<String>) -> Error {
    Error::Corrupt {
        path: f.path().to_string(),
        what: what.into(),
    }
}

/// Open a hosted sparse (VMDK4) extent. `write` refuses version 3 uncompressed extents
/// as QEMU does. Returns the extent and whether it is compressed (streamOptimized).
pub fn open_vmdk4(f: &FileLayer, id: FileId, kind: &str, write: bool) -> Result<Extent> {
    let head = read_padded(f, 0, 512, "VMDK header")?;
    let mut h = Vmdk4Header::parse(&head);
    if h.capacity == 0 && h.desc_offset != 0 {
        // QEMU then reads the embedded descriptor as a descriptor file.
        let len = f.len()?.div_ceil(512) * 512;
        let d = read_padded(
            f,
            h.desc_offset << 9,
            len.min((1 << 20) - 1) as usize,
            "descriptor",
        )?;
        let d = super::descriptor::c_str(&d);
        return Err(match super::descriptor::quoted_value(d, "createType", 128) {
            None => corrupt(f, "invalid VMDK image descriptor"),
            Some(ct) if !super::DESCRIPTOR_TYPES.contains(&ct.as_str()) => {
                Error::Unsupported(format!("Unsupported image type '{ct}'"))
            }
            Some(_) => Error::Unsupported(
                "VMDK sparse extents with an embedded descriptor and no capacity are not supported by rimg yet"
                    .into(),
            ),
        });
    }
    let file_len = f.len()?;
    let gd_at_end = h.gd_offset == GD_AT_END;
    if gd_at_end {
        // The footer (one sector before the end-of-stream marker) overrides the header.
        let end = file_len.div_ceil(512) * 512;
        let start = end
            .checked_sub(1536)
            .ok_or_else(|| corrupt(f, "Invalid footer"))?;
        let foot = read_padded(f, start, 1536, "VMDK footer")?;
        let ok = u32::from_be_bytes([foot[512], foot[513], foot[514], foot[515]]) == VMDK4_MAGIC
            && le32(&foot, 8) == 0
            && le32(&foot, 12) == 3
            && le64(&foot, 1024) == 0
            && le32(&foot, 1032) == 0
            && le32(&foot, 1036) == 0;
        if !ok {
            return Err(corrupt(f, "Invalid footer"));
        }
        h = Vmdk4Header::parse(&foot[512..1024]);
    }
    let compressed = h.compress_algorithm == 1;
    if h.version > 3 {
        return Err(Error::Unsupported(format!(
            "Unsupported VMDK version {}",
            h.version
        )));
    }
    if h.version == 3 && write && !compressed {
        return Err(corrupt(f, "VMDK version 3 must be read only"));
    }
    if h.num_gtes_per_gt > 512 {
        return Err(corrupt(f, "L2 table size too big"));
    }
    let l1_entry_sectors = (u64::from(h.num_gtes_per_gt).wrapping_mul(h.granularity)) as u32;
    if l1_entry_sectors == 0 {
        return Err(corrupt(f, "L1 entry size is invalid"));
    }
    let l1_size = (h.capacity.wrapping_add(u64::from(l1_entry_sectors) - 1)
        / u64::from(l1_entry_sectors)) as u32;
    let rgd = if h.flags & FLAG_RGD != 0 {
        h.rgd_offset << 9
    } else {
        0
    };
    if file_len.div_ceil(512) < h.grain_offset {
        return Err(corrupt(
            f,
            format!(
                "File truncated, expecting at least {} bytes",
                h.grain_offset.wrapping_mul(512) as i64
            ),
        ));
    }
    let mut s = SparseExtent {
        compressed,
        has_marker: h.flags & FLAG_MARKER != 0,
        has_zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
        sesparse: false,
        cluster_sectors: h.granularity,
        l2_size: h.num_gtes_per_gt,
        l1_entry_sectors,
        l1_offset: h.gd_offset << 9,
        l1_backup_offset: rgd,
        l1: Vec::new(),
        l1_backup: None,
        se_l2_tables_offset: 0,
        se_clusters_offset: 0,
        gd_at_end: false,
    };
    check_sizes(f, &s, l1_size)?;
    s.gd_at_end = gd_at_end;
    load_tables(f, &mut s, l1_size, 4, write)?;
    Ok(Extent {
        file: id,
        kind_name: kind.to_string(),
        sectors: h.capacity,
        start: 0,
        kind: ExtentKind::Sparse(Box::new(s)),
        file_len,
    })
}

/// Open an ESX sparse (`COWD`, VMDK3) extent.
pub fn open_vmdk3(f: &FileLayer, id: FileId, kind: &str) -> Result<Extent> {
    let b = read_padded(f, 0, 44, "VMDK3 header")?;
    let disk_sectors = le32(&b, 12);
    let granularity = le32(&b, 16);
    let l1dir_offset = le32(&b, 20);
    let l1dir_size = le32(&b, 24);
    let mut s = SparseExtent {
        compressed: false,
        has_marker: false,
        has_zero_grain: false,
        sesparse: false,
        cluster_sectors: u64::from(granularity),
        l2_size: 4096,
        l1_entry_sectors: 4096u32.wrapping_mul(granularity),
        l1_offset: u64::from(l1dir_offset) << 9,
        l1_backup_offset: 0,
        l1: Vec::new(),
        l1_backup: None,
        se_l2_tables_offset: 0,
        se_clusters_offset: 0,
        gd_at_end: false,
    };
    if s.l1_entry_sectors == 0 {
        return Err(corrupt(f, "L1 entry size is invalid"));
    }
    check_sizes(f, &s, l1dir_size)?;
    load_tables(f, &mut s, l1dir_size, 4, false)?;
    Ok(Extent {
        file: id,
        kind_name: kind.to_string(),
        sectors: u64::from(disk_sectors),
        start: 0,
        kind: ExtentKind::Sparse(Box::new(s)),
        file_len: f.len()?,
    })
}

/// Open an seSparse extent (read-only in QEMU too), with QEMU's strict header checks.
pub fn open_sesparse(f: &FileLayer, id: FileId, kind: &str) -> Result<Extent> {
    let c = read_padded(f, 0, 512, "seSparse const header")?;
    let g = |i: usize| le64(&c, i * 8);
    let bad = |m: String| corrupt(f, m);
    if g(0) != SE_CONST_MAGIC {
        return Err(bad(format!("Bad const header magic: 0x{:016x}", g(0))));
    }
    if g(1) != 0x0000_0002_0000_0001 {
        return Err(bad(format!("Unsupported version: 0x{:016x}", g(1))));
    }
    if g(3) != 8 {
        return Err(bad(format!("Unsupported grain size: {}", g(3))));
    }
    if g(4) != 64 {
        return Err(bad(format!("Unsupported grain table size: {}", g(4))));
    }
    if g(5) != 0 {
        return Err(bad(format!("Unsupported flags: 0x{:016x}", g(5))));
    }
    if g(6) != 0 || g(7) != 0 || g(8) != 0 || g(9) != 0 {
        return Err(bad(format!(
            "Unsupported reserved bits: 0x{:016x} 0x{:016x} 0x{:016x} 0x{:016x}",
            g(6),
            g(7),
            g(8),
            g(9)
        )));
    }
    if c[208..].iter().any(|&b| b != 0) {
        return Err(bad("Unsupported non-zero const header padding".into()));
    }
    let vol_off = g(10).wrapping_mul(512);
    let v = read_padded(f, vol_off, 512, "seSparse volatile header")?;
    if le64(&v, 0) != SE_VOLATILE_MAGIC {
        return Err(bad(format!(
            "Bad volatile header magic: 0x{:016x}",
            le64(&v, 0)
        )));
    }
    if le64(&v, 24) != 0 {
        return Err(bad("Image is dirty, Replaying journal not supported".into()));
    }
    if v[32..].iter().any(|&b| b != 0) {
        return Err(bad("Unsupported non-zero volatile header padding".into()));
    }
    let capacity = g(2);
    let l1_size = (g(17).wrapping_mul(512) / 8) as u32;
    let l2_size = (g(4) * 512 / 8) as u32;
    let mut s = SparseExtent {
        compressed: false,
        has_marker: false,
        has_zero_grain: false,
        sesparse: true,
        cluster_sectors: g(3),
        l2_size,
        l1_entry_sectors: l2_size * g(3) as u32,
        l1_offset: g(16).wrapping_mul(512),
        l1_backup_offset: 0,
        l1: Vec::new(),
        l1_backup: None,
        se_l2_tables_offset: g(18),
        se_clusters_offset: g(24),
        gd_at_end: false,
    };
    check_sizes(f, &s, l1_size)?;
    load_tables(f, &mut s, l1_size, 8, false)?;
    Ok(Extent {
        file: id,
        kind_name: kind.to_string(),
        sectors: capacity,
        start: 0,
        kind: ExtentKind::Sparse(Box::new(s)),
        file_len: f.len()?,
    })
}

/// QEMU's `vmdk_add_extent` limits.
fn check_sizes(f: &FileLayer, s: &SparseExtent, l1_size: u32) -> Result<()> {
    if s.cluster_sectors > 0x20_0000 {
        return Err(corrupt(f, "Invalid granularity, image may be corrupt"));
    }
    if s.cluster_sectors == 0 {
        return Err(corrupt(f, "Invalid granularity, image may be corrupt"));
    }
    if l1_size > 32 * 1024 * 1024 {
        return Err(corrupt(f, "L1 size too big"));
    }
    Ok(())
}

/// Read the grain directory (and the redundant one), `entry` bytes per entry. A grain
/// directory reaching past the end of the file is refused (QEMU would read zeros there and
/// show an empty disk); so is such a redundant one when opening to `write` (only writes use
/// it: reads leave it out).
fn load_tables(
    f: &FileLayer,
    s: &mut SparseExtent,
    l1_size: u32,
    entry: usize,
    write: bool,
) -> Result<()> {
    let bytes = l1_size as usize * entry;
    let file_len = f.len()?;
    // Offsets QEMU computes past 2^63 become negative: its read fails with EIO.
    if s.l1_offset > i64::MAX as u64 {
        return Err(corrupt(
            f,
            format!(
                "Could not read l1 table from extent '{}': Input/output error",
                f.path()
            ),
        ));
    }
    if s.l1_backup_offset > i64::MAX as u64 {
        return Err(corrupt(
            f,
            format!(
                "Could not read l1 backup table from extent '{}': Input/output error",
                f.path()
            ),
        ));
    }
    let past = |off: u64| off.checked_add(bytes as u64).is_none_or(|e| e > file_len);
    if bytes > 0 && past(s.l1_offset) {
        return Err(corrupt(
            f,
            format!(
                "Could not read l1 table from extent '{}': the grain directory at offset {:#x} is past the end of the file",
                f.path(),
                s.l1_offset
            ),
        ));
    }
    let raw = read_padded(f, s.l1_offset, bytes, "grain directory")?;
    s.l1 = if entry == 8 {
        raw.chunks_exact(8).map(|c| le64(c, 0)).collect()
    } else {
        raw.chunks_exact(4).map(|c| u64::from(le32(c, 0))).collect()
    };
    if s.l1_backup_offset != 0 {
        if bytes > 0 && past(s.l1_backup_offset) {
            if !write {
                s.l1_backup_offset = 0;
                return Ok(());
            }
            return Err(corrupt(
                f,
                format!(
                    "Could not read l1 backup table from extent '{}': the redundant grain directory at offset {:#x} is past the end of the file",
                    f.path(),
                    s.l1_backup_offset
                ),
            ));
        }
        let raw = read_padded(f, s.l1_backup_offset, bytes, "redundant grain directory")?;
        s.l1_backup = Some(raw.chunks_exact(4).map(|c| le32(c, 0)).collect());
    }
    Ok(())
}
