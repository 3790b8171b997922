//! Disk encryption headers: what `info` shows of an encrypted image without its key.
//!
//! Only the headers are read here (QEMU's `info` opens images without their keys too);
//! decrypting data needs the key secret and is not implemented yet.

pub mod cipher;
pub mod luks;
