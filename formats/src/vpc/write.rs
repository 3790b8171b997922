//! Creating VHDs and writing to them.
//!
//! Dynamic disks grow at the end: a new block goes where the trailing footer was. The
//! engine writes the block's data first; `commit` then writes the block's bitmap (all ones,
//! as QEMU does), the footer after the last block and finally the BAT entries, so a crash
//! leaves at worst an unreferenced block.

use std::collections::HashMap;
use std::sync::Arc;

use super::footer::{self, BAT_UNUSED, FOOTER_SIZE, TYPE_DYNAMIC, TYPE_FIXED};
use super::{all_options, check_prealloc, force_size, no_resize, Bat};
use crate::driver::{Action, CreateSpec, ImageWriter, Placement, Preallocation, Ticket};
use crate::error::{Error, Result};
use crate::file::FileLayer;
use crate::types::{FileId, GuestOff, HostOff};

/// Random bytes for the disk's UUID.
fn random_uuid() -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: `b` is a valid, writable buffer of `b.len()` bytes for the whole call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to the clock: a UUID only needs to be unique, not secret.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&t.to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// Seconds since the VHD epoch.
fn vhd_timestamp() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now.saturating_sub(footer::VHD_EPOCH) as u32
}

/// `create -f vpc`, in QEMU's order: the file is created (empty) first, then the options
/// are checked, then the structures are written.
pub(super) fn create(spec: &CreateSpec) -> Result<Vec<Action>> {
    spec.options.validate(&all_options())?;
    if let Some(v) = spec.options.get("preallocation") {
        if Preallocation::parse(v).is_none() {
            return Err(Error::InvalidArgument(format!(
                "invalid parameter value: {v}"
            )));
        }
    }
    let file = FileLayer::create(&spec.path)?;
    check_prealloc(&spec.options)?;
    let disk_type = match spec.options.get("subformat") {
        None | Some("dynamic") => TYPE_DYNAMIC,
        Some("fixed") => TYPE_FIXED,
        Some(v) => {
            return Err(Error::InvalidArgument(format!(
                "Parameter 'subformat' does not accept value '{v}'"
            )))
        }
    };
    let force = force_size(&spec.options);
    let too_large =
        || Error::InvalidArgument("The image size is too large for file format 'vpc'".into());
    let (size, chs) = footer::rounded_size(spec.size, force).ok_or_else(too_large)?;
    let foot = footer::build_footer(size, chs, disk_type, force, vhd_timestamp(), random_uuid());
    if disk_type == TYPE_FIXED {
        let total = size + FOOTER_SIZE as u64;
        if total > i64::MAX as u64 {
            return Err(too_large());
        }
        file.set_len(total)?;
        // Like QEMU's file layer growing an empty file: allocate the first block.
        let first = size.min(4096) as usize;
        if first > 0 {
            file.write_all_at(&vec![0u8; first], 0, "first block")?;
        }
        file.write_all_at(&foot, size, "VHD footer")?;
        return Ok(Vec::new());
    }
    let sectors = size / 512;
    let per_block = footer::DEFAULT_BLOCK as u64 / 512;
    let entries = sectors.div_ceil(per_block);
    let bat_bytes = (entries * 4).div_ceil(512) * 512;
    let bat_at = 3 * 512u64;
    file.write_all_at(&foot, 0, "VHD footer copy")?;
    file.write_all_at(&foot, bat_at + bat_bytes, "VHD footer")?;
    file.write_all_at(&vec![0xffu8; bat_bytes as usize], bat_at, "VHD BAT")?;
    let header = footer::build_dyn_header(bat_at, entries as u32, footer::DEFAULT_BLOCK);
    file.write_all_at(&header, 512, "dynamic VHD header")?;
    Ok(Vec::new())
}

/// Writer of a fixed disk: the identity, like raw, but never past the guest area (the
/// footer follows it).
pub(super) struct FixedWriter {
    pub(super) file: Arc<FileLayer>,
    pub(super) size: u64,
}

/// The error of a write past the virtual size.
fn past_end(file: &FileLayer, off: u64, len: u64) -> Error {
    Error::InvalidArgument(format!(
        "write of {len} bytes at {off:#x} is past the end of '{}'",
        file.path()
    ))
}

impl ImageWriter for FixedWriter {
    fn allocate(&mut self, off: GuestOff, len: u64, out: &mut Vec<Placement>) -> Result<Ticket> {
        if off.0.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(past_end(&self.file, off.0, len));
        }
        out.push(Placement {
            guest: off,
            len,
            file: FileId(0),
            host: HostOff(off.0),
        });
        Ok(Ticket(0))
    }

    fn commit(&mut self, _tickets: &[Ticket]) -> Result<()> {
        Ok(())
    }

    fn zero(
        &mut self,
        off: GuestOff,
        len: u64,
        may_unmap: bool,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        if off.0.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(past_end(&self.file, off.0, len));
        }
        out.push(Action::zeroing(
            &self.file,
            FileId(0),
            HostOff(off.0),
            len,
            may_unmap,
        ));
        Ok(())
    }

    fn resize(&mut self, _new_size: u64, _prealloc: Preallocation) -> Result<Vec<Action>> {
        no_resize()
    }

    fn flush(&mut self) -> Result<()> {
        self.file.sync()
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.file.sync()
    }
}

/// Writer of a dynamic disk.
pub(super) struct DynamicWriter {
    file: Arc<FileLayer>,
    size: u64,
    /// the footer bytes, rewritten after the last block
    footer: [u8; FOOTER_SIZE],
    /// the BAT as published on disk
    bat: Bat,
    /// blocks allocated but not committed: index → bitmap sector
    pending: HashMap<u32, u32>,
    /// the new blocks of each open ticket
    tickets: HashMap<u64, Vec<u32>>,
    next_ticket: u64,
    /// end of the last allocated block (committed or not)
    end: u64,
    /// whether the footer at the end and the BAT are up to date on disk
    clean: bool,
}

impl DynamicWriter {
    pub(super) fn new(
        file: Arc<FileLayer>,
        size: u64,
        footer: [u8; FOOTER_SIZE],
        bat: Bat,
    ) -> DynamicWriter {
        let end = bat.free_offset;
        DynamicWriter {
            file,
            size,
            footer,
            bat,
            pending: HashMap::new(),
            tickets: HashMap::new(),
            next_ticket: 1,
            end,
            clean: true,
        }
    }

    /// The bitmap sector of block `idx`, published or pending.
    fn block(&self, idx: u32) -> Option<u32> {
        match self.bat.entries.get(idx as usize) {
            Some(&e) if e != BAT_UNUSED => Some(e),
            _ => self.pending.get(&idx).copied(),
        }
    }

    fn block_len(&self) -> u64 {
        self.bat.bitmap_size + self.bat.block_size
    }
}

impl ImageWriter for DynamicWriter {
    fn allocate(&mut self, off: GuestOff, len: u64, out: &mut Vec<Placement>) -> Result<Ticket> {
        if off.0.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(past_end(&self.file, off.0, len));
        }
        let bs = self.bat.block_size;
        let mut fresh = Vec::new();
        let mut pos = off.0;
        let end = off.0 + len;
        while pos < end {
            let idx = (pos / bs) as u32;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            if idx as usize >= self.bat.entries.len() {
                return Err(past_end(&self.file, pos, n));
            }
            let sector = match self.block(idx) {
                Some(s) => s,
                None => {
                    if !self.end.is_multiple_of(512) || self.end / 512 >= BAT_UNUSED as u64 {
                        return Err(Error::Unsupported(format!(
                            "'{}': no room for another VHD block",
                            self.file.path()
                        )));
                    }
                    let s = (self.end / 512) as u32;
                    self.end += self.block_len();
                    self.pending.insert(idx, s);
                    fresh.push(idx);
                    s
                }
            };
            push_placement(
                out,
                Placement {
                    guest: GuestOff(pos),
                    len: n,
                    file: FileId(0),
                    host: HostOff(sector as u64 * 512 + self.bat.bitmap_size + in_block),
                },
            );
            pos += n;
        }
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(t, fresh);
        Ok(Ticket(t))
    }

    fn release_unwritten(&mut self, ticket: Ticket, zeros: &[(u64, u64)]) -> Result<()> {
        let Some(fresh) = self.tickets.get_mut(&ticket.0) else {
            return Ok(());
        };
        let bs = self.bat.block_size;
        let size = self.size;
        let block_len = self.bat.bitmap_size + bs;
        let mut keep = Vec::with_capacity(fresh.len());
        for &idx in fresh.iter() {
            let (s, e) = (idx as u64 * bs, ((idx as u64 + 1) * bs).min(size));
            let covered: u64 = zeros
                .iter()
                .map(|&(zs, zl)| (zs + zl).min(e).saturating_sub(zs.max(s)))
                .sum();
            if covered < e - s {
                keep.push(idx);
                continue;
            }
            if let Some(sector) = self.pending.remove(&idx) {
                // The last block can be given back; others stay as holes in the file.
                if sector as u64 * 512 + block_len == self.end {
                    self.end -= block_len;
                }
            }
        }
        *fresh = keep;
        Ok(())
    }

    fn commit(&mut self, tickets: &[Ticket]) -> Result<()> {
        let mut blocks = Vec::new();
        for t in tickets {
            if let Some(b) = self.tickets.remove(&t.0) {
                blocks.extend(b);
            }
        }
        if blocks.is_empty() {
            return Ok(());
        }
        let bitmap = vec![0xffu8; self.bat.bitmap_size as usize];
        for &idx in &blocks {
            if let Some(&sector) = self.pending.get(&idx) {
                self.file
                    .write_all_at(&bitmap, sector as u64 * 512, "VHD block bitmap")?;
            }
        }
        self.file
            .write_all_at(&self.footer, self.end, "VHD footer")?;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for &idx in &blocks {
            if let Some(sector) = self.pending.remove(&idx) {
                self.bat.entries[idx as usize] = sector;
                lo = lo.min(idx as usize);
                hi = hi.max(idx as usize + 1);
            }
        }
        if lo < hi {
            let bytes: Vec<u8> = self.bat.entries[lo..hi]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            self.file.write_all_at(
                &bytes,
                self.bat.table_offset + lo as u64 * 4,
                "VHD block allocation table",
            )?;
        }
        self.clean = false;
        Ok(())
    }

    fn zero(
        &mut self,
        off: GuestOff,
        len: u64,
        may_unmap: bool,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        if off.0.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(past_end(&self.file, off.0, len));
        }
        // Unallocated blocks already read as zeros (a VHD has no backing file here);
        // allocated ones get their bytes zeroed.
        let bs = self.bat.block_size;
        let mut pos = off.0;
        let end = off.0 + len;
        while pos < end {
            let idx = (pos / bs) as u32;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            if let Some(sector) = self.block(idx) {
                let host = HostOff(sector as u64 * 512 + self.bat.bitmap_size + in_block);
                let file = FileId(0);
                out.push(if may_unmap {
                    Action::PunchHole { file, host, len: n }
                } else {
                    Action::ZeroRange { file, host, len: n }
                });
            }
            pos += n;
        }
        Ok(())
    }

    fn resize(&mut self, _new_size: u64, _prealloc: Preallocation) -> Result<Vec<Action>> {
        no_resize()
    }

    fn flush(&mut self) -> Result<()> {
        if !self.clean {
            self.file.sync()?;
            self.clean = true;
        }
        Ok(())
    }

    fn close(mut self: Box<Self>) -> Result<()> {
        self.flush()
    }
}

/// Append `p`, merging with the previous placement when contiguous in guest and host.
fn push_placement(out: &mut Vec<Placement>, p: Placement) {
    if let Some(last) = out.last_mut() {
        if last.file == p.file
            && last.guest.0 + last.len == p.guest.0
            && last.host.0 + last.len == p.host.0
        {
            last.len += p.len;
            return;
        }
    }
    out.push(p);
}
