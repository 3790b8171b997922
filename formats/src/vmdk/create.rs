//! `create -f vmdk`: every subformat, laid out byte for byte as QEMU lays it out (the CID
//! is random, as in QEMU).

use std::hash::{BuildHasher, Hasher};

use super::descriptor::NewDescriptor;
use super::sparse::{
    Vmdk4Header, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN,
};
use crate::driver::{Access, Action, CreateSpec, OpenOptions};
use crate::error::{Error, Result};
use crate::file::FileLayer;
use crate::opts::parse_bool;

/// Size of each extent of the twoGbMaxExtent subformats.
const SPLIT_SIZE: u64 = 0x8000_0000;

/// A random 32-bit number (QEMU's `g_random_int`), for CIDs.
pub fn random_u32() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// The subformats QEMU creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subformat {
    MonolithicSparse,
    MonolithicFlat,
    TwoGbSparse,
    TwoGbFlat,
    StreamOptimized,
}

impl Subformat {
    fn parse(s: &str) -> Option<Subformat> {
        Some(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }
    fn flat(self) -> bool {
        matches!(self, Subformat::MonolithicFlat | Subformat::TwoGbFlat)
    }
    fn split(self) -> bool {
        matches!(self, Subformat::TwoGbSparse | Subformat::TwoGbFlat)
    }
}

fn invalid(v: &str) -> Error {
    Error::InvalidArgument(format!("invalid parameter value: {v}"))
}

/// The layout of a new hosted sparse extent of `capacity` sectors (QEMU's
/// `vmdk_init_extent`): header, grain directory size in sectors, grain table count.
pub fn new_sparse_header(capacity: u64, compress: bool, zeroed: bool) -> (Vmdk4Header, u64, u64) {
    let granularity = 128u64;
    let gtes = 512u64;
    let grains = capacity.div_ceil(granularity);
    let gt_size = (gtes * 4).div_ceil(512);
    let gt_count = grains.div_ceil(gtes);
    let gd_sectors = (gt_count * 4).div_ceil(512);
    let rgd_offset = 21;
    let gd_offset = rgd_offset + gd_sectors + gt_size * gt_count;
    let grain_offset =
        (gd_offset + gd_sectors + gt_size * gt_count).div_ceil(granularity) * granularity;
    let h = Vmdk4Header {
        version: if compress {
            3
        } else if zeroed {
            2
        } else {
            1
        },
        flags: FLAG_RGD
            | FLAG_NL_DETECT
            | if compress {
                FLAG_COMPRESS | FLAG_MARKER
            } else {
                0
            }
            | if zeroed { FLAG_ZERO_GRAIN } else { 0 },
        capacity,
        granularity,
        desc_offset: 1,
        desc_size: 20,
        num_gtes_per_gt: gtes as u32,
        rgd_offset,
        gd_offset,
        grain_offset,
        compress_algorithm: u16::from(compress),
    };
    (h, gd_sectors, gt_count)
}

/// Write a new extent of `size` bytes into the empty file `f`.
fn init_extent(f: &FileLayer, size: u64, flat: bool, compress: bool, zeroed: bool) -> Result<()> {
    if flat {
        f.set_len(size)?;
        // QEMU's file layer allocates the first block of a new file.
        let first = size.min(4096) as usize;
        if first > 0 {
            f.write_all_at(&vec![0u8; first], 0, "first block")?;
        }
        return Ok(());
    }
    let (h, gd_sectors, gt_count) = new_sparse_header(size / 512, compress, zeroed);
    f.write_all_at(&h.to_sector()[..79], 0, "VMDK header")?;
    f.set_len(h.grain_offset * 512)?;
    let gd_bytes = (gd_sectors * 512) as usize;
    for table in [h.rgd_offset, h.gd_offset] {
        let mut gd = vec![0u8; gd_bytes];
        for i in 0..gt_count {
            let v = (table + gd_sectors + i * 4) as u32;
            gd[i as usize * 4..i as usize * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        if gd_bytes > 0 {
            f.write_all_at(&gd, table * 512, "grain directory")?;
        }
    }
    Ok(())
}

/// Split `filename` as QEMU's `filename_decompose` does: directory (with its separator),
/// name without extension, extension (with its dot).
fn decompose(filename: &str) -> (String, String, String) {
    let cut = filename
        .rfind('/')
        .or_else(|| filename.rfind('\\'))
        .or_else(|| filename.rfind(':'));
    let (dir, base) = match cut {
        Some(i) => (&filename[..=i], &filename[i + 1..]),
        None => ("", filename),
    };
    match base.rfind('.') {
        Some(q) => (dir.into(), base[..q].into(), base[q..].into()),
        None => (dir.into(), base.into(), String::new()),
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Create the image `spec` describes. Writes metadata only.
pub fn create(spec: &CreateSpec) -> Result<Vec<Action>> {
    let o = &spec.options;
    let all: Vec<_> = super::options::VMDK_OPTIONS
        .iter()
        .chain(crate::file::FILE_OPTIONS)
        .copied()
        .collect();
    o.validate(&all)?;
    if let Some(f) = o.get("backing_fmt") {
        if f != "vmdk" {
            return Err(Error::InvalidArgument(
                "backing_file must be a vmdk image".into(),
            ));
        }
    }
    if spec.path.is_empty() {
        return Err(Error::InvalidArgument("No filename provided".into()));
    }
    let (dir, prefix, postfix) = decompose(&spec.path);
    let size = spec.size.div_ceil(512) * 512;
    let adapter = match o.get("adapter_type") {
        None => "ide",
        Some(a @ ("ide" | "buslogic" | "lsilogic" | "legacyESX")) => a,
        Some(a) => return Err(invalid(a)),
    };
    let sub = match o.get("subformat") {
        None => Subformat::MonolithicSparse,
        Some(s) => Subformat::parse(s).ok_or_else(|| invalid(s))?,
    };
    let flag = |n: &str| o.get(n).and_then(parse_bool).unwrap_or(false);
    let compat6 = flag("compat6");
    let zeroed = flag("zeroed_grain");
    let mut hw = o.get("hwversion").filter(|h| *h != "undefined");
    if compat6 {
        if hw.is_some() {
            return Err(Error::InvalidArgument(
                "compat6 cannot be enabled with hwversion set".into(),
            ));
        }
        hw = Some("6");
    }
    let hw = hw.unwrap_or("4");
    let tools = o.get("toolsversion").unwrap_or("2147483647");
    let backing = o.get("backing_file");
    let (flat, split) = (sub.flat(), sub.split());
    let compress = sub == Subformat::StreamOptimized;
    if flat && backing.is_some() {
        return Err(Error::Unsupported(
            "Flat image can't have backing file".into(),
        ));
    }
    if flat && zeroed {
        return Err(Error::Unsupported(
            "Flat image can't enable zeroed grain".into(),
        ));
    }
    let line = |sectors: u64, name: &str| {
        if flat {
            format!("RW {sectors} FLAT \"{name}\" 0\n")
        } else {
            format!("RW {sectors} SPARSE \"{name}\"\n")
        }
    };
    // The file layer's own option: accepted and (the files start empty) without effect,
    // except `metadata`, which it refuses once the file exists.
    match o.get("preallocation") {
        None | Some("off" | "falloc" | "full") => {}
        Some("metadata") => {
            FileLayer::create(&spec.path)?;
            return Err(Error::Unsupported(
                "Unsupported preallocation mode: metadata".into(),
            ));
        }
        Some(v) => return Err(invalid(v)),
    }
    // The descriptor's file (for monolithicSparse/streamOptimized, the extent itself).
    let desc_file = FileLayer::create(&spec.path)?;
    let mut lines = String::new();
    let mut created = 0u64;
    if !split && !flat {
        init_extent(&desc_file, size, false, compress, zeroed)?;
        lines.push_str(&line(size.div_ceil(512), basename(&spec.path)));
        created = size;
    }
    let mut parent_cid = 0xffff_ffffu32;
    if let Some(b) = backing {
        let full = crate::chain::resolve_backing(&spec.path, b);
        let (img, _) = crate::chain::open_image(&full, None, &OpenOptions::new(Access::Info))?;
        if img.format() != "vmdk" {
            return Err(Error::InvalidArgument(format!(
                "Invalid backing file format: {}. Must be vmdk",
                img.format()
            )));
        }
        parent_cid = img
            .format_specific()
            .and_then(|v| v["data"]["cid"].as_u64())
            .ok_or_else(|| Error::InvalidArgument("Failed to read parent CID".into()))?
            as u32;
    }
    let extent_size = if split { SPLIT_SIZE } else { size };
    let mut idx = 1;
    while created < size {
        let cur = (size - created).min(extent_size);
        let rel = if split {
            format!("{prefix}-{}{idx:03}{postfix}", if flat { 'f' } else { 's' })
        } else {
            format!("{prefix}-flat{postfix}")
        };
        let path = format!("{dir}{rel}");
        let f = FileLayer::create(&path)?;
        init_extent(&f, cur, flat, compress, zeroed)?;
        lines.push_str(&line(cur.div_ceil(512), basename(&path)));
        created += cur;
        idx += 1;
    }
    let desc = NewDescriptor {
        cid: random_u32(),
        parent_cid,
        create_type: sub.name(),
        parent_hint: backing,
        extents: &lines,
        hw_version: hw,
        size,
        adapter,
        tools_version: tools,
    }
    .text();
    if !split && !flat {
        desc_file.write_all_at(desc.as_bytes(), 0x200, "descriptor")?;
    } else {
        desc_file.write_all_at(desc.as_bytes(), 0, "descriptor")?;
        desc_file.set_len(desc.len() as u64)?;
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_like_qemu() {
        let (h, gd, n) = new_sparse_header(2 * 1024 * 1024, true, false);
        assert_eq!((h.gd_offset, h.grain_offset, gd, n), (150, 384, 1, 32));
        assert_eq!(h.version, 3);
        assert_eq!(
            decompose("a/b.c/d.vmdk"),
            ("a/b.c/".into(), "d".into(), ".vmdk".into())
        );
    }
}
