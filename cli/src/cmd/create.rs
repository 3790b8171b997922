//! `create`: make a new image.

use anyhow::{anyhow, bail, Result};
use rimg_formats::opts::{parse_size, OptionMap, SizeError};
use rimg_formats::{registry, CreateSpec, FormatDriver, OpenOptions};

use super::{parse, usage_error};
use crate::common::ImageSpec;
use crate::getopt::{o, OptSpec};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('q', "quiet", false),
    o('f', "format", true),
    o('o', "options", true),
    o('b', "backing", true),
    o('F', "backing-format", true),
    o('u', "backing-unsafe", false),
    o('\0', "object", true),
];

const HELP: &str = "Create and format a new image file.  Usage:

  qemu-img create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILE [-F BACKING_FMT]]
        [-u] [-q] [--object OBJDEF] FILE [SIZE]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet mode (produce only error messages if any)
  -f, --format FMT
     specifies the format of the new image (default: raw)
  -o, --options FMT_OPTS
     format-specific options (specify '-o help' for help)
  -b, --backing BACKING_FILE
     create target image to be a CoW on top of BACKING_FILE
  -F, --backing-format BACKING_FMT
     specifies the format of BACKING_FILE (default: probing is used)
  -u, --backing-unsafe
     do not fail if BACKING_FILE can not be read
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     name of the image file to create (will be overwritten if already exists)
  SIZE[bkKMGTPE]
     image size with optional multiplier suffix (powers of 1024)
     (required unless BACKING_FILE is specified)
";

/// qemu-img's wording for a bad image size.
pub fn size_error(arg: &str, e: SizeError) -> anyhow::Error {
    match e {
        SizeError::Overflow => anyhow!("Image size must be less than 8 EiB!"),
        SizeError::Invalid => anyhow!("Invalid image size specified: '{arg}'."),
    }
}

/// Parse an image size argument as `create` does (bytes, < 8 EiB).
pub fn parse_image_size(arg: &str) -> Result<u64> {
    match parse_size(arg, 1) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) => Err(size_error(arg, SizeError::Overflow)),
        Err(e) => Err(size_error(arg, e)),
    }
}

/// Print `-o help` for `driver` as qemu-img does.
pub fn print_option_help(driver: &dyn FormatDriver) {
    let mut s = format!("Supported {} options:\n", driver.name());
    let mut descs: Vec<_> = driver.create_options().to_vec();
    descs.sort_by_key(|d| d.name);
    for d in descs {
        let ty = match d.kind {
            rimg_formats::opts::OptKind::Size => "size",
            rimg_formats::opts::OptKind::Bool => "bool (on/off)",
            rimg_formats::opts::OptKind::Str => "str",
            rimg_formats::opts::OptKind::Number => "num",
        };
        s.push_str(&format!(
            "  {:<22} - {}\n",
            format!("{}=<{}>", d.name, ty),
            d.help
        ));
    }
    s.push_str("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n");
    print!("{s}");
}

/// The `Formatting '...'` line: format, size, then every other given option in the
/// driver's order.
pub fn formatting_line(
    path: &str,
    driver: &dyn FormatDriver,
    size: u64,
    opts: &OptionMap,
) -> String {
    let mut s = format!("Formatting '{path}', fmt={} size={size}", driver.name());
    for d in driver.create_options() {
        if d.name == "size" {
            continue;
        }
        if let Some(v) = opts.get(d.name) {
            s.push_str(&format!(" {}={v}", d.name));
        }
    }
    s
}

/// Run `create`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("create", args, SPECS, HELP)?;
    let fmt = o.get("format").unwrap_or("raw");
    let driver = registry::find(fmt).map_err(|e| anyhow!("{e}"))?;
    let mut opts = OptionMap::default();
    for s in o.all("options") {
        opts.extend_from(s);
    }
    if opts.wants_help() {
        print_option_help(driver);
        return Ok(0);
    }
    let Some(path) = o.pos.first() else {
        return Err(usage_error("create", "Expecting image file name"));
    };
    if o.pos.len() > 2 {
        return Err(usage_error(
            "create",
            &format!("Unexpected argument: {}", o.pos[2]),
        ));
    }
    if o.has("backing") {
        bail!(
            "Backing file not supported for file format '{}'",
            driver.name()
        );
    }
    let size = match o.pos.get(1) {
        Some(s) => Some(parse_image_size(s)?),
        None => None,
    };
    if let Err(e) = opts.validate(driver.create_options()) {
        bail!("{path}: {e}");
    }
    let size = match (size, opts.take("size")) {
        (Some(s), _) => s,
        (None, Some(v)) => parse_image_size(&v)?,
        (None, None) => bail!("Image creation needs a size parameter"),
    };
    if !o.has("quiet") {
        println!("{}", formatting_line(path, driver, size, &opts));
    }
    let spec = CreateSpec {
        path: path.clone(),
        size,
        options: opts,
    };
    let actions = driver.create(&spec).map_err(|e| anyhow!("{path}: {e}"))?;
    if !actions.is_empty() {
        let ispec = ImageSpec {
            path: path.clone(),
            format: Some(driver.name().to_string()),
            no_lock: false,
        };
        let chain = rimg_formats::Chain::open(
            &ispec.path,
            ispec.format.as_deref(),
            &OpenOptions::new(rimg_formats::Access::Write),
        )
        .map_err(|e| anyhow!("{path}: {e}"))?;
        let engine = rimg_engine::Engine::new(Default::default());
        rimg_engine::actions::run(&engine, chain.top(), &actions)
            .map_err(|e| anyhow!("{path}: {e}"))?;
    }
    Ok(0)
}
