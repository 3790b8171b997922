//! `amend`: change format options of an existing image. Raw has none.

use anyhow::{bail, Result};
use rimg_formats::Access;

use super::{parse, usage_error};
use crate::common::ImageSpec;
use crate::getopt::{o, OptSpec};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('o', "options", true),
    o('p', "progress", false),
    o('q', "quiet", false),
    o('t', "cache", true),
    o('\0', "force", false),
    o('\0', "object", true),
];

const HELP: &str = "Amend (change) image-format-specific options.  Usage:

  qemu-img amend [-f FMT|--image-opts] [-t CACHE] [--force] [-p] [-q]
        [--object OBJDEF] -o FMT_OPTS FILE

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILE format explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,..), not a file name
     (incompatible with -f|--format)
  -t, --cache CACHE
     cache mode for FILE (default: writeback)
  --force
     allow certain unsafe operations
  -o, --options FMT_OPTS
     FMT-specific format options (required)
  -p, --progress
     display progress information
  -q, --quiet
     quiet mode (produce only error messages if any)
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     name of the image file, or option string (key=value,..)
     with --image-opts, to operate on
";

/// Run `amend`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("amend", args, SPECS, HELP)?;
    if !o.has("options") {
        return Err(usage_error("amend", "Must specify options (-o)"));
    }
    if let Some(t) = o.get("cache") {
        crate::common::cache_mode(t)?;
    }
    let mut opts = rimg_formats::opts::OptionMap::default();
    for s in o.all("options") {
        opts.extend_from(s);
    }
    if opts.wants_help() {
        if let Some(f) = o.get("format") {
            // No format rimg implements yet has amendable options.
            if rimg_formats::registry::find(f).is_ok() {
                bail!("Format driver '{f}' does not support option amendment");
            }
        }
    }
    if o.pos.len() != 1 {
        // qemu-img gives no help hint here, unlike its other usage errors.
        bail!("Expecting one image file name");
    }
    let spec = ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let chain = spec.open_chain(Access::Write, false)?;
    bail!(
        "Format driver '{}' does not support option amendment",
        chain.top().format()
    )
}
