//! The `file` protocol layer: one host file (regular file or block device) of an image.
//!
//! It does metadata I/O (small synchronous reads and writes of headers and tables), answers
//! allocation queries (SEEK_DATA/SEEK_HOLE), and holds the QEMU-compatible image locks for as
//! long as it is open. Bulk guest data never goes through it: the engine opens its own
//! descriptors (possibly O_DIRECT) on [`FileLayer::path`].

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use crate::error::{Error, Result};
use crate::lock::{self, Perms};

/// How to open a [`FileLayer`].
#[derive(Clone, Copy, Debug)]
pub struct FileOpen {
    /// open read-write
    pub write: bool,
    /// permissions held (QEMU `BLK_PERM_*`), for locking
    pub perm: Perms,
    /// permissions shared with other processes, for locking
    pub shared: Perms,
    /// take locks at all (`locking=off` / `-U` on read-only opens still lock in QEMU)
    pub lock: bool,
}

impl FileOpen {
    /// A read-only open holding "consistent read" and sharing everything.
    pub fn read_only() -> FileOpen {
        FileOpen {
            write: false,
            perm: Perms::CONSISTENT_READ,
            shared: Perms::ALL,
            lock: true,
        }
    }

    /// The open of qemu's create step: write and resize held, resize not shared.
    pub fn create() -> FileOpen {
        FileOpen {
            write: true,
            perm: Perms::WRITE.or(Perms::RESIZE),
            shared: Perms(Perms::ALL.0 & !Perms::RESIZE.0),
            lock: true,
        }
    }
}

/// Create options of the `file` protocol layer, valid for every format whose image lives in
/// a plain file, in the order qemu-img prints them in its `Formatting` line.
pub static FILE_OPTIONS: &[crate::opts::OptionDesc] = &[
    crate::opts::OptionDesc {
        name: "nocow",
        kind: crate::opts::OptKind::Bool,
        help: "Turn off copy-on-write (valid only on btrfs)",
    },
    crate::opts::OptionDesc {
        name: "preallocation",
        kind: crate::opts::OptKind::Str,
        help: "Preallocation mode (allowed values: off, falloc, full)",
    },
    crate::opts::OptionDesc {
        name: "extent_size_hint",
        kind: crate::opts::OptKind::Size,
        help: "Extent size hint for the image file, 0 to disable",
    },
];

/// What `fallocate` should do; see [`FileLayer::fallocate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Falloc {
    /// allocate blocks (may extend the file)
    Allocate,
    /// deallocate, keep the size
    PunchHole,
    /// zero, keep the blocks allocated and the size
    ZeroRange,
}

/// One open host file of an image.
#[derive(Debug)]
pub struct FileLayer {
    path: String,
    file: File,
    block_device: bool,
    writable: bool,
}

impl FileLayer {
    /// Open `path` and take QEMU-compatible locks as `o` says.
    ///
    /// Errors: missing files and permission problems as [`Error::Open`]; anything that is not a
    /// regular file or block device as [`Error::OpenWhy`] with QEMU's wording; lock conflicts
    /// as [`Error::Locked`].
    pub fn open(path: &str, o: &FileOpen) -> Result<FileLayer> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(o.write)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_string(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.to_string(),
            source,
        })?;
        let ft = meta.file_type();
        let block_device = ft.is_block_device();
        if !ft.is_file() && !block_device {
            return Err(Error::OpenWhy {
                path: path.to_string(),
                why: format!("'file' driver requires '{path}' to be a regular file"),
            });
        }
        if o.lock {
            lock::apply(&file, path, o.perm, o.shared)?;
        }
        Ok(FileLayer {
            path: path.to_string(),
            file,
            block_device,
            writable: o.write,
        })
    }

    /// Create (or truncate) `path` as an empty regular file, as QEMU's file layer does for
    /// `create`: the locks are checked before anything is truncated. Errors are worded
    /// `Could not create 'path': ...`.
    pub fn create(path: &str) -> Result<FileLayer> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::Create {
                path: path.to_string(),
                source,
            })?;
        let f = FileLayer::open(path, &FileOpen::create())?;
        if !f.block_device {
            f.set_len(0)?;
        }
        Ok(f)
    }

    /// The path as the user gave it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The open file (for the engine to reopen or register; do not move data through it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether this is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether the file was opened read-write.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Current length in bytes (block devices: their size).
    pub fn len(&self) -> Result<u64> {
        if self.block_device {
            let end = lseek(self.file.as_fd(), 0, Whence::SeekEnd)
                .map_err(|e| Error::io("getting size", &self.path, 0, e.into()))?;
            return Ok(end as u64);
        }
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io("getting size", &self.path, 0, e))
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Bytes allocated on the host (`st_blocks * 512`); 0 for block devices.
    pub fn allocated_bytes(&self) -> u64 {
        if self.block_device {
            return 0;
        }
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Read exactly `buf.len()` bytes at `off`; `what` names the structure for errors.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| Error::io(format!("reading {what}"), &self.path, off, e))
    }

    /// Read up to `buf.len()` bytes at `off`, stopping at EOF; returns the count.
    pub fn read_at_most(&self, buf: &mut [u8], off: u64, what: &str) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("reading {what}"), &self.path, off, e)),
            }
        }
        Ok(done)
    }

    /// Read `buf.len()` bytes at `off`; bytes past the end of the file read as zeros (as
    /// QEMU's file layer returns them).
    pub fn read_zero_filled(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        let n = self.read_at_most(buf, off, what)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Describe `len` bytes of this file (the image's file `fid`) from `host` as extents:
    /// data runs as SEEK_DATA/SEEK_HOLE see them, and holes as `hole(host, len)` makes them.
    /// Everything at or past `limit` (a length no larger than the file's) is a hole.
    pub fn push_runs(
        &self,
        fid: crate::types::FileId,
        host: u64,
        len: u64,
        limit: u64,
        hole: impl Fn(u64, u64) -> crate::extent::Extent,
        out: &mut Vec<crate::extent::Extent>,
    ) -> Result<()> {
        use crate::extent::{push_merged, Extent};
        let end = host.saturating_add(len);
        let data_end = end.min(limit);
        let mut pos = host;
        while pos < end {
            let next = if pos < data_end {
                self.next_data(pos)?
            } else {
                None
            };
            match next {
                Some((s, e)) if s < data_end => {
                    let s = s.max(pos);
                    // A run that makes no progress: take the rest as data.
                    let e = if e > s { e.min(data_end) } else { data_end };
                    push_merged(out, hole(pos, s - pos));
                    push_merged(
                        out,
                        Extent::Data {
                            file: fid,
                            host: crate::types::HostOff(s),
                            len: e - s,
                        },
                    );
                    pos = e;
                }
                _ => {
                    push_merged(out, hole(pos, end - pos));
                    pos = end;
                }
            }
        }
        Ok(())
    }

    /// Write all of `buf` at `off`; `what` names the structure for errors.
    pub fn write_all_at(&self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        self.file
            .write_all_at(buf, off)
            .map_err(|e| Error::io(format!("writing {what}"), &self.path, off, e))
    }

    /// Set the file length (regular files only).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("truncating", &self.path, len, e))
    }

    /// `fsync` the file.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("flushing", &self.path, 0, e))
    }

    /// `fallocate` a range.
    pub fn fallocate(&self, mode: Falloc, off: u64, len: u64) -> Result<()> {
        let flags = match mode {
            Falloc::Allocate => FallocateFlags::empty(),
            Falloc::PunchHole => {
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            }
            Falloc::ZeroRange => {
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            }
        };
        fallocate(self.file.as_fd(), flags, off as i64, len as i64)
            .map_err(|e| Error::io("allocating", &self.path, off, e.into()))
    }

    /// Where the next data at or after `off` starts, and where that data run ends, using
    /// SEEK_DATA/SEEK_HOLE. `Ok(None)` when there is no data from `off` to EOF. When the
    /// file system cannot answer, everything is reported as data.
    pub fn next_data(&self, off: u64) -> Result<Option<(u64, u64)>> {
        let len = self.len()?;
        if off >= len {
            return Ok(None);
        }
        if self.block_device {
            return Ok(Some((off, len)));
        }
        let start = match lseek(self.file.as_fd(), off as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(nix::Error::ENXIO) => return Ok(None),
            Err(nix::Error::EINVAL | nix::Error::ENOTSUP) => return Ok(Some((off, len))),
            Err(e) => return Err(Error::io("seeking data", &self.path, off, e.into())),
        };
        let end = match lseek(self.file.as_fd(), start as i64, Whence::SeekHole) {
            Ok(e) => e as u64,
            Err(nix::Error::ENXIO) => len,
            Err(e) => return Err(Error::io("seeking hole", &self.path, start, e.into())),
        };
        Ok(Some((start, end.min(len).max(start))))
    }
}

/// Synchronous metadata I/O, as a driver sees it. [`FileLayer`] implements it; tests may
/// supply an in-memory one.
pub trait MetaIo: Send + Sync {
    /// Read exactly `buf.len()` bytes at `off` (`what` names the structure for errors).
    fn read_meta(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()>;
    /// Write all of `buf` at `off`.
    fn write_meta(&self, buf: &[u8], off: u64, what: &str) -> Result<()>;
    /// Current length of the file.
    fn meta_len(&self) -> Result<u64>;
    /// Make written metadata durable.
    fn meta_sync(&self) -> Result<()>;
}

impl MetaIo for FileLayer {
    fn read_meta(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.read_exact_at(buf, off, what)
    }
    fn write_meta(&self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        self.write_all_at(buf, off, what)
    }
    fn meta_len(&self) -> Result<u64> {
        self.len()
    }
    fn meta_sync(&self) -> Result<()> {
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_is_refused_with_qemu_wording() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_str().unwrap();
        let e = FileLayer::open(p, &FileOpen::read_only()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Could not open '{p}': 'file' driver requires '{p}' to be a regular file")
        );
    }

    #[test]
    fn data_runs_from_seek_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 65536).unwrap();
        drop(f);
        let l = FileLayer::open(p.to_str().unwrap(), &FileOpen::read_only()).unwrap();
        let (s, e) = l.next_data(0).unwrap().unwrap();
        assert!(s <= 65536 && e >= 65536 + 4096, "{s} {e}");
    }
}
