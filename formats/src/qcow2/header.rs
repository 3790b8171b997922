//! The qcow2 header and its extensions (docs/interop/qcow2.txt): parsing with validation of
//! every field before use, and serialisation for `create`, `amend` and header updates.
//!
//! All numbers are big endian. Version 2 headers are 72 bytes; version 3 headers are at
//! least 104 bytes (`header_length`), followed by extensions up to a zero-type terminator.

use crate::error::{Error, Result};

/// "QFI\xfb"
pub const MAGIC: u32 = 0x5146_49fb;

/// Smallest and largest cluster_bits QEMU opens (512 B .. 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Incompatible feature bits.
pub mod incompat {
    /// refcounts may be inconsistent (lazy refcounts in use)
    pub const DIRTY: u64 = 1 << 0;
    /// structures may be corrupt: open read-only
    pub const CORRUPT: u64 = 1 << 1;
    /// guest data lives in an external data file
    pub const DATA_FILE: u64 = 1 << 2;
    /// compression_type field is non-zero
    pub const COMPRESSION: u64 = 1 << 3;
    /// extended L2 entries (subclusters)
    pub const EXTL2: u64 = 1 << 4;
    /// every bit rimg understands
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// lazy refcounts
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// bitmaps extension is consistent
    pub const BITMAPS: u64 = 1 << 0;
    /// the external data file is a valid raw image
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension type codes.
pub mod ext {
    /// end of the extension area
    pub const END: u32 = 0;
    /// backing file format name
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// feature name table
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// bitmaps
    pub const BITMAPS: u32 = 0x2385_2875;
    /// full disk encryption header pointer
    pub const CRYPTO: u32 = 0x0537_be77;
    /// external data file name
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// The fixed part of the header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3
    pub version: u32,
    /// where the backing file name is (0: none)
    pub backing_file_offset: u64,
    /// its length (< 1024)
    pub backing_file_size: u32,
    /// log2 of the cluster size
    pub cluster_bits: u32,
    /// virtual size in bytes
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS
    pub crypt_method: u32,
    /// entries in the active L1 table
    pub l1_size: u32,
    /// host offset of the active L1 table
    pub l1_table_offset: u64,
    /// host offset of the refcount table
    pub refcount_table_offset: u64,
    /// clusters of the refcount table
    pub refcount_table_clusters: u32,
    /// number of internal snapshots
    pub nb_snapshots: u32,
    /// host offset of the snapshot table
    pub snapshots_offset: u64,
    /// incompatible feature bits (v3)
    pub incompatible_features: u64,
    /// compatible feature bits (v3)
    pub compatible_features: u64,
    /// autoclear feature bits (v3)
    pub autoclear_features: u64,
    /// log2 of refcount bits (v2: 4)
    pub refcount_order: u32,
    /// header length in bytes (v2: 72)
    pub header_length: u32,
    /// 0 zlib, 1 zstd (v3, when header_length > 104)
    pub compression_type: u8,
}

/// One entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear
    pub kind: u8,
    /// bit number
    pub bit: u8,
    /// name
    pub name: String,
}

/// The bitmaps extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// number of bitmaps
    pub nb_bitmaps: u32,
    /// size of the bitmap directory
    pub directory_size: u64,
    /// host offset of the bitmap directory
    pub directory_offset: u64,
}

/// Header extensions, parsed; unknown ones are kept verbatim so a rewrite preserves them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// backing file format
    pub backing_format: Option<String>,
    /// feature name table
    pub features: Vec<FeatureName>,
    /// bitmaps
    pub bitmaps: Option<BitmapsExt>,
    /// crypto header (offset, length)
    pub crypto: Option<(u64, u64)>,
    /// external data file name
    pub data_file: Option<String>,
    /// unknown extensions: (type, data)
    pub unknown: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether extended L2 entries (subclusters) are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    /// Bytes of one L2 entry (8, or 16 with extended L2 entries).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Bits of guest offset one L2 table covers beyond the cluster: log2(entries per table).
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }

    /// Parse and validate the fixed header from the first bytes of the file (at least 72;
    /// `buf` may be longer). `file_len` bounds every offset. `path` is for messages.
    pub fn parse(buf: &[u8], file_len: u64, path: &str) -> Result<Header> {
        let bad = |what: String| Error::Corrupt {
            path: path.to_string(),
            what,
        };
        if buf.len() < 4 || be32(buf, 0) != MAGIC {
            return Err(bad("Image is not in qcow2 format".into()));
        }
        if buf.len() < 72 {
            return Err(bad("qcow2 header too short".into()));
        }
        let mut h = Header {
            version: be32(buf, 4),
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            refcount_order: 4,
            header_length: 72,
            ..Default::default()
        };
        if h.version != 2 && h.version != 3 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 version {}",
                h.version
            )));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(bad(format!(
                "Unsupported cluster size: 2^{}",
                h.cluster_bits
            )));
        }
        if h.version >= 3 {
            if buf.len() < 104 {
                return Err(bad("qcow2 header too short".into()));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(bad("qcow2 header too short".into()));
            }
            if u64::from(h.header_length) > h.cluster_size() {
                return Err(bad("qcow2 header exceeds cluster size".into()));
            }
            if h.header_length > 104 && buf.len() > 104 {
                h.compression_type = buf[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!(
                "Refcount width {} is not supported (at most 64 bits)",
                1u64 << h.refcount_order.min(63)
            )));
        }
        let cs = h.cluster_size();
        // QEMU's wording for misaligned tables.
        let check_off = |name: &str, off: u64| -> Result<()> {
            if !off.is_multiple_of(cs) {
                return Err(bad(format!("{name} offset invalid")));
            }
            Ok(())
        };
        check_off("Active L1 table", h.l1_table_offset)?;
        check_off("Reference count table", h.refcount_table_offset)?;
        if h.nb_snapshots > 0 {
            check_off("Snapshot table", h.snapshots_offset)?;
        }
        // QEMU's limits: L1 table at most 32 MiB, refcount table at most 8 MiB.
        if u64::from(h.l1_size) * 8 > 32 << 20 {
            return Err(bad("Active L1 table too large".into()));
        }
        if u64::from(h.refcount_table_clusters) * cs > 8 << 20 {
            return Err(bad("Reference count table too large".into()));
        }
        let l1_end = h
            .l1_table_offset
            .checked_add(u64::from(h.l1_size) * 8)
            .ok_or_else(|| bad("Invalid L1 table offset".into()))?;
        if h.l1_size > 0 && l1_end > file_len {
            return Err(bad(format!(
                "L1 table at {:#x} ({} entries) is past the end of the file",
                h.l1_table_offset, h.l1_size
            )));
        }
        let rt_end = h
            .refcount_table_offset
            .checked_add(u64::from(h.refcount_table_clusters) * cs)
            .ok_or_else(|| bad("Invalid reference count table offset".into()))?;
        if rt_end > file_len {
            return Err(bad(format!(
                "Reference count table at {:#x} is past the end of the file",
                h.refcount_table_offset
            )));
        }
        // The L1 table must cover the virtual size.
        let l2_bits = h.l2_bits();
        let per_l1 = 1u128 << (l2_bits + h.cluster_bits);
        let need = (u128::from(h.size)).div_ceil(per_l1);
        if need > u128::from(h.l1_size) {
            return Err(bad("L1 table is too small".into()));
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_size > 1023 {
                return Err(bad("Backing file name too long".into()));
            }
            let end = h.backing_file_offset + u64::from(h.backing_file_size);
            if end > cs.min(file_len) {
                return Err(bad("Backing file name is outside the header cluster".into()));
            }
        }
        Ok(h)
    }

    /// Serialise the fixed header (72 bytes for v2, `header_length` for v3).
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = if self.version >= 3 {
            self.header_length.max(104) as usize
        } else {
            72
        };
        let mut b = vec![0u8; len];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, len as u32);
            if len > 104 {
                b[104] = self.compression_type;
            }
        }
        b
    }
}

impl Extensions {
    /// Parse the extensions that follow the header, within the first cluster `buf`
    /// (`buf.len()` = min(cluster size, file length)).
    pub fn parse(buf: &[u8], h: &Header, path: &str) -> Result<Extensions> {
        let bad = |what: String| Error::Corrupt {
            path: path.to_string(),
            what,
        };
        let mut e = Extensions::default();
        if h.version < 3 && h.backing_file_offset == 0 && buf.len() <= 72 {
            return Ok(e);
        }
        let mut off = h.header_length as usize;
        // Extensions end before the backing file name when there is one.
        let end = if h.backing_file_offset != 0 {
            (h.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len()
        };
        loop {
            if off + 8 > end {
                break;
            }
            let ty = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if ty == ext::END {
                break;
            }
            if off + len > end {
                return Err(bad(format!("header extension {ty:#x} too large")));
            }
            let data = &buf[off..off + len];
            let text = || String::from_utf8_lossy(data).into_owned();
            match ty {
                ext::BACKING_FORMAT => e.backing_format = Some(text()),
                ext::DATA_FILE => e.data_file = Some(text()),
                ext::FEATURE_TABLE => {
                    for f in data.chunks_exact(48) {
                        let name_end = f[2..].iter().position(|&c| c == 0).unwrap_or(46);
                        e.features.push(FeatureName {
                            kind: f[0],
                            bit: f[1],
                            name: String::from_utf8_lossy(&f[2..2 + name_end]).into_owned(),
                        });
                    }
                }
                ext::BITMAPS => {
                    if len < 24 {
                        return Err(bad("bitmaps extension too short".into()));
                    }
                    e.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                ext::CRYPTO => {
                    if len < 16 {
                        return Err(bad("crypto header extension too short".into()));
                    }
                    e.crypto = Some((be64(data, 0), be64(data, 8)));
                }
                _ => e.unknown.push((ty, data.to_vec())),
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(e)
    }

    /// Serialise the extensions (with the end marker), each padded to 8 bytes, in QEMU's
    /// order: backing format, data file, crypto, bitmaps, feature table, unknown ones.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |ty: u32, data: &[u8]| {
            out.extend_from_slice(&ty.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            push(ext::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            push(ext::DATA_FILE, f.as_bytes());
        }
        if let Some((o, l)) = self.crypto {
            let mut d = o.to_be_bytes().to_vec();
            d.extend_from_slice(&l.to_be_bytes());
            push(ext::CRYPTO, &d);
        }
        if let Some(b) = &self.bitmaps {
            let mut d = b.nb_bitmaps.to_be_bytes().to_vec();
            d.extend_from_slice(&[0u8; 4]);
            d.extend_from_slice(&b.directory_size.to_be_bytes());
            d.extend_from_slice(&b.directory_offset.to_be_bytes());
            push(ext::BITMAPS, &d);
        }
        if !self.features.is_empty() {
            let mut d = Vec::new();
            for f in &self.features {
                let mut ent = [0u8; 48];
                ent[0] = f.kind;
                ent[1] = f.bit;
                let n = f.name.len().min(46);
                ent[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&ent);
            }
            push(ext::FEATURE_TABLE, &d);
        }
        for (ty, data) in &self.unknown {
            push(*ty, data);
        }
        push(ext::END, &[]);
        out
    }

    /// QEMU's feature name table for a new image: every feature QEMU 10 knows.
    pub fn qemu_feature_table() -> Vec<FeatureName> {
        let f = |kind: u8, bit: u8, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_v3_with_extensions() {
        let h = Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            refcount_order: 4,
            header_length: 112,
            ..Default::default()
        };
        let mut b = h.to_bytes();
        let e = Extensions {
            backing_format: Some("raw".into()),
            features: Extensions::qemu_feature_table(),
            ..Default::default()
        };
        b.extend(e.to_bytes());
        b.resize(0x10000, 0);
        let h2 = Header::parse(&b, 0x40000, "x").unwrap();
        assert_eq!(h2, h);
        assert_eq!(Extensions::parse(&b, &h2, "x").unwrap(), e);
    }

    #[test]
    fn rejects_bad_headers() {
        let mut h = Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            refcount_order: 4,
            header_length: 104,
            ..Default::default()
        };
        let ok = h.to_bytes();
        assert!(Header::parse(&ok[..50], 0x40000, "x").is_err());
        h.cluster_bits = 30;
        assert!(Header::parse(&h.to_bytes(), 0x40000, "x").is_err());
        h.cluster_bits = 16;
        h.l1_table_offset = 0x1_0000_0000;
        assert!(Header::parse(&h.to_bytes(), 0x40000, "x").is_err());
        h.l1_table_offset = 0x30000;
        h.l1_size = 1;
        assert!(
            Header::parse(&h.to_bytes(), 0x40000, "x").is_err(),
            "L1 too small"
        );
    }
}
