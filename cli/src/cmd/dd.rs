//! `dd`: copy a range of an image into a new image, with qemu-img's own `count` semantics
//! (`count` blocks are counted from the start of the input, not from `skip`).

use anyhow::{anyhow, bail, Result};
use rimg_engine::convert::{convert, ConvertOptions, Source, Target};
use rimg_engine::{CacheMode, Engine, EngineConfig};
use rimg_formats::opts::{parse_size, OptionMap, SizeError};
use rimg_formats::{registry, Access, Chain, CreateSpec, OpenOptions};

use super::parse;
use crate::common::{open_message, report, ImageSpec};
use crate::getopt::{o, OptSpec};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('O', "output-format", true),
    o('\0', "image-opts", false),
    o('U', "force-share", false),
    o('\0', "object", true),
];

const HELP: &str = "Copy input to output with optional format conversion.  Usage:

  qemu-img dd [-f FMT|--image-opts] [-O OUTPUT_FMT] [bs=BLOCK_SIZE]
          [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT

Arguments:
  -h, --help
     print this help and exit
  -U, --force-share
     open images in shared mode for concurrent access
  -f, --format FMT
     specify format for INPUT explicitly (default: probing is used)
  --image-opts
     indicates that INPUT is a complete image specification
     instead of a file name (incompatible with --format)
  -O, --output-format OUTPUT_FMT
     format of the OUTPUT (default: raw)
  --object OBJDEF
     defines QEMU user-creatable object
  bs=BLOCK_SIZE[bKMGTP]
     size of the I/O block, with optional multiplier suffix (powers of 1024)
     (default: 512)
  count=COUNT
     number of blocks to convert (default whole INPUT)
  skip=BLOCKS
     number of input blocks to skip (default: 0)
  if=INPUT
     name of the file, or option string (key=value,..)
     with --image-opts, to use for input
  of=OUTPUT
     output file name to create (will be overridden if alrady exists)
";

/// `count=` and `skip=`: plain decimal numbers, no suffixes.
fn plain_number(what: &str, v: &str) -> Result<u64> {
    let t = v.trim();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!("Invalid {what} specified: '{v}'.");
    }
    match digits.parse::<u64>() {
        Ok(n) if !neg && n <= i64::MAX as u64 => Ok(n),
        Ok(0) => Ok(0),
        _ => bail!("Invalid {what} specified. Must be between 0 and 9223372036854775807."),
    }
}

/// Run `dd`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("dd", args, SPECS, HELP)?;
    let mut bs: u64 = 512;
    let mut count: Option<u64> = None;
    let mut skip: u64 = 0;
    let mut input: Option<String> = None;
    let mut output: Option<String> = None;
    for operand in &o.pos {
        let Some((k, v)) = operand.split_once('=') else {
            report(&format!("unrecognized operand {operand}"));
            return Ok(1);
        };
        match k {
            "bs" => {
                bs = match parse_size(v, 1) {
                    Ok(n) if n > 0 && n <= i32::MAX as u64 => n,
                    Ok(_) | Err(SizeError::Overflow) => {
                        bail!("Invalid bs specified. Must be between 1 and 2147483647.")
                    }
                    Err(SizeError::Invalid) => bail!("Invalid bs specified: '{v}'."),
                }
            }
            "count" => count = Some(plain_number("count", v)?),
            "skip" => skip = plain_number("skip", v)?,
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            _ => {
                report(&format!("unrecognized operand {k}"));
                return Ok(1);
            }
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        bail!("Must specify both input and output files");
    };
    let fmt = o.get("output-format").unwrap_or("raw");
    let driver = registry::find(fmt).map_err(|_| anyhow!("Unknown file format"))?;
    let spec = ImageSpec::resolve(&input, o.get("format"), o.has("image-opts"))?;
    let chain = spec.open_chain(Access::Read, o.has("force-share"))?;
    let in_size = chain.virtual_size();
    // qemu-img: count is measured from the start of the input; skip cuts from that.
    let mut end = in_size;
    if let Some(c) = count {
        end = end.min(c.saturating_mul(bs));
    }
    let start = skip.saturating_mul(bs);
    let out_size = end.saturating_sub(start);
    if start > end {
        report(&format!("{input}: cannot skip to specified offset"));
    }
    driver
        .create(&CreateSpec {
            path: output.clone(),
            size: out_size,
            options: OptionMap::default(),
        })
        .map_err(|e| anyhow!("{output}: error while creating output image: {e}"))?;
    let (timage, _) =
        rimg_formats::chain::open_image(&output, Some(fmt), &OpenOptions::new(Access::Write))
            .map_err(|e| anyhow!(open_message(&output, e)))?;
    let tchain = Chain::single(timage, &output, false);
    if out_size == 0 {
        return Ok(0);
    }
    let mut writer = tchain.top().writer()?;
    let engine = Engine::new(EngineConfig::default());
    convert(
        &engine,
        &[Source {
            chain: &chain,
            start,
            len: out_size,
        }],
        Target {
            image: tchain.top(),
            writer: writer.as_mut(),
            offset: 0,
            is_zero: true,
        },
        &ConvertOptions {
            sparse: Some(0),
            src_cache: CacheMode::Writeback,
            dst_cache: CacheMode::Writeback,
            copy_range: false,
            parallel: 8,
            rate: None,
            salvage: false,
            compress: false,
            top_layer_only: false,
            progress: None,
        },
    )
    .map_err(|e| anyhow!("{e}"))?;
    writer.close()?;
    Ok(0)
}
