//! The vhdx format (Microsoft's MS-VHDX), as QEMU 10 reads and writes it.
//!
//! Split by concern: [`header`] (headers, region table, metadata, checksums), [`log`] (the
//! metadata log: search, replay, entries for the writer), [`bat`] (the BAT, loaded in chunks
//! on demand), `create` (options, `Formatting` line, new images), `write` (the writer: block
//! allocation, BAT updates through the log). This file: opening and mapping.
//! `docs/vhdx.md` lists what was measured of qemu-img 10.0.2.
//!
//! What QEMU does, and so rimg does:
//! - dynamic and fixed images are read; differencing images (`has_parent`) are refused
//!   ("Operation not supported" with a parent locator, "Invalid argument" without one), as
//!   are logical sector sizes other than 512;
//! - an image whose log holds entries to replay opens read-write only (the log is replayed
//!   on disk); a read-only open is refused with QEMU's message naming `check -r all`;
//! - BAT entries of present blocks must lie inside the file (reported on stderr as QEMU does;
//!   `check` counts them as corruptions instead of refusing the open);
//! - QEMU reports no allocation status for vhdx: `map`, `measure` and `compare -s` see the
//!   whole disk as data with no offset ([`Image::opaque_allocation`]); the extents given to
//!   the engine stay precise (zero blocks, and holes of the file inside present blocks, are
//!   zeros it need not read).

pub mod bat;
mod create;
pub mod header;
pub mod log;
mod write;

use std::sync::{Arc, Mutex};

use bat::Bat;

use crate::driver::{Action, CreateSpec, FormatDriver, Image, ImageWriter, OpenOptions};
use crate::error::{Error, Result};
use crate::extent::{push_merged, Extent};
use crate::file::FileLayer;
use crate::opts::{OptionDesc, OptionMap};
use crate::qcow2::CheckReport;
use crate::types::{FileId, GuestOff};

use header::Headers;

/// The vhdx driver.
pub struct VhdxDriver;

/// The one instance, listed in [`crate::registry::DRIVERS`].
pub static VHDX: VhdxDriver = VhdxDriver;

/// Payload block states (low 3 bits of a BAT entry).
pub mod state {
    /// never written: reads as zeros
    pub const NOT_PRESENT: u64 = 0;
    /// contents undefined: QEMU reads zeros
    pub const UNDEFINED: u64 = 1;
    /// reads as zeros
    pub const ZERO: u64 = 2;
    /// unmapped (trimmed): reads as zeros
    pub const UNMAPPED: u64 = 3;
    /// unmapped, as VHDX 0.95 numbered it
    pub const UNMAPPED_V095: u64 = 5;
    /// stored at the entry's file offset
    pub const FULLY_PRESENT: u64 = 6;
    /// differencing images only: the sector bitmap says which sectors are here
    pub const PARTIALLY_PRESENT: u64 = 7;
}

/// File offset bits of a BAT entry (1 MiB units in the upper 44 bits).
pub const BAT_OFFSET_MASK: u64 = 0xffff_ffff_fff0_0000;

/// QEMU's `Could not open 'x': Invalid argument` (the open failed without a message).
pub(crate) fn einval(path: &str) -> Error {
    Error::Corrupt {
        path: path.to_string(),
        what: format!("Could not open '{path}': Invalid argument"),
    }
}

/// QEMU's `Could not open 'x': Operation not supported`.
pub(crate) fn enotsup(path: &str) -> Error {
    Error::Corrupt {
        path: path.to_string(),
        what: format!("Could not open '{path}': Operation not supported"),
    }
}

/// Print a line on stderr as QEMU's `error_report` does inside the vhdx driver (prefixed
/// with the program name), e.g. for BAT entries past the end of the file.
fn error_report(msg: &str) {
    let prog = std::env::args()
        .next()
        .map(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or(a)
        })
        .unwrap_or_else(|| "rimg".into());
    eprintln!("{prog}: {msg}");
}

/// The geometry and tables of an open image.
#[derive(Clone, Debug)]
pub struct Geometry {
    /// bytes per payload block
    pub block_size: u64,
    /// payload blocks per sector bitmap block
    pub chunk_ratio: u64,
    /// virtual disk size
    pub size: u64,
    /// entries in the BAT (payload and sector bitmap entries)
    pub bat_entries: u64,
    /// file offset of the BAT
    pub bat_offset: u64,
    /// fixed image (blocks are never released)
    pub fixed: bool,
}

impl Geometry {
    /// Index in the BAT of payload block `block` (sector bitmap entries are interleaved).
    pub fn bat_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }
}

/// Entries of the BAT as QEMU counts them for an image without a parent (32-bit
/// arithmetic, as QEMU does it).
pub fn bat_entries(size: u64, block_size: u64, chunk_ratio: u64) -> u64 {
    let data_blocks = size.div_ceil(block_size) as u32;
    let bits = chunk_ratio.trailing_zeros();
    u64::from(data_blocks.wrapping_add(data_blocks.wrapping_sub(1) >> bits))
}

/// An open vhdx image.
pub struct VhdxImage {
    files: [Arc<FileLayer>; 1],
    geo: Geometry,
    bat: Arc<Mutex<Bat>>,
    headers: Headers,
    /// the log was replayed when the image was opened (read-write)
    replayed: bool,
    write: bool,
    /// regions that payload blocks must not overlap: (start, end)
    regions: Vec<(u64, u64)>,
}

impl FormatDriver for VhdxDriver {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    fn probe(&self, head: &[u8], _file_len: u64) -> u32 {
        if head.len() >= 8 && &head[..8] == b"vhdxfile" {
            100
        } else {
            0
        }
    }

    fn open(&self, file: Arc<FileLayer>, opts: &OpenOptions) -> Result<Box<dyn Image>> {
        if opts.snapshot.is_some() {
            return Err(Error::Snapshot(
                "Block format 'vhdx' used by device '' does not support temporarily loading internal snapshots"
                    .into(),
            ));
        }
        Ok(Box::new(VhdxImage::open(file, opts)?))
    }

    fn create_options(&self) -> &'static [OptionDesc] {
        create::VHDX_OPTIONS
    }

    fn formatting_line(&self, path: &str, size: u64, opts: &OptionMap) -> Option<String> {
        Some(create::formatting_line(path, size, opts))
    }

    fn create(&self, spec: &CreateSpec) -> Result<Vec<Action>> {
        create::create(spec)
    }

    fn measure(
        &self,
        _size: u64,
        _data: Option<&[(u64, u64)]>,
        _options: &OptionMap,
    ) -> Result<(u64, u64)> {
        Err(Error::Unsupported(
            "Block driver 'vhdx' does not support size measurement".into(),
        ))
    }
}

impl VhdxImage {
    /// Open and validate, in QEMU's order: signature, headers, log (replayed when
    /// writable), region table, metadata, BAT. Nothing is allocated beyond what the file
    /// holds.
    pub fn open(file: Arc<FileLayer>, opts: &OpenOptions) -> Result<VhdxImage> {
        let path = file.path().to_string();
        let mut sig = [0u8; 8];
        file.read_zero_filled(&mut sig, 0, "vhdx file identifier")?;
        if &sig != b"vhdxfile" {
            return Err(einval(&path));
        }
        let mut headers = Headers::read(&file)?;
        let h = headers.cur().clone();
        let mut regions = vec![(h.log_offset, h.log_offset + u64::from(h.log_length))];
        let mut replayed = false;
        if log::log_present(
            &path,
            h.log_offset,
            h.log_length,
            h.log_version,
            &h.log_guid,
        )? {
            let seq = log::Log::new(&file, h.log_offset, u64::from(h.log_length), h.log_guid)
                .active_sequence()?;
            if !seq.is_empty() {
                if !opts.write() {
                    return Err(Error::Corrupt {
                        path: path.clone(),
                        what: format!(
                            "VHDX image file '{path}' opened read-only, but contains a log that needs to be replayed\nTo replay the log, run:\nqemu-img check -r all '{path}'"
                        ),
                    });
                }
                log::validate(&file, &seq)?;
                let session = header::new_guid();
                headers.update_both(&file, session, Some(header::new_guid()), None)?;
                log::replay(&file, &seq)?;
                headers.update_both(&file, session, None, Some([0; 16]))?;
                replayed = true;
            }
        }
        // The region table (QEMU reads only the first copy).
        let mut rt = vec![0u8; header::REGION_SIZE];
        file.read_zero_filled(&mut rt, header::REGION1_OFF, "vhdx region table")?;
        let table = header::parse_region_table(&rt).ok_or_else(|| einval(&path))?;
        let (mut bat_rt, mut md_rt) = (None, None);
        for r in &table {
            let (start, end) = (
                r.file_offset,
                r.file_offset.saturating_add(u64::from(r.length)),
            );
            if let Some((s, e)) = regions.iter().find(|(s, e)| !(start >= *e || end <= *s)) {
                error_report(&format!(
                    "VHDX region {start}-{end} overlaps with region {s}-{e}"
                ));
                return Err(einval(&path));
            }
            regions.push((start, end));
            if r.guid == header::BAT_GUID {
                if bat_rt.replace(*r).is_some() {
                    return Err(einval(&path));
                }
            } else if r.guid == header::METADATA_GUID {
                if md_rt.replace(*r).is_some() {
                    return Err(einval(&path));
                }
            } else if r.required {
                return Err(enotsup(&path));
            }
        }
        let (Some(bat_rt), Some(md_rt)) = (bat_rt, md_rt) else {
            return Err(einval(&path));
        };
        let geo = read_metadata(&file, md_rt.file_offset, bat_rt.file_offset)?;
        if geo.bat_entries > u64::from(bat_rt.length) / 8 {
            return Err(einval(&path));
        }
        let bat = Bat::new(file.clone(), geo.bat_offset, geo.bat_entries)?;
        let img = VhdxImage {
            files: [file],
            geo,
            bat: Arc::new(Mutex::new(bat)),
            headers,
            replayed,
            write: opts.write(),
            regions,
        };
        if !opts.check && img.check_bat(false)? > 0 {
            return Err(einval(&path));
        }
        // QEMU's block layer then refuses sizes it cannot count in 512-byte sectors.
        if img.geo.size >> 9 > i64::MAX as u64 / 512 {
            return Err(Error::Corrupt {
                path: path.clone(),
                what: "Could not refresh total sector count: File too large".into(),
            });
        }
        Ok(img)
    }

    /// QEMU's BAT check: every fully present block must start and end inside the file and
    /// not overlap the log, BAT or metadata. Reports each problem on stderr and returns the
    /// count; unless `all`, the first problem ends the check (as on open).
    fn check_bat(&self, all: bool) -> Result<u64> {
        let file_len = self.files[0].len()?;
        let mut bat = self.bat.lock().map_err(|_| einval(self.files[0].path()))?;
        let bs = self.geo.block_size;
        let total = self.geo.size / 512 * 512;
        let mut errors = 0;
        let mut payblocks = self.geo.chunk_ratio;
        let regions = &self.regions;
        let chunk_ratio = self.geo.chunk_ratio;
        bat.for_each_chunk(|first, entries| {
            for (k, &e) in entries.iter().enumerate() {
                if e & 7 != state::FULLY_PRESENT {
                    continue;
                }
                let i = first + k as u64;
                let off = e & BAT_OFFSET_MASK;
                // QEMU measures the last block from the BAT index (bitmap entries included).
                let block_length = bs.min(total.wrapping_sub(i.wrapping_mul(bs)));
                if off > i64::MAX as u64 - bs {
                    error_report(&format!("VHDX BAT entry {i} offset overflow."));
                    errors += 1;
                    if !all {
                        return false;
                    }
                }
                if off >= file_len {
                    error_report(&format!(
                        "VHDX BAT entry {i} start offset {off} points after end of file ({file_len}). Image has probably been truncated."
                    ));
                    errors += 1;
                } else if off + block_length > file_len {
                    error_report(&format!(
                        "VHDX BAT entry {i} end offset {} points after end of file ({file_len}). Image has probably been truncated.",
                        off + block_length - 1
                    ));
                    errors += 1;
                }
                if payblocks > 0 {
                    payblocks -= 1;
                    let end = off.saturating_add(bs);
                    if let Some((s, e)) = regions.iter().find(|(s, e)| !(off >= *e || end <= *s)) {
                        error_report(&format!(
                            "VHDX region {off}-{end} overlaps with region {s}-{e}"
                        ));
                        errors += 1;
                    }
                } else {
                    payblocks = chunk_ratio;
                }
                if errors > 0 && !all {
                    return false;
                }
            }
            true
        })?;
        Ok(errors)
    }
}

/// Read and validate the metadata region at `md_off`; `bat_off` is the BAT's offset.
fn read_metadata(file: &FileLayer, md_off: u64, bat_off: u64) -> Result<Geometry> {
    let path = file.path();
    let mut table = vec![0u8; header::METADATA_TABLE_SIZE];
    file.read_zero_filled(&mut table, md_off, "vhdx metadata table")?;
    let entries = header::parse_metadata_table(&table).ok_or_else(|| einval(path))?;
    let known = [
        header::FILE_PARAMS_GUID,
        header::VIRTUAL_SIZE_GUID,
        header::PAGE83_GUID,
        header::LOGICAL_SECTOR_GUID,
        header::PHYSICAL_SECTOR_GUID,
        header::PARENT_LOCATOR_GUID,
    ];
    let mut found: [Option<header::MetaEntry>; 6] = [None; 6];
    for e in &entries {
        match known.iter().position(|g| *g == e.item) {
            Some(k) if found[k].is_some() => return Err(einval(path)),
            Some(k) => found[k] = Some(*e),
            None if e.flags & 4 != 0 => return Err(enotsup(path)),
            None => {}
        }
    }
    if found[..5].iter().any(Option::is_none) {
        return Err(enotsup(path));
    }
    let item = |k: usize, n: usize| -> Result<Vec<u8>> {
        let e = found[k].expect("checked present");
        let mut b = vec![0u8; n];
        file.read_zero_filled(&mut b, md_off + u64::from(e.offset), "vhdx metadata item")?;
        Ok(b)
    };
    let params = item(0, 8)?;
    let block_size = u64::from(header::le32(&params, 0));
    let bits = header::le32(&params, 4);
    if bits & 2 != 0 {
        // Differencing images: QEMU supports none.
        return Err(if found[5].is_some() {
            enotsup(path)
        } else {
            einval(path)
        });
    }
    let size = header::le64(&item(1, 8)?, 0);
    let logical = u64::from(header::le32(&item(3, 4)?, 0));
    if !(header::BLOCK_SIZE_MIN..=header::BLOCK_SIZE_MAX).contains(&block_size) {
        return Err(einval(path));
    }
    if logical != 512 {
        // QEMU 10 refuses every other logical sector size (4096 included).
        return Err(enotsup(path));
    }
    if !block_size.is_power_of_two() {
        return Err(einval(path));
    }
    let chunk_ratio = header::SECTORS_PER_BITMAP * logical / block_size;
    // QEMU counts blocks in 32 bits: a huge virtual size may leave a short BAT, whose
    // missing entries read here as not present.
    Ok(Geometry {
        block_size,
        chunk_ratio,
        size: size / logical * logical,
        bat_entries: bat_entries(size, block_size, chunk_ratio),
        bat_offset: bat_off,
        fixed: bits & 1 != 0,
    })
}

impl Image for VhdxImage {
    fn format(&self) -> &'static str {
        "vhdx"
    }

    fn virtual_size(&self) -> u64 {
        self.geo.size
    }

    fn files(&self) -> &[Arc<FileLayer>] {
        &self.files
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.block_size)
    }

    fn opaque_allocation(&self) -> bool {
        true
    }

    fn map(&self, off: GuestOff, len: u64, out: &mut Vec<Extent>) -> Result<u64> {
        let size = self.geo.size;
        if off.0 >= size {
            return Ok(0);
        }
        let end = off.0.saturating_add(len).min(size);
        let bs = self.geo.block_size;
        let file_len = self.files[0].len()?;
        let mut bat = self.bat.lock().map_err(|_| einval(self.files[0].path()))?;
        let mut pos = off.0;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            let e = bat.get(self.geo.bat_index(block))?;
            match e & 7 {
                state::NOT_PRESENT
                | state::UNDEFINED
                | state::ZERO
                | state::UNMAPPED
                | state::UNMAPPED_V095 => push_merged(
                    out,
                    Extent::Zero {
                        len: n,
                        explicit: true,
                        at: None,
                    },
                ),
                state::FULLY_PRESENT => {
                    let host = (e & BAT_OFFSET_MASK).saturating_add(in_block);
                    // A block cut short by the end of the file reads as zeros there, and so
                    // do holes of the file inside the block (QEMU allocates blocks by
                    // growing the file): the engine need not read them.
                    let zero = |_: u64, len| Extent::Zero {
                        len,
                        explicit: true,
                        at: None,
                    };
                    self.files[0].push_runs(FileId(0), host, n, file_len, zero, out)?;
                }
                _ => {
                    return Err(Error::Corrupt {
                        path: self.files[0].path().to_string(),
                        what: format!(
                            "vhdx: payload block {block} has state {} (partially present or invalid), which QEMU cannot read: Input/output error",
                            e & 7
                        ),
                    })
                }
            }
            pos += n;
        }
        Ok(end - off.0)
    }

    fn check(&self) -> Option<Result<CheckReport>> {
        Some(self.check_bat(true).map(|corruptions| CheckReport {
            corruptions,
            corruptions_fixed: u64::from(self.replayed),
            ..Default::default()
        }))
    }

    fn check_repairs(&self) -> bool {
        true
    }

    fn writer(&self) -> Result<Box<dyn ImageWriter>> {
        if !self.write {
            return Err(Error::Unsupported(format!(
                "'{}' was opened read-only",
                self.files[0].path()
            )));
        }
        Ok(Box::new(write::VhdxWriter::new(
            self.files[0].clone(),
            self.geo.clone(),
            self.bat.clone(),
            self.headers.clone(),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::header::MIB;
    use super::*;
    use crate::types::HostOff;

    /// Create a 24 MiB dynamic image with 8 MiB blocks, set the BAT entries, map it all.
    fn map_with_bat(entries: &[u64], file_len: u64) -> Vec<Extent> {
        use crate::file::FileOpen;
        use crate::opts::OptionMap;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.vhdx").to_str().unwrap().to_string();
        let spec = CreateSpec {
            path: p.clone(),
            size: 24 * MIB,
            options: OptionMap::parse("block_state_zero=off"),
        };
        VHDX.create(&spec).unwrap();
        let f = FileLayer::open(&p, &FileOpen::create()).unwrap();
        let mut raw = Vec::new();
        for e in entries {
            raw.extend_from_slice(&e.to_le_bytes());
        }
        f.write_all_at(&raw, 2 * MIB, "test BAT").unwrap();
        f.set_len(file_len).unwrap();
        // 1 MiB of data at 8 MiB; the rest of the file past the metadata is a hole.
        f.write_all_at(&vec![7u8; MIB as usize], 8 * MIB, "test data")
            .unwrap();
        drop(f);
        let f = Arc::new(FileLayer::open(&p, &FileOpen::read_only()).unwrap());
        let opts = OpenOptions {
            check: true,
            ..Default::default()
        };
        let img = VHDX.open(f, &opts).unwrap();
        let mut out = Vec::new();
        assert_eq!(img.map(GuestOff(0), u64::MAX, &mut out).unwrap(), 24 * MIB);
        out
    }

    #[test]
    fn block_states_map_to_extents() {
        let present = |mb: u64| (mb * MIB) | state::FULLY_PRESENT;
        // Block 0 zero, block 1 present at 8 MiB, block 2 unmapped.
        let out = map_with_bat(&[state::ZERO, present(8), state::UNMAPPED], 16 * MIB);
        let zero = |len| Extent::Zero {
            len,
            explicit: true,
            at: None,
        };
        let data = Extent::Data {
            file: FileId(0),
            host: HostOff(8 * MIB),
            len: MIB,
        };
        // The hole of the file inside the present block reads as zeros too.
        assert_eq!(out, vec![zero(8 * MIB), data.clone(), zero(15 * MIB)]);
        // A present block cut short by the end of the file reads as zeros past it.
        let out = map_with_bat(&[present(8), 0, state::UNDEFINED], 12 * MIB);
        assert_eq!(out, vec![data, zero(23 * MIB)]);
    }

    #[test]
    fn bat_entries_like_qemu() {
        // 64 MiB with 8 MiB blocks: 8 payload entries, no bitmap entry needed in between.
        assert_eq!(bat_entries(64 * MIB, 8 * MIB, 512), 8);
        // 1 MiB blocks: chunk ratio 4096; 4097 blocks need one bitmap entry in between.
        assert_eq!(bat_entries(4097 * MIB, MIB, 4096), 4098);
        // An empty disk: QEMU's 32-bit arithmetic wraps.
        assert_eq!(bat_entries(0, 8 * MIB, 512), 0xffff_ffff >> 9);
    }
}
