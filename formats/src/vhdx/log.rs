//! The VHDX metadata log: finding the active sequence of entries and replaying it.
//!
//! The log is a circular buffer of 4 KiB sectors. An entry is a header sector (with up to
//! 126 descriptors), further descriptor sectors, then one data sector per data descriptor.
//! Entries are valid when their header, descriptors and whole-entry CRC-32C check out and
//! their log GUID is the current header's. The active sequence is the run of consecutive
//! valid entries (each numbered one higher than the last) whose first entry has the highest
//! sequence number. Replaying writes every descriptor's sector (or zeros) to its file offset.
//!
//! As in QEMU, an image whose log holds an active sequence can only be opened read-write
//! (which replays the log on disk); a read-only open is refused.

use super::header::{guid_at, le32, le64, Guid, MIB};
use crate::error::Result;
use crate::file::FileLayer;

const SECTOR: u64 = 4096;
const LOGE_SIG: u32 = 0x6567_6f6c; // "loge"
const DESC_SIG: u32 = 0x6373_6564; // "desc"
const ZERO_SIG: u32 = 0x6f72_657a; // "zero"
const DATA_SIG: u32 = 0x6174_6164; // "data"
/// Longest log entry read into memory. Real entries are a few sectors (QEMU writes two,
/// Hyper-V's log is 1 MiB); a longer one is treated as invalid rather than trusted with
/// memory.
const MAX_ENTRY: u64 = 64 << 20;

/// One descriptor of a log entry, with its data when it is a data descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// write this 4 KiB sector at the offset
    Data {
        /// file offset
        off: u64,
        /// the sector
        data: Vec<u8>,
    },
    /// write `len` zero bytes at the offset
    Zero {
        /// file offset
        off: u64,
        /// bytes
        len: u64,
    },
}

/// A valid log entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// sequence number
    pub seq: u64,
    /// the file must be at least this long for the entry to apply
    pub flushed_file_offset: u64,
    /// the size every structure of the file fits in after the entry
    pub last_file_offset: u64,
    /// what to write, in order
    pub writes: Vec<Write>,
    /// sectors the entry spans
    sectors: u64,
    /// every data sector carries the entry's sequence number
    data_ok: bool,
}

/// The log region of a file.
pub struct Log<'a> {
    file: &'a FileLayer,
    offset: u64,
    length: u64,
    guid: Guid,
}

impl<'a> Log<'a> {
    /// The log of `length` bytes at `offset`, valid for entries carrying `guid`.
    pub fn new(file: &'a FileLayer, offset: u64, length: u64, guid: Guid) -> Log<'a> {
        Log {
            file,
            offset,
            length,
            guid,
        }
    }

    fn sectors(&self) -> u64 {
        self.length / SECTOR
    }

    /// Sector `i` of the log (wrapping around its end).
    fn sector(&self, i: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; SECTOR as usize];
        let off = self.offset + (i % self.sectors()) * SECTOR;
        self.file.read_zero_filled(&mut b, off, "vhdx log sector")?;
        Ok(b)
    }

    /// The entry starting at sector `start`, if it is valid.
    fn entry_at(&self, start: u64) -> Result<Option<Entry>> {
        let first = self.sector(start)?;
        if le32(&first, 0) != LOGE_SIG {
            return Ok(None);
        }
        let entry_length = u64::from(le32(&first, 8));
        let seq = le64(&first, 16);
        let desc_count = u64::from(le32(&first, 24));
        if entry_length > self.length
            || entry_length > MAX_ENTRY
            || !entry_length.is_multiple_of(SECTOR)
            || seq == 0
            || guid_at(&first, 32) != self.guid
            || desc_count * 32 > entry_length
        {
            return Ok(None);
        }
        // The header takes the room of two descriptors in the first sector.
        let desc_sectors = (desc_count + 2).div_ceil(128);
        let sectors = entry_length / SECTOR;
        if sectors < desc_sectors {
            return Ok(None);
        }
        let mut whole = Vec::with_capacity(entry_length as usize);
        whole.extend_from_slice(&first);
        for k in 1..sectors {
            whole.extend_from_slice(&self.sector(start + k)?);
        }
        // QEMU reads the descriptors of an entry whose header is valid before it checks the
        // checksum, and a bad descriptor there fails the whole open.
        for d in 0..desc_count {
            let o = (64 + 32 * d) as usize;
            let sig = le32(&whole, o);
            let ok = le64(&whole, o + 24) == seq
                && le64(&whole, o + 16).is_multiple_of(SECTOR)
                && (sig == DESC_SIG
                    || (sig == ZERO_SIG && le64(&whole, o + 8).is_multiple_of(SECTOR)));
            if !ok {
                return Err(super::einval(self.file.path()));
            }
        }
        if !super::header::checksum_ok(&whole, 4) {
            return Ok(None);
        }
        let mut writes = Vec::new();
        let mut data_ok = true;
        let mut data_sector = desc_sectors;
        for d in 0..desc_count {
            let o = (64 + 32 * d) as usize;
            let file_off = le64(&whole, o + 16);
            if le32(&whole, o) == ZERO_SIG {
                let len = le64(&whole, o + 8);
                writes.push(Write::Zero { off: file_off, len });
                continue;
            }
            if data_sector >= sectors {
                return Ok(None);
            }
            let s = (data_sector * SECTOR) as usize;
            let ds = &whole[s..s + SECTOR as usize];
            // The data sector's sequence number is only compared when replaying (QEMU
            // fails the replay then); its signature is not looked at.
            let dseq = (u64::from(le32(ds, 4)) << 32) | u64::from(le32(ds, 4092));
            data_ok &= dseq == seq;
            let mut data = Vec::with_capacity(SECTOR as usize);
            data.extend_from_slice(&whole[o + 8..o + 16]);
            data.extend_from_slice(&ds[8..4092]);
            data.extend_from_slice(&whole[o + 4..o + 8]);
            writes.push(Write::Data {
                off: file_off,
                data,
            });
            data_sector += 1;
        }
        Ok(Some(Entry {
            seq,
            flushed_file_offset: le64(&first, 48),
            last_file_offset: le64(&first, 56),
            writes,
            sectors,
            data_ok,
        }))
    }

    /// The active sequence: from every starting sector, the run of valid entries numbered
    /// one after the other; the run whose first entry has the highest number wins.
    pub fn active_sequence(&self) -> Result<Vec<Entry>> {
        let n = self.sectors();
        let mut best: Vec<Entry> = Vec::new();
        let mut start = 0;
        while start < n {
            let Some(e) = self.entry_at(start)? else {
                start += 1;
                continue;
            };
            let mut run = vec![e];
            let mut pos = start + run[0].sectors;
            let mut used = run[0].sectors;
            while used < n {
                match self.entry_at(pos)? {
                    Some(next) if next.seq == run.last().map_or(0, |l| l.seq) + 1 => {
                        pos += next.sectors;
                        used += next.sectors;
                        run.push(next);
                    }
                    _ => break,
                }
            }
            if best.first().is_none_or(|b| run[0].seq > b.seq) {
                best = run;
            }
            // Continue after this run (its entries cannot start a better one).
            start = (start + used).max(start + 1);
        }
        Ok(best)
    }
}

/// Whether the header's log fields are acceptable, and whether a log may be present
/// (`Ok(false)`: no log to look at).
pub fn log_present(
    path: &str,
    log_offset: u64,
    log_length: u32,
    log_version: u16,
    log_guid: &Guid,
) -> Result<bool> {
    let einval = || super::einval(path);
    if log_offset < MIB || !log_offset.is_multiple_of(MIB) || log_version != 0 {
        return Err(einval());
    }
    if *log_guid == [0u8; 16] || log_length == 0 {
        return Ok(false);
    }
    if !u64::from(log_length).is_multiple_of(MIB) {
        return Err(einval());
    }
    Ok(true)
}

/// Check that `entries` can be replayed as QEMU checks them: an entry needing a longer
/// file than there is, or with a data sector of another sequence, refuses the whole
/// replay (before anything is written here; QEMU finds out part way).
pub fn validate(file: &FileLayer, entries: &[Entry]) -> Result<()> {
    let len = file.len()?;
    for e in entries {
        if e.flushed_file_offset > len || !e.data_ok {
            return Err(super::einval(file.path()));
        }
        for w in &e.writes {
            let end = match w {
                Write::Data { off, .. } => off.checked_add(SECTOR),
                Write::Zero { off, len } => off.checked_add(*len),
            };
            if end.is_none_or(|end| end > i64::MAX as u64) {
                // QEMU's block layer refuses such a request.
                return Err(open_error(
                    file,
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
        }
    }
    Ok(())
}

/// `Could not open 'x': <why>`, as QEMU reports an open whose replay failed.
fn open_error(file: &FileLayer, e: std::io::Error) -> crate::error::Error {
    let path = file.path();
    crate::error::Error::Corrupt {
        path: path.to_string(),
        what: format!("Could not open '{path}': {}", crate::error::strerror(&e)),
    }
}

/// Replay `entries` on disk, in order (after [`validate`]). Zeros past the end of the file
/// are made by growing the file, which reads as zeros there. A failed write is reported
/// as QEMU reports it (`Could not open 'x': File too large`).
pub fn replay(file: &FileLayer, entries: &[Entry]) -> Result<()> {
    validate(file, entries)?;
    replay_writes(file, entries).map_err(|e| match e {
        crate::error::Error::Io { source, .. } => open_error(file, source),
        other => other,
    })
}

fn replay_writes(file: &FileLayer, entries: &[Entry]) -> Result<()> {
    for e in entries {
        for w in &e.writes {
            match w {
                Write::Data { off, data } => file.write_all_at(data, *off, "vhdx log replay")?,
                Write::Zero { off, len } => {
                    let cur = file.len()?;
                    let end = off + len;
                    let inside = end.min(cur).saturating_sub(*off);
                    let zeros = vec![0u8; inside.min(MIB) as usize];
                    let mut done = 0;
                    while done < inside {
                        let n = (inside - done).min(MIB);
                        file.write_all_at(&zeros[..n as usize], off + done, "vhdx log replay")?;
                        done += n;
                    }
                    if end > cur {
                        file.set_len(end)?;
                    }
                }
            }
        }
        // QEMU grows the file to the entry's last offset rounded up to 1 MiB, when that
        // offset is not already a multiple of 1 MiB, and ignores a failure to.
        let cur = file.len()?;
        if cur < e.last_file_offset && !e.last_file_offset.is_multiple_of(MIB) {
            let _ = file.set_len(e.last_file_offset.div_ceil(MIB) * MIB);
        }
    }
    file.sync()
}

/// Build one log entry (header, descriptors, data sectors) writing the 4 KiB `sectors` at
/// their offsets, for tests and tools that need a log to replay.
pub fn build_entry(guid: &Guid, seq: u64, file_len: u64, sectors: &[(u64, Vec<u8>)]) -> Vec<u8> {
    use super::header::{put32, put64, set_checksum};
    let n = sectors.len() as u64;
    let desc_sectors = (n + 2).div_ceil(128);
    let total = (desc_sectors + n) * SECTOR;
    let mut b = vec![0u8; total as usize];
    put32(&mut b, 0, LOGE_SIG);
    put32(&mut b, 8, total as u32);
    put64(&mut b, 16, seq);
    put32(&mut b, 24, n as u32);
    b[32..48].copy_from_slice(guid);
    put64(&mut b, 48, file_len);
    put64(&mut b, 56, file_len);
    for (i, (off, data)) in sectors.iter().enumerate() {
        let o = 64 + 32 * i;
        put32(&mut b, o, DESC_SIG);
        b[o + 4..o + 8].copy_from_slice(&data[4092..4096]);
        b[o + 8..o + 16].copy_from_slice(&data[0..8]);
        put64(&mut b, o + 16, *off);
        put64(&mut b, o + 24, seq);
        let s = ((desc_sectors + i as u64) * SECTOR) as usize;
        put32(&mut b, s, DATA_SIG);
        put32(&mut b, s + 4, (seq >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put32(&mut b, s + 4092, seq as u32);
    }
    set_checksum(&mut b, 4);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::FileOpen;

    #[test]
    fn finds_and_replays_an_entry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let guid = [7u8; 16];
        let mut sector = vec![0u8; 4096];
        sector[0] = 0xab;
        sector[4095] = 0xcd;
        sector[100] = 0x11;
        let entry = build_entry(&guid, 5, 4 * MIB, &[(2 * MIB + 4096, sector.clone())]);
        let mut img = vec![0u8; 4 * MIB as usize];
        img[MIB as usize..MIB as usize + entry.len()].copy_from_slice(&entry);
        std::fs::write(&p, &img).unwrap();
        let mut o = FileOpen::read_only();
        o.write = true;
        let f = FileLayer::open(p.to_str().unwrap(), &o).unwrap();
        let log = Log::new(&f, MIB, MIB, guid);
        let seq = log.active_sequence().unwrap();
        assert_eq!(seq.len(), 1);
        assert_eq!(seq[0].seq, 5);
        // A different GUID makes the entry invalid.
        assert!(Log::new(&f, MIB, MIB, [8; 16])
            .active_sequence()
            .unwrap()
            .is_empty());
        replay(&f, &seq).unwrap();
        let back = std::fs::read(&p).unwrap();
        let at = (2 * MIB + 4096) as usize;
        assert_eq!(&back[at..at + 4096], &sector[..]);
    }
}
