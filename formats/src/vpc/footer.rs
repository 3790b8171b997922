//! The VHD hard disk footer, the dynamic disk header and the CHS geometry rules.
//!
//! Every field is big-endian. The footer (512 bytes) sits at the end of every VHD and, for
//! dynamic and differencing disks, also at offset 0; the dynamic disk header (1,024 bytes)
//! follows at the footer's `data_offset` and points at the block allocation table (BAT).

/// Size of the footer.
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const DYN_HEADER_SIZE: usize = 1024;
/// The footer's cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// The dynamic disk header's cookie.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Disk types.
pub const TYPE_FIXED: u32 = 2;
/// Disk types.
pub const TYPE_DYNAMIC: u32 = 3;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;
/// Largest cylinder count, heads and sectors per track of a VHD geometry.
pub const CHS_MAX: (u64, u64, u64) = (65535, 16, 255);
/// Sectors of the largest geometry.
pub const MAX_GEOMETRY: u64 = CHS_MAX.0 * CHS_MAX.1 * CHS_MAX.2;
/// The largest disk in sectors (2040 GiB).
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// The block size of dynamic disks rimg and qemu-img create.
pub const DEFAULT_BLOCK: u32 = 2 << 20;
/// A BAT entry of an unallocated block.
pub const BAT_UNUSED: u32 = 0xffff_ffff;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// One's complement of the byte sum, the checksum of both structures (the checksum field
/// itself must read as zero).
pub fn checksum(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32))
}

/// The fields of a footer rimg uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// the raw 512 bytes (rewritten verbatim at the end of a growing dynamic disk)
    pub raw: [u8; FOOTER_SIZE],
    /// offset of the dynamic disk header
    pub data_offset: u64,
    /// creator application, four bytes
    pub creator_app: [u8; 4],
    /// the size the creator asked for
    pub current_size: u64,
    /// cylinders, heads, sectors per track
    pub chs: (u64, u64, u64),
    /// disk type (2 fixed, 3 dynamic, 4 differencing)
    pub disk_type: u32,
    /// stored checksum
    pub checksum: u32,
}

impl Footer {
    /// Decode 512 bytes (no validation beyond layout).
    pub fn parse(raw: &[u8; FOOTER_SIZE]) -> Footer {
        Footer {
            raw: *raw,
            data_offset: be64(raw, 16),
            creator_app: raw[28..32].try_into().expect("4 bytes"),
            current_size: be64(raw, 48),
            chs: (be16(raw, 56) as u64, raw[58] as u64, raw[59] as u64),
            disk_type: be32(raw, 60),
            checksum: be32(raw, 64),
        }
    }

    /// Whether the cookie is "conectix".
    pub fn has_cookie(raw: &[u8]) -> bool {
        raw.len() >= 8 && &raw[..8] == FOOTER_COOKIE
    }

    /// Whether the stored checksum matches the bytes.
    pub fn checksum_ok(&self) -> bool {
        let mut b = self.raw;
        b[64..68].fill(0);
        checksum(&b) == self.checksum
    }

    /// Virtual size in sectors, as QEMU decides it: the CHS geometry for Virtual PC's and
    /// QEMU's own (`qemu`) images, the footer's current size for creators that use it
    /// (Hyper-V `win `, `qem2` for `force_size=on`, Disk2vhd `d2v `, XenServer `tap\0`,
    /// XenConverter `CTXS`) and for images whose geometry is the largest one.
    pub fn total_sectors(&self) -> u64 {
        let chs = self.chs.0 * self.chs.1 * self.chs.2;
        let uses_current = matches!(&self.creator_app, b"win " | b"qem2" | b"d2v " | b"CTXS")
            || &self.creator_app == b"tap\0";
        if uses_current || chs == MAX_GEOMETRY {
            self.current_size / 512
        } else {
            chs
        }
    }
}

/// The fields of a dynamic disk header rimg uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    /// offset of the BAT
    pub table_offset: u64,
    /// entries in the BAT
    pub max_table_entries: u32,
    /// block size in bytes
    pub block_size: u32,
}

impl DynHeader {
    /// Decode; `None` when the cookie is wrong.
    pub fn parse(raw: &[u8; DYN_HEADER_SIZE]) -> Option<DynHeader> {
        if &raw[..8] != DYN_COOKIE {
            return None;
        }
        Some(DynHeader {
            table_offset: be64(raw, 16),
            max_table_entries: be32(raw, 28),
            block_size: be32(raw, 32),
        })
    }
}

/// The geometry the VHD specification gives `total_sectors` (may round it down). Sizes past
/// the largest geometry get the largest geometry.
pub fn geometry(total_sectors: u64) -> (u64, u64, u64) {
    let total = total_sectors.min(MAX_GEOMETRY);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    // The cylinder count is a 16-bit field.
    ((cth / heads).min(CHS_MAX.0), heads, spt)
}

/// The size `create` gives a disk asked to be `size` bytes: rounded up to whole sectors,
/// then (unless `force_size`) up to the first geometry that holds it. Returns the size in
/// bytes and the geometry, or `None` past 2040 GiB.
pub fn rounded_size(size: u64, force_size: bool) -> Option<(u64, (u64, u64, u64))> {
    let size = size.div_ceil(512).checked_mul(512)?;
    let chs = if force_size {
        CHS_MAX
    } else {
        let want = (size / 512).min(MAX_GEOMETRY);
        let mut chs = (0, 0, 0);
        let mut i = 0;
        while want > chs.0 * chs.1 * chs.2 {
            chs = geometry(want + i);
            i += 1;
        }
        chs
    };
    let sectors = chs.0 * chs.1 * chs.2;
    if sectors == MAX_GEOMETRY {
        let s = size / 512;
        (s <= MAX_SECTORS).then_some((size, chs))
    } else {
        Some((sectors * 512, chs))
    }
}

/// Build a footer.
pub fn build_footer(
    size: u64,
    chs: (u64, u64, u64),
    disk_type: u32,
    force_size: bool,
    timestamp: u32,
    uuid: [u8; 16],
) -> [u8; FOOTER_SIZE] {
    let mut b = [0u8; FOOTER_SIZE];
    b[..8].copy_from_slice(FOOTER_COOKIE);
    b[8..12].copy_from_slice(&2u32.to_be_bytes());
    b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = if disk_type == TYPE_DYNAMIC {
        FOOTER_SIZE as u64
    } else {
        u64::MAX
    };
    b[16..24].copy_from_slice(&data_offset.to_be_bytes());
    b[24..28].copy_from_slice(&timestamp.to_be_bytes());
    b[28..32].copy_from_slice(if force_size { b"qem2" } else { b"qemu" });
    b[32..34].copy_from_slice(&5u16.to_be_bytes());
    b[34..36].copy_from_slice(&3u16.to_be_bytes());
    b[36..40].copy_from_slice(b"Wi2k");
    b[40..48].copy_from_slice(&size.to_be_bytes());
    b[48..56].copy_from_slice(&size.to_be_bytes());
    b[56..58].copy_from_slice(&(chs.0 as u16).to_be_bytes());
    b[58] = chs.1 as u8;
    b[59] = chs.2 as u8;
    b[60..64].copy_from_slice(&disk_type.to_be_bytes());
    b[68..84].copy_from_slice(&uuid);
    let sum = checksum(&b);
    b[64..68].copy_from_slice(&sum.to_be_bytes());
    b
}

/// Build a dynamic disk header for a BAT at `table_offset` of `entries` blocks.
pub fn build_dyn_header(table_offset: u64, entries: u32, block_size: u32) -> [u8; DYN_HEADER_SIZE] {
    let mut b = [0u8; DYN_HEADER_SIZE];
    b[..8].copy_from_slice(DYN_COOKIE);
    // The specification says 0xFFFFFFFF, but Microsoft's tools expect all 64 bits set.
    b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    b[16..24].copy_from_slice(&table_offset.to_be_bytes());
    b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    b[28..32].copy_from_slice(&entries.to_be_bytes());
    b[32..36].copy_from_slice(&block_size.to_be_bytes());
    let sum = checksum(&b);
    b[36..40].copy_from_slice(&sum.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_like_qemu_img() {
        // Measured with qemu-img 10.0.2 create -f vpc.
        assert_eq!(rounded_size(1 << 30, false).unwrap().0, 1_073_995_776);
        assert_eq!(rounded_size(10 << 20, false).unwrap().0, 10_514_432);
        assert_eq!(rounded_size(5 << 20, false).unwrap().0, 5_257_216);
        assert_eq!(rounded_size(1000, false).unwrap().0, 34_816);
        assert_eq!(rounded_size(1000, true).unwrap().0, 1024);
        assert_eq!(rounded_size(1 << 30, true).unwrap().0, 1 << 30);
        assert!(rounded_size(3000 << 30, false).is_none());
        assert!(rounded_size(3000 << 30, true).is_none());
        assert_eq!(rounded_size(2040 << 30, false).unwrap().0, 2040 << 30);
    }

    #[test]
    fn footer_round_trips() {
        let (size, chs) = rounded_size(1 << 30, false).unwrap();
        let raw = build_footer(size, chs, TYPE_DYNAMIC, false, 1, [7; 16]);
        let f = Footer::parse(&raw);
        assert!(f.checksum_ok());
        assert_eq!(f.total_sectors() * 512, size);
        assert_eq!(f.data_offset, 512);
    }
}
