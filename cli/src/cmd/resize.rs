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

/// Options of resize that take an argument (for finding the filename before getopt runs).
fn takes_arg(a: &str) -> bool {
    a == "-f"
        || ["--format", "--object", "--preallocation"]
            .iter()
            .any(|l| a.len() > 2 && l.starts_with(a) && !a.contains('='))
}

/// qemu-img's resize takes the argument right after the filename as the size even when it
/// starts with '-' ("-1G"); anywhere else such an argument is an option.
fn split_size(args: &[String]) -> (Vec<String>, Option<String>) {
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            break;
        }
        if a.starts_with('-') && a.len() > 1 {
            i += if takes_arg(a) { 2 } else { 1 };
            continue;
        }
        // a is the filename; a following "-<digit>..." is the size, not an option.
        if let Some(next) = args.get(i + 1) {
            if next.len() > 1 && next.starts_with('-') && next.as_bytes()[1].is_ascii_digit() {
                let mut rest = args.to_vec();
                let size = rest.remove(i + 1);
                return (rest, Some(size));
            }
        }
        break;
    }
    (args.to_vec(), None)
}

/// QAPI's size parser, with its messages.
fn parse_qapi_size(v: &str) -> Result<u64> {
    match rimg_formats::opts::parse_size(v, 1) {
        Ok(n) => Ok(n),
        Err(rimg_formats::opts::SizeError::Overflow) => {
            bail!("Value '{v}' is out of range for parameter 'size'")
        }
        Err(_) => bail!(
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        ),
    }
}

/// Run `resize`.
pub fn run(args: &[String]) -> Result<i32> {
    let (rest, dash_size) = split_size(args);
    let o = parse("resize", &rest, SPECS, HELP)?;
    let mut pos = o.pos.clone();
    if let Some(s) = dash_size {
        pos.insert(1.min(pos.len()), s);
    }
    if pos.len() < 2 {
        return Err(usage_error("resize", "Expecting image file name and size"));
    }
    if pos.len() > 2 {
        return Err(usage_error("resize", "Extra argument(s) in command line"));
    }
    let size_arg = pos[1].clone();
    let prealloc = match o.get("preallocation") {
        None => Preallocation::Off,
        Some(p) => match Preallocation::parse(p) {
            Some(Preallocation::Metadata) => bail!("Unsupported preallocation mode: metadata"),
            Some(p) => p,
            None => bail!("Invalid preallocation mode '{p}'"),
        },
    };
    let (rel, body) = match size_arg.chars().next() {
        Some('+') => (1i8, &size_arg[1..]),
        Some('-') => (-1i8, &size_arg[1..]),
        _ => (0, size_arg.as_str()),
    };
    let n = parse_qapi_size(body)?;
    let spec = ImageSpec::resolve(&pos[0], o.get("format"), o.has("image-opts"))?;
    let chain = spec.open_chain(Access::Resize, false)?;
    let current = chain.virtual_size();
    let total: i128 = match rel {
        1 => i128::from(current) + i128::from(n),
        -1 => i128::from(current) - i128::from(n),
        _ => i128::from(n),
    };
    // qemu computes in int64: anything past 2^63 wraps negative.
    if total <= 0 || total > i128::from(i64::MAX) {
        bail!("New image size must be positive");
    }
    let total = u64::try_from(total).unwrap_or(u64::MAX);
    if total <= current && prealloc != Preallocation::Off {
        bail!("Preallocation can only be used for growing images");
    }
    if total < current && !o.has("shrink") {
        report("Use the --shrink option to perform a shrink operation.");
        report("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
        return Ok(1);
    }
    let mut writer = chain.top().writer()?;
    let actions = writer.resize(total, prealloc).map_err(|e| match e {
        rimg_formats::Error::Io { source, .. } => anyhow!(
            "Could not resize file: {}",
            rimg_formats::error::strerror(&source)
        ),
        other => anyhow!("{other}"),
    })?;
    if !actions.is_empty() {
        let engine = rimg_engine::Engine::new(Default::default());
        rimg_engine::actions::run(&engine, chain.top(), &actions)
            .map_err(|e| anyhow!("Could not resize file: {e}"))?;
    }
    writer.close()?;
    if !o.has("quiet") {
        println!("Image resized.");
    }
    Ok(0)
}
