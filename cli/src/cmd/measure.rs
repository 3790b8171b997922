//! `measure`: how much space a new image needs.

use anyhow::{anyhow, bail, Result};
use rimg_formats::opts::OptionMap;
use rimg_formats::registry;
use rimg_formats::Access;
use serde_json::json;

use super::parse;
use crate::common::{output_format, report, ImageSpec};
use crate::getopt::{o, OptSpec};
use crate::output::qemu_json;

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('l', "snapshot", true),
    o('O', "target-format", true),
    o('o', "options", true),
    o('\0', "size", true),
    o('\0', "output", true),
    o('U', "force-share", false),
    o('\0', "object", true),
];

const HELP: &str = "Calculate the file size required for a new image.  Usage:

  qemu-img measure [-f FMT|--image-opts] [-l SNAPSHOT]
        [-O TARGET_FMT] [-o TARGET_OPTS] [--output human|json]
        [--object OBJDEF] (--size SIZE | FILE)

Arguments:
  -h, --help
     print this help and exit
  -f, --source-format FMT
     specify format of FILE explicitly (default: probing is used)
  --image-opts
     indicates that FILE is a complete image specification
     instead of a file name (incompatible with --source-format)
  -l, --source-snapshot SNAPSHOT_PARAMS
     use this snapshot in FILE as source
  -O, --target-format TARGET_FMT
     desired target/output image format (default: raw)
  -o TARGET_OPTS
     options specific to TARGET_FMT
  --output human|json
     output format (default: human)
  -U, --force-share
     open images in shared mode for concurrent access
  --object OBJDEF
     defines QEMU user-creatable object
  -s, --size SIZE[bKMGTPE]
     measure file size for given image size,
     with optional multiplier suffix (powers of 1024)
  FILE
     measure file size required to convert from FILE (either a file name
     or an option string (key=value,..) with --image-opts)
";

/// Run `measure`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("measure", args, SPECS, HELP)?;
    let json = output_format("measure", o.get("output"))?;
    let fmt = o.get("target-format").unwrap_or("raw");
    let mut opts = OptionMap::default();
    for s in o.all("options") {
        opts.extend_from(s);
    }
    if o.pos.len() > 1 {
        bail!("At most one filename argument is allowed.");
    }
    let file = o.pos.first();
    let size_arg = o.get("size");
    match (file, size_arg) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        _ => {}
    }
    let driver = registry::find(fmt).map_err(|_| anyhow!("Unknown file format '{fmt}'"))?;
    if opts.wants_help() {
        super::create::print_option_help(driver, false);
        return Ok(0);
    }
    let (size, allocated) = match (file, size_arg) {
        (None, Some(s)) => (super::create::parse_num("image size", s)?, None),
        (Some(f), _) => {
            let mut spec = ImageSpec::resolve(f, o.get("format"), o.has("image-opts"))?;
            spec.snapshot = o.get("snapshot").map(str::to_string);
            let chain = spec.open_chain(Access::Read, o.has("force-share"))?;
            let size = chain.virtual_size();
            (size, Some(data_ranges(&chain)?))
        }
        (None, None) => unreachable!("checked above"),
    };
    if let Err(e) = driver.check_options(&opts) {
        report(&e.to_string());
        bail!("Invalid options for file format '{}'", driver.name());
    }
    let (required, full) = driver
        .measure(size, allocated.as_deref(), &opts)
        .map_err(|e| anyhow!("{e}"))?;
    if json {
        println!(
            "{}",
            qemu_json(&json!({"required": required, "fully-allocated": full}))
        );
    } else {
        println!("required size: {required}\nfully allocated size: {full}");
    }
    Ok(0)
}

/// Guest ranges of `chain` that hold data (not zeros, not unallocated), merged.
fn data_ranges(chain: &rimg_formats::Chain) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    let size = chain.virtual_size();
    let mut exts = Vec::new();
    while off < size {
        exts.clear();
        let n = chain.map(rimg_formats::GuestOff(off), size - off, &mut exts)?;
        if n == 0 {
            break;
        }
        let mut pos = off;
        for ce in &exts {
            let len = ce.extent.len();
            if matches!(
                ce.extent,
                rimg_formats::Extent::Data { .. } | rimg_formats::Extent::Compressed { .. }
            ) {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == pos => *l += len,
                    _ => out.push((pos, len)),
                }
            }
            pos += len;
        }
        off += n;
    }
    Ok(out)
}
