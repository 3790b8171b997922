//! Image locking that interoperates with QEMU.
//!
//! QEMU's `file` layer takes open-file-description (OFD) read locks on single bytes of the
//! image file: byte `100 + bit` for each permission it *holds*, byte `200 + bit` for each
//! permission it does *not share*. Before relying on a permission it checks (with
//! `F_OFD_GETLK`) that nobody else holds byte `200 + bit` (someone refuses to share it); before
//! refusing to share a permission it checks that nobody holds `100 + bit`. rimg does exactly
//! the same, so rimg and a running qemu-nbd, qemu-storage-daemon or VM exclude each other as
//! two QEMU processes do. The locks vanish when the file is closed.

use std::fs::File;
use std::os::fd::AsFd;

use nix::fcntl::{fcntl, FcntlArg};

use crate::error::{Error, Result};

/// A set of QEMU block permissions (`BLK_PERM_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms(pub u8);

impl Perms {
    /// `BLK_PERM_CONSISTENT_READ`
    pub const CONSISTENT_READ: Perms = Perms(0x01);
    /// `BLK_PERM_WRITE`
    pub const WRITE: Perms = Perms(0x02);
    /// `BLK_PERM_WRITE_UNCHANGED`
    pub const WRITE_UNCHANGED: Perms = Perms(0x04);
    /// `BLK_PERM_RESIZE`
    pub const RESIZE: Perms = Perms(0x08);
    /// all permissions
    pub const ALL: Perms = Perms(0x0f);
    /// no permission
    pub const NONE: Perms = Perms(0);

    /// Union.
    pub const fn or(self, o: Perms) -> Perms {
        Perms(self.0 | o.0)
    }
    /// Whether permission bit `bit` is in the set.
    pub fn has_bit(self, bit: u32) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// QEMU's name for permission bit `bit`, as used in its lock error messages.
fn perm_name(bit: u32) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const BITS: u32 = 4;

fn flock_for(byte: i64, ty: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: ty,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Take a shared OFD lock on one byte. `Ok(false)` when the filesystem has no OFD locks.
fn lock_byte(file: &File, byte: i64) -> std::result::Result<bool, nix::Error> {
    let fl = flock_for(byte, libc::F_RDLCK as libc::c_short);
    match fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => Ok(true),
        Err(nix::Error::EINVAL | nix::Error::ENOTSUP | nix::Error::ENOLCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether another open file description holds a lock on `byte`.
fn byte_taken(file: &File, byte: i64) -> bool {
    let mut fl = flock_for(byte, libc::F_WRLCK as libc::c_short);
    match fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut fl)) {
        Ok(_) => fl.l_type != libc::F_UNLCK as libc::c_short,
        Err(_) => false,
    }
}

/// Apply QEMU's lock protocol on `file`: hold `perm`, share only `shared`.
/// On conflict returns [`Error::Locked`] worded as qemu-img words it.
pub fn apply(file: &File, path: &str, perm: Perms, shared: Perms) -> Result<()> {
    for bit in 0..BITS {
        let wanted = [
            (perm.has_bit(bit), PERM_BASE + bit as i64),
            (!shared.has_bit(bit), SHARED_BASE + bit as i64),
        ];
        for (want, byte) in wanted {
            if want {
                match lock_byte(file, byte) {
                    Ok(true) => {}
                    // No OFD locks on this filesystem: QEMU's locking=auto goes on unlocked.
                    Ok(false) => return Ok(()),
                    Err(e) => {
                        return Err(Error::io(
                            "taking image lock",
                            path,
                            byte as u64,
                            std::io::Error::from(e),
                        ))
                    }
                }
            }
        }
    }
    for bit in 0..BITS {
        if perm.has_bit(bit) && byte_taken(file, SHARED_BASE + bit as i64) {
            return Err(Error::Locked {
                path: path.to_string(),
                shared: "",
                perm: perm_name(bit),
            });
        }
    }
    for bit in 0..BITS {
        if !shared.has_bit(bit) && byte_taken(file, PERM_BASE + bit as i64) {
            return Err(Error::Locked {
                path: path.to_string(),
                shared: "shared ",
                perm: perm_name(bit),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_writers_conflict_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let ps = p.to_str().unwrap();
        let rw = Perms::CONSISTENT_READ.or(Perms::WRITE);
        let keep = Perms::CONSISTENT_READ.or(Perms::WRITE_UNCHANGED);
        let a = File::options().read(true).write(true).open(&p).unwrap();
        apply(&a, ps, rw, keep).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        let err = apply(&b, ps, rw, keep).unwrap_err();
        assert!(
            err.to_string().contains("Failed to get \"write\" lock"),
            "{err}"
        );
        // A force-share reader gets in; a plain reader does not (it refuses to share write).
        let c = File::open(&p).unwrap();
        apply(&c, ps, Perms::CONSISTENT_READ, Perms::ALL).unwrap();
        let d = File::open(&p).unwrap();
        let err = apply(&d, ps, Perms::CONSISTENT_READ, keep).unwrap_err();
        assert!(err.to_string().contains("shared \"write\" lock"), "{err}");
    }
}
