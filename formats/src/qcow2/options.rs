//! qcow2 create options (`-o`), as qemu-img 10 lists them.

use crate::opts::{OptKind, OptionDesc};

/// Every qcow2 create option, in the order QEMU declares them.
pub static QCOW2_OPTIONS: &[OptionDesc] = &[OptionDesc {
    name: "size",
    kind: OptKind::Size,
    help: "Virtual disk size",
}];
