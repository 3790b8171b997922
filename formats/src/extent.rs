//! What a guest range is, in one layer of a chain.

use crate::types::{FileId, HostOff};

/// Compression codec of a [`Extent::Compressed`] range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// raw deflate (qcow2 `zlib`)
    Zlib,
    /// zstd frames (qcow2 `zstd`)
    Zstd,
    /// a zlib stream (RFC 1950: header, deflate, Adler-32), as vmdk streamOptimized grains
    /// carry; any window size
    ZlibStream,
}

/// One contiguous guest range of one layer, as returned by [`crate::Image::map`].
///
/// Lengths are bytes of guest data. Neighbours with the same kind and contiguous host
/// location are merged by the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Extent {
    /// Guest bytes stored verbatim at `host` in `file`.
    Data {
        /// which of the image's files
        file: FileId,
        /// where in that file
        host: HostOff,
        /// length in bytes
        len: u64,
    },
    /// Reads as zeros. `explicit` means the backing file must not show through (a raw hole or
    /// a qcow2 zero cluster); `at` is the host location when the format still has one
    /// (a raw hole, a preallocated zero cluster), reported by `map` as the offset.
    Zero {
        /// length in bytes
        len: u64,
        /// whether this layer masks its backing
        explicit: bool,
        /// host location, if any
        at: Option<(FileId, HostOff)>,
    },
    /// This layer holds nothing here; the chain decides (backing file or zeros). `at` is host
    /// space reserved for the range without data in it (a qcow2 subcluster of an allocated
    /// cluster), which `map` reports as the offset when no backing layer answers.
    Unallocated {
        /// length in bytes
        len: u64,
        /// reserved host location, if any
        at: Option<(FileId, HostOff)>,
    },
    /// Guest bytes mapped verbatim at `host` in `file` where the host file has a hole, so
    /// they read as zeros (a fixed-layout image over a sparse file: vpc fixed). Allocated in
    /// this layer; `map` reports it as both data and zero, as QEMU does when it asks the
    /// protocol layer under such a format (`BDRV_BLOCK_RECURSE`).
    DataHole {
        /// which of the image's files
        file: FileId,
        /// where in that file
        host: HostOff,
        /// length in bytes
        len: u64,
    },
    /// A compressed unit: decode `clen_max` bytes at `host` with `codec` into `unit` bytes,
    /// of which the range covers `len` bytes starting `skip` bytes into the unit.
    Compressed {
        /// which of the image's files
        file: FileId,
        /// start of the compressed bytes
        host: HostOff,
        /// upper bound of the compressed length
        clen_max: u64,
        /// codec
        codec: Codec,
        /// decoded unit size (the cluster size)
        unit: u64,
        /// offset of the range inside the decoded unit
        skip: u64,
        /// length of the range
        len: u64,
    },
}

impl Extent {
    /// Length in guest bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. }
            | Extent::DataHole { len, .. }
            | Extent::Zero { len, .. }
            | Extent::Unallocated { len, .. }
            | Extent::Compressed { len, .. } => len,
        }
    }

    /// Whether the extent is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shorten to `len` bytes (must be `<=` the current length).
    pub fn truncate(&mut self, new_len: u64) {
        match self {
            Extent::Data { len, .. }
            | Extent::DataHole { len, .. }
            | Extent::Zero { len, .. }
            | Extent::Unallocated { len, .. }
            | Extent::Compressed { len, .. } => *len = (*len).min(new_len),
        }
    }

    /// The extent with its first `n` bytes removed (`n < len`).
    pub fn advance(&self, n: u64) -> Extent {
        let mut e = self.clone();
        match &mut e {
            Extent::Data { host, len, .. } | Extent::DataHole { host, len, .. } => {
                *host = host.plus(n);
                *len -= n;
            }
            Extent::Zero { len, at, .. } => {
                *len -= n;
                if let Some((_, h)) = at {
                    *h = h.plus(n);
                }
            }
            Extent::Unallocated { len, at } => {
                *len -= n;
                if let Some((_, h)) = at {
                    *h = h.plus(n);
                }
            }
            Extent::Compressed { skip, len, .. } => {
                *skip += n;
                *len -= n;
            }
        }
        e
    }

    /// Try to append `next` to `self` when both are the same kind and contiguous.
    pub fn try_merge(&mut self, next: &Extent) -> bool {
        match (self, next) {
            (
                Extent::Data { file, host, len },
                Extent::Data {
                    file: f2,
                    host: h2,
                    len: l2,
                },
            ) if file == f2 && host.plus(*len) == *h2 => {
                *len += l2;
                true
            }
            (
                Extent::DataHole { file, host, len },
                Extent::DataHole {
                    file: f2,
                    host: h2,
                    len: l2,
                },
            ) if file == f2 && host.plus(*len) == *h2 => {
                *len += l2;
                true
            }
            (
                Extent::Zero { len, explicit, at },
                Extent::Zero {
                    len: l2,
                    explicit: e2,
                    at: a2,
                },
            ) if explicit == e2 && contiguous(at.as_ref(), *len, a2.as_ref()) => {
                *len += l2;
                true
            }
            (Extent::Unallocated { len, at }, Extent::Unallocated { len: l2, at: a2 })
                if contiguous(at.as_ref(), *len, a2.as_ref()) =>
            {
                *len += l2;
                true
            }
            _ => false,
        }
    }
}

/// Whether two optional host locations continue each other (`a` covering `len` bytes).
fn contiguous(a: Option<&(FileId, HostOff)>, len: u64, b: Option<&(FileId, HostOff)>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some((f, h)), Some((f2, h2))) => f == f2 && h.plus(len) == *h2,
        _ => false,
    }
}

/// Push `e` onto `out`, merging with the last element when possible.
pub fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if e.is_empty() {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.try_merge(&e) {
            return;
        }
    }
    out.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_data_contiguous_only() {
        let mut v = Vec::new();
        push_merged(
            &mut v,
            Extent::Data {
                file: FileId(0),
                host: HostOff(0),
                len: 10,
            },
        );
        push_merged(
            &mut v,
            Extent::Data {
                file: FileId(0),
                host: HostOff(10),
                len: 5,
            },
        );
        push_merged(
            &mut v,
            Extent::Data {
                file: FileId(0),
                host: HostOff(100),
                len: 5,
            },
        );
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].len(), 15);
    }

    #[test]
    fn advance_moves_host() {
        let e = Extent::Zero {
            len: 10,
            explicit: true,
            at: Some((FileId(0), HostOff(4))),
        };
        assert_eq!(
            e.advance(3),
            Extent::Zero {
                len: 7,
                explicit: true,
                at: Some((FileId(0), HostOff(7)))
            }
        );
    }
}
