//! Creating new qcow2 images, laid out byte for byte as qemu-img 10 lays them out.
//!
//! Steps, in qemu-img's order (so errors come out in the same order and leave the same
//! files behind):
//! 1. option names and value syntax ([`check_types`]): nothing is created on failure;
//! 2. the image file and, with `data_file`, the data file are created (truncated);
//! 3. option values and combinations ([`CreateOpts::parse`]), header space, the layout
//!    ([`layout::plan`]) and the backing file name: on failure both files are deleted, as
//!    qemu-img deletes them;
//! 4. metadata is written; preallocation by `fallocate` is done here, zero-writing
//!    (`preallocation=full`, copy-on-write fill of a partial last cluster) is returned as
//!    [`Action::WriteZeroes`] for the engine. File 0 is the image, file 1 the data file.
//!
//! The backing file is recorded, never opened (the caller handles size-from-backing and
//! format probing).

mod clusters;
mod layout;

use std::io;

use self::layout::{FileOp, Layout, LayoutError, Plan};
use super::header::{autoclear, compat, incompat, Extensions, Header};
use super::options::{check_types, Compression, CreateOpts};
use crate::driver::{Action, CreateSpec};
use crate::error::{Error, Result};
use crate::file::{Falloc, FileLayer};
use crate::types::{FileId, HostOff};

/// Header length qemu writes for version 3 images (104 bytes + compression type, padded).
const V3_HEADER_LENGTH: u32 = 112;

/// Create a qcow2 image as `spec` says; returns the zero-writing the engine must do.
pub(super) fn create(spec: &CreateSpec) -> Result<Vec<Action>> {
    check_types(&spec.options)?;
    let image = FileLayer::create(&spec.path)?;
    let data = match spec.options.get("data_file") {
        None => None,
        Some(name) => match FileLayer::create(name) {
            Ok(f) => Some(f),
            Err(e) => {
                discard(image);
                return Err(e);
            }
        },
    };
    match build(spec, &image, data.as_ref()) {
        Ok(actions) => Ok(actions),
        Err(e) => {
            discard(image);
            if let Some(d) = data {
                discard(d);
            }
            Err(e)
        }
    }
}

/// Delete a file qemu-img would delete after a failed create (not block devices).
fn discard(f: FileLayer) {
    if !f.is_block_device() {
        let path = f.path().to_string();
        drop(f);
        let _ = std::fs::remove_file(path);
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Validate, lay out and write the image.
fn build(spec: &CreateSpec, image: &FileLayer, data: Option<&FileLayer>) -> Result<Vec<Action>> {
    let o = CreateOpts::parse(spec.size, &spec.options)?;
    // qemu writes the full header (without the backing file) before sizing the image.
    if header_cluster(&o, None, false).is_none() {
        return Err(invalid(format!(
            "Could not update qcow2 header: {}",
            crate::error::strerror(&io::Error::from_raw_os_error(libc::ENOSPC))
        )));
    }
    let layout = layout::plan(&Plan {
        cluster_bits: o.cluster_bits,
        refcount_order: o.refcount_order,
        extended_l2: o.extended_l2,
        size: o.size,
        prealloc: o.prealloc,
        data_file: data.is_some(),
    })
    .map_err(|e| match e {
        LayoutError::TooLarge => invalid(
            "The image size is too large for file format 'qcow2' (try using a larger \
             cluster size)"
                .into(),
        ),
        LayoutError::Internal(what) => {
            Error::Unsupported(format!("Could not lay out the qcow2 image: {what}"))
        }
    })?;
    if let Some(name) = &o.backing_file {
        let errno = if name.len() > 1023 {
            Some(libc::EINVAL)
        } else if header_cluster(&o, Some(&layout), true).is_none() {
            Some(libc::ENOSPC)
        } else {
            None
        };
        if let Some(errno) = errno {
            return Err(invalid(format!(
                "Could not assign backing file '{name}' with format '{}': {}",
                o.backing_fmt.as_deref().unwrap_or("(null)"),
                crate::error::strerror(&io::Error::from_raw_os_error(errno))
            )));
        }
    }
    let header = header_cluster(&o, Some(&layout), true)
        .ok_or_else(|| invalid("Could not update qcow2 header".into()))?;
    write_image(image, &layout, &header)?;
    let mut actions = apply_ops(image, FileId(0), &layout.image_ops, layout.image_len)?;
    image.sync()?;
    if let Some(d) = data {
        actions.extend(apply_ops(d, FileId(1), &layout.data_ops, layout.data_len)?);
        d.sync()?;
    }
    Ok(actions)
}

/// The header cluster: fixed header, extensions (backing format, data file name, feature
/// table as qemu writes them) and, with `with_backing`, the backing file name. `None` when
/// it does not fit in one cluster. `layout` supplies the table offsets (zeros without it).
fn header_cluster(o: &CreateOpts, layout: Option<&Layout>, with_backing: bool) -> Option<Vec<u8>> {
    let cs = 1usize << o.cluster_bits;
    let mut incompatible = 0;
    if o.data_file.is_some() {
        incompatible |= incompat::DATA_FILE;
    }
    if o.compression == Compression::Zstd {
        incompatible |= incompat::COMPRESSION;
    }
    if o.extended_l2 {
        incompatible |= incompat::EXTL2;
    }
    let (l1_size, l1_offset, rt_offset, rt_clusters) = match layout {
        Some(l) => (
            l.l1.len() as u32,
            l.l1_offset,
            l.reftable_offset,
            ((l.reftable.len() as u64 * 8) >> o.cluster_bits) as u32,
        ),
        None => (0, 0, 1 << o.cluster_bits, 1),
    };
    let mut h = Header {
        version: o.version,
        cluster_bits: o.cluster_bits,
        size: o.size,
        l1_size,
        l1_table_offset: l1_offset,
        refcount_table_offset: rt_offset,
        refcount_table_clusters: rt_clusters,
        incompatible_features: incompatible,
        compatible_features: if o.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if o.data_file_raw {
            autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: o.refcount_order,
        header_length: V3_HEADER_LENGTH,
        compression_type: match o.compression {
            Compression::Zlib => 0,
            Compression::Zstd => 1,
        },
        ..Default::default()
    };
    let ext = Extensions {
        backing_format: if with_backing && o.backing_file.is_some() {
            o.backing_fmt.clone()
        } else {
            None
        },
        data_file: o.data_file.clone(),
        // qemu leaves the feature table out of small clusters (it would crowd out the
        // backing file name) and out of version 2 images.
        features: if o.version >= 3 && cs > 4096 {
            Extensions::qemu_feature_table()
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let fixed_len = h.to_bytes().len();
    let ext_bytes = ext.to_bytes();
    let backing = match (with_backing, &o.backing_file) {
        (true, Some(b)) => b.as_bytes(),
        _ => &[],
    };
    let backing_at = fixed_len + ext_bytes.len();
    if backing_at + backing.len() > cs {
        return None;
    }
    if !backing.is_empty() {
        h.backing_file_offset = backing_at as u64;
        h.backing_file_size = backing.len() as u32;
    }
    let mut out = h.to_bytes();
    out.extend_from_slice(&ext_bytes);
    out.extend_from_slice(backing);
    out.resize(cs, 0);
    Some(out)
}

/// Write every metadata structure of `l`: first what qemu left behind (replaced refcount
/// tables), then the live header, refcount table and blocks, L1 and L2 tables.
fn write_image(f: &FileLayer, l: &Layout, header: &[u8]) -> Result<()> {
    for (off, bytes) in &l.stale {
        f.write_all_at(bytes, *off, "old refcount table")?;
    }
    f.write_all_at(header, 0, "qcow2 header")?;
    f.write_all_at(&l.reftable_bytes(), l.reftable_offset, "refcount table")?;
    for (off, block) in l.refcount_blocks() {
        f.write_all_at(&block, off, "refcount block")?;
    }
    if !l.l1.is_empty() {
        f.write_all_at(&l.l1_bytes(), l.l1_offset, "L1 table")?;
    }
    for (off, table) in l.l2_tables() {
        f.write_all_at(&table, off, "L2 table")?;
    }
    Ok(())
}

/// Perform `ops` on `f` and give it its final length `len`; zero-writes become actions.
fn apply_ops(f: &FileLayer, id: FileId, ops: &[FileOp], len: u64) -> Result<Vec<Action>> {
    let mut actions = Vec::new();
    let mut first_block = false;
    for op in ops {
        match *op {
            FileOp::Fallocate { off, len } => match f.fallocate(Falloc::Allocate, off, len) {
                Ok(()) => {}
                // posix_fallocate (which qemu uses) writes zeros where the file system
                // cannot allocate: leave that to the engine.
                Err(Error::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    f.set_len(off + len)?;
                    actions.push(Action::WriteZeroes {
                        file: id,
                        host: HostOff(off),
                        len,
                    });
                }
                Err(Error::Io { source, .. }) => {
                    return Err(invalid(format!(
                        "Could not resize image: {}Could not preallocate new data: {}",
                        if id.0 == 0 {
                            "Failed to resize underlying file: "
                        } else {
                            ""
                        },
                        crate::error::strerror(&source)
                    )))
                }
                Err(other) => return Err(other),
            },
            FileOp::WriteZeroes { off, len } => actions.push(Action::WriteZeroes {
                file: id,
                host: HostOff(off),
                len,
            }),
            FileOp::FirstBlock => first_block = true,
        }
    }
    if f.is_block_device() {
        if f.len()? < len {
            return Err(invalid(format!(
                "Could not resize image: '{}' is too small",
                f.path()
            )));
        }
    } else {
        f.set_len(len)?;
    }
    if first_block && len > 0 {
        f.write_all_at(&[0u8; 512], 0, "first block")?;
    }
    Ok(actions)
}

#[cfg(test)]
mod tests;
