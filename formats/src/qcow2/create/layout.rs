//! Where the metadata of a new qcow2 image goes, decided exactly as qemu-img 10 decides it,
//! so that an image rimg creates is byte-identical to qemu-img's.
//!
//! qemu creates an image in steps: header, one-cluster refcount table and one refcount
//! block; then it opens the image and resizes it to the virtual size (allocating the L1
//! table and, with preallocation, L2 tables and data clusters) through its ordinary
//! cluster allocator. That allocator places things in a history-dependent way: new
//! refcount blocks go right after the allocation that needed them, a growing refcount
//! table frees the old one and later allocations reuse the hole. This module replays those
//! steps on an in-memory model (which clusters are in use, the refcount table, L1 and
//! the data mappings) and returns the final state; `create` serialises it.
//!
//! Units: `*_off`/`*_offset` are host byte offsets; bare cluster numbers are host cluster
//! indices (`offset >> cluster_bits`); `guest` values are guest byte offsets.

use super::clusters::ClusterSet;
use crate::driver::Preallocation;

/// qemu's limit on refcount table entries and refcount blocks (compared with counts, as
/// qemu compares them).
const MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// qemu's limit on L1 entries (a 32 MiB table).
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Largest host offset a data or metadata cluster may start at.
const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;
/// qemu's largest single request (`BDRV_REQUEST_MAX_BYTES`), which bounds one allocation.
const REQUEST_MAX_BYTES: u64 = 0x7fff_fe00;
/// L1/L2 entry flag: refcount is exactly one.
pub(super) const COPIED: u64 = 1 << 63;
/// Retries of one allocation before the model gives up (qemu needs at most a handful).
const MAX_RETRIES: u32 = 1000;

/// Why a layout could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LayoutError {
    /// qemu would fail with EFBIG ("The image size is too large ...").
    TooLarge,
    /// The model reached a state qemu never reaches (a bug here).
    Internal(&'static str),
}

/// How an allocation step ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// qemu's -EAGAIN: refcount structures moved, search for free clusters again
    Again,
    /// a real failure
    Fail(LayoutError),
}

impl From<LayoutError> for Stop {
    fn from(e: LayoutError) -> Stop {
        Stop::Fail(e)
    }
}

type Step<T> = std::result::Result<T, Stop>;

/// What the new image is.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// log2 of the cluster size (9..=21)
    pub cluster_bits: u32,
    /// log2 of the refcount width (0..=6)
    pub refcount_order: u32,
    /// 16-byte L2 entries with subcluster bitmaps
    pub extended_l2: bool,
    /// virtual size, a multiple of 512
    pub size: u64,
    /// preallocation (`metadata` already implied by `data_file_raw`)
    pub prealloc: Preallocation,
    /// guest data lives in an external data file
    pub data_file: bool,
}

/// Something to do to a file beyond writing metadata, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileOp {
    /// `fallocate` the range (extending the file)
    Fallocate {
        /// start
        off: u64,
        /// length
        len: u64,
    },
    /// zeros qemu writes there (preallocation=full, copy-on-write fill of a partial last
    /// cluster): an engine action
    WriteZeroes {
        /// start
        off: u64,
        /// length
        len: u64,
    },
    /// qemu's file layer writes 512 zero bytes at offset 0 when it grows an empty file
    FirstBlock,
}

/// A run of data clusters mapped by an L2 table.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    /// first guest cluster
    guest: u64,
    /// number of clusters
    count: u64,
    /// first host cluster (in the data file: equal to `guest`)
    host: u64,
}

/// The final state of a new image, ready to be serialised.
#[derive(Debug)]
pub(super) struct Layout {
    /// log2 of the cluster size
    pub cluster_bits: u32,
    refcount_order: u32,
    extended_l2: bool,
    /// host offset of the refcount table
    pub reftable_offset: u64,
    /// refcount table entries (its length is a whole number of clusters of entries)
    pub reftable: Vec<u64>,
    /// clusters with refcount 1 (all others 0)
    used: ClusterSet,
    /// host offset of the L1 table (0 when it has no entries)
    pub l1_offset: u64,
    /// L1 entries (L2 table offset | [`COPIED`], or 0)
    pub l1: Vec<u64>,
    chunks: Vec<Chunk>,
    /// older contents qemu left in the file (replaced refcount tables), oldest first;
    /// to be written before the live structures
    pub stale: Vec<(u64, Vec<u8>)>,
    /// final length of the image file
    pub image_len: u64,
    /// fallocate/zero operations on the image file
    pub image_ops: Vec<FileOp>,
    /// final length of the data file (when there is one)
    pub data_len: u64,
    /// operations on the data file
    pub data_ops: Vec<FileOp>,
}

/// The allocator model.
struct Sim {
    cb: u32,
    cs: u64,
    /// log2 of refcount entries per refcount block
    rb_bits: u32,
    /// log2 of entries per L2 table
    l2_bits: u32,
    subcluster: u64,
    data_file: bool,
    used: ClusterSet,
    reftable: Vec<u64>,
    reftable_offset: u64,
    max_rt_index: usize,
    /// qemu's `free_cluster_index`: where the search for free clusters starts
    free_index: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    chunks: Vec<Chunk>,
    stale: Vec<(u64, Vec<u8>)>,
    image_len: u64,
    image_ops: Vec<FileOp>,
    data_len: u64,
    data_ops: Vec<FileOp>,
}

/// One allocation made by `alloc_host_offset`, to be entered into L2 (qemu's QCowL2Meta).
struct Meta {
    /// guest offset of the first cluster
    guest: u64,
    /// host offset of the first cluster
    host: u64,
    clusters: u64,
    /// bytes written from `host` on (the rest of the last cluster is copy-on-write)
    written: u64,
}

fn too_large<T>() -> Step<T> {
    Err(Stop::Fail(LayoutError::TooLarge))
}

fn internal<T>(what: &'static str) -> Step<T> {
    Err(Stop::Fail(LayoutError::Internal(what)))
}

impl Sim {
    fn new(p: &Plan) -> Sim {
        let cb = p.cluster_bits;
        let cs = 1u64 << cb;
        let l2_bits = cb - if p.extended_l2 { 4 } else { 3 };
        let mut reftable = vec![0u64; (cs / 8) as usize];
        reftable[0] = 2 * cs;
        Sim {
            cb,
            cs,
            rb_bits: cb + 3 - p.refcount_order,
            l2_bits,
            subcluster: if p.extended_l2 { cs / 32 } else { cs },
            data_file: p.data_file,
            used: ClusterSet::default(),
            reftable,
            reftable_offset: cs,
            max_rt_index: 0,
            free_index: 0,
            l1: Vec::new(),
            l1_offset: 0,
            chunks: Vec::new(),
            stale: Vec::new(),
            // header cluster, refcount table and first refcount block are written first
            image_len: 3 * cs,
            image_ops: Vec::new(),
            data_len: 0,
            data_ops: Vec::new(),
        }
    }

    fn wrote_image(&mut self, end: u64) {
        self.image_len = self.image_len.max(end);
    }

    fn mark_used(&mut self, a: u64, b: u64) -> Step<()> {
        if self.used.insert(a, b) {
            Ok(())
        } else {
            internal("cluster allocated twice")
        }
    }

    /// qemu's `alloc_clusters_noref`: the first run of `n` free clusters from the search
    /// start; moves the search start past it.
    fn alloc_noref(&mut self, n: u64, max_offset: u64) -> Step<u64> {
        let p = self.used.first_gap(self.free_index, n);
        self.free_index = p + n;
        if self.free_index > 0 && self.free_index - 1 > (max_offset >> self.cb) {
            return too_large();
        }
        Ok(p)
    }

    /// qemu's `update_refcount` by ±1 over clusters `[start, start + n)`: refcount blocks
    /// are allocated as needed; on failure the part done is undone.
    fn update_refcount(&mut self, start: u64, n: u64, decrease: bool) -> Step<()> {
        let end = start + n;
        let mut cur = start;
        let mut result = Ok(());
        while cur < end {
            if let Err(e) = self.alloc_refcount_block(cur) {
                if e == Stop::Again && self.free_index > start {
                    self.free_index = start;
                }
                result = Err(e);
                break;
            }
            let seg_end = end.min(((cur >> self.rb_bits) + 1) << self.rb_bits);
            if decrease {
                self.used.remove(cur, seg_end);
                self.free_index = self.free_index.min(cur);
            } else if let Err(e) = self.mark_used(cur, seg_end) {
                result = Err(e);
                break;
            }
            cur = seg_end;
        }
        if result.is_err() && cur > start {
            // qemu ignores the result of undoing
            let _ = self.update_refcount(start, cur - start, !decrease);
        }
        result
    }

    /// qemu's `alloc_refcount_block`: make sure cluster `c` has a refcount block. Creating
    /// one always ends in `Again` (the caller searches for free clusters anew).
    fn alloc_refcount_block(&mut self, c: u64) -> Step<()> {
        let index = c >> self.rb_bits;
        let ti = usize::try_from(index).map_err(|_| Stop::Fail(LayoutError::TooLarge))?;
        if ti < self.reftable.len() && self.reftable[ti] != 0 {
            return Ok(());
        }
        let block = self.alloc_noref(1, i64::MAX as u64)?;
        if block >> self.rb_bits == index {
            // the new block describes itself
            self.mark_used(block, block + 1)?;
        } else {
            self.update_refcount(block, 1, false)?;
        }
        self.wrote_image((block + 1) << self.cb);
        if ti < self.reftable.len() {
            self.reftable[ti] = block << self.cb;
            self.max_rt_index = self.max_rt_index.max(ti);
            return Err(Stop::Again);
        }
        // The table is full: grow it, with new self-describing structures past everything
        // allocated so far.
        let per_block = 1u64 << self.rb_bits;
        let blocks_used = (c + 1).max(block + 1).div_ceil(per_block);
        let meta_offset = blocks_used
            .checked_mul(per_block)
            .and_then(|n| n.checked_mul(self.cs))
            .ok_or(Stop::Fail(LayoutError::TooLarge))?;
        self.refcount_area(meta_offset, 0, false, ti, block << self.cb)?;
        Err(Stop::Again)
    }

    /// qemu's `qcow2_refcount_area`: at `start_off` (past everything in use), a new
    /// refcount table and the refcount blocks needed to cover itself and
    /// `additional` clusters beyond it; the old table is freed. Returns the offset after
    /// the new structures.
    fn refcount_area(
        &mut self,
        start_off: u64,
        additional: u64,
        exact: bool,
        new_index: usize,
        new_block_off: u64,
    ) -> Step<u64> {
        let cs = self.cs;
        let (_, total) = crate::qcow2::measure::refcount_metadata_size(
            (start_off / cs).saturating_add(additional),
            cs,
            self.cb + 3 - self.rb_bits,
            !exact,
        );
        if total > MAX_REFTABLE_SIZE {
            return too_large();
        }
        let area_index = (start_off / cs) >> self.rb_bits;
        let mut table_size = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        table_size = table_size.next_multiple_of(cs / 8);
        if table_size > MAX_REFTABLE_SIZE {
            return too_large();
        }
        let table_clusters = table_size * 8 / cs;
        let mut table = vec![0u64; table_size as usize];
        let keep = if table_size as usize > self.max_rt_index {
            self.max_rt_index + 1
        } else {
            table_size as usize
        };
        table[..keep].copy_from_slice(&self.reftable[..keep]);
        if new_block_off != 0 {
            if new_index as u64 >= total {
                return internal("new refcount block outside the new table");
            }
            table[new_index] = new_block_off;
        }
        let (first, total_us) = (area_index as usize, total as usize);
        let new_blocks = table
            .get(first..total_us)
            .map_or(0, |s| s.iter().filter(|&&e| e == 0).count()) as u64;
        let table_offset = start_off + new_blocks * cs;
        let end_offset = table_offset + table_clusters * cs;
        let mut block_off = start_off;
        for e in table.iter_mut().take(total_us).skip(first) {
            if *e == 0 {
                *e = block_off;
                block_off += cs;
            }
        }
        let covered_end = (end_offset / cs).min(total << self.rb_bits);
        self.mark_used(start_off / cs, covered_end.max(start_off / cs))?;
        self.wrote_image(end_offset);

        let old_offset = self.reftable_offset;
        let old = std::mem::replace(&mut self.reftable, table);
        let mut bytes = Vec::with_capacity(old.len() * 8);
        for e in &old {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        self.stale.push((old_offset, bytes));
        self.reftable_offset = table_offset;
        self.max_rt_index = self.reftable.iter().rposition(|&e| e != 0).unwrap_or(0);
        let first_old = old_offset / cs;
        let last_old = (old_offset + old.len() as u64 * 8 - 1) / cs;
        // qemu reports a failure to free the old table and carries on
        let _ = self.update_refcount(first_old, last_old - first_old + 1, true);
        Ok(end_offset)
    }

    /// qemu's `qcow2_alloc_clusters`: `n` contiguous clusters anywhere.
    fn alloc_clusters(&mut self, n: u64) -> Step<u64> {
        for _ in 0..MAX_RETRIES {
            let p = self.alloc_noref(n, MAX_CLUSTER_OFFSET)?;
            match self.update_refcount(p, n, false) {
                Err(Stop::Again) => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(p),
            }
        }
        internal("allocation does not converge")
    }

    /// qemu's `qcow2_alloc_clusters_at`: up to `n` clusters exactly at cluster `c`;
    /// returns how many were free there.
    fn alloc_clusters_at(&mut self, c: u64, n: u64) -> Step<u64> {
        if n == 0 {
            return Ok(0);
        }
        for _ in 0..MAX_RETRIES {
            let free = self.used.gap_len(c, n);
            match self.update_refcount(c, free, false) {
                Err(Stop::Again) => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(free),
            }
        }
        internal("allocation does not converge")
    }

    /// qemu's `qcow2_grow_l1_table` with an exact size, from an empty table.
    fn grow_l1(&mut self, entries: u64) -> Step<()> {
        if entries <= self.l1.len() as u64 {
            return Ok(());
        }
        if entries > i32::MAX as u64 / 8 || entries > MAX_L1_ENTRIES {
            return too_large();
        }
        let bytes = entries * 8;
        let first = self.alloc_clusters(bytes.div_ceil(self.cs))?;
        self.l1_offset = first << self.cb;
        self.l1 = vec![0; entries as usize];
        self.wrote_image(self.l1_offset + bytes);
        Ok(())
    }

    fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// qemu's `get_cluster_table`: the L2 table covering `guest`, allocated if missing.
    fn l2_table_for(&mut self, guest: u64) -> Step<()> {
        let index = guest >> (self.cb + self.l2_bits);
        let Some(&entry) = self.l1.get(index as usize) else {
            return internal("guest offset beyond the L1 table");
        };
        if entry & COPIED == 0 {
            let table = self.alloc_clusters(1)?;
            if table == 0 {
                return internal("L2 table at offset 0");
            }
            self.wrote_image((table + 1) << self.cb);
            self.l1[index as usize] = (table << self.cb) | COPIED;
        }
        Ok(())
    }

    /// qemu's `qcow2_alloc_host_offset` for a range that is entirely unallocated (as
    /// everything is in a new image): allocates as many contiguous clusters from `guest`
    /// (at most `bytes`) as it can. Returns the host offset of `guest`, the bytes mapped
    /// and the allocations to enter into L2.
    fn alloc_host_offset(&mut self, guest: u64, bytes: u64) -> Step<(u64, u64, Vec<Meta>)> {
        let cs = self.cs;
        let (mut start, mut remaining, mut cur) = (guest, bytes, 0u64);
        let mut cluster_offset: Option<u64> = None;
        let mut host: Option<u64> = None;
        let mut metas = Vec::new();
        loop {
            if host.is_none() {
                host = cluster_offset;
            }
            start += cur;
            remaining -= cur;
            if let Some(c) = cluster_offset.as_mut() {
                *c += cur;
            }
            if remaining == 0 {
                break;
            }
            cur = remaining;
            // handle_copied: looks the L2 table up, allocating it; nothing to reuse.
            self.l2_table_for(start)?;
            // handle_alloc
            let in_cluster = start & (cs - 1);
            let l2_index = (start >> self.cb) & (self.l2_entries() - 1);
            let mut n = (in_cluster + cur)
                .div_ceil(cs)
                .min(self.l2_entries() - l2_index)
                .min(REQUEST_MAX_BYTES >> self.cb);
            let alloc_off = if self.data_file {
                start & !(cs - 1)
            } else if let Some(c) = cluster_offset {
                let at = c & !(cs - 1);
                n = self.alloc_clusters_at(at >> self.cb, n)?;
                at
            } else {
                self.alloc_clusters(n)? << self.cb
            };
            if n == 0 {
                // cannot continue contiguously
                break;
            }
            let mapped = (cur + in_cluster).min(n * cs);
            cluster_offset = Some(alloc_off + in_cluster);
            cur = cur.min(mapped - in_cluster);
            metas.push(Meta {
                guest: start & !(cs - 1),
                host: alloc_off,
                clusters: n,
                written: in_cluster + cur,
            });
        }
        Ok((host.unwrap_or(0), bytes - remaining, metas))
    }

    /// qemu's `qcow2_alloc_cluster_link_l2` for a preallocation: copy-on-write of the
    /// unwritten tail of the last cluster (zeros), then the L2 entries.
    fn link_l2(&mut self, m: &Meta) -> Step<()> {
        let tail_end = m.written.next_multiple_of(self.subcluster);
        if tail_end > m.written {
            let (off, len) = (m.host + m.written, tail_end - m.written);
            let op = FileOp::WriteZeroes { off, len };
            if self.data_file {
                self.data_ops.push(op);
                self.data_len = self.data_len.max(off + len);
            } else {
                self.image_ops.push(op);
                self.wrote_image(off + len);
            }
        }
        self.l2_table_for(m.guest)?;
        self.chunks.push(Chunk {
            guest: m.guest >> self.cb,
            count: m.clusters,
            host: m.host >> self.cb,
        });
        Ok(())
    }

    /// Grow a file from `cur` to `new` bytes as qemu's file layer does for `mode`.
    fn grow_file(ops: &mut Vec<FileOp>, cur: u64, new: u64, mode: Preallocation) {
        if new <= cur {
            return;
        }
        match mode {
            Preallocation::Off | Preallocation::Metadata => {
                if cur == 0 {
                    ops.push(FileOp::FirstBlock);
                }
            }
            Preallocation::Falloc => ops.push(FileOp::Fallocate {
                off: cur,
                len: new - cur,
            }),
            Preallocation::Full => ops.push(FileOp::WriteZeroes {
                off: cur,
                len: new - cur,
            }),
        }
    }

    /// qemu's `preallocate_co` over the whole new image: L2 tables and data clusters
    /// (in the data file: L2 tables only), then the file holding the data is extended to
    /// the end of the last allocation.
    fn preallocate(&mut self, size: u64, mode: Preallocation) -> Step<()> {
        let chunk_max = (i32::MAX as u64) & !(self.cs - 1);
        let (mut guest, mut left) = (0u64, size);
        let (mut last_host, mut last_len) = (0u64, 0u64);
        while left > 0 {
            let (host, mapped, metas) = self.alloc_host_offset(guest, left.min(chunk_max))?;
            if mapped == 0 {
                return internal("preallocation made no progress");
            }
            for m in metas.iter().rev() {
                self.link_l2(m)?;
            }
            left -= mapped;
            guest += mapped;
            last_host = host;
            last_len = mapped;
        }
        let end = last_host + last_len;
        let mode = if mode == Preallocation::Metadata {
            Preallocation::Off
        } else {
            mode
        };
        if self.data_file {
            if end > self.data_len {
                Sim::grow_file(&mut self.data_ops, self.data_len, end, mode);
                self.data_len = end;
            }
        } else if end > self.image_len {
            Sim::grow_file(&mut self.image_ops, self.image_len, end, mode);
            self.image_len = end;
        }
        Ok(())
    }

    /// qemu's falloc/full resize of an image without a data file: refcount structures for
    /// everything first, then all data clusters in one run, then their L2 tables.
    fn preallocate_data(&mut self, size: u64, mode: Preallocation) -> Step<()> {
        let cs = self.cs;
        let len_clusters = self.image_len.div_ceil(cs);
        let old_end = match self.used.last_below(len_clusters) {
            Some(last) => (last + 1) * cs,
            None => len_clusters * cs,
        };
        let data = size.div_ceil(cs);
        let l2_tables = data.div_ceil(self.l2_entries()) + 1;
        let start = self.refcount_area(old_end, data + l2_tables, true, 0, 0)?;
        if self.alloc_clusters_at(start / cs, data)? != data {
            return internal("preallocated data clusters not free");
        }
        let new_len = start + data * cs;
        Sim::grow_file(&mut self.image_ops, self.image_len, new_len, mode);
        self.wrote_image(new_len);
        let (mut guest, mut host, mut left) = (0u64, start, data);
        while left > 0 {
            let l2_index = (guest >> self.cb) & (self.l2_entries() - 1);
            let n = left.min(self.l2_entries() - l2_index);
            self.link_l2(&Meta {
                guest,
                host,
                clusters: n,
                written: n * cs,
            })?;
            guest += n * cs;
            host += n * cs;
            left -= n;
        }
        Ok(())
    }
}

/// Replay qemu's creation of an image as `p` says and return the final layout.
pub(super) fn plan(p: &Plan) -> Result<Layout, LayoutError> {
    let mut s = Sim::new(p);
    let run = |s: &mut Sim| -> Step<()> {
        // Opening the minimal image refcounts header, refcount table and refcount block.
        if s.alloc_clusters(3)? != 0 {
            return internal("first cluster in use");
        }
        let l1_shift = s.cb + s.l2_bits;
        let l1_entries = p.size.div_ceil(1u64 << l1_shift);
        s.grow_l1(l1_entries)?;
        match (p.prealloc, p.data_file) {
            (Preallocation::Off, false) => {}
            (Preallocation::Off, true) => {
                Sim::grow_file(&mut s.data_ops, 0, p.size, Preallocation::Off);
                s.data_len = p.size;
            }
            (Preallocation::Metadata, _) | (_, true) => s.preallocate(p.size, p.prealloc)?,
            (mode, false) => s.preallocate_data(p.size, mode)?,
        }
        Ok(())
    };
    match run(&mut s) {
        Ok(()) => {}
        Err(Stop::Fail(e)) => return Err(e),
        Err(Stop::Again) => return Err(LayoutError::Internal("unhandled retry")),
    }
    Ok(Layout {
        cluster_bits: s.cb,
        refcount_order: p.refcount_order,
        extended_l2: p.extended_l2,
        reftable_offset: s.reftable_offset,
        reftable: s.reftable,
        used: s.used,
        l1_offset: s.l1_offset,
        l1: s.l1,
        chunks: s.chunks,
        stale: s.stale,
        image_len: s.image_len,
        image_ops: s.image_ops,
        data_len: s.data_len,
        data_ops: s.data_ops,
    })
}

impl Layout {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The refcount table as stored.
    pub(super) fn reftable_bytes(&self) -> Vec<u8> {
        self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect()
    }

    /// The L1 table as stored.
    pub(super) fn l1_bytes(&self) -> Vec<u8> {
        self.l1.iter().flat_map(|e| e.to_be_bytes()).collect()
    }

    /// Every refcount block: `(host offset, contents)`, in table order.
    pub(super) fn refcount_blocks(&self) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        let cs = self.cluster_size();
        let width = 1u64 << self.refcount_order;
        let per_block = cs * 8 / width;
        self.reftable
            .iter()
            .enumerate()
            .filter(|(_, &off)| off != 0)
            .map(move |(i, &off)| {
                let mut block = vec![0u8; cs as usize];
                let first = i as u64 * per_block;
                for (a, b) in self.used.runs_in(first, first + per_block) {
                    for j in a - first..b - first {
                        if width >= 8 {
                            let bytes = width / 8;
                            block[(j * bytes + bytes - 1) as usize] = 1;
                        } else {
                            let bit = j * width;
                            block[(bit / 8) as usize] |= 1 << (bit % 8);
                        }
                    }
                }
                (off, block)
            })
    }

    /// Every L2 table: `(host offset, contents)`, in L1 order.
    pub(super) fn l2_tables(&self) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        let cb = self.cluster_bits;
        let cs = self.cluster_size();
        let entry_size: u64 = if self.extended_l2 { 16 } else { 8 };
        let l2_bits = cb - entry_size.trailing_zeros();
        let mut next_chunk = 0usize;
        let mut sorted: Vec<Chunk> = self.chunks.clone();
        sorted.sort_by_key(|c| c.guest);
        self.l1
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != 0)
            .map(move |(i, &e)| {
                let mut table = vec![0u8; cs as usize];
                let first = (i as u64) << l2_bits;
                let end = first + (1 << l2_bits);
                while next_chunk < sorted.len() && sorted[next_chunk].guest < first {
                    next_chunk += 1;
                }
                while next_chunk < sorted.len() && sorted[next_chunk].guest < end {
                    let c = sorted[next_chunk];
                    for k in 0..c.count {
                        let at = ((c.guest + k - first) * entry_size) as usize;
                        let entry = ((c.host + k) << cb) | COPIED;
                        table[at..at + 8].copy_from_slice(&entry.to_be_bytes());
                    }
                    next_chunk += 1;
                }
                (e & !COPIED, table)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(size: u64, cb: u32, order: u32, prealloc: Preallocation) -> Layout {
        plan(&Plan {
            cluster_bits: cb,
            refcount_order: order,
            extended_l2: false,
            size,
            prealloc,
            data_file: false,
        })
        .unwrap()
    }

    #[test]
    fn default_image_has_qemus_layout() {
        let l = plan_of(1 << 20, 16, 4, Preallocation::Off);
        assert_eq!(l.reftable_offset, 0x10000);
        assert_eq!(l.l1_offset, 0x30000);
        assert_eq!(l.l1.len(), 1);
        assert_eq!(l.image_len, 196616);
        let l = plan_of(10 << 20, 16, 4, Preallocation::Metadata);
        assert_eq!(l.l1[0], 0x40000 | COPIED);
        assert_eq!(l.image_len, 165 * 65536);
        let l = plan_of(10 << 20, 16, 4, Preallocation::Falloc);
        assert_eq!(l.reftable_offset, 0x40000);
        assert_eq!(l.l1[0], 0x10000 | COPIED);
        assert_eq!(l.image_len, 165 * 65536);
    }

    #[test]
    fn too_large_like_qemu() {
        let p = |size, cb| Plan {
            cluster_bits: cb,
            refcount_order: 4,
            extended_l2: false,
            size,
            prealloc: Preallocation::Off,
            data_file: false,
        };
        assert!(plan(&p(128 << 30, 9)).is_ok());
        assert_eq!(plan(&p(129 << 30, 9)).unwrap_err(), LayoutError::TooLarge);
        assert_eq!(plan(&p(3 << 50, 16)).unwrap_err(), LayoutError::TooLarge);
    }
}
