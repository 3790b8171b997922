//! The driver list and format probing.

use crate::driver::FormatDriver;
use crate::error::{Error, Result};
use crate::file::FileLayer;

/// Every format rimg implements.
pub static DRIVERS: &[&dyn FormatDriver] = &[
    &crate::raw::RAW,
    &crate::qcow2::QCOW2,
    &crate::vmdk::VMDK,
    &crate::vpc::VPC,
    &crate::luks::LUKS,
    &crate::vhdx::VHDX,
];

/// Image formats qemu-img 10.x knows that rimg does not implement yet: named in a clear
/// "not supported yet" error instead of qemu-img's "Unknown driver".
const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "host_device",
    "nbd",
    "null-co",
    "null-aio",
    "parallels",
    "preallocate",
    "qcow",
    "qed",
    "quorum",
    "snapshot-access",
    "throttle",
    "vdi",
    "vvfat",
];

/// The driver called `name` (qemu-img's `-f` names).
pub fn find(name: &str) -> Result<&'static dyn FormatDriver> {
    if let Some(d) = DRIVERS.iter().find(|d| d.name() == name) {
        return Ok(*d);
    }
    if QEMU_FORMATS.contains(&name) {
        return Err(Error::Unsupported(format!(
            "Format '{name}' is not supported by rimg yet"
        )));
    }
    Err(Error::InvalidArgument(format!("Unknown driver '{name}'")))
}

/// Bytes of the file head given to [`FormatDriver::probe`].
pub const PROBE_BYTES: usize = 2048;

/// Guess the format of `file` as qemu does: the highest probe score wins; raw (score 1) is
/// the fallback.
pub fn probe(file: &FileLayer) -> Result<&'static dyn FormatDriver> {
    let mut head = vec![0u8; PROBE_BYTES];
    let n = file.read_at_most(&mut head, 0, "image header")?;
    head.truncate(n);
    let len = file.len()?;
    let best = DRIVERS
        .iter()
        .map(|d| (d.probe(&head, len), *d))
        .max_by_key(|(score, _)| *score)
        .map(|(_, d)| d)
        .unwrap_or(&crate::raw::RAW);
    Ok(best)
}
