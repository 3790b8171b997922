//! VHDX on-disk structures (MS-VHDX): the file identifier, the two headers, the region
//! table and the metadata region, with their CRC-32C checksums. Parsing validates as QEMU's
//! driver does; serialisation builds what `create` and the writer put on disk.
//!
//! Every integer is little-endian. GUIDs are kept as the 16 bytes stored on disk.

use crate::error::{Error, Result};
use crate::file::FileLayer;

/// 1 MiB: the unit of the header section, log, regions and payload block offsets.
pub const MIB: u64 = 1 << 20;
/// File offset of header 1 (header 2 follows 64 KiB later).
pub const HEADER1_OFF: u64 = 64 << 10;
/// File offset of header 2.
pub const HEADER2_OFF: u64 = 128 << 10;
/// Bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4096;
/// File offset of region table 1 (table 2 follows 64 KiB later).
pub const REGION1_OFF: u64 = 192 << 10;
/// File offset of region table 2.
pub const REGION2_OFF: u64 = 256 << 10;
/// Bytes a region table occupies (and its checksum covers).
pub const REGION_SIZE: usize = 64 << 10;
/// Bytes of the metadata table (header and up to 2047 entries).
pub const METADATA_TABLE_SIZE: usize = 64 << 10;
/// Smallest and largest payload block sizes.
pub const BLOCK_SIZE_MIN: u64 = MIB;
/// Largest payload block size.
pub const BLOCK_SIZE_MAX: u64 = 256 * MIB;
/// Sectors a sector bitmap block describes (2^23).
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// A GUID as its 16 stored bytes.
pub type Guid = [u8; 16];

/// The stored form of GUID `{d1-d2-d3-d4}` (the first three fields little-endian).
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// Region: the block allocation table.
pub const BAT_GUID: Guid = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// Region: the metadata region.
pub const METADATA_GUID: Guid = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
/// Metadata item: file parameters (block size, flags).
pub const FILE_PARAMS_GUID: Guid = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
/// Metadata item: virtual disk size.
pub const VIRTUAL_SIZE_GUID: Guid = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
/// Metadata item: SCSI page 83 data.
pub const PAGE83_GUID: Guid = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_GUID: Guid = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_GUID: Guid = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
/// Metadata item: parent locator (differencing images).
pub const PARENT_LOCATOR_GUID: Guid = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// CRC-32C of `data` with the 4 bytes at `crc_off` taken as zero.
pub fn checksum(data: &[u8], crc_off: usize) -> u32 {
    let mut d = CRC32C.digest();
    d.update(&data[..crc_off]);
    d.update(&[0; 4]);
    d.update(&data[crc_off + 4..]);
    d.finalize()
}

/// Whether the checksum stored at `crc_off` matches.
pub fn checksum_ok(data: &[u8], crc_off: usize) -> bool {
    le32(data, crc_off) == checksum(data, crc_off)
}

/// Store the checksum of `data` at `crc_off`.
pub fn set_checksum(data: &mut [u8], crc_off: usize) {
    let c = checksum(data, crc_off);
    data[crc_off..crc_off + 4].copy_from_slice(&c.to_le_bytes());
}

/// Little-endian u16 at `o`.
pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
/// Little-endian u32 at `o`.
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
/// Little-endian u64 at `o`.
pub fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
/// The GUID at `o`.
pub fn guid_at(b: &[u8], o: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[o..o + 16]);
    g
}
/// Store a u32 at `o`.
pub fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
/// Store a u64 at `o`.
pub fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// A fresh random GUID (version 4), as QEMU makes them.
pub fn new_guid() -> Guid {
    use std::io::Read;
    let mut g = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut g));
    if ok.is_err() {
        // No entropy source: a time-derived value still differs between sessions.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        g.copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// One of the two image headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// the valid header with the higher number is current
    pub sequence_number: u64,
    /// changed before the first write to the file in a session
    pub file_write_guid: Guid,
    /// changed before the first write of guest-visible data
    pub data_write_guid: Guid,
    /// entries of the log with this GUID are valid; zero: no log to replay
    pub log_guid: Guid,
    /// log format version (0)
    pub log_version: u16,
    /// file format version (1)
    pub version: u16,
    /// bytes of the log
    pub log_length: u32,
    /// file offset of the log
    pub log_offset: u64,
}

const HEAD_SIG: u32 = 0x6461_6568; // "head"

impl Header {
    /// Parse a 4 KiB header area; `None` unless checksum, signature and version are valid.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || !checksum_ok(&b[..HEADER_SIZE], 4) {
            return None;
        }
        if le32(b, 0) != HEAD_SIG || le16(b, 66) != 1 {
            return None;
        }
        Some(Header {
            sequence_number: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    /// The 4 KiB header area with its checksum, `rest` supplying bytes 80.. (kept as on
    /// disk, as QEMU keeps them).
    pub fn to_bytes(&self, rest: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        let n = rest.len().min(HEADER_SIZE);
        b[..n].copy_from_slice(&rest[..n]);
        put32(&mut b, 0, HEAD_SIG);
        put64(&mut b, 8, self.sequence_number);
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        set_checksum(&mut b, 4);
        b
    }

    /// The fields as they are stored (for comparing two headers byte for byte).
    fn fields(&self) -> Vec<u8> {
        self.to_bytes(&[])[8..80].to_vec()
    }
}

/// Both headers and which one is current.
#[derive(Clone, Debug)]
pub struct Headers {
    /// header 1 and header 2 (`None` when invalid)
    pub h: [Option<Header>; 2],
    /// index of the current header
    pub current: usize,
    /// the raw 4 KiB areas, for rewriting with their trailing bytes kept
    pub raw: [Vec<u8>; 2],
}

impl Headers {
    /// Read both headers and choose the current one: the only valid one, or the valid one
    /// with the higher sequence number; equal numbers are accepted only for identical headers
    /// (Disk2VHD writes such pairs).
    pub fn read(file: &FileLayer) -> Result<Headers> {
        let mut raw = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
        file.read_zero_filled(&mut raw[0], HEADER1_OFF, "vhdx header 1")?;
        file.read_zero_filled(&mut raw[1], HEADER2_OFF, "vhdx header 2")?;
        let h = [Header::parse(&raw[0]), Header::parse(&raw[1])];
        let current = match (&h[0], &h[1]) {
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (Some(a), Some(b)) if a.sequence_number > b.sequence_number => 0,
            (Some(a), Some(b)) if b.sequence_number > a.sequence_number => 1,
            (Some(a), Some(b)) if a.fields() == b.fields() => 0,
            _ => {
                return Err(Error::Corrupt {
                    path: file.path().to_string(),
                    what: "No valid VHDX header found".into(),
                })
            }
        };
        Ok(Headers { h, current, raw })
    }

    /// The current header.
    pub fn cur(&self) -> &Header {
        self.h[self.current]
            .as_ref()
            .expect("the current header is valid")
    }

    /// Write a new current header into the other slot: sequence number one higher, the
    /// session's file write GUID, and optionally a new data write GUID and log GUID. Synced.
    pub fn update(
        &mut self,
        file: &FileLayer,
        session: Guid,
        data_guid: Option<Guid>,
        log_guid: Option<Guid>,
    ) -> Result<()> {
        let other = 1 - self.current;
        let mut h = self.cur().clone();
        h.sequence_number = h.sequence_number.wrapping_add(1);
        h.file_write_guid = session;
        if let Some(g) = data_guid {
            h.data_write_guid = g;
        }
        if let Some(g) = log_guid {
            h.log_guid = g;
        }
        let bytes = h.to_bytes(&self.raw[other]);
        let off = if other == 0 { HEADER1_OFF } else { HEADER2_OFF };
        file.write_all_at(&bytes, off, "vhdx header")?;
        file.sync()?;
        self.raw[other] = bytes;
        self.h[other] = Some(h);
        self.current = other;
        Ok(())
    }

    /// Update both headers (QEMU's two-step update, so both end up valid and alike).
    pub fn update_both(
        &mut self,
        file: &FileLayer,
        session: Guid,
        data_guid: Option<Guid>,
        log_guid: Option<Guid>,
    ) -> Result<()> {
        self.update(file, session, data_guid, log_guid)?;
        self.update(file, session, data_guid, log_guid)
    }
}

/// One region table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// what the region is
    pub guid: Guid,
    /// file offset
    pub file_offset: u64,
    /// length in bytes
    pub length: u32,
    /// the parser must understand the region to open the file
    pub required: bool,
}

const REGI_SIG: u32 = 0x6967_6572; // "regi"

/// The regions of a valid region table, or `None` when the table is invalid (checksum,
/// signature, more than 2047 entries).
pub fn parse_region_table(b: &[u8]) -> Option<Vec<Region>> {
    if b.len() < REGION_SIZE || !checksum_ok(&b[..REGION_SIZE], 4) || le32(b, 0) != REGI_SIG {
        return None;
    }
    let n = le32(b, 8);
    if n > 2047 {
        return None;
    }
    Some(
        (0..n as usize)
            .map(|i| {
                let e = 16 + 32 * i;
                Region {
                    guid: guid_at(b, e),
                    file_offset: le64(b, e + 16),
                    length: le32(b, e + 24),
                    required: le32(b, e + 28) & 1 != 0,
                }
            })
            .collect(),
    )
}

/// A region table holding `regions`, checksummed.
pub fn region_table_bytes(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_SIZE];
    put32(&mut b, 0, REGI_SIG);
    put32(&mut b, 8, regions.len() as u32);
    for (i, r) in regions.iter().enumerate() {
        let e = 16 + 32 * i;
        b[e..e + 16].copy_from_slice(&r.guid);
        put64(&mut b, e + 16, r.file_offset);
        put32(&mut b, e + 24, r.length);
        put32(&mut b, e + 28, u32::from(r.required));
    }
    set_checksum(&mut b, 4);
    b
}

/// One metadata table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaEntry {
    /// which item
    pub item: Guid,
    /// offset from the start of the metadata region
    pub offset: u32,
    /// length in bytes
    pub length: u32,
    /// flag bits (1: user, 2: virtual disk, 4: required)
    pub flags: u32,
}

/// The metadata signature, "metadata".
pub const METADATA_SIG: u64 = 0x6174_6164_6174_656d;

/// The entries of a metadata table (`None`: bad signature or too many entries).
pub fn parse_metadata_table(b: &[u8]) -> Option<Vec<MetaEntry>> {
    if le64(b, 0) != METADATA_SIG {
        return None;
    }
    let n = usize::from(le16(b, 10));
    if n * 32 > METADATA_TABLE_SIZE - 32 {
        return None;
    }
    Some(
        (0..n)
            .map(|i| {
                let e = 32 + 32 * i;
                MetaEntry {
                    item: guid_at(b, e),
                    offset: le32(b, e + 16),
                    length: le32(b, e + 20),
                    flags: le32(b, e + 24),
                }
            })
            .collect(),
    )
}

/// A metadata table holding `entries`.
pub fn metadata_table_bytes(entries: &[MetaEntry]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE];
    put64(&mut b, 0, METADATA_SIG);
    b[10..12].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    for (i, m) in entries.iter().enumerate() {
        let e = 32 + 32 * i;
        b[e..e + 16].copy_from_slice(&m.item);
        put32(&mut b, e + 16, m.offset);
        put32(&mut b, e + 20, m.length);
        put32(&mut b, e + 24, m.flags);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // The CRC-32C check value of "123456789".
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        let mut b = b"ab\0\0\0\0cd".to_vec();
        set_checksum(&mut b, 2);
        assert!(checksum_ok(&b, 2));
        b[7] ^= 1;
        assert!(!checksum_ok(&b, 2));
    }

    #[test]
    fn guid_layout_matches_the_spec() {
        // The BAT region GUID 2DC27766-F623-4200-9D64-115E9BFD4A08 as stored.
        assert_eq!(
            BAT_GUID,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
    }

    #[test]
    fn header_and_region_round_trip() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: new_guid(),
            data_write_guid: new_guid(),
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        assert_eq!(Header::parse(&h.to_bytes(&[])), Some(h));
        let r = Region {
            guid: BAT_GUID,
            file_offset: 2 * MIB,
            length: MIB as u32,
            required: true,
        };
        assert_eq!(parse_region_table(&region_table_bytes(&[r])), Some(vec![r]));
    }
}
