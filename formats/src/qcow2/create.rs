//! Creating new qcow2 images.

use crate::driver::{Action, CreateSpec};
use crate::error::{Error, Result};

/// Create a qcow2 image as `spec` says.
pub(super) fn create(_spec: &CreateSpec) -> Result<Vec<Action>> {
    Err(Error::Unsupported(
        "Creating qcow2 images is not supported by rimg yet".into(),
    ))
}
