//! The vhdx writer.
//!
//! Writes to a fully present block go in place. Any other block gets a new payload block
//! at the end of the file (1 MiB aligned, as QEMU allocates), whose unwritten parts read as
//! zeros because that space has never been written. A new block's BAT entry is published
//! (FULLY_PRESENT) only once every allocation touching it has committed and at least one
//! wrote data; a block the engine found all zeros is not published and its space is handed
//! to the next allocation, so the layout stays that of an in-order copy of the data blocks.
//!
//! Before the first write the headers are updated (new file and data write GUIDs), as the
//! specification asks. BAT sectors are written on flush (and every few hundred changed
//! sectors), after the file has been extended over every published block, through the log
//! as QEMU writes them: one log entry per new block, synced, then the BAT, then the log
//! marked empty.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::bat::Bat;
use super::header::{new_guid, Guid, Headers, MIB};
use super::{log, state, Geometry, BAT_OFFSET_MASK};
use crate::driver::{Action, ImageWriter, Placement, Preallocation, Ticket};
use crate::error::{Error, Result};
use crate::file::FileLayer;
use crate::types::{FileId, GuestOff, HostOff};

/// A new block not yet published.
struct Pending {
    host: u64,
    /// uncommitted allocations touching it
    users: u32,
    /// some committed allocation wrote data into it
    has_data: bool,
}

/// BAT entries per 4 KiB sector of the BAT.
const ENTRIES_PER_SECTOR: u64 = 512;
/// Bytes of a log sector (and of a BAT sector).
const LOG_SECTOR: u64 = 4096;
/// Dirty BAT sectors kept before writing them out.
const MAX_DIRTY: usize = 256;

/// Writer of one vhdx image (owned by the engine's metadata thread).
pub(super) struct VhdxWriter {
    file: Arc<FileLayer>,
    geo: Geometry,
    bat: Arc<Mutex<Bat>>,
    headers: Headers,
    session: Guid,
    headers_updated: bool,
    /// where the next new block goes
    next_free: u64,
    /// space of blocks dropped unpublished, reused first
    free: BTreeSet<u64>,
    pending: HashMap<u64, Pending>,
    /// ticket -> (block, guest start, guest end) of each new block it touches
    tickets: HashMap<u64, Vec<(u64, u64, u64)>>,
    /// ticket -> blocks its data was all zeros in
    zero_in: HashMap<u64, HashSet<u64>>,
    /// BAT sectors changed in memory
    dirty: BTreeSet<u64>,
    /// the file must be at least this long (published blocks)
    file_end: u64,
    /// BAT indexes of blocks published since the BAT was last written, in order
    published: Vec<u64>,
    /// next log sector to write
    log_pos: u64,
    next_ticket: u64,
}

impl VhdxWriter {
    pub(super) fn new(
        file: Arc<FileLayer>,
        geo: Geometry,
        bat: Arc<Mutex<Bat>>,
        headers: Headers,
    ) -> Result<VhdxWriter> {
        let len = file.len()?;
        Ok(VhdxWriter {
            file,
            geo,
            bat,
            headers,
            session: new_guid(),
            headers_updated: false,
            next_free: len.next_multiple_of(MIB),
            free: BTreeSet::new(),
            pending: HashMap::new(),
            tickets: HashMap::new(),
            zero_in: HashMap::new(),
            dirty: BTreeSet::new(),
            file_end: len,
            published: Vec::new(),
            log_pos: 0,
            next_ticket: 0,
        })
    }

    fn bat_lock(&self) -> Result<std::sync::MutexGuard<'_, Bat>> {
        self.bat.lock().map_err(|_| self.poisoned())
    }

    fn poisoned(&self) -> Error {
        Error::Corrupt {
            path: self.file.path().to_string(),
            what: "vhdx BAT lock poisoned".into(),
        }
    }

    /// Host offset of block `b` when it is fully present or pending.
    fn host_of(&self, b: u64) -> Result<Option<u64>> {
        if let Some(p) = self.pending.get(&b) {
            return Ok(Some(p.host));
        }
        let e = self.bat_lock()?.get(self.geo.bat_index(b))?;
        Ok((e & 7 == state::FULLY_PRESENT).then_some(e & BAT_OFFSET_MASK))
    }

    fn set_entry(&mut self, b: u64, entry: u64) -> Result<()> {
        let i = self.geo.bat_index(b);
        self.bat_lock()?.set(i, entry)?;
        self.dirty.insert(i / ENTRIES_PER_SECTOR);
        self.published.push(i);
        Ok(())
    }

    /// The 4 KiB BAT sector `s` as it is in memory.
    fn bat_sector(&self, s: u64) -> Result<Vec<u8>> {
        let mut bat = self.bat_lock()?;
        let mut raw = Vec::with_capacity(4096);
        for i in s * ENTRIES_PER_SECTOR..(s + 1) * ENTRIES_PER_SECTOR {
            let e = bat.get(i)?;
            raw.extend_from_slice(&e.to_le_bytes());
        }
        Ok(raw)
    }

    /// Publish the BAT changes: after extending the file over every published block, each
    /// new block's BAT sector goes through the log first (one entry per block, as QEMU
    /// writes them), then to the BAT, then the log is marked empty again. A crash in
    /// between leaves a log that the next read-write open replays.
    fn write_bat(&mut self) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        if self.file.len()? < self.file_end {
            self.file.set_len(self.file_end)?;
        }
        let dirty = std::mem::take(&mut self.dirty);
        let mut events = std::mem::take(&mut self.published);
        // Sectors changed without a new block (none today) still go through the log.
        for s in &dirty {
            if !events.iter().any(|i| i / ENTRIES_PER_SECTOR == *s) {
                events.push(s * ENTRIES_PER_SECTOR);
            }
        }
        let h = self.headers.cur().clone();
        let log_sectors = u64::from(h.log_length) / LOG_SECTOR;
        // A sequence must fit in the log with room to spare.
        let per_batch = (log_sectors / 2).saturating_sub(1).max(1) as usize;
        for batch in events.chunks(per_batch) {
            let guid = new_guid();
            self.headers
                .update_both(&self.file, self.session, None, Some(guid))?;
            let file_len = self.file.len()?;
            let mut sectors = BTreeSet::new();
            for (k, i) in batch.iter().enumerate() {
                let s = i / ENTRIES_PER_SECTOR;
                sectors.insert(s);
                let data = self.bat_sector(s)?;
                let entry = log::build_entry(
                    &guid,
                    k as u64 + 1,
                    file_len,
                    &[(self.geo.bat_offset + s * LOG_SECTOR, data)],
                );
                let n = entry.len() as u64 / LOG_SECTOR;
                if self.log_pos + n > log_sectors {
                    self.log_pos = 0;
                }
                self.file.write_all_at(
                    &entry,
                    h.log_offset + self.log_pos * LOG_SECTOR,
                    "vhdx log",
                )?;
                self.log_pos += n;
            }
            self.file.sync()?;
            for s in sectors {
                let data = self.bat_sector(s)?;
                self.file
                    .write_all_at(&data, self.geo.bat_offset + s * LOG_SECTOR, "vhdx BAT")?;
            }
            self.file.sync()?;
            self.headers
                .update_both(&self.file, self.session, None, Some([0; 16]))?;
        }
        Ok(())
    }

    fn first_write(&mut self) -> Result<()> {
        if !self.headers_updated {
            self.headers_updated = true;
            self.headers
                .update_both(&self.file, self.session, Some(new_guid()), None)?;
        }
        Ok(())
    }

    fn check_range(&self, off: GuestOff, len: u64) -> Result<()> {
        if off.0.checked_add(len).is_none_or(|e| e > self.geo.size) {
            return Err(Error::InvalidArgument(format!(
                "write of {len} bytes at {off} is past the end of '{}'",
                self.file.path()
            )));
        }
        Ok(())
    }
}

/// Whether `[start, end)` lies inside the union of the `(start, len)` ranges.
fn covered(zeros: &[(u64, u64)], start: u64, end: u64) -> bool {
    let mut got = 0;
    for &(s, l) in zeros {
        let (a, b) = (s.max(start), (s + l).min(end));
        if a < b {
            got += b - a;
        }
    }
    got >= end - start
}

impl ImageWriter for VhdxWriter {
    fn allocate(&mut self, off: GuestOff, len: u64, out: &mut Vec<Placement>) -> Result<Ticket> {
        self.check_range(off, len)?;
        self.first_write()?;
        let bs = self.geo.block_size;
        let t = self.next_ticket;
        self.next_ticket += 1;
        let mut touched = Vec::new();
        let mut pos = off.0;
        let end = off.0 + len;
        while pos < end {
            let b = pos / bs;
            let in_b = pos % bs;
            let n = (bs - in_b).min(end - pos);
            let host = if let Some(p) = self.pending.get_mut(&b) {
                p.users += 1;
                touched.push((b, pos, pos + n));
                p.host
            } else if let Some(h) = self.host_of(b)? {
                h
            } else if self.geo.bat_index(b) >= self.geo.bat_entries {
                return Err(Error::Corrupt {
                    path: self.file.path().to_string(),
                    what: format!("vhdx: the BAT has no entry for block {b}"),
                });
            } else {
                let host = match self.free.pop_first() {
                    Some(h) => h,
                    None => {
                        let h = self.next_free;
                        self.next_free += bs;
                        h
                    }
                };
                self.pending.insert(
                    b,
                    Pending {
                        host,
                        users: 1,
                        has_data: false,
                    },
                );
                touched.push((b, pos, pos + n));
                host
            };
            let p = Placement {
                guest: GuestOff(pos),
                len: n,
                file: FileId(0),
                host: HostOff(host + in_b),
            };
            match out.last_mut() {
                Some(last)
                    if last.host.plus(last.len) == p.host
                        && last.guest.plus(last.len) == p.guest =>
                {
                    last.len += n
                }
                _ => out.push(p),
            }
            pos += n;
        }
        self.tickets.insert(t, touched);
        Ok(Ticket(t))
    }

    fn release_unwritten(&mut self, ticket: Ticket, zeros: &[(u64, u64)]) -> Result<()> {
        let Some(touched) = self.tickets.get(&ticket.0) else {
            return Ok(());
        };
        let set: HashSet<u64> = touched
            .iter()
            .filter(|(_, s, e)| covered(zeros, *s, *e))
            .map(|(b, _, _)| *b)
            .collect();
        self.zero_in.insert(ticket.0, set);
        Ok(())
    }

    fn commit(&mut self, tickets: &[Ticket]) -> Result<()> {
        let bs = self.geo.block_size;
        for t in tickets {
            let Some(touched) = self.tickets.remove(&t.0) else {
                continue;
            };
            let zero = self.zero_in.remove(&t.0).unwrap_or_default();
            for (b, _, _) in touched {
                let Some(p) = self.pending.get_mut(&b) else {
                    continue;
                };
                p.has_data |= !zero.contains(&b);
                p.users -= 1;
                if p.users > 0 {
                    continue;
                }
                let p = self.pending.remove(&b).expect("present");
                if p.has_data {
                    self.file_end = self.file_end.max(p.host + bs);
                    self.set_entry(b, p.host | state::FULLY_PRESENT)?;
                } else {
                    self.free.insert(p.host);
                }
            }
        }
        if self.dirty.len() > MAX_DIRTY {
            self.write_bat()?;
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
        self.check_range(off, len)?;
        let bs = self.geo.block_size;
        let mut pos = off.0;
        let end = off.0 + len;
        while pos < end {
            let b = pos / bs;
            let in_b = pos % bs;
            let n = (bs - in_b).min(end - pos);
            // Blocks that are not present already read as zeros (no backing file).
            if let Some(h) = self.host_of(b)? {
                self.first_write()?;
                out.push(Action::zeroing(
                    &self.file,
                    FileId(0),
                    HostOff(h + in_b),
                    n,
                    may_unmap,
                ));
            }
            pos += n;
        }
        Ok(())
    }

    fn resize(&mut self, _new_size: u64, _prealloc: Preallocation) -> Result<Vec<Action>> {
        Err(Error::Unsupported(
            "Image format driver does not support resize".into(),
        ))
    }

    fn flush(&mut self) -> Result<()> {
        self.write_bat()
    }

    fn close(mut self: Box<Self>) -> Result<()> {
        self.write_bat()
    }
}

#[cfg(test)]
mod tests {
    use super::covered;

    #[test]
    fn coverage_of_zero_ranges() {
        assert!(covered(&[(0, 10), (10, 5)], 2, 15));
        assert!(!covered(&[(0, 10)], 2, 15));
        assert!(covered(&[(0, 100)], 20, 30));
    }
}
