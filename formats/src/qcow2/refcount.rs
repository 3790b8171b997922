//! Reference counts for the qcow2 writer: the refcount table and blocks, cached in memory,
//! read on demand, written back in [`Refcounts::write_dirty`].
//!
//! Allocation is append-only (`next_free` grows); a refcount block is allocated, and counts
//! itself, the first time a cluster it covers is counted. The table grows by relocation to
//! the end of the file; the old table's clusters are freed only after the header points at
//! the new one (see [`Refcounts::take_deferred_frees`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::file::FileLayer;

/// Bits 9..63 of a refcount table entry: the block's host offset.
const RT_OFFSET_MASK: u64 = !0x1ff;

/// In-memory refcount state of one image.
pub(super) struct Refcounts {
    file: Arc<FileLayer>,
    cs: u64,
    order: u32,
    /// host offset and entries of the refcount table
    pub(super) table_off: u64,
    pub(super) table: Vec<u64>,
    pub(super) table_dirty: bool,
    /// table index -> (block host offset, raw block)
    blocks: BTreeMap<u64, (u64, Vec<u8>)>,
    dirty_blocks: BTreeSet<u64>,
    /// next free host cluster offset (append-only allocation)
    pub(super) next_free: u64,
    /// clusters to free once the header no longer references them
    deferred: Vec<u64>,
}

impl Refcounts {
    /// Load the refcount table of an image whose file is `file`.
    pub(super) fn load(
        file: Arc<FileLayer>,
        cs: u64,
        order: u32,
        table_off: u64,
        table_clusters: u32,
    ) -> Result<Refcounts> {
        let mut raw = vec![0u8; (u64::from(table_clusters) * cs) as usize];
        file.read_exact_at(&mut raw, table_off, "refcount table")?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let next_free = file.len()?.div_ceil(cs) * cs;
        Ok(Refcounts {
            file,
            cs,
            order,
            table_off,
            table,
            table_dirty: false,
            blocks: BTreeMap::new(),
            dirty_blocks: BTreeSet::new(),
            next_free,
            deferred: Vec::new(),
        })
    }

    fn per_block(&self) -> u64 {
        (self.cs * 8) >> self.order
    }

    fn max_value(&self) -> u64 {
        if self.order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// Load (or find) the block with table index `ti`; `None` when not allocated.
    fn block(&mut self, ti: u64) -> Result<Option<&mut (u64, Vec<u8>)>> {
        if !self.blocks.contains_key(&ti) {
            let e = self.table.get(ti as usize).copied().unwrap_or(0) & RT_OFFSET_MASK;
            if e == 0 {
                return Ok(None);
            }
            if !e.is_multiple_of(self.cs) {
                return Err(Error::Corrupt {
                    path: self.file.path().to_string(),
                    what: format!("Refcount block offset {e:#x} unaligned"),
                });
            }
            let mut raw = vec![0u8; self.cs as usize];
            self.file
                .read_exact_at(&mut raw, e, &format!("refcount block at {e:#x}"))?;
            self.blocks.insert(ti, (e, raw));
        }
        Ok(self.blocks.get_mut(&ti))
    }

    fn read_entry(order: u32, raw: &[u8], i: u64) -> u64 {
        let bits = 1u64 << order;
        if bits < 8 {
            let byte = raw[(i * bits / 8) as usize];
            let shift = (i * bits) % 8;
            (u64::from(byte) >> shift) & ((1 << bits) - 1)
        } else {
            let n = (bits / 8) as usize;
            let s = i as usize * n;
            raw[s..s + n]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }

    fn write_entry(order: u32, raw: &mut [u8], i: u64, v: u64) {
        let bits = 1u64 << order;
        if bits < 8 {
            let idx = (i * bits / 8) as usize;
            let shift = (i * bits) % 8;
            let mask = ((1u64 << bits) - 1) << shift;
            raw[idx] = ((u64::from(raw[idx]) & !mask) | ((v << shift) & mask)) as u8;
        } else {
            let n = (bits / 8) as usize;
            let s = i as usize * n;
            for (k, b) in raw[s..s + n].iter_mut().enumerate() {
                *b = (v >> (8 * (n - 1 - k))) as u8;
            }
        }
    }

    /// Set the refcount of host cluster `c` to `v`, allocating refcount blocks (and growing
    /// the table) as needed.
    pub(super) fn set(&mut self, c: u64, v: u64) -> Result<()> {
        if v > self.max_value() {
            return Err(Error::Unsupported(format!(
                "refcount of cluster {c} would exceed {} bits",
                1u32 << self.order
            )));
        }
        let pb = self.per_block();
        let (ti, i) = (c / pb, c % pb);
        if ti as usize >= self.table.len() {
            self.grow_table(ti)?;
        }
        if self.block(ti)?.is_none() {
            // New block at the end of the file; it counts itself below.
            let boff = self.next_free;
            self.next_free += self.cs;
            self.table[ti as usize] = boff;
            self.table_dirty = true;
            self.blocks.insert(ti, (boff, vec![0u8; self.cs as usize]));
            self.dirty_blocks.insert(ti);
            self.set(boff / self.cs, 1)?;
        }
        let order = self.order;
        if let Some((_, raw)) = self.blocks.get_mut(&ti) {
            Self::write_entry(order, raw, i, v);
        }
        self.dirty_blocks.insert(ti);
        Ok(())
    }

    /// Whether host cluster `c` can take one more reference (narrow refcounts saturate).
    pub(super) fn can_inc(&mut self, c: u64) -> Result<bool> {
        let pb = self.per_block();
        let (ti, i) = (c / pb, c % pb);
        let order = self.order;
        let max = self.max_value();
        Ok(match self.block(ti)? {
            None => true,
            Some((_, raw)) => Self::read_entry(order, raw, i) < max,
        })
    }

    /// Drop one reference to host cluster `c` (saturating at 0).
    pub(super) fn dec(&mut self, c: u64) -> Result<()> {
        let pb = self.per_block();
        let (ti, i) = (c / pb, c % pb);
        let order = self.order;
        let cur = match self.block(ti)? {
            None => 0,
            Some((_, raw)) => Self::read_entry(order, raw, i),
        };
        self.set(c, cur.saturating_sub(1))
    }

    /// Add one reference to host cluster `c`.
    pub(super) fn inc(&mut self, c: u64) -> Result<()> {
        let pb = self.per_block();
        let (ti, i) = (c / pb, c % pb);
        let order = self.order;
        let cur = match self.block(ti)? {
            None => 0,
            Some((_, raw)) => Self::read_entry(order, raw, i),
        };
        self.set(c, cur + 1)
    }

    /// Take `n` contiguous free clusters and count them; refcount blocks this needs are
    /// placed after them.
    pub(super) fn alloc_contiguous(&mut self, n: u64) -> Result<u64> {
        let off = self.next_free;
        self.next_free += n * self.cs;
        for k in 0..n {
            self.set(off / self.cs + k, 1)?;
        }
        Ok(off)
    }

    /// Take the next free cluster and count it.
    pub(super) fn alloc_cluster(&mut self) -> Result<u64> {
        let off = self.next_free;
        self.next_free += self.cs;
        self.set(off / self.cs, 1)?;
        Ok(off)
    }

    /// Relocate the table so that index `ti` fits, with room to spare.
    fn grow_table(&mut self, ti: u64) -> Result<()> {
        let want_entries = ((ti + 1) * 2).max(self.table.len() as u64 * 2);
        let clusters = (want_entries * 8).div_ceil(self.cs);
        let entries = (clusters * self.cs / 8) as usize;
        let old_off = self.table_off;
        let old_clusters = (self.table.len() as u64 * 8).div_ceil(self.cs);
        let new_off = self.next_free;
        self.next_free += clusters * self.cs;
        self.table.resize(entries, 0);
        self.table_off = new_off;
        self.table_dirty = true;
        for k in 0..clusters {
            self.set(new_off / self.cs + k, 1)?;
        }
        for k in 0..old_clusters {
            self.deferred.push(old_off / self.cs + k);
        }
        Ok(())
    }

    /// Clusters of an old refcount table, to free after the header was rewritten.
    pub(super) fn take_deferred_frees(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.deferred)
    }

    /// Table size in clusters.
    pub(super) fn table_clusters(&self) -> u32 {
        (self.table.len() as u64 * 8).div_ceil(self.cs) as u32
    }

    /// Write dirty refcount blocks, then the table if it changed.
    pub(super) fn write_dirty(&mut self) -> Result<()> {
        for ti in std::mem::take(&mut self.dirty_blocks) {
            if let Some((off, raw)) = self.blocks.get(&ti) {
                self.file
                    .write_all_at(raw, *off, &format!("refcount block at {off:#x}"))?;
            }
        }
        if self.table_dirty {
            let mut raw = Vec::with_capacity(self.table.len() * 8);
            for e in &self.table {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            self.file
                .write_all_at(&raw, self.table_off, "refcount table")?;
            self.table_dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back() {
        for order in 0..=6u32 {
            let mut raw = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            Refcounts::write_entry(order, &mut raw, 7, max);
            Refcounts::write_entry(order, &mut raw, 8, 1);
            assert_eq!(Refcounts::read_entry(order, &raw, 7), max);
            assert_eq!(Refcounts::read_entry(order, &raw, 8), 1);
            assert_eq!(Refcounts::read_entry(order, &raw, 6), 0);
        }
    }

    #[test]
    fn sub_byte_and_wide_entries() {
        let mut raw = vec![0u8; 64];
        Refcounts::write_entry(0, &mut raw, 9, 1);
        assert_eq!(raw[1], 0b10);
        Refcounts::write_entry(4, &mut raw, 3, 0x1234);
        assert_eq!(&raw[6..8], &[0x12, 0x34]);
        Refcounts::write_entry(2, &mut raw, 5, 0xa);
        assert_eq!(raw[2] >> 4, 0xa);
    }
}
