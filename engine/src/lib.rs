//! x
#![deny(missing_docs)]

pub mod io;
