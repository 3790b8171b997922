//! Guest offset → extents through the L1 and L2 tables.
//!
//! One call covers at most the range of one L2 table (the caller loops). L2 tables are
//! read through a small cache shared by all shards (a mutex around a map; entries are
//! `Arc`s so the lock is held only for the lookup).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::header::Header;
use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::extent::{push_merged, Codec, Extent};
use crate::types::{FileId, GuestOff, HostOff};

/// Bits 9..55 of L1 and standard L2 entries: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bit 62: compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 63: refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// Standard descriptor bit 0: reads as zeros (v3, not with extended L2).
const ZERO_FLAG: u64 = 1;

/// How many L2 tables the cache keeps.
const CACHE_TABLES: usize = 64;

/// Cache of L2 tables by host offset (each table as its raw big-endian entries).
pub(super) struct L2Cache {
    tables: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

impl L2Cache {
    pub(super) fn new(_h: &Header) -> L2Cache {
        L2Cache {
            tables: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, img: &Qcow2Image, l2_off: u64) -> Result<Arc<Vec<u64>>> {
        {
            let t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = t.get(&l2_off) {
                return Ok(v.clone());
            }
        }
        let cs = img.header.cluster_size();
        let path = img.files[0].path();
        let file_len = img.files[0].len()?;
        if !l2_off.is_multiple_of(cs) {
            return Err(Error::Corrupt {
                path: path.to_string(),
                what: format!("L2 table offset {l2_off:#x} unaligned"),
            });
        }
        if l2_off.checked_add(cs).is_none_or(|e| e > file_len) {
            return Err(Error::Corrupt {
                path: path.to_string(),
                what: format!("L2 table at {l2_off:#x} is past the end of the file"),
            });
        }
        let mut raw = vec![0u8; cs as usize];
        img.files[0].read_exact_at(&mut raw, l2_off, &format!("L2 table at {l2_off:#x}"))?;
        let v: Arc<Vec<u64>> = Arc::new(
            raw.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        );
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= CACHE_TABLES {
            // Evict an arbitrary table; mapping walks tables in order, so reuse is rare.
            if let Some(k) = t.keys().next().copied() {
                t.remove(&k);
            }
        }
        t.insert(l2_off, v.clone());
        Ok(v)
    }
}

/// Map `[off, off+len)` (clipped to the virtual size and to the current L2 table).
pub(super) fn map(img: &Qcow2Image, off: GuestOff, len: u64, out: &mut Vec<Extent>) -> Result<u64> {
    let h = &img.header;
    let size = img.size;
    if off.0 >= size || len == 0 {
        return Ok(0);
    }
    let cb = h.cluster_bits;
    let cs = h.cluster_size();
    let l2_bits = h.l2_bits();
    let table_span = 1u64 << (cb + l2_bits);
    let end = off
        .0
        .saturating_add(len)
        .min(size)
        .min((off.0 / table_span + 1).saturating_mul(table_span));
    let l1_index = (off.0 / table_span) as usize;
    let path = img.files[0].path();
    let l1e = img.l1.get(l1_index).copied().unwrap_or(0);
    let l2_off = l1e & OFFSET_MASK;
    if l2_off == 0 {
        push_merged(
            out,
            Extent::Unallocated {
                len: end - off.0,
                at: None,
            },
        );
        return Ok(end - off.0);
    }
    let table = img.l2_cache.get(img, l2_off)?;
    let ext = h.extended_l2();
    let per_entry = if ext { 2 } else { 1 };
    let data_file = img.data_file;
    let external = data_file != FileId(0);
    let codec = if h.compression_type == 1 {
        Codec::Zstd
    } else {
        Codec::Zlib
    };
    let mut pos = off.0;
    while pos < end {
        let cluster_start = pos & !(cs - 1);
        let in_cluster = pos - cluster_start;
        let cluster_end = (cluster_start + cs).min(end);
        let idx = ((pos / cs) % (1u64 << l2_bits)) as usize;
        let entry = table[idx * per_entry];
        let n = cluster_end - pos;
        if entry & COMPRESSED != 0 {
            // Compressed: host offset in the low x bits, extra sectors above.
            let x = 62 - (cb - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
            let clen_max = sectors * 512 - (host & 511);
            push_merged(
                out,
                Extent::Compressed {
                    file: FileId(0),
                    host: HostOff(host),
                    clen_max,
                    codec,
                    unit: cs,
                    skip: in_cluster,
                    len: n,
                },
            );
            pos = cluster_end;
            continue;
        }
        let host = entry & OFFSET_MASK;
        let allocated = host != 0 || (external && entry & COPIED != 0);
        if allocated && !host.is_multiple_of(cs) {
            return Err(Error::Corrupt {
                path: path.to_string(),
                what: format!(
                    "Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {})",
                    if idx == 0 { "0".to_string() } else { format!("{idx:#x}") }
                ),
            });
        }
        if !ext {
            let e = if h.version >= 3 && entry & ZERO_FLAG != 0 {
                Extent::Zero {
                    len: n,
                    explicit: true,
                    at: allocated.then_some((data_file, HostOff(host + in_cluster))),
                }
            } else if allocated {
                Extent::Data {
                    file: data_file,
                    host: HostOff(host + in_cluster),
                    len: n,
                }
            } else {
                Extent::Unallocated { len: n, at: None }
            };
            push_merged(out, e);
            pos = cluster_end;
            continue;
        }
        // Extended L2 entries: 32 subclusters with allocation and zero bitmaps.
        let bitmap = table[idx * 2 + 1];
        let sc = cs / 32;
        while pos < cluster_end {
            let in_c = pos - cluster_start;
            let i = in_c / sc;
            let sc_end = (cluster_start + (i + 1) * sc).min(cluster_end);
            let len = sc_end - pos;
            let e = if bitmap & (1u64 << i) != 0 {
                Extent::Data {
                    file: data_file,
                    host: HostOff(host + in_c),
                    len,
                }
            } else if bitmap & (1u64 << (32 + i)) != 0 {
                Extent::Zero {
                    len,
                    explicit: true,
                    at: (host != 0).then_some((data_file, HostOff(host + in_c))),
                }
            } else {
                Extent::Unallocated {
                    len,
                    at: (host != 0).then_some((data_file, HostOff(host + in_c))),
                }
            };
            push_merged(out, e);
            pos = sc_end;
        }
    }
    Ok(end - off.0)
}
