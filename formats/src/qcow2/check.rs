//! `check` for qcow2: recount every reference from the metadata and compare with the stored
//! refcounts, as QEMU's check does (leaks, corruptions, OFLAG_COPIED mismatches), and the
//! allocation statistics it prints. Read-only: repairs are not done here.

use std::collections::HashMap;
use std::sync::Arc;

use super::header::Header;
use super::refcount::Refcounts;
use super::snapshot;
use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::file::FileLayer;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// What a check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// problems that may corrupt data
    pub corruptions: u64,
    /// clusters counted but unreferenced
    pub leaks: u64,
    /// errors while checking
    pub check_errors: u64,
    /// corruptions repaired (by `check -r`)
    pub corruptions_fixed: u64,
    /// leaks repaired (by `check -r`)
    pub leaks_fixed: u64,
    /// one line per finding, as QEMU prints them on stderr
    pub messages: Vec<String>,
    /// guest clusters in the virtual disk
    pub total_clusters: u64,
    /// guest clusters allocated in the active image
    pub allocated_clusters: u64,
    /// allocated clusters not following the previous one on the host
    pub fragmented_clusters: u64,
    /// compressed clusters
    pub compressed_clusters: u64,
    /// end of the last cluster in use
    pub image_end_offset: u64,
    /// the format reports no allocation statistics or image end (vmdk): `check` prints
    /// only the error counts
    pub no_stats: bool,
    /// the format cannot repair (QEMU's vmdk): `check -r` says the format does not support
    /// checks, exit 63
    pub no_repair: bool,
    /// the check itself failed after printing `messages` (qemu-img's `Check failed: ...`,
    /// exit 1), with this reason
    pub fatal: Option<String>,
}

fn read_table(f: &FileLayer, off: u64, n: usize, what: &str) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; n * 8];
    f.read_exact_at(&mut raw, off, what)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

impl Qcow2Image {
    /// Check the image's reference counts.
    pub fn check_refcounts(&self) -> Result<CheckReport> {
        self.check_refcounts_repair(None)
    }

    /// Check the reference counts and, with `repair` (`Some(all)`), repair leaks as
    /// `qemu-img check -r leaks|all` does: each leaked cluster's refcount is set to its
    /// references and a cluster left unused is discarded. An image with corruptions is
    /// refused unchanged (QEMU rebuilds the refcount structures then; rimg does not yet).
    pub fn check_refcounts_repair(&self, repair: Option<bool>) -> Result<CheckReport> {
        let h = &self.header;
        let f = &self.files[0];
        let cs = h.cluster_size();
        let file_len = f.len()?;
        let external = self.ext.data_file.is_some();
        if self.ext.bitmaps.is_some() || h.crypt_method > 2 {
            return Err(Error::Unsupported(
                "checking qcow2 images with bitmaps is not supported by rimg yet".into(),
            ));
        }
        let mut refs: HashMap<u64, u64> = HashMap::new();
        let mut add = |off: u64, len: u64| {
            if len == 0 {
                return;
            }
            for c in off / cs..=(off + len - 1) / cs {
                *refs.entry(c).or_insert(0) += 1;
            }
        };
        add(0, cs);
        // The LUKS header (with its key material) lives in clusters of its own.
        if let (2, Some((off, len))) = (h.crypt_method, self.ext.crypto) {
            add(off, len);
        }
        let mut rep = CheckReport {
            total_clusters: h.size.div_ceil(cs),
            ..Default::default()
        };
        // L1 tables: the active one (with statistics) and every snapshot's.
        let snaps = snapshot::read_table(f, h)?;
        let mut l1s = vec![(h.l1_table_offset, h.l1_size, true)];
        for s in &snaps {
            l1s.push((s.l1_offset, s.l1_size, false));
        }
        if h.nb_snapshots > 0 {
            let mut end = h.snapshots_offset;
            for s in &snaps {
                end += (40 + 16 + s.id.len() as u64 + s.name.len() as u64).div_ceil(8) * 8;
            }
            add(h.snapshots_offset, end - h.snapshots_offset);
        }
        let wpe: usize = if h.extended_l2() { 2 } else { 1 };
        let entries = (cs / 8) as usize / wpe;
        // Active L1: (L1 index, L1 entry) of each L2 table, and the L2 entries of data
        // clusters, for the OFLAG_COPIED checks.
        let mut l2_seen: Vec<(usize, u64)> = Vec::new();
        let mut data_seen: Vec<u64> = Vec::new();
        let x = 62 - (h.cluster_bits - 8);
        for (l1_off, l1_size, active) in l1s {
            add(l1_off, u64::from(l1_size) * 8);
            let l1 = read_table(f, l1_off, l1_size as usize, "L1 table")?;
            for (l1i, e) in l1.into_iter().enumerate() {
                let l2_off = e & OFFSET_MASK;
                if l2_off == 0 {
                    continue;
                }
                add(l2_off, cs);
                if active {
                    l2_seen.push((l1i, e));
                }
                // Fragmentation is counted within one L2 table, as QEMU does.
                let mut next_contiguous = 0u64;
                if l2_off + cs > file_len {
                    rep.corruptions += 1;
                    rep.messages.push(format!(
                        "ERROR: L2 table at {l2_off:#x} is past the end of the file"
                    ));
                    continue;
                }
                let words = read_table(f, l2_off, (cs / 8) as usize, "L2 table")?;
                for i in 0..entries {
                    let w = words[i * wpe];
                    if w & COMPRESSED != 0 {
                        let host = w & ((1u64 << x) - 1);
                        let sectors = ((w >> x) & ((1u64 << (h.cluster_bits - 8)) - 1)) + 1;
                        add(host & !511, sectors * 512);
                        if active {
                            rep.allocated_clusters += 1;
                            rep.compressed_clusters += 1;
                            rep.fragmented_clusters += 1;
                        }
                        continue;
                    }
                    let host = w & OFFSET_MASK;
                    // Plain zero and unallocated clusters reference nothing.
                    if host == 0 && !(external && w & COPIED != 0) {
                        continue;
                    }
                    if !external {
                        add(host, cs);
                    }
                    if active {
                        if !external {
                            data_seen.push(w);
                        }
                        rep.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            rep.fragmented_clusters += 1;
                        }
                        next_contiguous = host + cs;
                    }
                }
            }
        }
        // The refcount structures themselves.
        let rt_entries = (u64::from(h.refcount_table_clusters) * cs / 8) as usize;
        add(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        let rt = read_table(f, h.refcount_table_offset, rt_entries, "refcount table")?;
        for e in &rt {
            let b = e & !0x1ff;
            if b != 0 {
                add(b, cs);
            }
        }
        // Stored refcounts, cluster by cluster.
        let bits = 1u64 << h.refcount_order;
        let per_block = cs * 8 / bits;
        let stored_of = |c: u64, cache: &mut HashMap<u64, Vec<u8>>| -> Result<u64> {
            let ti = (c / per_block) as usize;
            let Some(&e) = rt.get(ti) else { return Ok(0) };
            let b = e & !0x1ff;
            if b == 0 || b + cs > file_len {
                return Ok(0);
            }
            if let std::collections::hash_map::Entry::Vacant(v) = cache.entry(b) {
                let mut raw = vec![0u8; cs as usize];
                f.read_exact_at(&mut raw, b, "refcount block")?;
                v.insert(raw);
            }
            let raw = &cache[&b];
            let i = c % per_block;
            Ok(if bits < 8 {
                (u64::from(raw[(i * bits / 8) as usize]) >> ((i * bits) % 8)) & ((1 << bits) - 1)
            } else {
                let n = (bits / 8) as usize;
                let s = i as usize * n;
                raw[s..s + n]
                    .iter()
                    .fold(0, |a, &v| (a << 8) | u64::from(v))
            })
        };
        let mut cache = HashMap::new();
        let mut fixes: Vec<(u64, u64)> = Vec::new();
        let mut fixer: Option<Refcounts> = None;
        let max_cluster = file_len
            .div_ceil(cs)
            .max(refs.keys().max().map_or(0, |m| m + 1));
        let mut highest = 0;
        for c in 0..max_cluster {
            let stored = stored_of(c, &mut cache)?;
            let reference = refs.get(&c).copied().unwrap_or(0);
            if reference > 0 || stored > 0 {
                highest = c + 1;
            }
            if stored != reference {
                let kind = if stored < reference {
                    "ERROR"
                } else {
                    "Leaked"
                };
                rep.messages.push(format!(
                    "{kind} cluster {c} refcount={stored} reference={reference}"
                ));
                // Leaks only: QEMU rebuilds the refcount structures for corruptions,
                // which rimg does not do yet.
                let fix = repair.is_some() && stored > reference;
                if fix {
                    rep.messages.push(format!(
                        "Repairing cluster {c} refcount={stored} reference={reference}"
                    ));
                    fixes.push((c, reference));
                    if stored < reference {
                        rep.corruptions_fixed += 1;
                    } else {
                        rep.leaks_fixed += 1;
                    }
                } else if stored < reference {
                    rep.corruptions += 1;
                } else {
                    rep.leaks += 1;
                }
            }
        }
        // OFLAG_COPIED must say "refcount is exactly one".
        for w in data_seen {
            let rc = stored_of((w & OFFSET_MASK) / cs, &mut cache)?;
            if (rc == 1) != (w & COPIED != 0) {
                rep.corruptions += 1;
                rep.messages.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={w:x} refcount={rc}"
                ));
            }
        }
        for (l1i, e) in l2_seen {
            let rc = stored_of((e & OFFSET_MASK) / cs, &mut cache)?;
            if (rc == 1) != (e & COPIED != 0) {
                rep.corruptions += 1;
                rep.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}"
                ));
            }
        }
        rep.image_end_offset = highest * cs;
        if repair.is_some() && rep.corruptions > 0 {
            return Err(Error::Unsupported(
                "repairing qcow2 images with corruptions is not supported by rimg yet; nothing was changed".into(),
            ));
        }
        if !fixes.is_empty() {
            let refs = fixer_get(&mut fixer, f, h)?;
            for &(c, v) in &fixes {
                refs.set(c, v)?;
            }
            refs.write_dirty()?;
            // A cluster no longer in use is discarded, as QEMU discards freed clusters.
            for &(c, v) in &fixes {
                if v == 0 {
                    let _ = f.fallocate(crate::file::Falloc::PunchHole, c * cs, cs);
                }
            }
            f.sync()?;
        }
        Ok(rep)
    }
}

/// The writable refcount structures, loaded on first use.
fn fixer_get<'a>(
    fixer: &'a mut Option<Refcounts>,
    f: &Arc<FileLayer>,
    h: &Header,
) -> Result<&'a mut Refcounts> {
    if fixer.is_none() {
        *fixer = Some(Refcounts::load(
            f.clone(),
            h.cluster_size(),
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )?);
    }
    Ok(fixer.as_mut().expect("just loaded"))
}
