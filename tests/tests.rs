//! The integration-test binary of rimg: differential tests that run `rimg` and the real
//! `qemu-img` 10.x side by side on the same inputs and require the same stdout, stderr, exit code
//! and resulting files. Fixtures come from the real `qemu-io`; results are judged by the real
//! `qemu-img compare`.
//!
//! Run with `cargo test -p rimg-cli --test tests`.

mod util;

mod bad_input;
mod bench;
mod check_and_friends;
mod cli_parsing;
mod compare;
mod convert;
mod create;
mod dd;
mod info;
mod limits;
mod locking;
mod luks;
mod map;
mod measure;
mod prop_map;
mod qcow2_encrypted;
mod qcow2_read;
mod qcow2_write;
mod quiet_stderr;
mod resize;
mod vhdx;
mod vmdk;
mod vpc;
