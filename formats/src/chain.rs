//! Backing chains, outside any driver.
//!
//! [`Chain::open`] opens the top image, then each backing file through a gate: relative
//! names resolve against the directory of the image that names them, `backing_fmt` is
//! honoured (probing when absent), a file seen twice is a loop and a chain deeper than
//! [`MAX_DEPTH`] is refused. [`Chain::map`] resolves [`Extent::Unallocated`] downward.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use crate::driver::{Access, FormatDriver, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::file::FileLayer;
use crate::registry;
use crate::types::GuestOff;

/// Deepest backing chain accepted.
pub const MAX_DEPTH: usize = 256;

/// One layer of a chain.
pub struct Layer {
    /// the open image
    pub image: Box<dyn Image>,
    /// filename as qemu-img would print it
    pub filename: String,
    /// whether the format was guessed (no `-f` / no `backing_fmt`)
    pub probed: bool,
}

/// An extent of a chain: which layer answered (`depth`, 0 = top) and what it is there.
/// `Unallocated` with `depth == layers` means no layer has the range: it reads as zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// layer index that holds the range (or the chain length when none does)
    pub depth: usize,
    /// what the range is in that layer
    pub extent: Extent,
    /// the depth `map` reports: `depth` when a layer holds the range; otherwise the deepest
    /// layer consulted (the one whose backing file ends, or the bottom of the chain)
    pub shown_depth: usize,
}

/// An open backing chain; layer 0 is the image named by the user.
pub struct Chain {
    layers: Vec<Layer>,
}

/// Open one image file with `format` (probing when `None`).
pub fn open_image(
    path: &str,
    format: Option<&str>,
    opts: &OpenOptions,
) -> Result<(Box<dyn Image>, bool)> {
    let driver: Option<&'static dyn FormatDriver> = match format {
        Some(f) => Some(registry::find(f).map_err(|e| match e {
            Error::InvalidArgument(m) | Error::Unsupported(m) => Error::OpenWhy {
                path: path.to_string(),
                why: m,
            },
            other => other,
        })?),
        None => None,
    };
    let file = Arc::new(FileLayer::open(path, &opts.file_open())?);
    let (driver, probed) = match driver {
        Some(d) => (d, false),
        None => (registry::probe(&file)?, true),
    };
    Ok((driver.open(file, opts)?, probed))
}

impl Chain {
    /// Open `path` and its whole backing chain. Backing files are opened read-only.
    pub fn open(path: &str, format: Option<&str>, opts: &OpenOptions) -> Result<Chain> {
        let (image, probed) = open_image(path, format, opts)?;
        let mut layers = vec![Layer {
            image,
            filename: path.to_string(),
            probed,
        }];
        let mut seen = vec![file_id(path)];
        loop {
            let last = layers.last().expect("chain has a top layer");
            let Some(backing) = last.image.backing() else {
                break;
            };
            if layers.len() >= MAX_DEPTH {
                return Err(Error::Chain(format!(
                    "Backing chain of '{path}' is deeper than {MAX_DEPTH} images"
                )));
            }
            let resolved = resolve_backing(&last.filename, &backing.name);
            let id = file_id(&resolved);
            if id.is_some() && seen.contains(&id) {
                return Err(Error::Chain(format!(
                    "Backing file '{resolved}' creates an infinite loop."
                )));
            }
            seen.push(id);
            // `info` opens the whole chain without I/O (no locks, no keys); everything
            // else reads backing files.
            let bopts = OpenOptions {
                access: if opts.access == Access::Info {
                    Access::Info
                } else {
                    Access::Read
                },
                force_share: opts.force_share,
                no_lock: opts.no_lock,
                snapshot: None,
                check: false,
                key: None,
            };
            let (image, probed) = open_image(&resolved, backing.format.as_deref(), &bopts)
                .map_err(|e| {
                    Error::Chain(format!(
                        "Could not open backing file '{}' of '{}': {e}",
                        backing.name, last.filename
                    ))
                })?;
            layers.push(Layer {
                image,
                filename: resolved,
                probed,
            });
        }
        Ok(Chain { layers })
    }

    /// Build a chain of one already-open image.
    pub fn single(image: Box<dyn Image>, filename: &str, probed: bool) -> Chain {
        Chain {
            layers: vec![Layer {
                image,
                filename: filename.to_string(),
                probed,
            }],
        }
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The top image.
    pub fn top(&self) -> &dyn Image {
        self.layers[0].image.as_ref()
    }

    /// Virtual size of the top image.
    pub fn virtual_size(&self) -> u64 {
        self.top().virtual_size()
    }

    /// Map `len` bytes from `off` through the chain: each `Unallocated` range of a layer is
    /// looked up in the layer below. Returns guest bytes covered (0 only at the end).
    pub fn map(&self, off: GuestOff, len: u64, out: &mut Vec<ChainExtent>) -> Result<u64> {
        self.map_at(0, off, len, out)
    }

    fn map_at(
        &self,
        depth: usize,
        off: GuestOff,
        len: u64,
        out: &mut Vec<ChainExtent>,
    ) -> Result<u64> {
        let Some(layer) = self.layers.get(depth) else {
            push_chain(
                out,
                ChainExtent {
                    depth,
                    extent: Extent::Unallocated { len, at: None },
                    shown_depth: depth.saturating_sub(1),
                },
            );
            return Ok(len);
        };
        let size = layer.image.virtual_size();
        if off.0 >= size {
            // Past the end of a (shorter) backing file: reads as zeros; `map` names the
            // layer whose backing file ended.
            push_chain(
                out,
                ChainExtent {
                    depth: self.layers.len(),
                    extent: Extent::Unallocated { len, at: None },
                    shown_depth: depth.saturating_sub(1),
                },
            );
            return Ok(len);
        }
        let mut exts = Vec::new();
        let covered = layer.image.map(off, len.min(size - off.0), &mut exts)?;
        let mut pos = off;
        for e in exts {
            let l = e.len();
            if let Extent::Unallocated { at: Some(at), .. } = e {
                // Look below; where no layer has the range, keep this layer's reserved host
                // location for `map` (QEMU reports it).
                let mut below = Vec::new();
                let mut done = 0;
                while done < l {
                    let n = self.map_at(depth + 1, pos.plus(done), l - done, &mut below)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                let mut rel = 0;
                for ce in below {
                    let n = ce.extent.len();
                    if ce.depth >= self.layers.len() {
                        push_chain(
                            out,
                            ChainExtent {
                                depth: self.layers.len(),
                                extent: Extent::Unallocated {
                                    len: n,
                                    at: Some((at.0, at.1.plus(rel))),
                                },
                                shown_depth: depth,
                            },
                        );
                    } else {
                        push_chain(out, ce);
                    }
                    rel += n;
                }
            } else if let Extent::Unallocated { .. } = e {
                let mut done = 0;
                while done < l {
                    let n = self.map_at(depth + 1, pos.plus(done), l - done, out)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
            } else {
                push_chain(
                    out,
                    ChainExtent {
                        depth,
                        extent: e,
                        shown_depth: depth,
                    },
                );
            }
            pos = pos.plus(l);
        }
        Ok(covered)
    }
}

/// Append, merging with the previous extent of the same depth when contiguous.
fn push_chain(out: &mut Vec<ChainExtent>, ce: ChainExtent) {
    if let Some(last) = out.last_mut() {
        if last.depth == ce.depth
            && last.shown_depth == ce.shown_depth
            && last.extent.try_merge(&ce.extent)
        {
            return;
        }
    }
    out.push(ce);
}

/// Resolve a backing name against the directory of the image that names it.
pub fn resolve_backing(overlay: &str, backing: &str) -> String {
    if Path::new(backing).is_absolute() || backing.contains("://") {
        return backing.to_string();
    }
    match Path::new(overlay).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            dir.join(backing).to_string_lossy().into_owned()
        }
        _ => backing.to_string(),
    }
}

fn file_id(path: &str) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names() {
        assert_eq!(
            resolve_backing("/a/b/top.qcow2", "base.raw"),
            "/a/b/base.raw"
        );
        assert_eq!(resolve_backing("top.qcow2", "base.raw"), "base.raw");
        assert_eq!(resolve_backing("/a/top", "/abs/base"), "/abs/base");
    }
}
