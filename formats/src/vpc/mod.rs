//! The `vpc` format: Microsoft Virtual PC / Hyper-V VHD images, fixed and dynamic.
//!
//! A fixed disk is the guest bytes followed by a 512-byte footer. A dynamic disk starts
//! with a copy of the footer, then the dynamic disk header and the block allocation table
//! (BAT); each allocated block is a sector bitmap followed by the block's data, and the
//! footer follows the last block. As in QEMU, the bitmap is not consulted when reading (an
//! allocated block reads entirely from the file) and is written all ones when a block is
//! allocated; a differencing disk reads like a dynamic one (QEMU does not follow VHD
//! parents).
//!
//! Probing matches QEMU: only a footer copy at offset 0 (dynamic disks) is recognised, so
//! without `-f vpc` a fixed VHD opens as raw.

use std::sync::Arc;

use crate::driver::{
    Action, CreateSpec, FormatDriver, Image, ImageWriter, OpenOptions, Preallocation,
};
use crate::error::{Error, Result};
use crate::extent::{push_merged, Extent};
use crate::file::{FileLayer, FILE_OPTIONS};
use crate::opts::{parse_bool, OptKind, OptionDesc, OptionMap};
use crate::types::{FileId, GuestOff, HostOff};

pub mod footer;
mod write;

use footer::{DynHeader, Footer, BAT_UNUSED, DYN_HEADER_SIZE, FOOTER_SIZE, TYPE_FIXED};

/// The vpc driver.
pub struct VpcDriver;

/// The one instance, listed in [`crate::registry::DRIVERS`].
pub static VPC: VpcDriver = VpcDriver;

/// vpc's create options, in qemu-img's declaration order.
static VPC_OPTIONS: &[OptionDesc] = &[
    OptionDesc {
        name: "size",
        kind: OptKind::Size,
        help: "Virtual disk size",
    },
    OptionDesc {
        name: "subformat",
        kind: OptKind::Str,
        help: "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    },
    OptionDesc {
        name: "force_size",
        kind: OptKind::Bool,
        help: "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
    },
];

fn open_err(file: &FileLayer, why: impl Into<String>) -> Error {
    Error::OpenWhy {
        path: file.path().to_string(),
        why: why.into(),
    }
}

impl FormatDriver for VpcDriver {
    fn name(&self) -> &'static str {
        "vpc"
    }

    fn probe(&self, head: &[u8], _file_len: u64) -> u32 {
        if Footer::has_cookie(head) {
            100
        } else {
            0
        }
    }

    fn open(&self, file: Arc<FileLayer>, opts: &OpenOptions) -> Result<Box<dyn Image>> {
        if opts.snapshot.is_some() {
            return Err(Error::Snapshot(
                "Block format 'vpc' used by device '' does not support temporarily loading internal snapshots"
                    .into(),
            ));
        }
        // QEMU's block layer sees file lengths rounded up to whole sectors.
        let file_len = file.len()?.div_ceil(512) * 512;
        let mut raw = [0u8; FOOTER_SIZE];
        file.read_zero_filled(&mut raw, 0, "VHD footer")?;
        let mut fixed = false;
        if !Footer::has_cookie(&raw) {
            if file_len < FOOTER_SIZE as u64 {
                return Err(open_err(&file, "File too small for a VHD header"));
            }
            file.read_zero_filled(&mut raw, file_len - FOOTER_SIZE as u64, "VHD footer")?;
            if !Footer::has_cookie(&raw) || Footer::parse(&raw).disk_type != TYPE_FIXED {
                return Err(open_err(&file, "invalid VPC image"));
            }
            fixed = true;
        }
        let footer = Footer::parse(&raw);
        if !footer.checksum_ok() {
            return Err(open_err(&file, "Incorrect header checksum"));
        }
        let total_sectors = footer.total_sectors();
        if total_sectors > footer::MAX_SECTORS {
            return Err(open_err(&file, "File too large"));
        }
        let size = total_sectors * 512;
        let layout = if fixed {
            Layout::Fixed
        } else {
            Layout::Dynamic(read_bat(&file, &footer, size, file_len)?)
        };
        Ok(Box::new(VpcImage {
            files: [file],
            size,
            footer,
            layout,
            write: opts.write(),
        }))
    }

    fn create_options(&self) -> &'static [OptionDesc] {
        VPC_OPTIONS
    }

    fn create(&self, spec: &CreateSpec) -> Result<Vec<Action>> {
        write::create(spec)
    }

    fn measure(
        &self,
        _size: u64,
        _data: Option<&[(u64, u64)]>,
        _options: &OptionMap,
    ) -> Result<(u64, u64)> {
        Err(Error::Unsupported(
            "Block driver 'vpc' does not support size measurement".into(),
        ))
    }
}

/// Every option vpc's `create` accepts: its own and the file layer's.
fn all_options() -> Vec<OptionDesc> {
    VPC_OPTIONS.iter().chain(FILE_OPTIONS).copied().collect()
}

/// Parse `force_size` (already type-checked).
fn force_size(options: &OptionMap) -> bool {
    options
        .get("force_size")
        .and_then(parse_bool)
        .unwrap_or(false)
}

/// The block allocation of a dynamic disk.
#[derive(Clone, Debug)]
struct Bat {
    /// where the table lives
    table_offset: u64,
    /// block size in bytes
    block_size: u64,
    /// sector bitmap bytes before each block's data
    bitmap_size: u64,
    /// the entries (sector numbers of the blocks' bitmaps, or [`BAT_UNUSED`])
    entries: Vec<u32>,
    /// first byte after the last block (where the footer lives)
    free_offset: u64,
}

/// Read and check the dynamic disk header and the BAT, with QEMU's messages.
fn read_bat(file: &FileLayer, footer: &Footer, size: u64, file_len: u64) -> Result<Bat> {
    let mut raw = [0u8; DYN_HEADER_SIZE];
    if footer.data_offset > i64::MAX as u64 - DYN_HEADER_SIZE as u64 {
        return Err(open_err(file, "Error reading dynamic VHD header"));
    }
    file.read_zero_filled(&mut raw, footer.data_offset, "dynamic VHD header")?;
    let h = DynHeader::parse(&raw).ok_or_else(|| open_err(file, "Invalid header magic"))?;
    if !h.block_size.is_power_of_two() || h.block_size < 512 {
        return Err(open_err(
            file,
            format!("Invalid block size {}", h.block_size),
        ));
    }
    let block_size = h.block_size as u64;
    let bitmap_size = (block_size / (8 * 512)).div_ceil(512) * 512;
    if size / block_size > 0xffff_ffff {
        return Err(open_err(file, "Too many blocks"));
    }
    if (h.max_table_entries as u64) * block_size < size {
        return Err(open_err(file, "Page table too small"));
    }
    if h.max_table_entries > i32::MAX as u32 / 4 {
        return Err(open_err(
            file,
            format!(
                "Max Table Entries too large ({})",
                h.max_table_entries as i32
            ),
        ));
    }
    let table_len = h.max_table_entries as u64 * 4;
    let truncated = || {
        open_err(
            file,
            "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.",
        )
    };
    // A table reaching past the end of the file would put the first free byte there too:
    // refuse before allocating anything.
    let table_end = h
        .table_offset
        .checked_add(table_len)
        .map(|e| e.div_ceil(512) * 512)
        .ok_or_else(truncated)?;
    if table_end > file_len {
        return Err(truncated());
    }
    let mut bytes = vec![0u8; table_len as usize];
    file.read_exact_at(&mut bytes, h.table_offset, "VHD block allocation table")?;
    let entries: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let mut free_offset = table_end;
    for &e in &entries {
        if e != BAT_UNUSED {
            free_offset = free_offset.max(e as u64 * 512 + bitmap_size + block_size);
        }
    }
    if free_offset > file_len {
        return Err(truncated());
    }
    Ok(Bat {
        table_offset: h.table_offset,
        block_size,
        bitmap_size,
        entries,
        free_offset,
    })
}

/// How guest bytes are laid out.
#[derive(Clone, Debug)]
enum Layout {
    /// guest offset = host offset
    Fixed,
    /// blocks through a BAT
    Dynamic(Bat),
}

/// An open VHD.
struct VpcImage {
    files: [Arc<FileLayer>; 1],
    /// virtual size in bytes
    size: u64,
    /// the footer as read
    footer: Footer,
    layout: Layout,
    write: bool,
}

impl VpcImage {
    /// A fixed disk maps like a raw file whose holes still count as allocated data.
    fn map_fixed(&self, off: u64, end: u64, out: &mut Vec<Extent>) -> Result<()> {
        let file = &self.files[0];
        let hole = |at: u64, l: u64| Extent::DataHole {
            file: FileId(0),
            host: HostOff(at),
            len: l,
        };
        file.push_runs(FileId(0), off, end - off, file.len()?, hole, out)
    }
}

/// Map `[off, end)` of a dynamic disk through `bat`.
fn map_dynamic(bat: &Bat, off: u64, end: u64, out: &mut Vec<Extent>) {
    let mut pos = off;
    while pos < end {
        let idx = pos / bat.block_size;
        let in_block = pos % bat.block_size;
        let n = (bat.block_size - in_block).min(end - pos);
        match bat.entries.get(idx as usize) {
            Some(&e) if e != BAT_UNUSED => push_merged(
                out,
                Extent::Data {
                    file: FileId(0),
                    host: HostOff(e as u64 * 512 + bat.bitmap_size + in_block),
                    len: n,
                },
            ),
            _ => push_merged(
                out,
                Extent::Zero {
                    len: n,
                    explicit: true,
                    at: None,
                },
            ),
        }
        pos += n;
    }
}

impl Image for VpcImage {
    fn format(&self) -> &'static str {
        "vpc"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn files(&self) -> &[Arc<FileLayer>] {
        &self.files
    }

    fn map(&self, off: GuestOff, len: u64, out: &mut Vec<Extent>) -> Result<u64> {
        if off.0 >= self.size {
            return Ok(0);
        }
        let end = off.0.saturating_add(len).min(self.size);
        match &self.layout {
            Layout::Fixed => self.map_fixed(off.0, end, out)?,
            Layout::Dynamic(bat) => map_dynamic(bat, off.0, end, out),
        }
        Ok(end - off.0)
    }

    fn cluster_size(&self) -> Option<u64> {
        match &self.layout {
            Layout::Fixed => None,
            Layout::Dynamic(bat) => Some(bat.block_size),
        }
    }

    fn writer(&self) -> Result<Box<dyn ImageWriter>> {
        if !self.write {
            return Err(Error::Unsupported(format!(
                "'{}' was opened read-only",
                self.files[0].path()
            )));
        }
        Ok(match &self.layout {
            Layout::Fixed => Box::new(write::FixedWriter {
                file: self.files[0].clone(),
                size: self.size,
            }),
            Layout::Dynamic(bat) => Box::new(write::DynamicWriter::new(
                self.files[0].clone(),
                self.size,
                self.footer.raw,
                bat.clone(),
            )),
        })
    }
}

/// `resize` on a VHD: QEMU's vpc driver cannot resize.
fn no_resize() -> Result<Vec<Action>> {
    Err(Error::Unsupported(
        "Image format driver does not support resize".into(),
    ))
}

/// Check `preallocation=` as QEMU's file layer does when creating the file (the value has
/// no effect on a VHD: QEMU creates the file empty and then writes the structures).
fn check_prealloc(options: &OptionMap) -> Result<()> {
    match options.get("preallocation") {
        None => Ok(()),
        Some(v) => match Preallocation::parse(v) {
            Some(Preallocation::Metadata) => Err(Error::InvalidArgument(
                "Unsupported preallocation mode: metadata".into(),
            )),
            Some(_) => Ok(()),
            None => Err(Error::InvalidArgument(format!(
                "invalid parameter value: {v}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests;
