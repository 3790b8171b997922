//! `compare`: do two images have the same content? Exit codes as qemu-img: 0 identical,
//! 1 different, 2 an image could not be opened, 3 allocation status could not be read,
//! 4 a read failed.

use anyhow::Result;
use rimg_engine::compare::{compare, CompareOptions, CompareResult};
use rimg_engine::{Engine, EngineConfig};
use rimg_formats::Access;

use super::parse;
use crate::common::{report, ImageSpec};
use crate::getopt::{o, OptSpec};
use crate::progress::Progress;

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "a-format", true),
    o('f', "left-format", true),
    o('F', "b-format", true),
    o('F', "right-format", true),
    o('\0', "image-opts", false),
    o('T', "cache", true),
    o('p', "progress", false),
    o('q', "quiet", false),
    o('s', "strict", false),
    o('U', "force-share", false),
    o('\0', "object", true),
];

const HELP: &str = "Check if two images have the same contents.  Usage:

  qemu-img compare [[-f FMT] [-F FMT] | --image-opts] [-T CACHE_MODE] [-p] [-q] [-s] [-U]
        [--object OBJDEF] FILE1 FILE2

Arguments:
  -h, --help
     print this help and exit
  -f, --a-format FMT
     specify FILE1 image format explicitly (default: probing is used)
  -F, --b-format FMT
     specify FILE2 image format explicitly (default: probing is used)
  --image-opts
     treat FILE1 and FILE2 as option strings (key=value,..), not file names
     (incompatible with -f|--a-format and -F|--b-format)
  -T, --cache CACHE_MODE
     images caching mode (default: writeback)
  -p, --progress
     display progress information
  -q, --quiet
     quiet mode (produce only error messages if any)
  -s, --strict
     strict mode, also check if sizes are equal
  -U, --force-share
     open images in shared mode for concurrent access
  --object OBJDEF
     defines QEMU user-creatable object
  FILE1, FILE2
     names of the image files, or option strings (key=value,..)
     with --image-opts, to compare

rimg compares on every shard in parallel and reads only where either image may hold data.
";

/// Run `compare`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("compare", args, SPECS, HELP)?;
    if o.pos.len() != 2 {
        return Err(super::usage_error(
            "compare",
            "Expecting two image file names",
        ));
    }
    let quiet = o.has("quiet");
    let cache = match o.get("cache") {
        Some(t) => match crate::common::source_cache_mode(t) {
            Ok(c) => c,
            Err(e) => {
                report(&format!("{e}"));
                return Ok(2);
            }
        },
        None => rimg_engine::CacheMode::Writeback,
    };
    let io = o.has("image-opts");
    let share = o.has("force-share");
    let mut chains = Vec::new();
    for (k, name) in o.pos.iter().enumerate() {
        let fmt = if k == 0 {
            o.get("a-format")
        } else {
            o.get("b-format")
        };
        let opened =
            ImageSpec::resolve(name, fmt, io).and_then(|s| s.open_chain(Access::Read, share));
        match opened {
            Ok(c) => chains.push(c),
            Err(e) => {
                report(&format!("{e:#}"));
                return Ok(2);
            }
        }
    }
    let progress = Progress::new(o.has("progress") && !quiet);
    let cb = |d: u64, t: u64| progress.update(d, t);
    let warn = || {
        if !quiet {
            println!("Warning: Image size mismatch!");
        }
    };
    let engine = Engine::new(EngineConfig::default());
    let res = compare(
        &engine,
        &chains[0],
        &chains[1],
        &CompareOptions {
            strict: o.has("strict"),
            cache,
            progress: Some(&cb),
            on_size_mismatch: Some(&warn),
        },
    );
    let (msg, code) = match res {
        Ok(CompareResult::Identical) => ("Images are identical.".to_string(), 0),
        Ok(CompareResult::ContentMismatch(off)) => {
            (format!("Content mismatch at offset {off}!"), 1)
        }
        Ok(CompareResult::StatusMismatch(off)) => (
            format!("Strict mode: Offset {off} block status mismatch!"),
            1,
        ),
        Ok(CompareResult::SizeMismatch) => ("Strict mode: Image size mismatch!".to_string(), 1),
        Err(rimg_engine::Error::Map { image, source, .. }) => {
            crate::common::report_corrupt(&source);
            report(&format!("Sector allocation test failed for {image}"));
            return Ok(3);
        }
        Err(rimg_engine::Error::Read {
            guest,
            path,
            source,
        }) => {
            report(&format!(
                "Error while reading offset {guest} of {path}: {}",
                rimg_engine::read_strerror(&source)
            ));
            return Ok(4);
        }
        Err(e) => {
            report(&format!("{e}"));
            return Ok(4);
        }
    };
    if !quiet {
        println!("{msg}");
    }
    progress.end_line();
    Ok(code)
}
