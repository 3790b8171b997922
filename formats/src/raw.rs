//! The `raw` format: guest offset = host offset in one file.
//!
//! Allocation comes from SEEK_DATA/SEEK_HOLE (block devices: all data). As in QEMU, the
//! virtual size is the file length rounded up to 512 bytes; the padding reads as zeros.

use std::sync::Arc;

use crate::driver::{
    Action, CreateSpec, FormatDriver, Image, ImageWriter, OpenOptions, Placement, Preallocation,
    Ticket,
};
use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::file::{Falloc, FileLayer};
use crate::opts::{OptKind, OptionDesc, OptionMap};
use crate::types::{FileId, GuestOff, HostOff};

/// The raw driver.
pub struct RawDriver;

/// The one instance, listed in [`crate::registry::DRIVERS`].
pub static RAW: RawDriver = RawDriver;

const SECTOR: u64 = 512;

static RAW_OPTIONS: &[OptionDesc] = &[OptionDesc {
    name: "size",
    kind: OptKind::Size,
    help: "Virtual disk size",
}];

/// Every option raw's `create` accepts: its own and the file layer's.
fn all_options() -> Vec<OptionDesc> {
    RAW_OPTIONS
        .iter()
        .chain(crate::file::FILE_OPTIONS)
        .copied()
        .collect()
}

/// Parse `preallocation=` for raw: `off`, `falloc`, `full`.
fn raw_prealloc(options: &OptionMap) -> Result<Preallocation> {
    match options.get("preallocation") {
        None => Ok(Preallocation::Off),
        Some(v) => match Preallocation::parse(v) {
            Some(p) if p != Preallocation::Metadata => Ok(p),
            _ => Err(Error::InvalidArgument(format!(
                "invalid parameter value: {v}"
            ))),
        },
    }
}

/// Extend `file` from `from` to `to` bytes as `prealloc` says; returns engine actions.
fn grow(file: &FileLayer, from: u64, to: u64, prealloc: Preallocation) -> Result<Vec<Action>> {
    if file.is_block_device() {
        return Err(Error::Unsupported("Cannot grow device files".to_string()));
    }
    match prealloc {
        Preallocation::Off | Preallocation::Metadata => {
            file.set_len(to)?;
            Ok(Vec::new())
        }
        Preallocation::Falloc => {
            if to > from {
                file.fallocate(Falloc::Allocate, from, to - from)?;
            }
            file.set_len(to)?;
            Ok(Vec::new())
        }
        Preallocation::Full => {
            file.set_len(to)?;
            Ok(if to > from {
                vec![Action::WriteZeroes {
                    file: FileId(0),
                    host: HostOff(from),
                    len: to - from,
                }]
            } else {
                Vec::new()
            })
        }
    }
}

impl FormatDriver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn probe(&self, _head: &[u8], _file_len: u64) -> u32 {
        1
    }

    fn open(&self, file: Arc<FileLayer>, opts: &OpenOptions) -> Result<Box<dyn Image>> {
        if opts.snapshot.is_some() {
            return Err(Error::Snapshot(
                "Block format 'raw' used by device '' does not support temporarily loading internal snapshots"
                    .into(),
            ));
        }
        let len = file.len()?;
        let size = len.div_ceil(SECTOR) * SECTOR;
        Ok(Box::new(RawImage {
            files: [file],
            size,
            file_len: len,
            write: opts.write(),
        }))
    }

    fn create_options(&self) -> &'static [OptionDesc] {
        RAW_OPTIONS
    }

    fn create(&self, spec: &CreateSpec) -> Result<Vec<Action>> {
        spec.options.validate(&all_options())?;
        let prealloc = raw_prealloc(&spec.options)?;
        let file = FileLayer::create(&spec.path)?;
        if file.is_block_device() {
            return Ok(Vec::new());
        }
        // QEMU makes raw files a whole number of sectors.
        let size = spec.size.div_ceil(SECTOR).saturating_mul(SECTOR);
        if size > i64::MAX as u64 {
            return Err(Error::InvalidArgument(
                "Could not resize file: Invalid argument".into(),
            ));
        }
        let actions = grow(&file, 0, size, prealloc).map_err(|e| match e {
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::EFBIG) => {
                Error::InvalidArgument("The image size is too large for file format 'raw'".into())
            }
            Error::Io { source, .. } => Error::InvalidArgument(format!(
                "Could not resize file: {}",
                crate::error::strerror(&source)
            )),
            other => other,
        })?;
        // Like QEMU's file layer, allocate the first block (so O_DIRECT alignment probing
        // later finds a real block).
        let first = size.min(4096) as usize;
        if first > 0 && prealloc == Preallocation::Off {
            file.write_all_at(&vec![0u8; first], 0, "first block")?;
        }
        Ok(actions)
    }

    fn measure(
        &self,
        size: u64,
        _data: Option<&[(u64, u64)]>,
        options: &OptionMap,
    ) -> Result<(u64, u64)> {
        // qemu-img measure checks option names only, not values.
        options.validate_names(&all_options())?;
        let size = size.div_ceil(SECTOR).saturating_mul(SECTOR);
        Ok((size, size))
    }
}

/// An open raw image.
struct RawImage {
    files: [Arc<FileLayer>; 1],
    /// virtual size: file length rounded up to 512
    size: u64,
    /// file length at open
    file_len: u64,
    write: bool,
}

impl Image for RawImage {
    fn format(&self) -> &'static str {
        "raw"
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
        let file = &self.files[0];
        let zero = |at: u64, l: u64| Extent::Zero {
            len: l,
            explicit: true,
            at: Some((FileId(0), HostOff(at))),
        };
        file.push_runs(FileId(0), off.0, end - off.0, self.file_len, zero, out)?;
        Ok(end - off.0)
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }

    fn writer(&self) -> Result<Box<dyn ImageWriter>> {
        if !self.write {
            return Err(Error::Unsupported(format!(
                "'{}' was opened read-only",
                self.files[0].path()
            )));
        }
        Ok(Box::new(RawWriter {
            file: self.files[0].clone(),
            size: self.size,
        }))
    }
}

/// Writer of a raw image: placements are the identity; nothing to commit.
struct RawWriter {
    file: Arc<FileLayer>,
    size: u64,
}

impl ImageWriter for RawWriter {
    fn allocate(&mut self, off: GuestOff, len: u64, out: &mut Vec<Placement>) -> Result<Ticket> {
        if off.0.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::InvalidArgument(format!(
                "write of {len} bytes at {off} is past the end of '{}'",
                self.file.path()
            )));
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
        out.push(Action::zeroing(
            &self.file,
            FileId(0),
            HostOff(off.0),
            len,
            may_unmap,
        ));
        Ok(())
    }

    fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<Vec<Action>> {
        let cur = self.file.len()?;
        let actions = if new_size >= cur {
            grow(&self.file, cur, new_size, prealloc)?
        } else {
            if self.file.is_block_device() {
                return Err(Error::Unsupported("Cannot shrink device files".to_string()));
            }
            self.file.set_len(new_size)?;
            Vec::new()
        };
        self.size = new_size;
        Ok(actions)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::FileOpen;
    use std::os::unix::fs::FileExt;

    #[test]
    fn map_rounds_to_sector_and_reports_padding_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        std::fs::write(&p, vec![7u8; 5000]).unwrap();
        let f = Arc::new(FileLayer::open(p.to_str().unwrap(), &FileOpen::read_only()).unwrap());
        let img = RAW.open(f, &OpenOptions::default()).unwrap();
        assert_eq!(img.virtual_size(), 5120);
        let mut v = Vec::new();
        assert_eq!(img.map(GuestOff(0), u64::MAX, &mut v).unwrap(), 5120);
        assert_eq!(
            v,
            vec![
                Extent::Data {
                    file: FileId(0),
                    host: HostOff(0),
                    len: 5000
                },
                Extent::Zero {
                    len: 120,
                    explicit: true,
                    at: Some((FileId(0), HostOff(5000)))
                },
            ]
        );
    }

    #[test]
    fn map_sees_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 1 << 20).unwrap();
        drop(f);
        let f = Arc::new(FileLayer::open(p.to_str().unwrap(), &FileOpen::read_only()).unwrap());
        let img = RAW.open(f, &OpenOptions::default()).unwrap();
        let mut v = Vec::new();
        img.map(GuestOff(0), u64::MAX, &mut v).unwrap();
        assert!(v.iter().any(|e| matches!(e, Extent::Data { .. })));
        assert_eq!(v.iter().map(Extent::len).sum::<u64>(), 4 << 20);
    }
}
