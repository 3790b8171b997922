//! `rimg`: a drop-in replacement for `qemu-img` 10.x.
//!
//! Parsing happens in two phases (see `shared/CONVENTIONS.md`): [`getopt`] turns the command
//! line into options and positionals exactly as qemu-img's GNU getopt does, then each
//! command in [`cmd`] resolves them into a validated plan before any I/O.

mod cmd;
mod common;
mod getopt;
mod output;
mod progress;

use std::process::ExitCode;

fn main() -> ExitCode {
    // A closed pipe ends the process quietly, as it ends qemu-img (`rimg map ... | head`);
    // Rust's default (SIGPIPE ignored) would turn it into a panic in println!.
    // SAFETY: called first thing, before any other thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().collect();
    common::set_progname(args.first().map(String::as_str).unwrap_or("rimg"));
    let code = cmd::run(&args[1..]);
    ExitCode::from(code as u8)
}
