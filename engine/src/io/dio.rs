//! O_DIRECT: opening files for direct I/O and learning the alignment it needs.
//!
//! Direct I/O requires the buffer address, the file offset and the length to be multiples of
//! the file's alignment. Arena buffers are page aligned, which covers every memory alignment
//! Linux asks for; offsets and lengths are the caller's job, using [`dio_alignment`].

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Alignment (bytes, powers of two) that O_DIRECT I/O on one file requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// alignment of the user buffer's address
    pub mem: u32,
    /// alignment of the file offset and of the length
    pub offset: u32,
}

impl DioAlign {
    /// What we assume when the kernel does not say: 4096 for both, which every Linux
    /// filesystem and block device with a logical block size up to 4 KiB accepts.
    pub const SAFE: DioAlign = DioAlign {
        mem: 4096,
        offset: 4096,
    };
}

/// The error inside the `io::Error` returned when a filesystem refuses O_DIRECT (open gave
/// `EINVAL`). Test for it with [`is_dio_refused`].
#[derive(Debug)]
pub struct DioRefused {
    /// the file that could not be opened for direct I/O
    pub path: PathBuf,
    /// the original `EINVAL`
    pub source: io::Error,
}

impl fmt::Display for DioRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: the filesystem does not support O_DIRECT ({})",
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for DioRefused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Whether `e` says the filesystem refused O_DIRECT (as returned by [`open_file`] and
/// [`reopen_direct`]); the caller may then fall back to buffered I/O.
pub fn is_dio_refused(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<DioRefused>())
}

fn open_with(path: &Path, write: bool, direct: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    match OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
    {
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            DioRefused {
                path: path.to_owned(),
                source: e,
            },
        )),
        r => r,
    }
}

/// Open an existing file (or block device) for reading, and for writing too when `write`;
/// with O_DIRECT when `direct`. Always O_CLOEXEC; never creates or truncates.
///
/// When the filesystem refuses O_DIRECT (tmpfs before 6.6, some FUSE and network filesystems)
/// the error is `ErrorKind::InvalidInput` wrapping a [`DioRefused`]; see [`is_dio_refused`].
pub fn open_file(path: &Path, write: bool, direct: bool) -> io::Result<File> {
    open_with(path, write, direct)
}

/// Open the same file as `file` again, through `/proc/self/fd/N`, with O_DIRECT: a new open
/// file description, so `file`'s own flags (buffered) are untouched. Read-write when `write`.
///
/// Errors as [`open_file`] (a refused O_DIRECT is a [`DioRefused`]).
pub fn reopen_direct(file: &File, write: bool) -> io::Result<File> {
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    open_with(&path, write, true)
}

/// The O_DIRECT alignment of `file`.
///
/// Asks `statx(STATX_DIOALIGN)` (Linux 6.1+); for a block device the kernel does not describe,
/// uses its logical sector size (`BLKSSZGET`) for both; otherwise [`DioAlign::SAFE`].
pub fn dio_alignment(file: &File) -> io::Result<DioAlign> {
    if let Some(a) = statx_dioalign(file) {
        return Ok(a);
    }
    if file.metadata()?.file_type().is_block_device() {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at `sector`;
        // the fd is open for the duration of the call (borrowed from `file`).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut sector) };
        if r == 0 && sector > 0 && (sector as u32).is_power_of_two() {
            return Ok(DioAlign {
                mem: sector as u32,
                offset: sector as u32,
            });
        }
    }
    Ok(DioAlign::SAFE)
}

/// `statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN)`; `None` when the kernel is too old, the
/// call fails, or the file reports no direct-I/O support (alignment 0).
fn statx_dioalign(file: &File) -> Option<DioAlign> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a valid NUL-terminated string, `stx` points at writable memory of
    // the right type, and the fd is open for the duration of the call.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: zero-initialised and then filled by a successful statx; all fields are integers,
    // so any bit pattern is valid.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (mem, offset) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    if mem == 0 || offset == 0 || !mem.is_power_of_two() || !offset.is_power_of_two() {
        return None;
    }
    Some(DioAlign { mem, offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_sane() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = dio_alignment(f.as_file()).unwrap();
        assert!(a.mem.is_power_of_two() && a.offset.is_power_of_two());
        assert!(a.offset <= 65536);
    }

    #[test]
    fn reopen_is_a_new_description() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let buffered = open_file(f.path(), true, false).unwrap();
        match reopen_direct(&buffered, true) {
            Ok(d) => {
                // SAFETY: plain fcntl on an fd we own.
                let fl = unsafe { libc::fcntl(d.as_raw_fd(), libc::F_GETFL) };
                assert_ne!(fl & libc::O_DIRECT, 0);
                // SAFETY: as above.
                let fl = unsafe { libc::fcntl(buffered.as_raw_fd(), libc::F_GETFL) };
                assert_eq!(fl & libc::O_DIRECT, 0);
            }
            Err(e) if is_dio_refused(&e) => eprintln!("skip: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
