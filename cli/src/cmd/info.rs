//! `info`: what an image is, as qemu-img prints it (human or `--output=json`).

use anyhow::Result;
use rimg_formats::chain::Layer;
use rimg_formats::Access;
use serde_json::{json, Map, Value};

use super::{parse, usage_error};
use crate::common::{output_format, ImageSpec};
use crate::getopt::{o, OptSpec};
use crate::output::{qemu_json, size_to_str};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('b', "backing-chain", false),
    o('\0', "output", true),
    o('U', "force-share", false),
    o('\0', "object", true),
];

const HELP: &str = "Display information about an image.  Usage:

  qemu-img info [-f FMT|--image-opts] [--backing-chain] [--limits] [-U]
        [--output human|json] [--object OBJDEF] FILE

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILE image format explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,..), not a file name
     (incompatible with -f|--format)
  --backing-chain
     display information about the backing chain for copy-on-write overlays
  --limits
     show detected block limits (may depend on options, e.g. cache mode)
  -U, --force-share
     open image in shared mode for concurrent access
  --output human|json
     specify output format (default: human)
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     name of the image file, or option string (key=value,..)
     with --image-opts, to operate on
";

/// Run `info`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("info", args, SPECS, HELP)?;
    if o.pos.len() != 1 {
        return Err(usage_error("info", "Expecting one image file name"));
    }
    let json = output_format("info", o.get("output"))?;
    let spec = ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let chain = if o.has("backing-chain") {
        spec.open_chain(Access::Info, o.has("force-share"))?
    } else {
        spec.open_top(Access::Info, o.has("force-share"))?
    };
    let layers: Vec<&Layer> = if o.has("backing-chain") {
        chain.layers().iter().collect()
    } else {
        vec![&chain.layers()[0]]
    };
    if json {
        let infos: Vec<Value> = layers.iter().map(|l| layer_json(l)).collect();
        let v = if o.has("backing-chain") {
            Value::Array(infos)
        } else {
            infos.into_iter().next().unwrap_or(Value::Null)
        };
        println!("{}", qemu_json(&v));
    } else {
        let mut out = String::new();
        for (k, l) in layers.iter().enumerate() {
            if k > 0 {
                out.push('\n');
            }
            out.push_str(&layer_human(l));
        }
        print!("{out}");
    }
    Ok(0)
}

fn protocol_of(l: &Layer) -> &'static str {
    if l.image.files()[0].is_block_device() {
        "host_device"
    } else {
        "file"
    }
}

/// The file child's size as QEMU's block layer reports it (rounded up to 512 bytes).
fn file_length(l: &Layer) -> u64 {
    l.image.files()[0]
        .len()
        .map(|n| n.div_ceil(512) * 512)
        .unwrap_or(0)
}

/// The backing file as qemu-img reports it: (name as stored, full path, format).
fn backing_of(l: &Layer) -> Option<(String, String, Option<String>)> {
    let b = l.image.backing()?;
    let full = rimg_formats::chain::resolve_backing(&l.filename, &b.name);
    Some((b.name, full, b.format))
}

/// `info --output=json` of one layer (QAPI `ImageInfo`, keys in QEMU's order).
pub fn layer_json(l: &Layer) -> Value {
    let file = &l.image.files()[0];
    let proto = protocol_of(l);
    let mut child = Map::new();
    child.insert("children".into(), json!([]));
    child.insert("virtual-size".into(), json!(file_length(l)));
    child.insert("filename".into(), json!(l.filename));
    child.insert("format".into(), json!(proto));
    child.insert("actual-size".into(), json!(file.allocated_bytes()));
    child.insert("format-specific".into(), json!({"type": proto, "data": {}}));
    child.insert("dirty-flag".into(), json!(false));
    let backing = backing_of(l);
    let mut m = Map::new();
    m.insert(
        "children".into(),
        json!([{"name": "file", "info": Value::Object(child)}]),
    );
    let snaps = l.image.snapshots();
    if !snaps.is_empty() {
        m.insert("snapshots".into(), crate::output::snapshots_json(&snaps));
    }
    if let Some((_, _, Some(fmt))) = &backing {
        m.insert("backing-filename-format".into(), json!(fmt));
    }
    m.insert("virtual-size".into(), json!(l.image.virtual_size()));
    m.insert("filename".into(), json!(l.filename));
    if let Some(cs) = l.image.cluster_size() {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(l.image.format()));
    m.insert("actual-size".into(), json!(file.allocated_bytes()));
    if let Some(fs) = l.image.format_specific() {
        m.insert("format-specific".into(), fs);
    }
    if let Some((_, full, _)) = &backing {
        m.insert("full-backing-filename".into(), json!(full));
    }
    if l.image.encrypted() {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some((name, _, _)) = &backing {
        m.insert("backing-filename".into(), json!(name));
    }
    m.insert("dirty-flag".into(), json!(l.image.dirty()));
    Value::Object(m)
}

fn layer_human(l: &Layer) -> String {
    let file = &l.image.files()[0];
    let vsize = l.image.virtual_size();
    let alloc = file.allocated_bytes();
    let flen = file_length(l);
    let mut s = format!(
        "image: {name}\nfile format: {fmt}\nvirtual size: {vs} ({vsize} bytes)\ndisk size: {ds}\n",
        name = l.filename,
        fmt = l.image.format(),
        vs = size_to_str(vsize),
        ds = size_to_str(alloc),
    );
    if l.image.encrypted() {
        s.push_str("encrypted: yes\n");
    }
    if let Some(cs) = l.image.cluster_size() {
        s.push_str(&format!("cluster_size: {cs}\n"));
    }
    if l.image.dirty() {
        s.push_str("cleanly shut down: no\n");
    }
    if let Some((name, full, fmt)) = backing_of(l) {
        if full == name {
            s.push_str(&format!("backing file: {name}\n"));
        } else {
            s.push_str(&format!("backing file: {name} (actual path: {full})\n"));
        }
        if let Some(f) = fmt {
            s.push_str(&format!("backing file format: {f}\n"));
        }
    }
    let snaps = l.image.snapshots();
    if !snaps.is_empty() {
        s.push_str(&crate::output::snapshot_table(&snaps));
    }
    if let Some(Value::Object(fs)) = l.image.format_specific() {
        if let Some(data) = fs.get("data") {
            s.push_str("Format specific information:\n");
            crate::output::dump_human(&mut s, data, 1);
        }
    }
    s.push_str(&format!(
        "Child node '/file':\n    filename: {name}\n    protocol type: {proto}\n    \
         file length: {fl} ({flen} bytes)\n    disk size: {ds}\n",
        name = l.filename,
        proto = protocol_of(l),
        fl = size_to_str(flen),
        ds = size_to_str(alloc),
    ));
    s
}
