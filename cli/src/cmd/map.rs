//! `map`: the allocation map of an image chain, as qemu-img prints it.

use anyhow::Result;
use rimg_formats::Access;
use rimg_formats::{Chain, ChainExtent, Extent, GuestOff};

use super::{parse, usage_error};
use crate::common::{output_format, ImageSpec};
use crate::getopt::{o, OptSpec};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('\0', "output", true),
    o('U', "force-share", false),
    o('\0', "object", true),
    o('s', "start-offset", true),
    o('l', "max-length", true),
];

const HELP: &str = "Dump image metadata.  Usage:

  qemu-img map [-f FMT|--image-opts] [--start-offset OFFSET] [--max-length LENGTH]
        [--output human|json] [-U] [--object OBJDEF] FILE

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILE image format explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,..), not a file name
     (incompatible with -f|--format)
  -s, --start-offset OFFSET
     start at the given OFFSET in the image, not at the beginning
  -l, --max-length LENGTH
     process at most LENGTH bytes instead of up to the end of the image
  --output human|json
     specify output format name (default: human)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     the image file name, or option string (key=value,..)
     with --image-opts, to operate on
";

/// One line of `map` output (QAPI `MapEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    start: u64,
    length: u64,
    depth: usize,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
    /// the file the human output names: (layer, file of that layer)
    file: (usize, u32),
}

impl Entry {
    fn from_chain(ce: &ChainExtent, start: u64, layers: usize) -> Entry {
        let len = ce.extent.len();
        let mut e = Entry {
            start,
            length: len,
            depth: ce.shown_depth.min(layers - 1),
            present: ce.depth < layers,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            file: (ce.depth.min(layers - 1), 0),
        };
        match &ce.extent {
            Extent::Data { host, file, .. } => {
                e.data = true;
                e.offset = Some(host.0);
                e.file.1 = file.0;
            }
            Extent::DataHole { host, file, .. } => {
                e.data = true;
                e.zero = true;
                e.offset = Some(host.0);
                e.file.1 = file.0;
            }
            Extent::Zero { at, .. } => {
                e.zero = true;
                e.offset = at.map(|(_, h)| h.0);
            }
            Extent::Compressed { .. } => {
                e.data = true;
                e.compressed = true;
            }
            Extent::Unallocated { at, .. } => {
                e.zero = true;
                e.present = false;
                e.offset = at.map(|(_, h)| h.0);
            }
            _ => {
                e.zero = true;
                e.present = false;
            }
        }
        e
    }

    /// qemu-img's merge rule: same flags, contiguous, and contiguous host offsets.
    fn try_merge(&mut self, n: &Entry) -> bool {
        let same = self.depth == n.depth
            && self.present == n.present
            && self.zero == n.zero
            && self.data == n.data
            && self.compressed == n.compressed
            && self.start + self.length == n.start;
        let off_ok = match (self.offset, n.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + self.length == b,
            _ => false,
        };
        if same && off_ok {
            self.length += n.length;
            true
        } else {
            false
        }
    }

    fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

/// C's `%#x`: "0" for zero, "0x..." otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Run `map`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("map", args, SPECS, HELP)?;
    if o.pos.len() != 1 {
        return Err(usage_error("map", "Expecting one image file name"));
    }
    let json = output_format("map", o.get("output"))?;
    let start = match o.get("start-offset") {
        Some(v) => super::create::parse_num("start offset", v)?,
        None => 0,
    };
    let max_len = match o.get("max-length") {
        Some(v) => Some(super::create::parse_num("max length", v)?),
        None => None,
    };
    let spec = ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let chain = spec.open_chain(Access::Read, o.has("force-share"))?;
    let size = chain.virtual_size();
    let end = match max_len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let mut entries = match collect(&chain, start, end) {
        Ok(e) => e,
        Err(e) => {
            // qemu-img has printed the start of its output when the lookup fails.
            if let Some(fe) = e.downcast_ref::<rimg_formats::Error>() {
                if crate::common::report_corrupt(fe) {
                    if json {
                        print!("[");
                    } else {
                        println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
                    }
                    anyhow::bail!("Could not read file metadata: Input/output error");
                }
            }
            return Err(e);
        }
    };
    if entries.is_empty() {
        // qemu-img prints one empty, not-present entry for an empty range.
        entries.push(Entry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            file: (0, 0),
        });
    }
    let mut out = String::new();
    if json {
        out.push('[');
        for (k, e) in entries.iter().enumerate() {
            if k > 0 {
                out.push_str(",\n");
            }
            out.push_str(&e.json());
        }
        out.push_str("]\n");
    } else {
        out.push_str(&format!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset", "Length", "Mapped to", "File"
        ));
        for e in &entries {
            if e.data && e.offset.is_none() {
                print!("{out}");
                anyhow::bail!("File contains external, encrypted or compressed clusters.");
            }
            if let (true, false, Some(off)) = (e.data, e.zero, e.offset) {
                out.push_str(&format!(
                    "{:<16}{:<16}{:<16}{}\n",
                    hex(e.start),
                    hex(e.length),
                    hex(off),
                    file_name(&chain, e.file)
                ));
            }
        }
    }
    print!("{out}");
    Ok(0)
}

fn collect(chain: &Chain, start: u64, end: u64) -> Result<Vec<Entry>> {
    let layers = chain.layers().len();
    // Formats QEMU reports no allocation status for show as data with no offset.
    let opaque: Vec<bool> = chain
        .layers()
        .iter()
        .map(|l| l.image.opaque_allocation())
        .collect();
    if opaque[0] {
        // The top layer answers for everything; QEMU never looks at its tables here.
        return Ok(if start < end {
            vec![Entry {
                start,
                length: end - start,
                depth: 0,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: None,
                file: (0, 0),
            }]
        } else {
            Vec::new()
        });
    }
    let mut entries: Vec<Entry> = Vec::new();
    let mut off = start;
    let mut exts = Vec::new();
    while off < end {
        exts.clear();
        let n = chain.map(GuestOff(off), end - off, &mut exts)?;
        if n == 0 {
            break;
        }
        let mut pos = off;
        for ce in &exts {
            let mut e = Entry::from_chain(ce, pos, layers);
            if opaque.get(ce.depth).copied().unwrap_or(false) {
                e.present = true;
                e.zero = false;
                e.data = true;
                e.compressed = false;
                e.offset = None;
            }
            // QEMU gives no host offset for encrypted data.
            if ce.depth < layers && chain.layers()[ce.depth].image.encrypted() {
                e.offset = None;
            }
            pos += e.length;
            let merged = entries.last_mut().is_some_and(|last| last.try_merge(&e));
            if !merged {
                entries.push(e);
            }
        }
        off += n;
    }
    Ok(entries)
}

/// The name human `map` prints for a layer's file: the image as named, or an external data
/// file as an absolute path (as qemu-img shows it).
fn file_name(chain: &Chain, (layer, file): (usize, u32)) -> String {
    let l = &chain.layers()[layer];
    if let Some(name) = l.image.map_file_name(rimg_formats::FileId(file)) {
        return name;
    }
    if file == 0 {
        return l.filename.clone();
    }
    match l.image.files().get(file as usize) {
        Some(f) => {
            let p = std::path::Path::new(f.path());
            if p.is_absolute() {
                f.path().to_string()
            } else {
                std::env::current_dir()
                    .map(|d| d.join(p).to_string_lossy().into_owned())
                    .unwrap_or_else(|_| f.path().to_string())
            }
        }
        None => l.filename.clone(),
    }
}
