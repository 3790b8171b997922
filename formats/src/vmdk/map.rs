//! Guest offsets into extents: flat extents map straight to their file (holes there read
//! as zeros), sparse extents through the grain directory and grain tables.

use std::sync::Arc;

use super::{ExtentKind, SparseExtent, VmdkImage, GT_CACHE_MAX};
use crate::error::{Error, Result};
use crate::extent::{push_merged, Codec, Extent};
use crate::types::{GuestOff, HostOff};

/// Bytes of the marker before a compressed grain (lba: u64, size: u32).
pub const MARKER_LEN: u64 = 12;

/// What a grain table says about one grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// no grain table, or a zero entry
    Unallocated,
    /// the zeroed-grain entry (1) of an extent with that feature, or an seSparse zero
    Zeroed,
    /// stored at this byte offset of the extent's file
    At(u64),
}

fn bad(img: &VmdkImage, ei: usize, what: String) -> Error {
    let f = &img.files[img.extents[ei].file.0 as usize];
    Error::Corrupt {
        path: f.path().to_string(),
        what,
    }
}

/// The grain table covering directory entry `l1i` of sparse extent `ei` (`None`: not
/// allocated), through the cache.
fn grain_table(
    img: &VmdkImage,
    ei: usize,
    s: &SparseExtent,
    l1i: u64,
) -> Result<Option<Arc<Vec<u64>>>> {
    let entry = s.l1[l1i as usize];
    let l2_sector = if s.sesparse {
        if entry == 0 {
            0
        } else if entry & 0xffff_ffff_0000_0000 != 0x1000_0000_0000_0000 {
            return Err(bad(
                img,
                ei,
                format!("invalid seSparse grain directory entry {entry:#x} (index {l1i})"),
            ));
        } else {
            let t = (entry & 0xffff_ffff) * u64::from(s.l2_size) * 8 / 512;
            let off = s.se_l2_tables_offset.saturating_add(t);
            if off > 0xffff_ffff {
                return Err(bad(
                    img,
                    ei,
                    format!("seSparse grain table offset {off:#x} out of range"),
                ));
            }
            off
        }
    } else {
        entry
    };
    if l2_sector == 0 {
        return Ok(None);
    }
    let key = (ei, l1i);
    if let Some(t) = img.gt_cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(Some(t));
    }
    let e = &img.extents[ei];
    let f = &img.files[e.file.0 as usize];
    let esize = if s.sesparse { 8 } else { 4 };
    let bytes = u64::from(s.l2_size) * esize;
    let off = l2_sector * 512;
    let flen = f.len()?.div_ceil(512) * 512;
    if off.checked_add(bytes).is_none_or(|end| end > flen) {
        return Err(bad(
            img,
            ei,
            format!(
                "grain table at offset {off:#x} (grain directory entry {l1i}) is past the end of the file"
            ),
        ));
    }
    let mut raw = vec![0u8; bytes as usize];
    f.read_at_most(&mut raw, off, &format!("grain table at {off:#x}"))?;
    let t: Vec<u64> = if s.sesparse {
        raw.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()
    } else {
        raw.chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
            .collect()
    };
    let t = Arc::new(t);
    if let Ok(mut c) = img.gt_cache.lock() {
        if c.len() >= GT_CACHE_MAX {
            c.clear();
        }
        c.insert(key, t.clone());
    }
    Ok(Some(t))
}

/// The grain directory index of byte `rel` of sparse extent `ei`, and its grain table.
fn table_of(img: &VmdkImage, ei: usize, s: &SparseExtent, rel: u64) -> Result<(u64, Table)> {
    let sector = rel >> 9;
    let l1i = sector / u64::from(s.l1_entry_sectors);
    if l1i >= s.l1.len() as u64 {
        return Err(bad(
            img,
            ei,
            format!("guest sector {sector} is beyond the grain directory"),
        ));
    }
    Ok((l1i, grain_table(img, ei, s, l1i)?))
}

/// What grain table entry `v` of sparse extent `ei` means.
fn decode(img: &VmdkImage, ei: usize, s: &SparseExtent, v: u64) -> Result<Grain> {
    if s.sesparse {
        return match v & 0xf000_0000_0000_0000 {
            0 if v == 0 => Ok(Grain::Unallocated),
            0x1000_0000_0000_0000 | 0x2000_0000_0000_0000 => Ok(Grain::Zeroed),
            0x3000_0000_0000_0000 => {
                let c = ((v & 0x0fff_0000_0000_0000) >> 48) | ((v & 0x0000_ffff_ffff_ffff) << 12);
                Ok(Grain::At(
                    s.se_clusters_offset
                        .saturating_add(c.saturating_mul(s.cluster_sectors))
                        .saturating_mul(512),
                ))
            }
            _ => Err(bad(
                img,
                ei,
                format!("invalid seSparse grain table entry {v:#x}"),
            )),
        };
    }
    if s.has_zero_grain && v == 1 {
        return Ok(Grain::Zeroed);
    }
    if v == 0 {
        return Ok(Grain::Unallocated);
    }
    Ok(Grain::At(v << 9))
}

/// Index of the entry for byte `rel` inside its grain table.
fn slot(s: &SparseExtent, rel: u64) -> usize {
    (((rel >> 9) / s.cluster_sectors) % u64::from(s.l2_size)) as usize
}

/// A grain table, when allocated.
type Table = Option<Arc<Vec<u64>>>;

/// Repeated lookups that keep the last grain table at hand (for walks over many grains).
#[derive(Default)]
pub struct Walker {
    last: Option<((usize, u64), Table)>,
}

impl Walker {
    /// Look up the grain holding byte `rel` of sparse extent `ei` (QEMU's
    /// `get_cluster_offset` without allocation).
    pub fn lookup(&mut self, img: &VmdkImage, ei: usize, rel: u64) -> Result<Grain> {
        let Some(s) = img.extents[ei].sparse() else {
            return Ok(Grain::At(0));
        };
        let l1i = (rel >> 9) / u64::from(s.l1_entry_sectors);
        let hit = matches!(&self.last, Some((k, _)) if *k == (ei, l1i));
        if !hit {
            let (l1i, t) = table_of(img, ei, s, rel)?;
            self.last = Some(((ei, l1i), t));
        }
        match self.last.as_ref().and_then(|(_, t)| t.as_ref()) {
            None => Ok(Grain::Unallocated),
            Some(t) => decode(img, ei, s, t[slot(s, rel)]),
        }
    }
}

/// Map `len` bytes from `off` (see [`crate::Image::map`]).
pub fn map(img: &VmdkImage, off: GuestOff, len: u64, out: &mut Vec<Extent>) -> Result<u64> {
    if off.0 >= img.size || len == 0 {
        return Ok(0);
    }
    let Some(ei) = img.find_extent(off.0) else {
        return Ok(0);
    };
    let e = &img.extents[ei];
    let end = off
        .0
        .saturating_add(len)
        .min(e.start.saturating_add(e.len()));
    let f = &img.files[e.file.0 as usize];
    match &e.kind {
        ExtentKind::Flat { offset } => {
            let host = offset.saturating_add(off.0 - e.start);
            let hole = |h: u64, l: u64| Extent::DataHole {
                file: e.file,
                host: HostOff(h),
                len: l,
            };
            f.push_runs(e.file, host, end - off.0, f.len()?, hole, out)?;
        }
        ExtentKind::Sparse(s) => {
            let gb = s.grain_bytes();
            let mut pos = off.0;
            let flen = f.len()?;
            let span = u64::from(s.l1_entry_sectors) * 512;
            let mut table: Option<(u64, Table)> = None;
            while pos < end {
                let rel = pos - e.start;
                let in_grain = rel % gb;
                let mut n = (gb - in_grain).min(end - pos);
                let l1i = rel / span;
                if table.as_ref().is_none_or(|t| t.0 != l1i) {
                    table = Some(table_of(img, ei, s, rel)?);
                }
                let grain = match table.as_ref().and_then(|t| t.1.as_ref()) {
                    Some(t) => decode(img, ei, s, t[slot(s, rel)])?,
                    None => {
                        // No grain table: the whole span it would cover is unallocated.
                        n = ((l1i + 1) * span - rel).min(end - pos);
                        Grain::Unallocated
                    }
                };
                let ext = match grain {
                    Grain::Unallocated if img.stale_parent => {
                        return Err(Error::InvalidArgument(format!(
                            "error while reading at byte {pos}: Invalid argument"
                        )));
                    }
                    Grain::Unallocated => Extent::Unallocated { len: n, at: None },
                    Grain::Zeroed => Extent::Zero {
                        len: n,
                        explicit: true,
                        at: None,
                    },
                    Grain::At(h) => {
                        if h >= flen {
                            return Err(bad(
                                img,
                                ei,
                                format!(
                                    "grain at offset {h:#x} for guest offset {pos:#x} is past the end of the file"
                                ),
                            ));
                        }
                        if s.compressed {
                            let (host, max) = if s.has_marker {
                                (h + MARKER_LEN, 2 * gb - MARKER_LEN)
                            } else {
                                (h, gb)
                            };
                            Extent::Compressed {
                                file: e.file,
                                host: HostOff(host),
                                clen_max: max.min(flen.saturating_sub(host)).max(1),
                                codec: Codec::ZlibStream,
                                unit: gb.min(e.len() - (rel - in_grain)),
                                skip: in_grain,
                                len: n,
                            }
                        } else {
                            Extent::Data {
                                file: e.file,
                                host: HostOff(h + in_grain),
                                len: n,
                            }
                        }
                    }
                };
                push_merged(out, ext);
                pos += n;
            }
        }
    }
    Ok(end - off.0)
}
