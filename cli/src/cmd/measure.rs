//! `measure`: how much space a new image needs.

use anyhow::{anyhow, bail, Result};
use rimg_formats::opts::OptionMap;
use rimg_formats::registry;
use rimg_formats::Access;

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
    // Persistent bitmaps of a qcow2 source: (granularity, name length) each.
    let mut source_bitmaps: Option<Vec<(u64, usize)>> = None;
    let (size, allocated) = match (file, size_arg) {
        (None, Some(s)) => (super::create::parse_num("image size", s)?, None),
        (Some(f), _) => {
            let mut spec = ImageSpec::resolve(f, o.get("format"), o.has("image-opts"))?;
            spec.snapshot = o.get("snapshot").map(str::to_string);
            let chain = spec.open_chain(Access::Read, o.has("force-share"))?;
            if chain.top().format() == "qcow2" {
                let fs = chain.top().format_specific().unwrap_or_default();
                let list = fs["data"]["bitmaps"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|b| {
                                (
                                    b["granularity"].as_u64().unwrap_or(65536),
                                    b["name"].as_str().map_or(0, str::len),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                source_bitmaps = Some(list);
            }
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
    // qemu-img adds the space persistent bitmaps need when both ends are qcow2.
    let bitmaps = match (&source_bitmaps, driver.name()) {
        (Some(list), "qcow2") => {
            let cs = opts
                .get("cluster_size")
                .and_then(|v| rimg_formats::opts::parse_size(v, 1).ok())
                .unwrap_or(65536);
            Some(bitmaps_size(size, cs, list))
        }
        _ => None,
    };
    if json {
        let mut m = serde_json::Map::new();
        if let Some(b) = bitmaps {
            m.insert("bitmaps".into(), b.into());
        }
        m.insert("required".into(), required.into());
        m.insert("fully-allocated".into(), full.into());
        println!("{}", qemu_json(&serde_json::Value::Object(m)));
    } else {
        println!("required size: {required}\nfully allocated size: {full}");
        if let Some(b) = bitmaps {
            println!("bitmaps size: {b}");
        }
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
        let push = |out: &mut Vec<(u64, u64)>, s0: u64, l0: u64| match out.last_mut() {
            Some((s, l)) if *s + *l == s0 => *l += l0,
            _ => out.push((s0, l0)),
        };
        for ce in &exts {
            let len = ce.extent.len();
            let opaque = chain
                .layers()
                .get(ce.depth)
                .is_some_and(|l| l.image.opaque_allocation());
            if opaque {
                // QEMU has no allocation status for this layer: all of it is data.
                push(&mut out, pos, len);
                pos += len;
                continue;
            }
            match ce.extent {
                rimg_formats::Extent::Compressed { .. } => push(&mut out, pos, len),
                rimg_formats::Extent::Data { file, host, .. } => {
                    // Like qemu's block status, holes in the host file read as zeros.
                    let f = &chain.layers()[ce.depth].image.files()[file.0 as usize];
                    let mut h = host.0;
                    let end = host.0 + len;
                    while h < end {
                        match f.next_data(h)? {
                            Some((s, e)) if s < end => {
                                let e = e.min(end);
                                push(&mut out, pos + (s - host.0), e - s);
                                h = e;
                            }
                            _ => break,
                        }
                    }
                }
                _ => {}
            }
            pos += len;
        }
        off += n;
    }
    Ok(out)
}

/// Bytes the persistent bitmaps of an image of `size` bytes need in a qcow2 target with
/// clusters of `cs` bytes: per bitmap its data clusters and bitmap table, plus the
/// bitmap directory.
fn bitmaps_size(size: u64, cs: u64, bitmaps: &[(u64, usize)]) -> u64 {
    let mut clusters = 0;
    let mut dir = 0u64;
    for &(gran, name_len) in bitmaps {
        let bits = size.div_ceil(gran.max(1));
        let data = bits.div_ceil(8).div_ceil(cs);
        clusters += data + (data * 8).div_ceil(cs);
        dir += (24 + name_len as u64).div_ceil(8) * 8;
    }
    (clusters + dir.div_ceil(cs)) * cs
}
