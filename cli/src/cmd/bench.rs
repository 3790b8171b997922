//! `bench`: options are accepted as qemu-img's; the benchmark itself is tracked in its own
//! issue (it runs as an engine task).

use anyhow::{bail, Result};

use super::parse;
use crate::getopt::{o, OptSpec};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('c', "count", true),
    o('d', "depth", true),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('i', "aio", true),
    o('n', "native", false),
    o('o', "offset", true),
    o('q', "", false),
    o('s', "buffer-size", true),
    o('S', "step-size", true),
    o('t', "cache", true),
    o('w', "write", false),
    o('U', "force-share", false),
    o('\0', "flush-interval", true),
    o('\0', "no-drain", false),
    o('\0', "pattern", true),
    o('\0', "object", true),
];

const HELP: &str = "Run a simple image benchmark.  Usage:

  qemu-img bench [-f FMT|--image-opts] [-c COUNT] [-d DEPTH] [-i AIO] [-n]
        [-o OFFSET] [-s BUFSIZE] [-S STEPSIZE] [-t CACHE] [-w [--pattern PATTERN]]
        [--flush-interval N [--no-drain]] [-q] [-U] [--object OBJDEF] FILE
";

/// Run `bench`.
pub fn run(args: &[String]) -> Result<i32> {
    let _o = parse("bench", args, SPECS, HELP)?;
    bail!("bench is not implemented by rimg yet")
}
