//! The files a job moves data between, opened by the engine itself.
//!
//! For each image file the engine opens its own descriptors through `/proc/self/fd/N` (new
//! open file descriptions, so the format layer's metadata descriptor and its locks are left
//! alone): always a buffered one, and an O_DIRECT one when the cache mode asks for it and the
//! file system allows it. Each file takes two queue slots: `2*i` buffered, `2*i+1` direct
//! (the buffered descriptor again when direct I/O is off). I/O that is not aligned for
//! O_DIRECT (a file tail, an odd offset) goes through the buffered slot: that is the bounce
//! path for unaligned edges.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use rimg_formats::FileLayer;

use crate::io::dio::{self, DioAlign};
use crate::io::FileSlot;
use crate::{Engine, Error, Result};

/// QEMU cache modes (`-t` / `-T`), mapped to open flags and flush behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT, flush at the end
    None,
    /// page cache, flush at the end
    Writeback,
    /// page cache, every write synchronous (O_DSYNC)
    Writethrough,
    /// O_DIRECT and O_DSYNC
    DirectSync,
    /// page cache, never flush
    Unsafe,
}

impl CacheMode {
    /// Parse qemu's cache mode names (`off` is qemu's alias of `none`).
    pub fn parse(s: &str) -> Option<CacheMode> {
        Some(match s {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::DirectSync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }

    /// Whether data I/O bypasses the page cache.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// Whether every write is synchronous.
    pub fn sync_writes(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }

    /// Whether the job ends with an fsync of written files.
    pub fn flush_at_end(self) -> bool {
        !matches!(self, CacheMode::Unsafe)
    }
}

struct JobFile {
    path: String,
    buffered: File,
    direct: Option<(File, DioAlign)>,
    /// opened for writing
    writable: bool,
    written: bool,
    cache: CacheMode,
    /// encrypted by sectors: (cipher, host offset of IV sector 0)
    crypt: Option<(
        std::sync::Arc<dyn rimg_formats::crypto::cipher::SectorCipher>,
        u64,
    )>,
}

/// The file table of one job; every shard registers the same descriptors.
#[derive(Default)]
pub(crate) struct JobFiles {
    files: Vec<JobFile>,
}

/// Index of a file in a [`JobFiles`] table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileIdx(pub usize);

fn reopen(file: &File, write: bool, flags: i32) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC | flags)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

impl JobFiles {
    /// Add `layer` to the table, opened for writing when `write`, with `cache`'s flags.
    pub fn add(
        &mut self,
        engine: &Engine,
        layer: &FileLayer,
        write: bool,
        cache: CacheMode,
    ) -> Result<FileIdx> {
        let path = layer.path().to_string();
        let sync = if write && cache.sync_writes() {
            libc::O_DSYNC
        } else {
            0
        };
        let open_err = |source| Error::Io {
            what: "opening",
            path: path.clone(),
            off: 0,
            source,
        };
        let buffered = reopen(layer.file(), write, sync).map_err(open_err)?;
        let mut direct = None;
        if cache.direct() {
            match reopen(layer.file(), write, sync | libc::O_DIRECT) {
                Ok(f) => {
                    let align = dio::dio_alignment(&f).unwrap_or(DioAlign::SAFE);
                    engine.note(format!(
                        "{path}: O_DIRECT, alignment mem {} offset {}",
                        align.mem, align.offset
                    ));
                    direct = Some((f, align));
                }
                Err(e) => engine.note(format!(
                    "{path}: O_DIRECT refused ({e}); using the page cache"
                )),
            }
        }
        self.files.push(JobFile {
            path,
            buffered,
            direct,
            writable: write,
            written: false,
            cache,
            crypt: None,
        });
        Ok(FileIdx(self.files.len() - 1))
    }

    /// Descriptors to register with each shard's queue, in slot order.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = Vec::with_capacity(self.files.len() * 2);
        for f in &self.files {
            v.push(f.buffered.as_raw_fd());
            v.push(
                f.direct
                    .as_ref()
                    .map(|(d, _)| d.as_raw_fd())
                    .unwrap_or(f.buffered.as_raw_fd()),
            );
        }
        v
    }

    /// The slot to use for I/O of `len` bytes at `off` from the start of a buffer (which is
    /// page aligned): the direct descriptor when aligned, else the buffered one.
    pub fn slot(&self, i: FileIdx, off: u64, len: u64) -> FileSlot {
        self.slot_at(i, off, len, 0)
    }

    /// As [`JobFiles::slot`], for I/O from `mem_off` bytes into a buffer.
    pub fn slot_at(&self, i: FileIdx, off: u64, len: u64, mem_off: usize) -> FileSlot {
        let f = &self.files[i.0];
        if let Some((_, a)) = &f.direct {
            let m = u64::from(a.offset) - 1;
            let mm = a.mem.max(1) as usize - 1;
            if off & m == 0 && len & m == 0 && mem_off & mm == 0 {
                return FileSlot(i.0 as u32 * 2 + 1);
            }
        }
        FileSlot(i.0 as u32 * 2)
    }

    /// The buffered descriptor of file `i` (for copy_file_range).
    pub fn buffered_fd(&self, i: FileIdx) -> &File {
        &self.files[i.0].buffered
    }

    /// Read into `dst` at `off` through the buffered descriptor of file `i`, until it is
    /// full or the file ends; returns the bytes read.
    pub fn pread(&self, i: FileIdx, off: u64, dst: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let f = &self.files[i.0].buffered;
        let mut got = 0;
        while got < dst.len() {
            match f.read_at(&mut dst[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// The buffered slot of file `i` (fallocate, unaligned I/O).
    pub fn buffered_slot(&self, i: FileIdx) -> FileSlot {
        FileSlot(i.0 as u32 * 2)
    }

    /// The O_DIRECT offset alignment of file `i` (1 when direct I/O is off).
    pub fn align(&self, i: FileIdx) -> u64 {
        self.files[i.0]
            .direct
            .as_ref()
            .map(|(_, a)| u64::from(a.offset))
            .unwrap_or(1)
    }

    /// Path of file `i`, for errors.
    pub fn path(&self, i: FileIdx) -> &str {
        &self.files[i.0].path
    }

    /// Add every file of `image` (one open with `write`/`cache`), marking the encrypted one
    /// so reads from it are decrypted. Returns the indexes in the image's file order.
    pub fn add_image(
        &mut self,
        engine: &Engine,
        image: &dyn rimg_formats::Image,
        write: bool,
        cache: CacheMode,
    ) -> Result<Vec<FileIdx>> {
        let mut v = Vec::new();
        for f in image.files() {
            v.push(self.add(engine, f, write, cache)?);
        }
        if let Some(e) = image.encryption() {
            if let Some(i) = v.get(e.file.0 as usize) {
                self.files[i.0].crypt = Some((e.cipher, e.base));
            }
        }
        Ok(v)
    }

    /// Whether file `i` holds encrypted data.
    pub fn encrypted(&self, i: FileIdx) -> bool {
        self.files[i.0].crypt.is_some()
    }

    /// Decrypt `buf`, read from file `i` at `host`, in place (nothing for plain files).
    /// Encrypted reads are whole 512-byte sectors; a partial last sector is an error.
    pub fn decrypt(&self, i: FileIdx, host: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let Some((c, base)) = &self.files[i.0].crypt else {
            return Ok(());
        };
        if host < *base || !(host - base).is_multiple_of(512) || !buf.len().is_multiple_of(512) {
            return Err(std::io::Error::other(format!(
                "unaligned read of encrypted data ({} bytes at {host:#x})",
                buf.len()
            )));
        }
        c.decrypt((host - base) / 512, buf);
        Ok(())
    }

    /// Encrypt `buf`, about to be written to file `i` at `host`, in place (nothing for
    /// plain files). Whole 512-byte sectors only.
    pub fn encrypt(&self, i: FileIdx, host: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let Some((c, base)) = &self.files[i.0].crypt else {
            return Ok(());
        };
        if host < *base || !(host - base).is_multiple_of(512) || !buf.len().is_multiple_of(512) {
            return Err(std::io::Error::other(format!(
                "unaligned write of encrypted data ({} bytes at {host:#x})",
                buf.len()
            )));
        }
        c.encrypt((host - base) / 512, buf);
        Ok(())
    }

    /// Read `dst.len()` bytes at `off` of file `i` with the buffered descriptor, decrypted
    /// when the file is encrypted (reading whole sectors around the range). Bytes past EOF
    /// read as zeros. Returns the bytes that came from the file.
    pub fn pread_plain(&self, i: FileIdx, off: u64, dst: &mut [u8]) -> std::io::Result<usize> {
        if self.files[i.0].crypt.is_none() {
            let got = self.pread(i, off, dst)?;
            dst[got..].fill(0);
            return Ok(got);
        }
        let a = off & !511;
        let end = (off + dst.len() as u64).div_ceil(512) * 512;
        let mut tmp = vec![0u8; (end - a) as usize];
        let got = self.pread(i, a, &mut tmp)?;
        tmp[got..].fill(0);
        self.decrypt(i, a, &mut tmp)?;
        let s = (off - a) as usize;
        dst.copy_from_slice(&tmp[s..s + dst.len()]);
        Ok(dst.len())
    }

    /// Whether some file holds encrypted data.
    pub fn any_encrypted(&self) -> bool {
        self.files.iter().any(|f| f.crypt.is_some())
    }

    /// Whether the job's I/O goes through the page cache: some file is written without
    /// O_DIRECT, or (`reads_too`) no file uses O_DIRECT at all.
    pub fn page_cache_only(&self, reads_too: bool) -> bool {
        self.buffered_writes()
            || (reads_too
                && !self.files.is_empty()
                && self.files.iter().all(|f| f.direct.is_none()))
    }

    /// Whether some file is opened for writing through the page cache (no O_DIRECT).
    fn buffered_writes(&self) -> bool {
        self.files.iter().any(|f| f.writable && f.direct.is_none())
    }

    /// Remember that file `i` was written (so it is flushed at the end).
    pub fn mark_written(&mut self, i: FileIdx) {
        self.files[i.0].written = true;
    }

    /// fdatasync every written file, whatever the cache mode (an explicit flush).
    pub fn sync_written(&self) -> Result<()> {
        for f in self.files.iter().filter(|f| f.written) {
            f.buffered.sync_data().map_err(|source| Error::Io {
                what: "flushing",
                path: f.path.clone(),
                off: 0,
                source,
            })?;
        }
        Ok(())
    }

    /// fsync every written file whose cache mode asks for it.
    pub fn flush(&self) -> Result<()> {
        for f in &self.files {
            if f.written && f.cache.flush_at_end() {
                f.buffered.sync_all().map_err(|source| Error::Io {
                    what: "flushing",
                    path: f.path.clone(),
                    off: 0,
                    source,
                })?;
            }
        }
        Ok(())
    }
}
