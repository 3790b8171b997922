//! rimg format drivers.
//!
//! One rule shapes this crate (see `shared/DESIGN.md`): **format drivers translate guest
//! offsets into extent lists and commit metadata; the engine moves every data byte.** Nothing
//! here reads or writes bulk guest data. A driver answers "where does this guest range live"
//! ([`Image::map`] → [`Extent`]s) and "where may I put these guest bytes"
//! ([`ImageWriter::allocate`] → [`Placement`]s), and publishes metadata once the engine says
//! the data is on disk ([`ImageWriter::commit`]).
//!
//! Layout:
//! - [`types`]: offset newtypes and file ids; [`extent`]: what a guest range is.
//! - [`driver`]: the [`FormatDriver`], [`Image`] and [`ImageWriter`] contracts.
//! - [`file`]: the `file` protocol layer (metadata I/O, allocation queries) with
//!   QEMU-compatible image locking ([`lock`]).
//! - [`chain`]: backing chains, opened through a gate (depth limit, loop detection).
//! - [`registry`]: the driver list and format probing.
//! - [`opts`]: `-o` option strings and qemu-img's size syntax.
//! - one module per format: [`raw`], [`qcow2`], [`vmdk`], [`vpc`], [`vhdx`], [`luks`].
#![deny(missing_docs)]

pub mod chain;
pub mod crypto;
pub mod driver;
pub mod error;
pub mod extent;
pub mod file;
pub mod lock;
pub mod luks;
pub mod opts;
pub mod qcow2;
pub mod raw;
pub mod registry;
pub mod types;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

pub use chain::{Chain, ChainExtent};
pub use driver::{
    Access, Action, BackingRef, CreateSpec, Encryption, FormatDriver, Image, ImageWriter,
    OpenOptions, Placement, Preallocation, SnapshotInfo, Ticket,
};
pub use error::{Error, ErrorKind, Result};
pub use extent::{Codec, Extent};
pub use file::FileLayer;
pub use types::{FileId, GuestOff, HostOff};
