//! `measure -O qcow2`: the space a new qcow2 image needs.

use crate::error::{Error, Result};
use crate::opts::OptionMap;

/// `(required, fully_allocated)` for a qcow2 image of `size` bytes holding `data`.
pub(super) fn measure(
    _size: u64,
    _data: Option<&[(u64, u64)]>,
    _options: &OptionMap,
) -> Result<(u64, u64)> {
    Err(Error::Unsupported(
        "measure -O qcow2 is not supported by rimg yet".into(),
    ))
}
