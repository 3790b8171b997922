//! `snapshot`, `bitmap`, `commit` and `rebase`: on raw images these have nothing to work
//! on, and answer as qemu-img does.

use anyhow::{bail, Result};
use rimg_formats::Access;

use super::{parse, usage_error};
use crate::common::ImageSpec;
use crate::getopt::{o, OptSpec};

const SNAPSHOT_SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('l', "list", false),
    o('a', "", true),
    o('c', "", true),
    o('d', "", true),
    // qemu-img's table gives these long names no argument (the name is then "(null)").
    o('\0', "apply", false),
    o('\0', "create", false),
    o('\0', "delete", false),
    o('q', "quiet", false),
    o('U', "force-share", false),
    o('\0', "object", true),
];

const SNAPSHOT_HELP: &str = "List or manipulate snapshots in the image.  Usage:

  qemu-img snapshot [-f FMT|--image-opts] [-U] [-q] [--object OBJDEF]
        [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILE format explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,..), not a file name
     (incompatible with -f|--format)
  -U, --force-share
     open image in shared mode for concurrent access
  -q, --quiet
     quiet mode (produce only error messages if any)
  --object OBJDEF
     defines QEMU user-creatable object
  -l, --list
     list snapshots in FILE (default action if no -l|-c|-a|-d is given)
  -c, --create SNAPSHOT
     create named snapshot
  -a, --apply SNAPSHOT
     apply named snapshot to the base
  -d, --delete SNAPSHOT
     delete named snapshot
  FILE
     name of the image file, or option string (key=value,..)
     with --image-opts) to operate on
";

/// Run `snapshot`.
pub fn run_snapshot(args: &[String]) -> Result<i32> {
    let o = parse("snapshot", args, SNAPSHOT_SPECS, SNAPSHOT_HELP)?;
    let actions = [
        ("l", "list"),
        ("a", "apply"),
        ("c", "create"),
        ("d", "delete"),
    ]
    .iter()
    .filter(|(s, l)| o.has(s) || o.has(l))
    .count();
    if actions > 1 {
        return Err(usage_error("snapshot", "Cannot mix '-l', '-a', '-c', '-d'"));
    }
    if o.pos.len() != 1 {
        return Err(usage_error("snapshot", "Expecting one image file name"));
    }
    let spec = ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let listing = actions == 0 || o.has("l");
    let chain = spec.open_chain(
        if listing { Access::Read } else { Access::Write },
        o.has("force-share"),
    )?;
    if listing {
        // Nothing at all when there are no snapshots (a raw image), as qemu-img.
        let snaps = chain.top().snapshots();
        if !snaps.is_empty() {
            print!("{}", crate::output::snapshot_table(&snaps));
        }
        return Ok(0);
    }
    let _ = chain;
    // qemu-img's long forms take no argument and act on a snapshot named "(null)".
    let name = |short: &str, long: &str| -> String {
        o.get(short)
            .map(str::to_string)
            .or_else(|| o.has(long).then(|| "(null)".to_string()))
            .unwrap_or_default()
    };
    if o.has("c") || o.has("create") {
        bail!(
            "Could not create snapshot '{}': Operation not supported",
            name("c", "create")
        );
    }
    if o.has("a") || o.has("apply") {
        bail!(
            "Could not apply snapshot '{}': Block driver does not support snapshots",
            name("a", "apply")
        );
    }
    bail!(
        "Could not delete snapshot '{}': snapshot not found",
        name("d", "delete")
    )
}

const COMMIT_SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('t', "cache", true),
    o('b', "base", true),
    o('d', "drop", false),
    o('r', "rate", true),
    o('p', "progress", false),
    o('q', "quiet", false),
    o('\0', "object", true),
];

const COMMIT_HELP: &str = "Commit image to its backing file.  Usage:

  qemu-img commit [-f FMT|--image-opts] [-t CACHE_MODE] [-b BASE_IMG]
        [-d] [-r RATE] [-q] [--object OBJDEF] FILE

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILE image format explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,..), not a file name
     (incompatible with -f|--format)
  -t, --cache CACHE_MODE
     cache mode for FILE (default: unsafe)
  -b, --base BASE_IMG
     image in the backing chain to commit change to
     (default: immediate backing file; implies --drop)
  -d, --no-drop
     skip emptying FILE on completion
  -p, --progress
     show operation progress
  -q, --quiet
     quiet mode (produce only error messages if any)
  -r, --rate-limit RATE
     I/O rate limit, in bytes per second
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     name of the image file, or option string (key=value,..)
     with --image-opts, to operate on
";

/// Run `commit`.
pub fn run_commit(args: &[String]) -> Result<i32> {
    let o = parse("commit", args, COMMIT_SPECS, COMMIT_HELP)?;
    if o.pos.len() != 1 {
        return Err(usage_error("commit", "Expecting one image file name"));
    }
    if let Some(t) = o.get("cache") {
        crate::common::cache_mode(t)?;
    }
    if let Some(r) = o.get("rate") {
        super::create::parse_num("rate limit", r)?;
    }
    let spec = ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let chain = spec.open_chain(Access::Write, false)?;
    if let Some(b) = o.get("base") {
        if !chain.layers()[1..].iter().any(|l| l.filename == b) {
            bail!("Did not find '{b}' in the backing chain of '{}'", o.pos[0]);
        }
    }
    if chain.layers().len() < 2 {
        bail!("Image does not have a backing file");
    }
    bail!("commit is not supported by rimg yet for this image")
}

const REBASE_SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('t', "cache", true),
    o('T', "backing-cache", true),
    o('b', "backing", true),
    o('F', "backing-format", true),
    o('u', "backing-unsafe", false),
    o('c', "compress", false),
    o('p', "progress", false),
    o('q', "quiet", false),
    o('U', "force-share", false),
    o('\0', "object", true),
];

const REBASE_HELP: &str = "Change the backing file of the image.  Usage:

  qemu-img rebase [-f FMT|--image-opts] [-B BACKING_FILE [-F BACKING_FMT]]
        [-u] [-c] [-t CACHE] [-T SRC_CACHE] [-p] [-q] [-U] [--object OBJDEF] FILE

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILE format explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,..), not a file name
     (incompatible with -f|--format)
  -b, --backing BACKING_FILE|\"\"
     rebase onto this file (specify empty name for no backing file)
  -F, --backing-format BACKING_FMT
     specify format for BACKING_FILE explicitly (default: probing is used)
  -u, --unsafe
     do not fail if BACKING_FILE can not be read
  -c, --compress
     compress image (when image supports this)
  -t, --cache CACHE
     cache mode for FILE (default: writeback)
  -T, --source-cache SRC_CACHE
     cache mode for reading backing file (default: writeback)
  -p, --progress
     show progress indicator
  -q, --quiet
     quiet mode (produce only error messages if any)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     name of the image file, or option string (key=value,..)
     with --image-opts, to operate on
";

/// Run `rebase`.
pub fn run_rebase(args: &[String]) -> Result<i32> {
    let o = parse("rebase", args, REBASE_SPECS, REBASE_HELP)?;
    if o.pos.len() != 1 {
        return Err(usage_error("rebase", "Expecting one image file name"));
    }
    if let Some(t) = o.get("cache") {
        crate::common::cache_mode(t)?;
    }
    if let Some(t) = o.get("backing-cache") {
        crate::common::source_cache_mode(t)?;
    }
    let Some(backing) = o.get("backing") else {
        return Err(usage_error(
            "rebase",
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    };
    let spec = ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let chain = spec.open_chain(Access::Write, false)?;
    if !o.has("backing-format") && !backing.is_empty() {
        bail!("Could not change the backing file to '{backing}': backing format must be specified");
    }
    let _ = chain;
    bail!("Could not change the backing file to '{backing}': Operation not supported")
}

const BITMAP_SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "", true),
    o('\0', "image-opts", false),
    o('\0', "add", false),
    o('\0', "remove", false),
    o('\0', "clear", false),
    o('\0', "enable", false),
    o('\0', "disable", false),
    o('\0', "merge", true),
    o('g', "granularity", true),
    o('b', "source-file", true),
    o('F', "source-format", true),
    o('\0', "object", true),
];

const BITMAP_HELP: &str = "Perform modifications of the persistent bitmap in the image.  Usage:

  qemu-img bitmap [-f FMT|--image-opts]
        (--add [-g SIZE] | --remove | --clear | --enable | --disable |
         --merge SOURCE [-b SRC_FILE [-F SRC_FMT]]) [--object OBJDEF]
        FILE BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILE format explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,..), not a file name
     (incompatible with -f|--format)
  --add
     creates new BITMAP in FILE
  --remove
     removes BITMAP from FILE
  --clear
     clears BITMAP in FILE
  --enable, --disable
     starts and stops tracking writes in BITMAP in FILE
  --merge SOURCE
     merges contents of the SOURCE bitmap into BITMAP in FILE
  -g, --granularity SIZE[bKMGTPE]
     sets non-default granularity for the bitmap being added,
     with optional multiplier suffix (in powers of 1024)
  -b, --source-file SRC_FILE
     select alternative source file for --merge
  -F, --source-format SRC_FMT
     specify format for SRC_FILE explicitly
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     name of the image file, or option string (key=value,..)
     with --image-opts, to operate on
  BITMAP
     name of the bitmap to add, remove, clear, enable, disable or merge to
";

/// Run `bitmap`.
pub fn run_bitmap(args: &[String]) -> Result<i32> {
    let o = parse("bitmap", args, BITMAP_SPECS, BITMAP_HELP)?;
    let ops = ["add", "remove", "clear", "enable", "disable", "merge"];
    let op = ops.iter().find(|a| o.has(a));
    let Some(op) = op else {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    };
    if o.has("granularity") && *op != "add" {
        bail!("granularity only supported with --add");
    }
    if o.pos.len() != 2 {
        bail!("Expecting filename and bitmap name");
    }
    let spec = ImageSpec::resolve(&o.pos[0], o.get("f"), o.has("image-opts"))?;
    let chain = spec.open_chain(Access::Write, false)?;
    let bm = &o.pos[1];
    if let Some(g) = o.get("granularity") {
        match rimg_formats::opts::parse_size(g, 1) {
            Ok(n) if n >= 512 && n.is_power_of_two() && n <= 1 << 31 => {}
            _ => bail!(
                "Operation add on bitmap {bm} failed: Granularity must be power of 2 and at least 512"
            ),
        }
    }
    if *op == "add" {
        bail!(
            "Operation add on bitmap {bm} failed: Can't store persistent bitmaps to #block{}: Operation not supported",
            100 + chain.layers().len()
        );
    }
    bail!("Operation {op} on bitmap {bm} failed: Dirty bitmap '{bm}' not found")
}
