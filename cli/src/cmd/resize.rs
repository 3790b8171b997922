//! `resize`: grow or shrink an image.

use anyhow::{anyhow, bail, Result};
use rimg_formats::Access;
use rimg_formats::Preallocation;

use super::{parse, usage_error};
use crate::common::{report, ImageSpec};
use crate::getopt::{o, OptSpec};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('\0', "preallocation", true),
    o('q', "quiet", false),
    o('\0', "shrink", false),
    o('\0', "object", true),
];

const HELP: &str = "Resize a disk image.  Usage:

  qemu-img resize [-f FMT|--image-opts] [--preallocation PREALLOC] [--shrink]
        [-q] [--object OBJDEF] FILE [+-]SIZE[bkKMGTPE]

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILE format explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,...), not a file name
     (incompatible with -f|--format)
  --shrink
     allow operation when the new size is smaller than the original
  --preallocation PREALLOC
     specify FMT-specific preallocation type for the new areas
  -q, --quiet
     quiet mode (produce only error messages if any)
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     name of the image file, or option string (key=value,..)
     with --image-opts, to operate on
  [+-]SIZE[bkKMGTPE]
     new image size or amount by which to shrink (-)/grow (+),
     with optional multiplier suffix (powers of 1024, default is bytes)
";

/// Run `resize`.
pub fn run(args: &[String]) -> Result<i32> {
    // The size is taken off the end first, so "-1G" is not read as an option.
    if args.len() < 2 {
        if args.iter().any(|a| a == "-h" || a == "--help") {
            print!("{HELP}");
            return Ok(0);
        }
        return Err(usage_error("resize", "Not enough arguments"));
    }
    let size_arg = args[args.len() - 1].clone();
    let o = parse("resize", &args[..args.len() - 1], SPECS, HELP)?;
    if o.pos.len() != 1 {
        return Err(usage_error("resize", "Expecting image file name and size"));
    }
    let prealloc = match o.get("preallocation") {
        None => Preallocation::Off,
        Some(p) => match Preallocation::parse(p) {
            Some(p) => p,
            None => bail!("Invalid preallocation mode '{p}'"),
        },
    };
    let (rel, body) = match size_arg.chars().next() {
        Some('+') => (1i8, &size_arg[1..]),
        Some('-') => (-1i8, &size_arg[1..]),
        _ => (0, size_arg.as_str()),
    };
    let n = match rimg_formats::opts::parse_size(body, 1) {
        Ok(n) if n <= i64::MAX as u64 => n,
        _ => {
            report("Invalid size specified! You may use k, M, G, T, P or E suffixes for");
            report("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
            return Ok(1);
        }
    };
    let spec = ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let chain = spec.open_chain(Access::Resize, false)?;
    let current = chain.virtual_size();
    let total: i128 = match rel {
        1 => i128::from(current) + i128::from(n),
        -1 => i128::from(current) - i128::from(n),
        _ => i128::from(n),
    };
    if total <= 0 {
        bail!("New image size must be positive");
    }
    let total = total as u64;
    if total < current && !o.has("shrink") {
        report("Use the --shrink option to perform a shrink operation.");
        report("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
        return Ok(1);
    }
    if total < current && prealloc != Preallocation::Off {
        bail!("Preallocation can only be used for growing images");
    }
    let mut writer = chain.top().writer()?;
    let actions = writer
        .resize(total, prealloc)
        .map_err(|e| anyhow!("Failed to resize image: {e}"))?;
    if !actions.is_empty() {
        let engine = rimg_engine::Engine::new(Default::default());
        rimg_engine::actions::run(&engine, chain.top(), &actions)
            .map_err(|e| anyhow!("Failed to resize image: {e}"))?;
    }
    writer.close()?;
    if !o.has("quiet") {
        println!("Image resized.");
    }
    Ok(0)
}
