//! `convert`: copy one or more images (concatenated) into a new or existing target.

use anyhow::{anyhow, bail, Result};
use rimg_engine::convert::{convert, ConvertOptions, Source, Target};
use rimg_engine::{CacheMode, Engine, EngineConfig};
use rimg_formats::opts::{parse_size, OptionMap, SizeError};
use rimg_formats::Access;
use rimg_formats::{registry, Chain, CreateSpec, OpenOptions};

use super::parse;
use crate::common::{cache_mode, open_message, warn_probed_raw, ImageSpec};
use crate::getopt::{o, OptSpec};
use crate::progress::Progress;

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('q', "quiet", false),
    o('p', "", false),
    o('f', "source-format", true),
    o('\0', "source-image-opts", false),
    o('\0', "image-opts", false),
    o('l', "snapshot", true),
    o('T', "source-cache", true),
    o('O', "output-format", true),
    o('\0', "target-image-opts", false),
    o('o', "options", true),
    o('c', "", false),
    o('t', "output-cache", true),
    o('B', "backing", true),
    o('F', "backing-format", true),
    o('n', "", false),
    o('\0', "target-is-zero", false),
    o('S', "sparse-size", true),
    o('\0', "bitmaps", false),
    o('\0', "skip-broken-bitmaps", false),
    o('U', "force-share", false),
    o('r', "rate", true),
    o('m', "parallel", true),
    o('C', "copy-range-offloading", false),
    o('\0', "salvage", false),
    o('W', "oob-writes", false),
    o('\0', "object", true),
];

const HELP: &str = "Copy one image to another with optional format conversion.  Usage:

  qemu-img convert [-f SRC_FMT|--image-opts] [-T SRC_CACHE] [--bitmaps [--skip-broken-bitmaps]]
        [-o TGT_OPTS|--target-image-opts] [-t TGT_CACHE] [-n]
        [-B BACKING_FILENAME [-F BACKING_FMT]]
        SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress (also printed once on SIGUSR1)
  -f, --source-format SRC_FMT
     specify SRC_FILENAME source image format explicitly
  --source-image-opts
     indicates that SRC_FILENAME is a complete image specification
     instead of a file name (incompatible with --source-format)
  -l, --source-snapshot SNAPSHOT_PARAMS
     specify source snapshot parameters
  -T, --source-cache SRC_CACHE
     source image(s) cache mode (writeback)
  -O, --target-format TGT_FMT
     specify TGT_FILENAME image format (default is raw)
  --target-image-opts
     indicates that TGT_FILENAME is a complete image specification
     instead of a file name (incompatible with --output-format)
  -o, --target-options TGT_OPTS
     TARGET_FMT-specific options
  -c, --compress
     create compressed output image (qcow and qcow2 format only)
  -t, --target-cache TGT_CACHE
     cache mode when opening output image (unsafe)
  -B, --backing BACKING_FILENAME
     create output to be a CoW on top of BACKING_FILENAME
  -F, --backing-format BACKING_FMT
     specify BACKING_FILENAME image format explicitly
  -n, --no-create
     omit target volume creation (eg on rbd)
  --target-is-zero
     the target reads as zeros already (requires -n): zero ranges are skipped
  -S, --sparse-size SPARSE_SIZE
     runs of zeros of at least SPARSE_SIZE (default 4k, multiple of 512) become
     holes in the target; 0 fully allocates the target
  --bitmaps
     also copy any persistent bitmaps present in source
  --skip-broken-bitmaps
     skip (do not error out) any broken bitmaps
  -U, --force-share
     open images in shared mode for concurrent access
  -r, --rate RATE
     I/O rate limit, in bytes per second
  -m, --parallel NUM_COROUTINES
     most transfer units in flight, in pairs (default 8); rimg spreads them over
     one shard per core
  -C, --copy-range-offloading
     use copy_file_range offloading where no data transform is needed
  --salvage
     on read errors, write zeros and go on instead of failing
  -W, --oob-writes
     enable out-of-order writes to improve performance (rimg always allocates
     in guest order, so the target layout is the same either way)
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  SRC_FILENAME
     source image file name (or specification with --image-opts)
  TGT_FILENAME
     target (output) image file name
";

/// Run `convert`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("convert", args, SPECS, HELP)?;
    let quiet = o.has("quiet");
    let no_create = o.has("n");
    let fmt = o.get("output-format").unwrap_or("raw");
    let mut topts = OptionMap::default();
    for s in o.all("options") {
        topts.extend_from(s);
    }
    let driver = registry::find(fmt).map_err(|_| anyhow!("Unknown file format '{fmt}'"))?;
    if topts.wants_help() {
        super::create::print_option_help(driver, o.pos.len() >= 2);
        return Ok(0);
    }
    let src_cache = match o.get("source-cache") {
        Some(t) => crate::common::source_cache_mode(t)?,
        None => CacheMode::Writeback,
    };
    let dst_cache = match o.get("output-cache") {
        Some(t) => cache_mode(t)?,
        None => CacheMode::Unsafe,
    };
    let parallel = match o.get("parallel") {
        Some(v) => match parse_size(v, 1) {
            Ok(n) if (1..=16).contains(&n) => n as usize,
            Ok(_) | Err(SizeError::Overflow) => {
                bail!("Invalid number of coroutines specified. Must be between 1 and 16.")
            }
            Err(SizeError::Invalid) => bail!("Invalid number of coroutines specified: '{v}'."),
        },
        None => 8,
    };
    let sparse = match o.get("sparse-size") {
        Some(v) => {
            let n = super::create::parse_num("buffer size for sparse output", v)?;
            if n % 512 != 0 || n > 16 << 20 {
                bail!("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).");
            }
            Some(n)
        }
        None => None,
    };
    let rate = match o.get("rate") {
        Some(v) => Some(super::create::parse_num("rate limit", v)?),
        None => None,
    };
    if o.has("copy-range-offloading") && sparse.is_some() {
        bail!("Cannot enable copy offloading when -S is used");
    }
    if o.has("skip-broken-bitmaps") && !o.has("bitmaps") {
        bail!("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if o.has("target-is-zero") && !no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    if o.has("target-image-opts") && !no_create {
        bail!("--target-image-opts requires use of -n flag");
    }
    if o.pos.len() < 2 {
        bail!("Must specify image file name");
    }
    if no_create && !topts.is_empty() {
        bail!("-o has no effect when skipping image creation");
    }
    if o.has("c") && !driver.supports_compression() {
        bail!("Compression not supported for this file format");
    }
    let takes_backing = driver
        .create_options()
        .iter()
        .any(|d| d.name == "backing_file");
    if !takes_backing && o.has("backing") {
        bail!(
            "Backing file not supported for file format '{}'",
            driver.name()
        );
    }
    if !takes_backing && o.has("backing-format") {
        bail!(
            "Backing file format not supported for file format '{}'",
            driver.name()
        );
    }
    if let Some(b) = o.get("backing") {
        if !o.has("backing-format") && topts.get("backing_fmt").is_none() {
            bail!("Use of backing file requires explicit backing format");
        }
        topts.set("backing_file", b);
    }
    if let Some(f) = o.get("backing-format") {
        topts.set("backing_fmt", f);
    }
    // -B (or -o backing_file): only what the source's top layer holds is copied; the rest
    // is left to the target's backing file, as qemu-img does.
    let target_backing = topts.get("backing_file").is_some();
    let sparse = sparse.unwrap_or(4096);
    let (srcs, tgt) = o.pos.split_at(o.pos.len() - 1);
    let tgt = &tgt[0];

    // Sources.
    let image_opts = o.has("source-image-opts") || o.has("image-opts");
    let share = o.has("force-share");
    let mut chains: Vec<Chain> = Vec::new();
    for s in srcs {
        let mut spec = ImageSpec::resolve(s, o.get("source-format"), image_opts)?;
        spec.snapshot = o.get("snapshot").map(str::to_string);
        chains.push(spec.open_chain(Access::ReadUnshared, share)?);
    }
    if o.has("bitmaps") && !chains.is_empty() {
        bail!("Source lacks bitmap support");
    }
    let total: u64 = chains.iter().map(Chain::virtual_size).sum();

    // Target.
    let tspec = if o.has("target-image-opts") {
        if !no_create {
            bail!("--target-image-opts requires use of -n flag");
        }
        ImageSpec::resolve(tgt, None, true)?
    } else {
        ImageSpec {
            path: tgt.clone(),
            format: Some(fmt.to_string()),
            no_lock: false,
            snapshot: None,
            key_secret: None,
            opts_name: None,
        }
    };
    if !no_create {
        if let Err(e) = driver.check_options(&topts) {
            bail!("{e}");
        }
        if topts.get("size").is_some() {
            topts.take("size");
        }
        let actions = driver
            .create(&CreateSpec {
                path: tgt.clone(),
                size: total,
                options: topts.clone(),
            })
            .map_err(|e| anyhow!("{tgt}: error while converting {fmt}: {e}"))?;
        if !actions.is_empty() {
            let c = Chain::open(tgt, Some(fmt), &OpenOptions::new(Access::Write))
                .map_err(|e| anyhow!(open_message(tgt, e)))?;
            let engine = Engine::new(EngineConfig::default());
            rimg_engine::actions::run(&engine, c.top(), &actions)
                .map_err(|e| anyhow!("{tgt}: {e}"))?;
        }
    }
    let (timage, _probed) = rimg_formats::chain::open_image(
        &tspec.path,
        tspec.format.as_deref(),
        &OpenOptions {
            access: Access::Write,
            force_share: false,
            no_lock: tspec.no_lock,
            snapshot: None,
            check: false,
            key: match topts.get("key-secret").or(topts.get("encrypt.key-secret")) {
                Some(id) => Some(
                    rimg_formats::crypto::secret(id)
                        .ok_or_else(|| anyhow!("{tgt}: No secret with id '{id}'"))?,
                ),
                None => None,
            },
        },
    )
    .map_err(|e| anyhow!(open_message(&tspec.path, e)))?;
    if no_create && timage.virtual_size() < total {
        bail!("output file is smaller than input file");
    }
    let tchain = Chain::single(timage, &tspec.path, tspec.format.is_none());
    if no_create {
        warn_probed_raw(&tchain);
    }
    let mut writer = tchain.top().writer()?;

    let progress = Progress::new(o.has("p") && !quiet);
    let cb = |d: u64, t: u64| progress.update(d, t);
    let sources: Vec<Source<'_>> = chains
        .iter()
        .map(|c| Source {
            chain: c,
            start: 0,
            len: c.virtual_size(),
        })
        .collect();
    let engine = Engine::new(EngineConfig::default());
    let res = convert(
        &engine,
        &sources,
        Target {
            image: tchain.top(),
            writer: writer.as_mut(),
            offset: 0,
            // A new file reads as zeros; a block device does not (no zero-init).
            // Encrypted zeros are not zeros on disk.
            is_zero: (!no_create
                && !target_backing
                && !tchain.top().files()[0].is_block_device()
                && !tchain.top().encrypted())
                || o.has("target-is-zero"),
        },
        &ConvertOptions {
            // copy_file_range cannot see zeros: -C copies data extents as they are.
            sparse: if o.has("copy-range-offloading") {
                None
            } else {
                Some(sparse)
            },
            src_cache,
            dst_cache,
            copy_range: o.has("copy-range-offloading"),
            parallel,
            rate,
            salvage: o.has("salvage"),
            compress: o.has("c"),
            top_layer_only: target_backing,
            progress: Some(&cb),
        },
    );
    if crate::common::verbose() {
        for n in engine.notes() {
            eprintln!("rimg: {n}");
        }
    }
    match res {
        Ok(stats) => {
            progress.finish();
            writer.close()?;
            if stats.salvaged > 0 && !quiet {
                crate::common::report(&format!(
                    "warning: {} bytes could not be read and were written as zeros",
                    stats.salvaged
                ));
            }
            Ok(0)
        }
        Err(rimg_engine::Error::Map { off, source, .. })
            if crate::common::report_corrupt(&source) =>
        {
            progress.finish();
            bail!("error while reading block status at offset {off}: Input/output error")
        }
        Err(e) => {
            progress.finish();
            bail!("{e}")
        }
    }
}
