//! The qcow2 writer: QEMU's two-phase write.
//!
//! `allocate` reserves host clusters (append-only, in guest order) and counts them; the
//! engine writes the data; `commit` publishes the L2 entries in memory. Metadata reaches the
//! file in dependency order — refcount blocks and table, then L2 tables, then the L1 table,
//! then the header — so that an interrupted write leaves at most leaked clusters, never a
//! reference to an uncounted cluster. Dirty L2 tables are written out (in that order) as
//! they accumulate, to bound memory on large images.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::header::{Extensions, Header};
use super::refcount::Refcounts;
use crate::driver::{Action, ImageWriter, Placement, Preallocation, Ticket};
use crate::error::{Error, Result};
use crate::file::FileLayer;
use crate::types::{FileId, GuestOff, HostOff};

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Standard descriptor bit 0: the cluster reads as zeros.
const ZERO_FLAG: u64 = 1;

/// Dirty L2 tables kept before writing them out.
const MAX_DIRTY_L2: usize = 32;

struct L2Table {
    off: u64,
    /// raw 64-bit words (2 per entry with extended L2)
    words: Vec<u64>,
    dirty: bool,
}

/// Writer of one qcow2 image (owned by the engine's metadata thread).
pub(super) struct Qcow2Writer {
    file: Arc<FileLayer>,
    header: Header,
    header_dirty: bool,
    cs: u64,
    l2_bits: u32,
    ext_l2: bool,
    external: bool,
    data_fid: FileId,
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: BTreeMap<u64, L2Table>,
    refs: Refcounts,
    /// guest cluster -> host offset, allocated and not yet committed
    pending: HashMap<u64, u64>,
    /// ticket -> guest clusters it published
    tickets: HashMap<u64, Vec<u64>>,
    /// ticket -> (guest cluster, subcluster bits) newly written in clusters that were
    /// allocated already (extended L2)
    subclusters: HashMap<u64, Vec<(u64, u32)>>,
    /// ticket -> (guest cluster, compressed L2 descriptor)
    compressed: HashMap<u64, (u64, u64)>,
    /// next free byte for compressed data, inside the last cluster taken for it
    byte_cursor: Option<u64>,
    codec: crate::extent::Codec,
    next_ticket: u64,
    /// the image file's length as this writer left it (grown ahead of allocation)
    file_len: u64,
    /// its length when the writer started (never truncated below)
    open_len: u64,
}

/// How far ahead of the allocation the image file is grown at once: writes inside the
/// file's length do not extend it, which for O_DIRECT is the difference between an
/// asynchronous write and a synchronous, serialised one on Linux file systems.
const GROW_AHEAD: u64 = 32 << 20;

impl Qcow2Writer {
    /// A writer for the image whose parsed header is `header` and active L1 is `l1`.
    pub(super) fn new(
        file: Arc<FileLayer>,
        header: Header,
        _ext: &Extensions,
        l1: Vec<u64>,
        data_fid: FileId,
    ) -> Result<Qcow2Writer> {
        let cs = header.cluster_size();
        let refs = Refcounts::load(
            file.clone(),
            cs,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
        )?;
        let file_len = file.len()?;
        let codec = if header.compression_type == 1 {
            crate::extent::Codec::Zstd
        } else {
            crate::extent::Codec::Zlib
        };
        Ok(Qcow2Writer {
            file,
            cs,
            l2_bits: header.l2_bits(),
            ext_l2: header.extended_l2(),
            external: data_fid != FileId(0),
            data_fid,
            header,
            header_dirty: false,
            l1,
            l1_dirty: false,
            l2: BTreeMap::new(),
            refs,
            pending: HashMap::new(),
            tickets: HashMap::new(),
            subclusters: HashMap::new(),
            compressed: HashMap::new(),
            byte_cursor: None,
            codec,
            next_ticket: 0,
            file_len,
            open_len: file_len,
        })
    }

    fn words_per_entry(&self) -> usize {
        if self.ext_l2 {
            2
        } else {
            1
        }
    }

    /// The L2 table of L1 index `l1i`, loading or allocating it.
    fn l2_table(&mut self, l1i: u64, create: bool) -> Result<Option<&mut L2Table>> {
        if !self.l2.contains_key(&l1i) {
            let e = *self.l1.get(l1i as usize).ok_or_else(|| Error::Corrupt {
                path: self.file.path().to_string(),
                what: format!("guest offset beyond the L1 table (index {l1i})"),
            })?;
            let off = e & OFFSET_MASK;
            if off == 0 {
                if !create {
                    return Ok(None);
                }
                let off = self.refs.alloc_cluster()?;
                self.l1[l1i as usize] = off | COPIED;
                self.l1_dirty = true;
                self.l2.insert(
                    l1i,
                    L2Table {
                        off,
                        words: vec![0; (self.cs / 8) as usize],
                        dirty: true,
                    },
                );
            } else {
                if e & COPIED == 0 {
                    return Err(Error::Unsupported(
                        "writing to an L2 table shared with a snapshot is not supported by rimg yet"
                            .into(),
                    ));
                }
                let mut raw = vec![0u8; self.cs as usize];
                self.file
                    .read_exact_at(&mut raw, off, &format!("L2 table at {off:#x}"))?;
                let words = raw
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect();
                self.l2.insert(
                    l1i,
                    L2Table {
                        off,
                        words,
                        dirty: false,
                    },
                );
            }
        }
        Ok(self.l2.get_mut(&l1i))
    }

    /// For a write of `[in_c, in_c+n)` into allocated cluster `gc` of an extended-L2 image:
    /// the subclusters it makes allocated, which `commit` publishes. Subclusters not yet
    /// allocated must be written whole (their unwritten part would otherwise be undefined).
    fn claim_subclusters(
        &mut self,
        gc: u64,
        in_c: u64,
        n: u64,
        subs: &mut Vec<(u64, u32)>,
    ) -> Result<()> {
        let sc = self.cs / 32;
        let (l1i, l2i) = (gc >> self.l2_bits, gc & ((1 << self.l2_bits) - 1));
        let Some(t) = self.l2_table(l1i, false)? else {
            return Ok(());
        };
        let allocated = t.words[l2i as usize * 2 + 1] as u32;
        let (first, last) = (in_c / sc, (in_c + n - 1) / sc);
        let mut bits = 0u32;
        for i in first..=last {
            if allocated & (1 << i) == 0 {
                let whole = in_c <= i * sc && in_c + n >= (i + 1) * sc;
                if !whole {
                    return Err(Error::Unsupported(
                        "writing part of an unallocated subcluster is not supported by rimg yet"
                            .into(),
                    ));
                }
                bits |= 1 << i;
            }
        }
        if bits != 0 {
            subs.push((gc, bits));
        }
        Ok(())
    }

    /// Host offset of guest cluster `gc` if it is allocated (plain data cluster).
    fn lookup(&mut self, gc: u64) -> Result<Option<u64>> {
        if let Some(h) = self.pending.get(&gc) {
            return Ok(Some(*h));
        }
        let (l1i, l2i) = (gc >> self.l2_bits, gc & ((1 << self.l2_bits) - 1));
        let wpe = self.words_per_entry();
        let external = self.external;
        let Some(t) = self.l2_table(l1i, false)? else {
            return Ok(None);
        };
        let e = t.words[l2i as usize * wpe];
        if e & COMPRESSED != 0 {
            return Err(Error::Unsupported(
                "overwriting compressed clusters is not supported by rimg yet".into(),
            ));
        }
        let host = e & OFFSET_MASK;
        if host != 0 || (external && e & COPIED != 0) {
            if e & COPIED == 0 {
                return Err(Error::Unsupported(
                    "writing to clusters shared with a snapshot is not supported by rimg yet"
                        .into(),
                ));
            }
            return Ok(Some(host));
        }
        Ok(None)
    }

    /// Make the image file at least `end` bytes long, growing it well ahead.
    fn reserve_file(&mut self, end: u64) -> Result<()> {
        if self.external || end <= self.file_len {
            return Ok(());
        }
        let new = end.max(self.file_len + GROW_AHEAD).div_ceil(self.cs) * self.cs;
        // Allocated (as unwritten extents, reading as zeros), not just a longer size: data
        // writes then only convert extents instead of allocating blocks one by one.
        if self
            .file
            .fallocate(
                crate::file::Falloc::Allocate,
                self.file_len,
                new - self.file_len,
            )
            .is_err()
        {
            self.file.set_len(new)?;
        }
        self.file_len = new;
        Ok(())
    }

    /// Give back what [`Qcow2Writer::reserve_file`] grew beyond the last cluster.
    fn trim_file(&mut self) -> Result<()> {
        let keep = self.refs.next_free.max(self.open_len);
        if self.file_len > keep {
            self.file.set_len(keep)?;
            self.file_len = keep;
        }
        Ok(())
    }

    /// Write dirty metadata in dependency order and drop clean L2 tables from memory.
    fn write_metadata(&mut self) -> Result<()> {
        // Every allocated cluster must lie inside the file before anything points at it.
        let end = self.refs.next_free;
        if self.file_len < end && self.file.len()? < end {
            self.file.set_len(end)?;
            self.file_len = end;
        }
        self.refs.write_dirty()?;
        for t in self.l2.values_mut().filter(|t| t.dirty) {
            let mut raw = Vec::with_capacity(t.words.len() * 8);
            for w in &t.words {
                raw.extend_from_slice(&w.to_be_bytes());
            }
            self.file
                .write_all_at(&raw, t.off, &format!("L2 table at {:#x}", t.off))?;
            t.dirty = false;
        }
        if self.l1_dirty {
            let mut raw = Vec::with_capacity(self.l1.len() * 8);
            for e in &self.l1 {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            self.file
                .write_all_at(&raw, self.header.l1_table_offset, "L1 table")?;
            self.l1_dirty = false;
        }
        if self.refs.table_off != self.header.refcount_table_offset {
            self.header.refcount_table_offset = self.refs.table_off;
            self.header.refcount_table_clusters = self.refs.table_clusters();
            self.header_dirty = true;
        }
        if self.header_dirty {
            let fixed = self.header.to_bytes();
            self.file.write_all_at(&fixed, 0, "qcow2 header")?;
            self.header_dirty = false;
        }
        // Only now may the old refcount table's clusters be freed.
        let frees = self.refs.take_deferred_frees();
        if !frees.is_empty() {
            for c in frees {
                self.refs.set(c, 0)?;
            }
            self.refs.write_dirty()?;
        }
        self.l2.retain(|_, t| t.dirty);
        Ok(())
    }
}

impl Qcow2Writer {
    /// Reserve `len` bytes for compressed data, packed after the previous compressed
    /// cluster; a host cluster is counted once per compressed cluster touching it.
    fn alloc_bytes(&mut self, len: u64) -> Result<u64> {
        let cs = self.cs;
        if let Some(cur) = self.byte_cursor.filter(|c| !c.is_multiple_of(cs)) {
            let cluster_end = (cur / cs + 1) * cs;
            let fits = cur + len <= cluster_end;
            // Spilling into following clusters needs them to be the next free ones.
            let spill_ok = cluster_end == self.refs.next_free;
            if cur < cluster_end && (fits || spill_ok) && self.refs.can_inc(cur / cs)? {
                self.refs.inc(cur / cs)?;
                let mut c = cluster_end;
                while c < cur + len {
                    let got = self.refs.alloc_cluster()?;
                    debug_assert_eq!(got, c);
                    c += cs;
                }
                self.byte_cursor = Some(cur + len);
                return Ok(cur);
            }
        }
        let start = self.refs.alloc_cluster()?;
        let mut c = start + cs;
        while c < start + len {
            self.refs.alloc_cluster()?;
            c += cs;
        }
        self.byte_cursor = Some(start + len);
        Ok(start)
    }
}

impl Qcow2Writer {
    /// Mark `[in_c, in_c+n)` of unallocated guest cluster `gc` as reading zeros.
    fn set_zero_flag(&mut self, gc: u64, in_c: u64, n: u64) -> Result<()> {
        let (l1i, l2i) = (gc >> self.l2_bits, gc & ((1 << self.l2_bits) - 1));
        let (ext_l2, v3, cs) = (self.ext_l2, self.header.version >= 3, self.cs);
        let wpe = self.words_per_entry();
        let unsupported = || {
            Error::Unsupported(
                "zeroing part of an unallocated cluster over a backing file is not supported by rimg yet"
                    .into(),
            )
        };
        if !v3 {
            return Err(unsupported());
        }
        let table = self
            .l2_table(l1i, true)?
            .ok_or_else(|| Error::Unsupported("L2 table allocation failed".into()))?;
        if ext_l2 {
            let sc = cs / 32;
            if !in_c.is_multiple_of(sc) || !n.is_multiple_of(sc) {
                return Err(unsupported());
            }
            let mut bits = 0u64;
            for i in in_c / sc..(in_c + n) / sc {
                bits |= 1 << (32 + i);
            }
            table.words[l2i as usize * wpe + 1] |= bits;
        } else {
            if in_c != 0 || n != cs {
                return Err(unsupported());
            }
            table.words[l2i as usize * wpe] = ZERO_FLAG;
        }
        table.dirty = true;
        Ok(())
    }
}

impl Qcow2Writer {
    /// Make the L1 table cover `new_size`, relocating it to the end of the file if it must
    /// grow. The old table is freed after the header points at the new one.
    fn grow_l1(&mut self, new_size: u64) -> Result<()> {
        let span = self.cs << self.l2_bits;
        let need = new_size.div_ceil(span) as usize;
        if need <= self.l1.len() {
            return Ok(());
        }
        if need as u64 * 8 > 32 << 20 {
            return Err(Error::InvalidArgument("File too large".into()));
        }
        let old_off = self.header.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(self.cs);
        let clusters = (need as u64 * 8).div_ceil(self.cs);
        let new_off = self.refs.alloc_contiguous(clusters)?;
        self.l1.resize(need, 0);
        self.l1_dirty = true;
        // Order: new table (refcounts, contents) -> header -> free the old one.
        self.header.l1_table_offset = new_off;
        self.header.l1_size = need as u32;
        self.header_dirty = true;
        self.write_metadata()?;
        if old_clusters > 0 && old_off != 0 {
            for k in 0..old_clusters {
                self.refs.dec(old_off / self.cs + k)?;
            }
            self.refs.write_dirty()?;
        }
        Ok(())
    }

    /// Drop every cluster beyond `new_size`: L2 entries first (written), then refcounts.
    fn shrink(&mut self, new_size: u64) -> Result<()> {
        let cs = self.cs;
        let per_table = 1u64 << self.l2_bits;
        let wpe = self.words_per_entry();
        let first_gc = new_size.div_ceil(cs);
        let end_gc = self.header.size.div_ceil(cs);
        let cb = self.header.cluster_bits;
        let external = self.external;
        let mut freed: Vec<u64> = Vec::new();
        let mut gc = first_gc;
        while gc < end_gc {
            let l1i = gc / per_table;
            let table_end = ((l1i + 1) * per_table).min(end_gc);
            if let Some(t) = self.l2_table(l1i, false)? {
                for g in gc..table_end {
                    let i = (g % per_table) as usize * wpe;
                    let e = t.words[i];
                    if e & COMPRESSED != 0 {
                        let x = 62 - (cb - 8);
                        let host = e & ((1u64 << x) - 1);
                        let sectors = ((e >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
                        let last = (host & !511) + sectors * 512 - 1;
                        for c in host / cs..=last / cs {
                            freed.push(c);
                        }
                    } else if e & OFFSET_MASK != 0 && !external {
                        freed.push((e & OFFSET_MASK) / cs);
                    }
                    t.words[i] = 0;
                    if wpe == 2 {
                        t.words[i + 1] = 0;
                    }
                }
                t.dirty = true;
            }
            // A table wholly beyond the new end goes too.
            if l1i * per_table >= first_gc {
                let off = self.l1[l1i as usize] & OFFSET_MASK;
                if off != 0 {
                    freed.push(off / cs);
                    self.l1[l1i as usize] = 0;
                    self.l1_dirty = true;
                    self.l2.remove(&l1i);
                }
            }
            gc = table_end;
        }
        // Publish the unmapping before the refcounts drop (a crash leaves leaks only).
        self.header.size = new_size;
        self.header_dirty = true;
        self.write_metadata()?;
        for c in freed {
            self.refs.dec(c)?;
        }
        self.refs.write_dirty()?;
        Ok(())
    }
}

impl ImageWriter for Qcow2Writer {
    fn release_unwritten(&mut self, ticket: Ticket, zeros: &[(u64, u64)]) -> Result<()> {
        if self.external {
            return Ok(());
        }
        let cs = self.cs;
        let size = self.header.size;
        let Some(clusters) = self.tickets.get(&ticket.0).cloned() else {
            return Ok(());
        };
        let mut keep = Vec::with_capacity(clusters.len());
        for gc in clusters {
            let start = gc * cs;
            let end = (start + cs).min(size);
            let covered: u64 = zeros
                .iter()
                .map(|&(s, l)| (s + l).min(end).saturating_sub(s.max(start)))
                .sum();
            if covered >= end - start {
                // Never written and never published: give the cluster back.
                if let Some(h) = self.pending.remove(&gc) {
                    self.refs.set(h / cs, 0)?;
                    // It may lie in space grown ahead: leave a hole, not allocated blocks.
                    let _ = self.file.fallocate(crate::file::Falloc::PunchHole, h, cs);
                }
            } else {
                keep.push(gc);
            }
        }
        self.tickets.insert(ticket.0, keep);
        Ok(())
    }

    fn compression_unit(&self) -> Option<(u64, crate::extent::Codec)> {
        (!self.external).then_some((self.cs, self.codec))
    }

    fn allocate_compressed(&mut self, off: GuestOff, clen: u64) -> Result<(Placement, Ticket)> {
        if self.external {
            return Err(Error::Unsupported(
                "Compression is not supported with an external data file".into(),
            ));
        }
        if !off.0.is_multiple_of(self.cs) || clen == 0 || clen > self.cs {
            return Err(Error::InvalidArgument(format!(
                "bad compressed write: {clen} bytes for {off}"
            )));
        }
        let cb = self.header.cluster_bits;
        let host = self.alloc_bytes(clen)?;
        self.reserve_file(host + clen)?;
        // Sectors spanned, minus one, in the bits above the offset field.
        let x = 62 - (cb - 8);
        let sectors = (host + clen - 1) / 512 - host / 512 + 1;
        let desc = COMPRESSED | ((sectors - 1) << x) | host;
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.compressed.insert(t, (off.0 / self.cs, desc));
        Ok((
            Placement {
                guest: off,
                len: clen,
                file: self.data_fid,
                host: HostOff(host),
            },
            Ticket(t),
        ))
    }

    fn allocate(&mut self, off: GuestOff, len: u64, out: &mut Vec<Placement>) -> Result<Ticket> {
        if off.0.checked_add(len).is_none_or(|e| e > self.header.size) {
            return Err(Error::InvalidArgument(format!(
                "write of {len} bytes at {off} is past the end of '{}'",
                self.file.path()
            )));
        }
        let cs = self.cs;
        let mut pos = off.0;
        let end = off.0 + len;
        let mut clusters = Vec::new();
        let mut subs = Vec::new();
        while pos < end {
            let gc = pos / cs;
            let in_c = pos % cs;
            let n = (cs - in_c).min(end - pos);
            let host = match self.lookup(gc)? {
                Some(h) => {
                    if self.ext_l2 && !self.pending.contains_key(&gc) {
                        self.claim_subclusters(gc, in_c, n, &mut subs)?;
                    }
                    h
                }
                None => {
                    if (in_c != 0 || n != cs.min(self.header.size - gc * cs))
                        && self.header.backing_file_offset != 0
                    {
                        return Err(Error::Unsupported(
                            "writing part of an unallocated cluster over a backing file is not supported by rimg yet"
                                .into(),
                        ));
                    }
                    let h = if self.external {
                        gc * cs
                    } else {
                        let h = self.refs.alloc_cluster()?;
                        self.reserve_file(h + cs)?;
                        h
                    };
                    self.pending.insert(gc, h);
                    clusters.push(gc);
                    h
                }
            };
            let p = Placement {
                guest: GuestOff(pos),
                len: n,
                file: self.data_fid,
                host: HostOff(host + in_c),
            };
            match out.last_mut() {
                Some(last)
                    if last.file == p.file
                        && last.host.plus(last.len) == p.host
                        && last.guest.plus(last.len) == p.guest =>
                {
                    last.len += n
                }
                _ => out.push(p),
            }
            pos += n;
        }
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(t, clusters);
        if !subs.is_empty() {
            self.subclusters.insert(t, subs);
        }
        Ok(Ticket(t))
    }

    fn commit(&mut self, tickets: &[Ticket]) -> Result<()> {
        let wpe = self.words_per_entry();
        let ext_l2 = self.ext_l2;
        for t in tickets {
            if let Some((gc, desc)) = self.compressed.remove(&t.0) {
                let (l1i, l2i) = (gc >> self.l2_bits, gc & ((1 << self.l2_bits) - 1));
                let table = self
                    .l2_table(l1i, true)?
                    .ok_or_else(|| Error::Unsupported("L2 table allocation failed".into()))?;
                if table.words[l2i as usize * wpe] != 0 {
                    return Err(Error::Unsupported(
                        "compressed writes over allocated clusters are not supported by rimg yet"
                            .into(),
                    ));
                }
                table.words[l2i as usize * wpe] = desc;
                table.dirty = true;
                continue;
            }
            for (gc, bits) in self.subclusters.remove(&t.0).unwrap_or_default() {
                let (l1i, l2i) = (gc >> self.l2_bits, gc & ((1 << self.l2_bits) - 1));
                let table = self
                    .l2_table(l1i, true)?
                    .ok_or_else(|| Error::Unsupported("L2 table allocation failed".into()))?;
                let w = &mut table.words[l2i as usize * wpe + 1];
                *w = (*w | bits as u64) & !((bits as u64) << 32);
                table.dirty = true;
            }
            let Some(clusters) = self.tickets.remove(&t.0) else {
                continue;
            };
            for gc in clusters {
                let Some(host) = self.pending.remove(&gc) else {
                    continue;
                };
                let (l1i, l2i) = (gc >> self.l2_bits, gc & ((1 << self.l2_bits) - 1));
                let table = self
                    .l2_table(l1i, true)?
                    .ok_or_else(|| Error::Unsupported("L2 table allocation failed".into()))?;
                table.words[l2i as usize * wpe] = host | COPIED;
                if ext_l2 {
                    // The whole cluster is allocated; unwritten parts of a new cluster read
                    // as zeros (there is no backing file to show through).
                    table.words[l2i as usize * wpe + 1] = 0xffff_ffff;
                }
                table.dirty = true;
            }
        }
        if self.l2.values().filter(|t| t.dirty).count() > MAX_DIRTY_L2 {
            self.write_metadata()?;
        }
        Ok(())
    }

    fn zero(
        &mut self,
        off: GuestOff,
        len: u64,
        _may_unmap: bool,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        // Allocated clusters are zeroed in place (their allocation is kept). Without a
        // backing file an unallocated cluster already reads as zeros; with one, whole
        // clusters get the zero flag (v3) so the backing file does not show through.
        let cs = self.cs;
        let backed = self.header.backing_file_offset != 0;
        let mut pos = off.0;
        let end = off.0 + len;
        while pos < end {
            let gc = pos / cs;
            let in_c = pos % cs;
            let n = (cs - in_c).min(end - pos);
            if let Some(h) = self.lookup(gc)? {
                out.push(Action::ZeroRange {
                    file: self.data_fid,
                    host: HostOff(h + in_c),
                    len: n,
                });
            } else if backed {
                self.set_zero_flag(gc, in_c, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<Vec<Action>> {
        if !new_size.is_multiple_of(512) {
            return Err(Error::InvalidArgument(
                "The new size must be a multiple of 512".into(),
            ));
        }
        if prealloc != Preallocation::Off {
            return Err(Error::Unsupported(format!(
                "Unsupported preallocation mode: {}",
                prealloc.name()
            )));
        }
        let old = self.header.size;
        if new_size < old {
            self.shrink(new_size)?;
        } else {
            self.grow_l1(new_size)?;
        }
        self.header.size = new_size;
        self.header_dirty = true;
        self.write_metadata()?;
        Ok(Vec::new())
    }

    fn flush(&mut self) -> Result<()> {
        self.write_metadata()
    }

    fn close(mut self: Box<Self>) -> Result<()> {
        // Durability is the caller's cache mode: the engine syncs after `flush`.
        self.write_metadata()?;
        self.trim_file()
    }
}
