//! The vmdk writer. Flat extents place guest bytes at their fixed location. Sparse extents
//! get new grains appended to their file (QEMU's `next_cluster_sector`), published in the
//! grain table and its redundant copy at `commit`. streamOptimized extents take only whole
//! compressed grains, each after a 12-byte marker the writer fills in at `commit`. As QEMU
//! does, the first write after opening gives the descriptor a new CID.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::descriptor::{with_new_cid, DESC_SIZE};
use super::map::MARKER_LEN;
use super::{create::random_u32, Extent, ExtentKind, SparseExtent, VmdkImage};
use crate::driver::{Action, ImageWriter, Placement, Preallocation, Ticket};
use crate::error::{Error, Result};
use crate::file::FileLayer;
use crate::types::{GuestOff, HostOff};

/// Dirty grain tables kept before they are written out.
const MAX_DIRTY_GT: usize = 64;

/// One grain allocated and not yet published.
#[derive(Clone, Copy, Debug)]
struct NewGrain {
    /// extent index
    ei: usize,
    /// grain index inside the extent
    grain: u64,
    /// host byte offset of the grain (of its marker, when compressed)
    host: u64,
    /// compressed grains: (lba, compressed size) for the marker
    marker: Option<(u64, u32)>,
}

/// A loaded grain table.
struct GrainTable {
    entries: Vec<u32>,
    dirty: bool,
}

/// Writer of one vmdk image (owned by the engine's metadata thread).
pub(super) struct VmdkWriter {
    files: Vec<Arc<FileLayer>>,
    extents: Vec<Extent>,
    desc_offset: u64,
    backed: bool,
    cid_updated: bool,
    /// next free byte per extent (sparse extents)
    next: Vec<u64>,
    /// length each file must reach before grain tables point into it
    min_len: Vec<u64>,
    /// (extent, grain directory index) -> table
    gts: BTreeMap<(usize, u64), GrainTable>,
    /// (extent, grain) -> host offset, allocated and not yet committed
    pending: HashMap<(usize, u64), u64>,
    tickets: HashMap<u64, Vec<NewGrain>>,
    next_ticket: u64,
    size: u64,
    /// grains published since the last flush: (file index, host, length) to allocate on
    /// the host, as QEMU's whole-grain writes allocate them
    fresh: Vec<(usize, u64, u64)>,
    /// new grains over a backing file not yet wholly written: (extent, grain) -> guest
    /// ranges written or zeroed so far (the rest must come from the backing file)
    partial: BTreeMap<(usize, u64), Vec<(u64, u64)>>,
}

fn unsupported(m: &str) -> Error {
    Error::Unsupported(m.to_string())
}

impl VmdkWriter {
    pub(super) fn new(img: &VmdkImage) -> Result<VmdkWriter> {
        let mut next = Vec::new();
        for e in &img.extents {
            next.push(match e.sparse() {
                Some(s) => {
                    if s.sesparse {
                        return Err(unsupported(
                            "No write support for seSparse images available",
                        ));
                    }
                    if s.gd_at_end {
                        return Err(unsupported(
                            "writing to a streamOptimized image whose grain directory is at its end is not supported by rimg yet",
                        ));
                    }
                    e.file_len.div_ceil(s.grain_bytes()) * s.grain_bytes()
                }
                None => 0,
            });
        }
        let mut min_len = Vec::new();
        for f in &img.files {
            min_len.push(f.len()?);
        }
        Ok(VmdkWriter {
            files: img.files.clone(),
            extents: img.extents.clone(),
            desc_offset: img.desc_offset,
            backed: img.backing.is_some(),
            cid_updated: false,
            next,
            min_len,
            gts: BTreeMap::new(),
            pending: HashMap::new(),
            tickets: HashMap::new(),
            next_ticket: 0,
            size: img.size,
            fresh: Vec::new(),
            partial: BTreeMap::new(),
        })
    }

    fn find(&self, off: u64) -> Result<usize> {
        self.extents
            .iter()
            .position(|e| off >= e.start && off < e.start.saturating_add(e.len()))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "write at guest offset {off:#x} is past the end of '{}'",
                    self.files[0].path()
                ))
            })
    }

    fn sparse(&self, ei: usize) -> &SparseExtent {
        match &self.extents[ei].kind {
            ExtentKind::Sparse(s) => s,
            ExtentKind::Flat { .. } => unreachable!("caller checked the extent is sparse"),
        }
    }

    /// The grain table of directory entry `l1i` of extent `ei`, loading it.
    fn table(&mut self, ei: usize, l1i: u64) -> Result<&mut GrainTable> {
        if !self.gts.contains_key(&(ei, l1i)) {
            let s = self.sparse(ei);
            let sector = s.l1.get(l1i as usize).copied().unwrap_or(0);
            if sector == 0 {
                return Err(unsupported(
                    "writing to a vmdk grain whose grain table is not allocated is not supported by rimg yet",
                ));
            }
            let n = s.l2_size as usize;
            let f = &self.files[self.extents[ei].file.0 as usize];
            let mut raw = vec![0u8; n * 4];
            f.read_at_most(
                &mut raw,
                sector * 512,
                &format!("grain table at {:#x}", sector * 512),
            )?;
            let entries = raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                .collect();
            self.gts.insert(
                (ei, l1i),
                GrainTable {
                    entries,
                    dirty: false,
                },
            );
        }
        Ok(self.gts.get_mut(&(ei, l1i)).expect("inserted above"))
    }

    /// (directory index, table index) of grain `g` of extent `ei`.
    fn slot(&self, ei: usize, g: u64) -> (u64, usize) {
        let l2 = u64::from(self.sparse(ei).l2_size);
        (g / l2, (g % l2) as usize)
    }

    /// The grain table entry of grain `g` (pending allocations first).
    fn entry(&mut self, ei: usize, g: u64) -> Result<u32> {
        if let Some(h) = self.pending.get(&(ei, g)) {
            return Ok((h / 512) as u32);
        }
        let (l1i, l2i) = self.slot(ei, g);
        Ok(self.table(ei, l1i)?.entries[l2i])
    }

    fn set_entry(&mut self, ei: usize, g: u64, v: u32) -> Result<()> {
        let (l1i, l2i) = self.slot(ei, g);
        let t = self.table(ei, l1i)?;
        t.entries[l2i] = v;
        t.dirty = true;
        Ok(())
    }

    /// Reserve `bytes` at the end of extent `ei`'s file (grain aligned for plain grains).
    fn take_space(&mut self, ei: usize, bytes: u64, align: u64) -> Result<u64> {
        let host = self.next[ei].div_ceil(align) * align;
        if (host + bytes) / 512 >= 1 << 32 {
            return Err(Error::InvalidArgument(format!(
                "'{}' is full: grains past 2 TiB cannot be addressed",
                self.files[self.extents[ei].file.0 as usize].path()
            )));
        }
        self.next[ei] = host + bytes;
        Ok(host)
    }

    fn grow_to(&mut self, ei: usize, end: u64) {
        let fi = self.extents[ei].file.0 as usize;
        self.min_len[fi] = self.min_len[fi].max(end);
    }

    /// Guest bytes of grain `g` of extent `ei` (the last grain of an extent may be short).
    fn grain_len(&self, ei: usize, g: u64) -> u64 {
        let e = &self.extents[ei];
        let gb = self.sparse(ei).grain_bytes();
        gb.min(e.len() - g * gb)
    }

    /// Guest range `[off, off+n)` of a new grain over a backing file was written or zeroed.
    fn cover(&mut self, ei: usize, g: u64, off: u64, n: u64) {
        let glen = self.grain_len(ei, g);
        if let Some(c) = self.partial.get_mut(&(ei, g)) {
            c.push((off, n));
            if c.iter().map(|r| r.1).sum::<u64>() >= glen {
                self.partial.remove(&(ei, g));
            }
        }
    }

    /// A new grain over a backing file: track it until all of it is written or zeroed.
    fn track(&mut self, ei: usize, g: u64) {
        if self.backed {
            self.partial.insert((ei, g), Vec::new());
        }
    }

    /// Refuse to finish while a new grain over the backing file misses some of its bytes.
    fn check_filled(&self) -> Result<()> {
        if let Some(&(ei, g)) = self.partial.keys().next() {
            let e = &self.extents[ei];
            let off = e.start + g * self.sparse(ei).grain_bytes();
            return Err(unsupported(&format!(
                "part of the new vmdk grain at guest offset {off:#x} would have to be copied from the backing file, which rimg does not do yet"
            )));
        }
        Ok(())
    }

    /// As QEMU does after the first write: a new random CID in the descriptor.
    fn update_cid(&mut self) -> Result<()> {
        if self.cid_updated {
            return Ok(());
        }
        self.cid_updated = true;
        let f = &self.files[0];
        let mut buf = vec![0u8; DESC_SIZE];
        f.read_at_most(&mut buf, self.desc_offset, "descriptor")?;
        let Some(mut text) = with_new_cid(&buf, random_u32()) else {
            return Err(Error::Corrupt {
                path: f.path().to_string(),
                what: "the descriptor has no parentCID".into(),
            });
        };
        text.resize(DESC_SIZE, 0);
        // QEMU's write is clipped to the sectors the file already has.
        let room = (f.len()?.div_ceil(512) * 512).saturating_sub(self.desc_offset);
        let n = (DESC_SIZE as u64).min(room) as usize;
        f.write_all_at(&text[..n], self.desc_offset, "descriptor")
    }

    /// Write dirty grain tables (each to both directories) after the files are long enough.
    fn write_tables(&mut self) -> Result<()> {
        for (i, f) in self.files.iter().enumerate() {
            if f.len()? < self.min_len[i] {
                f.set_len(self.min_len[i])?;
            }
        }
        // QEMU writes whole grains (zeros around the data): allocate them the same way, so
        // the image takes the same disk space. Best effort: not every file system can.
        for (fi, host, len) in self.fresh.drain(..) {
            let _ = self.files[fi].fallocate(crate::file::Falloc::Allocate, host, len);
        }
        let mut writes = Vec::new();
        for (&(ei, l1i), t) in self.gts.iter_mut().filter(|(_, t)| t.dirty) {
            t.dirty = false;
            let mut raw = Vec::with_capacity(t.entries.len() * 4);
            for v in &t.entries {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            writes.push((ei, l1i, raw));
        }
        for (ei, l1i, raw) in writes {
            let s = self.sparse(ei);
            let mut at = vec![s.l1[l1i as usize] * 512];
            if let Some(b) = &s.l1_backup {
                if s.l1_backup_offset != 0 && b[l1i as usize] != 0 {
                    at.push(u64::from(b[l1i as usize]) * 512);
                }
            }
            let f = &self.files[self.extents[ei].file.0 as usize];
            for off in at {
                f.write_all_at(&raw, off, &format!("grain table at {off:#x}"))?;
            }
        }
        self.gts.retain(|_, t| t.dirty);
        Ok(())
    }
}

impl ImageWriter for VmdkWriter {
    fn allocate(&mut self, off: GuestOff, len: u64, out: &mut Vec<Placement>) -> Result<Ticket> {
        if off.0.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::InvalidArgument(format!(
                "write of {len} bytes at {off} is past the end of '{}'",
                self.files[0].path()
            )));
        }
        let mut grains = Vec::new();
        let mut pos = off.0;
        let end = off.0 + len;
        while pos < end {
            let ei = self.find(pos)?;
            let e = &self.extents[ei];
            let (file, rel, ext_end) = (e.file, pos - e.start, e.start.saturating_add(e.len()));
            let (host, n) = match &e.kind {
                ExtentKind::Flat { offset } => (offset.saturating_add(rel), end.min(ext_end) - pos),
                ExtentKind::Sparse(s) => {
                    if s.compressed {
                        return Err(unsupported(
                            "streamOptimized vmdk images take only compressed grains",
                        ));
                    }
                    let gb = s.grain_bytes();
                    let (g, in_g) = (rel / gb, rel % gb);
                    let n = (gb - in_g).min(end.min(ext_end) - pos);
                    let zero_grain = s.has_zero_grain;
                    let v = self.entry(ei, g)?;
                    let base = if v == 0 || (zero_grain && v == 1) {
                        if v == 0 {
                            self.track(ei, g);
                        }
                        let h = self.take_space(ei, gb, gb)?;
                        self.grow_to(ei, h + gb);
                        self.pending.insert((ei, g), h);
                        grains.push(NewGrain {
                            ei,
                            grain: g,
                            host: h,
                            marker: None,
                        });
                        h
                    } else {
                        u64::from(v) * 512
                    };
                    self.cover(ei, g, pos, n);
                    (base + in_g, n)
                }
            };
            let p = Placement {
                guest: GuestOff(pos),
                len: n,
                file,
                host: HostOff(host),
            };
            match out.last_mut() {
                Some(l)
                    if l.file == p.file
                        && l.host.plus(l.len) == p.host
                        && l.guest.plus(l.len) == p.guest =>
                {
                    l.len += n
                }
                _ => out.push(p),
            }
            pos += n;
        }
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(t, grains);
        Ok(Ticket(t))
    }

    fn compression_unit(&self) -> Option<(u64, crate::extent::Codec)> {
        let s = self.extents.iter().find_map(Extent::sparse)?;
        s.compressed
            .then_some((s.grain_bytes(), crate::extent::Codec::ZlibStream))
    }

    fn backing_fills(&mut self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (&(ei, g), done) in &self.partial {
            let e = &self.extents[ei];
            let gb = self.sparse(ei).grain_bytes();
            let start = e.start + g * gb;
            let end = start + self.grain_len(ei, g);
            let mut done = done.clone();
            done.sort_unstable();
            let mut pos = start;
            for (o, n) in done {
                if o > pos {
                    out.push((pos, o - pos));
                }
                pos = pos.max(o + n);
            }
            if pos < end {
                out.push((pos, end - pos));
            }
        }
        out
    }

    fn compressed_writes_are_plain(&self) -> bool {
        // QEMU writes sparse grains plainly; flat extents refuse (no cluster size).
        !self.always_compressed() && self.extents.iter().all(|e| e.sparse().is_some())
    }

    fn always_compressed(&self) -> bool {
        self.extents
            .iter()
            .any(|e| e.sparse().is_some_and(|s| s.compressed))
    }

    fn allocate_compressed(&mut self, off: GuestOff, clen: u64) -> Result<(Placement, Ticket)> {
        let ei = self.find(off.0)?;
        let e = &self.extents[ei];
        let file = e.file;
        let rel = off.0 - e.start;
        let Some(s) = e.sparse().filter(|s| s.compressed && s.has_marker) else {
            return Err(unsupported(
                "Compression is only supported for streamOptimized vmdk images",
            ));
        };
        let (gb, zero_grain) = (s.grain_bytes(), s.has_zero_grain);
        if !rel.is_multiple_of(gb) || clen == 0 || clen > u64::from(u32::MAX) {
            return Err(Error::InvalidArgument(format!(
                "bad compressed write: {clen} bytes for {off}"
            )));
        }
        let g = rel / gb;
        let v = self.entry(ei, g)?;
        if v != 0 && !(zero_grain && v == 1) {
            return Err(Error::InvalidArgument(
                "Could not write to allocated cluster for streamOptimized".into(),
            ));
        }
        let host = self.take_space(ei, MARKER_LEN + clen, 512)?;
        // QEMU writes the whole grain's worth of zeros before the compressed bytes.
        self.grow_to(ei, host + gb);
        self.next[ei] = self.next[ei].div_ceil(512) * 512;
        self.pending.insert((ei, g), host);
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(
            t,
            vec![NewGrain {
                ei,
                grain: g,
                host,
                marker: Some((off.0 >> 9, clen as u32)),
            }],
        );
        Ok((
            Placement {
                guest: off,
                len: clen,
                file,
                host: HostOff(host + MARKER_LEN),
            },
            Ticket(t),
        ))
    }

    fn release_unwritten(&mut self, ticket: Ticket, zeros: &[(u64, u64)]) -> Result<()> {
        let Some(grains) = self.tickets.get(&ticket.0).cloned() else {
            return Ok(());
        };
        let mut keep = Vec::new();
        for ng in grains {
            let e = &self.extents[ng.ei];
            let Some(s) = e.sparse() else {
                keep.push(ng);
                continue;
            };
            let start = e.start + ng.grain * s.grain_bytes();
            let end = (start + s.grain_bytes()).min(e.start.saturating_add(e.len()));
            let covered: u64 = zeros
                .iter()
                .map(|&(z, l)| (z + l).min(end).saturating_sub(z.max(start)))
                .sum();
            if ng.marker.is_none() && covered >= end - start {
                // Never written: the grain stays unallocated (its space is left unused, as
                // appending allocation cannot take it back once later grains follow).
                self.pending.remove(&(ng.ei, ng.grain));
                if self.next[ng.ei] == ng.host + s.grain_bytes() {
                    self.next[ng.ei] = ng.host;
                    let fi = e.file.0 as usize;
                    let orig = self.files[fi].len()?;
                    if self.min_len[fi] == ng.host + s.grain_bytes() {
                        self.min_len[fi] = orig.max(ng.host);
                    }
                }
            } else {
                keep.push(ng);
            }
        }
        self.tickets.insert(ticket.0, keep);
        Ok(())
    }

    fn commit(&mut self, tickets: &[Ticket]) -> Result<()> {
        for t in tickets {
            let Some(grains) = self.tickets.remove(&t.0) else {
                continue;
            };
            for ng in grains {
                if self.pending.remove(&(ng.ei, ng.grain)).is_none() {
                    continue;
                }
                if let Some((lba, size)) = ng.marker {
                    let mut m = [0u8; 12];
                    m[..8].copy_from_slice(&lba.to_le_bytes());
                    m[8..].copy_from_slice(&size.to_le_bytes());
                    let f = &self.files[self.extents[ng.ei].file.0 as usize];
                    f.write_all_at(&m, ng.host, "grain marker")?;
                }
                self.set_entry(ng.ei, ng.grain, (ng.host / 512) as u32)?;
                let gb = self.sparse(ng.ei).grain_bytes();
                self.fresh
                    .push((self.extents[ng.ei].file.0 as usize, ng.host, gb));
            }
            self.update_cid()?;
        }
        if self.gts.values().filter(|t| t.dirty).count() > MAX_DIRTY_GT {
            self.write_tables()?;
        }
        Ok(())
    }

    fn zero(
        &mut self,
        off: GuestOff,
        len: u64,
        may_unmap: bool,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        let mut pos = off.0;
        let end = off.0.saturating_add(len).min(self.size);
        while pos < end {
            let ei = self.find(pos)?;
            let e = &self.extents[ei];
            let (file, rel, ext_end) = (e.file, pos - e.start, e.start.saturating_add(e.len()));
            match &e.kind {
                ExtentKind::Flat { offset } => {
                    let n = end.min(ext_end) - pos;
                    let host = HostOff(offset.saturating_add(rel));
                    // QEMU's vmdk cannot zero a flat extent; its block layer writes zeros.
                    let _ = may_unmap;
                    out.push(Action::WriteZeroes { file, host, len: n });
                    pos += n;
                }
                ExtentKind::Sparse(s) => {
                    let gb = s.grain_bytes();
                    let (g, in_g) = (rel / gb, rel % gb);
                    let n = (gb - in_g).min(end.min(ext_end) - pos);
                    let whole = in_g == 0 && n == gb.min(ext_end - pos);
                    let (zero_grain, compressed) = (s.has_zero_grain, s.compressed);
                    let v = self.entry(ei, g)?;
                    let unallocated = v == 0 || (zero_grain && v == 1);
                    if zero_grain && whole {
                        if v != 1 {
                            self.set_entry(ei, g, 1)?;
                            self.update_cid()?;
                        }
                    } else if unallocated {
                        if compressed {
                            if self.backed && v == 0 {
                                return Err(unsupported(
                                    "zeroing an unallocated streamOptimized grain over a backing file is not supported by rimg yet",
                                ));
                            }
                            // QEMU writes a compressed grain of zeros; left unallocated, the
                            // grain reads as zeros all the same.
                        } else {
                            // QEMU cannot zero here and its block layer writes zeros, which
                            // allocates the grain: a fresh grain past the end of the file
                            // reads as zeros without writing any.
                            let h = self.take_space(ei, gb, gb)?;
                            self.grow_to(ei, h + gb);
                            self.set_entry(ei, g, (h / 512) as u32)?;
                            self.fresh.push((file.0 as usize, h, gb));
                            if v == 0 {
                                self.track(ei, g);
                            }
                            self.cover(ei, g, pos, n);
                            self.update_cid()?;
                        }
                    } else if compressed {
                        return Err(Error::InvalidArgument(
                            "Could not write to allocated cluster for streamOptimized".into(),
                        ));
                    } else {
                        out.push(Action::ZeroRange {
                            file,
                            host: HostOff(u64::from(v) * 512 + in_g),
                            len: n,
                        });
                        self.cover(ei, g, pos, n);
                    }
                    pos += n;
                }
            }
        }
        Ok(())
    }

    fn resize(&mut self, _new_size: u64, _prealloc: Preallocation) -> Result<Vec<Action>> {
        Err(unsupported("Image format driver does not support resize"))
    }

    fn flush(&mut self) -> Result<()> {
        self.check_filled()?;
        self.write_tables()
    }

    fn close(mut self: Box<Self>) -> Result<()> {
        self.check_filled()?;
        self.write_tables()?;
        // As QEMU does at the end of a compressed stream: extent files end on a sector.
        for (ei, e) in self.extents.iter().enumerate() {
            if e.sparse().is_some_and(|s| s.compressed) {
                let _ = ei;
                let f = &self.files[e.file.0 as usize];
                let len = f.len()?;
                if !len.is_multiple_of(512) {
                    f.set_len(len.div_ceil(512) * 512)?;
                }
            }
        }
        Ok(())
    }
}
