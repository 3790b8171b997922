//! `create`: make a new image.

use anyhow::{anyhow, bail, Result};
use rimg_formats::opts::{parse_size, OptKind, OptionDesc, OptionMap, SizeError};
use rimg_formats::{registry, CreateSpec, FormatDriver, OpenOptions};

use super::{parse, usage_error};
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

/// qemu-img's wording for a bad size argument; `what` is "image size", "start offset" ...
pub fn size_error(what: &str, arg: &str, e: SizeError) -> anyhow::Error {
    match e {
        SizeError::Overflow => {
            anyhow!("Invalid {what} specified. Must be between 0 and 9223372036854775807.")
        }
        SizeError::Invalid => anyhow!("Invalid {what} specified: '{arg}'."),
    }
}

/// Parse a size argument as qemu-img's `cvtnum` does (bytes, below 2^63).
pub fn parse_num(what: &str, arg: &str) -> Result<u64> {
    match parse_size(arg, 1) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) => Err(size_error(what, arg, SizeError::Overflow)),
        Err(e) => Err(size_error(what, arg, e)),
    }
}

/// Print `-o help` for `driver` as qemu-img does: with a target filename the protocol
/// layer's options are listed too (under a plain "Supported options:").
pub fn print_option_help(driver: &dyn FormatDriver, with_protocol: bool) {
    let mut descs: Vec<OptionDesc> = driver.create_options().to_vec();
    if with_protocol {
        for d in driver.protocol_options() {
            if !descs.iter().any(|x| x.name == d.name) {
                descs.push(*d);
            }
        }
    }
    descs.sort_by_key(|d| d.name);
    let mut s = if with_protocol {
        "Supported options:\n".to_string()
    } else {
        format!("Supported {} options:\n", driver.name())
    };
    for d in descs {
        let ty = match d.kind {
            OptKind::Size => "size",
            OptKind::Bool => "bool (on/off)",
            OptKind::Str => "str",
            OptKind::Number => "num",
        };
        s.push_str(&format!(
            "  {:<22} - {}\n",
            format!("{}=<{}>", d.name, ty),
            d.help
        ));
    }
    if !with_protocol {
        s.push_str("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n");
    }
    print!("{s}");
}

/// The `Formatting '...'` line: format, size, then the other given options in the
/// driver's order and then the protocol layer's (sizes printed in bytes).
pub fn formatting_line(
    path: &str,
    driver: &dyn FormatDriver,
    size: u64,
    opts: &OptionMap,
) -> String {
    if let Some(line) = driver.formatting_line(path, size, opts) {
        return line;
    }
    let mut s = format!("Formatting '{path}', fmt={} size={size}", driver.name());
    for d in driver
        .create_options()
        .iter()
        .chain(driver.protocol_options())
    {
        if d.name == "size" {
            continue;
        }
        if let Some(v) = opts.get(d.name) {
            let v = match d.kind {
                OptKind::Size => parse_size(v, 1)
                    .map(|n| n.to_string())
                    .unwrap_or(v.to_string()),
                _ => v.to_string(),
            };
            s.push_str(&format!(" {}={v}", d.name));
        }
    }
    s
}

/// Run `create`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("create", args, SPECS, HELP)?;
    let fmt = o.get("format").unwrap_or("raw");
    let mut opts = OptionMap::default();
    for s in o.all("options") {
        opts.extend_from(s);
    }
    let path = o.pos.first();
    let driver = match registry::find(fmt) {
        Ok(d) => d,
        Err(_) => match path {
            Some(p) => bail!("{p}: Unknown file format '{fmt}'"),
            None => bail!("Unknown file format '{fmt}'"),
        },
    };
    if opts.wants_help() {
        print_option_help(driver, path.is_some());
        return Ok(0);
    }
    let Some(path) = path else {
        return Err(usage_error("create", "Expecting image file name"));
    };
    if o.pos.len() > 2 {
        return Err(usage_error(
            "create",
            &format!("Unexpected argument: {}", o.pos[2]),
        ));
    }
    let size = match o.pos.get(1) {
        Some(s) => Some(parse_num("image size", s)?),
        None => None,
    };
    let takes_backing = driver
        .create_options()
        .iter()
        .any(|d| d.name == "backing_file");
    if !takes_backing {
        if o.has("backing") {
            bail!(
                "{path}: Backing file not supported for file format '{}'",
                driver.name()
            );
        }
        if o.has("backing-format") {
            bail!(
                "{path}: Backing file format not supported for file format '{}'",
                driver.name()
            );
        }
    }
    if let Some(b) = o.get("backing") {
        opts.set("backing_file", b);
    }
    if let Some(f) = o.get("backing-format") {
        opts.set("backing_fmt", f);
    }
    if let Err(e) = driver.check_options(&opts) {
        bail!("{path}: {e}");
    }
    // The backing file: its format must be named; it gives the size when none is given.
    let mut backing_size = None;
    if let Some(b) = opts.get("backing_file").map(str::to_string) {
        let resolved = rimg_formats::chain::resolve_backing(path, &b);
        let fmt = opts.get("backing_fmt").map(str::to_string);
        if fmt.is_none() {
            let probed = rimg_formats::FileLayer::open(
                &resolved,
                &rimg_formats::file::FileOpen::read_only(),
            )
            .and_then(|f| rimg_formats::registry::probe(&f))
            .map(|d| d.name())
            .unwrap_or("raw");
            bail!(
                "{path}: Backing file specified without backing format\nDetected format of {probed}."
            );
        }
        if !o.has("backing-unsafe") {
            match rimg_formats::chain::open_image(
                &resolved,
                fmt.as_deref(),
                &OpenOptions::new(rimg_formats::Access::Info),
            ) {
                Ok((img, _)) => backing_size = Some(img.virtual_size()),
                Err(e) => {
                    let msg = match e {
                        rimg_formats::Error::Corrupt { what, .. } => what,
                        other => other.to_string(),
                    };
                    bail!("{path}: {msg}\nCould not open backing image.");
                }
            }
        }
    }
    let size = match (size, opts.take("size"), backing_size) {
        (Some(_), Some(_), _) => bail!("{path}: The image size must be specified only once"),
        (Some(s), None, _) => s,
        (None, Some(v), _) => parse_num("image size", &v)?,
        (None, None, Some(b)) => b,
        (None, None, None) => bail!("{path}: Image creation needs a size parameter"),
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
        let chain = rimg_formats::Chain::open(
            path,
            Some(driver.name()),
            &OpenOptions::new(rimg_formats::Access::Write),
        )
        .map_err(|e| anyhow!("{path}: {e}"))?;
        let engine = rimg_engine::Engine::new(Default::default());
        rimg_engine::actions::run(&engine, chain.top(), &actions)
            .map_err(|e| anyhow!("{path}: {e}"))?;
    }
    Ok(0)
}
