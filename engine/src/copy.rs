//! The units of a convert: [`CopyWork`] moves one transfer unit (read or zeros, zero
//! detection, writes to its placements, or copy_file_range), [`ActionWork`] performs a
//! writer's host actions (zeroing, preallocation).

use std::collections::VecDeque;
use std::io as stdio;
use std::sync::atomic::{AtomicBool, Ordering};

use rimg_formats::{Action, ChainExtent, Extent, FileId};

use crate::decompress::{read_compressed, CompressedSrc};
use crate::files::FileIdx;
use crate::io::{Buf, FallocMode, FileSlot, OpKind};
use crate::shard::{Cx, Outcome, Step, Work};
use crate::{zero, Error};

/// Sticky: copy_file_range failed with "not here" once, use read+write from then on.
static CFR_BROKEN: AtomicBool = AtomicBool::new(false);

/// Where a unit's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Src {
    /// nothing to read: zeros
    Zeros,
    /// verbatim at (file, host offset)
    Data(FileIdx, u64),
    /// a compressed unit to decode
    Compressed(CompressedSrc),
}

impl Src {
    /// Where the bytes of chain extent `ce` come from; `files[depth][file]` maps the
    /// layers' files to the job's file table.
    pub(crate) fn from_extent(ce: &ChainExtent, files: &[Vec<FileIdx>]) -> Src {
        match ce.extent {
            Extent::Data { file, host, .. } => Src::Data(files[ce.depth][file.0 as usize], host.0),
            Extent::Compressed {
                file,
                host,
                clen_max,
                codec,
                unit,
                skip,
                ..
            } => Src::Compressed(CompressedSrc {
                file: files[ce.depth][file.0 as usize],
                host: host.0,
                clen_max,
                codec,
                unit,
                skip,
            }),
            _ => Src::Zeros,
        }
    }

    /// The source `n` guest bytes further on.
    pub(crate) fn advance(self, n: u64) -> Src {
        match self {
            Src::Zeros => Src::Zeros,
            Src::Data(f, h) => Src::Data(f, h + n),
            Src::Compressed(mut c) => {
                c.skip += n;
                Src::Compressed(c)
            }
        }
    }
}

/// One pending I/O of a unit.
#[derive(Debug)]
enum Io {
    /// write `len` bytes from `buf_off` in the unit's buffer to `host` of `file`
    Write {
        file: FileIdx,
        host: u64,
        buf_off: usize,
        len: usize,
    },
    /// write `len` zero bytes at `host` (the buffer is zeroed first)
    WriteZeros { file: FileIdx, host: u64, len: u64 },
    /// fallocate
    Falloc {
        file: FileIdx,
        mode: FallocMode,
        host: u64,
        len: u64,
    },
}

const TAG_READ: u16 = 0;
const TAG_WRITE: u16 = 1;
const TAG_FALLOC: u16 = 2;

/// Copy one transfer unit: read (or zeros), detect zeros, write placements.
pub(crate) struct CopyWork {
    id: u64,
    guest: u64,
    len: u64,
    src: Src,
    dst: Vec<(FileIdx, u64, u64)>,
    detect: Option<u64>,
    target_zero: bool,
    salvage: bool,
    cfr: bool,
    ios: VecDeque<Io>,
    buf: Option<Buf>,
    skip: usize,
    outstanding: usize,
    err: Option<Error>,
    salvaged: u64,
    /// guest ranges found all-zero and not written
    zeros: Vec<(u64, u64)>,
}

impl CopyWork {
    /// A unit copying `len` guest bytes at target offset `guest` from `src` to `dst`
    /// placements `(file, host, len)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        guest: u64,
        len: u64,
        src: Src,
        dst: Vec<(FileIdx, u64, u64)>,
        detect: Option<u64>,
        target_zero: bool,
        salvage: bool,
        cfr: bool,
    ) -> CopyWork {
        CopyWork {
            id,
            guest,
            len,
            src,
            dst,
            detect,
            target_zero,
            salvage,
            cfr,
            ios: VecDeque::new(),
            buf: None,
            skip: 0,
            outstanding: 0,
            err: None,
            salvaged: 0,
            zeros: Vec::new(),
        }
    }

    fn set_err(&mut self, e: Error) {
        if self.err.is_none() {
            self.err = Some(e);
        }
    }

    /// Try the copy_file_range path; true when the unit is complete.
    fn try_copy_range(&mut self, cx: &mut Cx<'_>) -> bool {
        if CFR_BROKEN.load(Ordering::Relaxed) {
            return false;
        }
        let (Src::Data(sf, sh), [(df, dh, _)]) = (self.src, self.dst.as_slice()) else {
            return false;
        };
        let (df, dh) = (*df, *dh);
        let mut off_in = sh as i64;
        let mut off_out = dh as i64;
        let mut left = self.len as usize;
        while left > 0 {
            match nix::fcntl::copy_file_range(
                cx.files.buffered_fd(sf),
                Some(&mut off_in),
                cx.files.buffered_fd(df),
                Some(&mut off_out),
                left,
            ) {
                Ok(0) => break, // source EOF: the rest reads as zeros (target is sized)
                Ok(n) => left -= n,
                Err(nix::Error::EINTR) => {}
                Err(
                    nix::Error::EXDEV
                    | nix::Error::EOPNOTSUPP
                    | nix::Error::EINVAL
                    | nix::Error::ENOSYS,
                ) if left == self.len as usize => {
                    CFR_BROKEN.store(true, Ordering::Relaxed);
                    return false;
                }
                Err(e) => {
                    self.set_err(Error::Io {
                        what: "copying to",
                        path: cx.files.path(df).to_string(),
                        off: off_out as u64,
                        source: e.into(),
                    });
                    return true;
                }
            }
        }
        if left > 0 && !self.target_zero {
            self.ios.push_back(Io::WriteZeros {
                file: df,
                host: off_out as u64,
                len: left as u64,
            });
            return false;
        }
        true
    }

    /// Plan the writes of the data now in the buffer.
    fn plan_writes(&mut self) {
        let buf = self.buf.as_ref().expect("buffer held after read");
        let data = &buf.as_slice()[self.skip..self.skip + self.len as usize];
        let mut p_off = 0usize;
        for &(file, host, plen) in &self.dst {
            let plen = plen as usize;
            let piece = &data[p_off..p_off + plen];
            match self.detect {
                Some(g) => {
                    let (skip, target_zero, ios) = (self.skip, self.target_zero, &mut self.ios);
                    let (guest0, zeros) = (self.guest + p_off as u64, &mut self.zeros);
                    zero::runs(piece, guest0, g, |o, l, z| {
                        if z && target_zero {
                            zeros.push((guest0 + o as u64, l as u64));
                        }
                        if !z {
                            ios.push_back(Io::Write {
                                file,
                                host: host + o as u64,
                                buf_off: skip + p_off + o,
                                len: l,
                            });
                        } else if !target_zero {
                            ios.push_back(Io::Falloc {
                                file,
                                mode: FallocMode::PunchHole,
                                host: host + o as u64,
                                len: l as u64,
                            });
                        }
                    });
                }
                None => self.ios.push_back(Io::Write {
                    file,
                    host,
                    buf_off: self.skip + p_off,
                    len: plen,
                }),
            }
            p_off += plen;
        }
    }

    /// Submit what can go now: all fallocates, and the next write if the buffer is free.
    fn pump(&mut self, cx: &mut Cx<'_>) -> Step {
        if self.err.is_some() {
            self.ios.clear();
        }
        while let Some(io) = self.ios.front() {
            match *io {
                Io::Falloc {
                    file,
                    mode,
                    host,
                    len,
                } => {
                    self.ios.pop_front();
                    let slot = cx.files.buffered_slot(file);
                    cx.submit(
                        TAG_FALLOC,
                        OpKind::Fallocate {
                            file: slot,
                            mode,
                            off: host,
                            len,
                        },
                    );
                    self.outstanding += 1;
                }
                Io::Write { .. } | Io::WriteZeros { .. } => {
                    let Some(mut buf) = self.buf.take() else {
                        break; // a write is in flight with the buffer
                    };
                    let (file, slot, host, start, len) = match self.ios.pop_front() {
                        Some(Io::Write {
                            file,
                            host,
                            buf_off,
                            len,
                        }) => (
                            file,
                            cx.files.slot_at(file, host, len as u64, buf_off),
                            host,
                            buf_off,
                            len,
                        ),
                        Some(Io::WriteZeros { file, host, len }) => {
                            let cap = buf.capacity();
                            let n = (len as usize).min(cap);
                            buf.set_len(cap);
                            buf.as_mut_slice()[..n].fill(0);
                            if len as usize > n {
                                self.ios.push_front(Io::WriteZeros {
                                    file,
                                    host: host + n as u64,
                                    len: len - n as u64,
                                });
                            }
                            (file, cx.files.slot(file, host, n as u64), host, 0, n)
                        }
                        _ => unreachable!("front was a write"),
                    };
                    // An encrypted target gets ciphertext (zeros included).
                    if cx.files.encrypted(file) {
                        if buf.len() < start + len {
                            buf.set_len(buf.capacity());
                        }
                        let r = cx.files.encrypt(
                            file,
                            host,
                            &mut buf.as_mut_slice()[start..start + len],
                        );
                        if let Err(e) = r {
                            self.set_err(Error::Io {
                                what: "encrypting for",
                                path: cx.files.path(file).to_string(),
                                off: host,
                                source: e,
                            });
                            self.buf = Some(buf);
                            self.ios.clear();
                            break;
                        }
                    }
                    cx.submit(
                        TAG_WRITE,
                        OpKind::Write {
                            file: slot,
                            off: host,
                            buf,
                            start,
                            len,
                        },
                    );
                    self.outstanding += 1;
                }
            }
        }
        if self.outstanding == 0 && self.ios.is_empty() {
            if let Some(b) = self.buf.take() {
                cx.put_buf(b);
            }
            return Step::Done;
        }
        Step::Pending
    }
}

fn aligned_range(host: u64, len: u64, align: u64) -> (u64, u64) {
    let start = host / align * align;
    let end = (host + len).div_ceil(align) * align;
    (start, end - start)
}

impl Work for CopyWork {
    fn buffers(&self) -> usize {
        1
    }

    fn start(&mut self, cx: &mut Cx<'_>) -> Step {
        if self.cfr && self.try_copy_range(cx) {
            return Step::Done;
        }
        let mut buf = cx.take_buf();
        match self.src {
            Src::Zeros => {
                // Fully allocate: zeros to every placement.
                self.buf = Some(buf);
                for &(file, host, len) in &self.dst {
                    self.ios.push_back(Io::WriteZeros { file, host, len });
                }
                self.pump(cx)
            }
            Src::Compressed(c) => {
                // CPU work on this shard: read and decode the unit, then write as usual.
                buf.set_len(self.len as usize);
                self.skip = 0;
                if let Err(e) = read_compressed(cx.files, &c, buf.as_mut_slice()) {
                    if self.salvage {
                        buf.as_mut_slice().fill(0);
                        self.salvaged += self.len;
                    } else {
                        self.set_err(Error::Read {
                            guest: self.guest,
                            path: cx.files.path(c.file).to_string(),
                            source: e,
                        });
                    }
                }
                self.buf = Some(buf);
                if self.err.is_none() {
                    self.plan_writes();
                }
                self.pump(cx)
            }
            Src::Data(file, host) => {
                let align = cx.files.align(file);
                let (a_start, a_len) = aligned_range(host, self.len, align);
                let (off, rlen, skip) = if a_len as usize <= buf.capacity() {
                    (a_start, a_len, (host - a_start) as usize)
                } else {
                    (host, self.len, 0)
                };
                self.skip = skip;
                buf.set_len(rlen as usize);
                let slot: FileSlot = cx.files.slot(file, off, rlen);
                cx.submit(
                    TAG_READ,
                    OpKind::Read {
                        file: slot,
                        off,
                        buf,
                    },
                );
                self.outstanding = 1;
                Step::Pending
            }
        }
    }

    fn complete(
        &mut self,
        cx: &mut Cx<'_>,
        tag: u16,
        res: stdio::Result<usize>,
        buf: Option<Buf>,
    ) -> Step {
        self.outstanding -= 1;
        match tag {
            TAG_READ => {
                let mut buf = buf.expect("read returns its buffer");
                let want = self.skip + self.len as usize;
                match res {
                    Ok(n) if n < want => {
                        // Past EOF (a raw tail padded to 512): zeros.
                        buf.set_len(buf.capacity());
                        buf.as_mut_slice()[n..want].fill(0);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let Src::Data(file, _) = self.src else {
                            unreachable!("only data sources are read through the queue")
                        };
                        if self.salvage {
                            buf.set_len(buf.capacity());
                            buf.as_mut_slice()[..want].fill(0);
                            self.salvaged += self.len;
                        } else {
                            self.set_err(Error::Read {
                                guest: self.guest,
                                path: cx.files.path(file).to_string(),
                                source: e,
                            });
                        }
                    }
                }
                if let (Src::Data(file, host), None) = (self.src, &self.err) {
                    if cx.files.encrypted(file) {
                        let n = want.div_ceil(512) * 512;
                        buf.set_len(buf.capacity().min(n.max(buf.len())));
                        let at = host - self.skip as u64;
                        let end = n.min(buf.len());
                        if let Err(e) = cx.files.decrypt(file, at, &mut buf.as_mut_slice()[..end]) {
                            self.set_err(Error::Read {
                                guest: self.guest,
                                path: cx.files.path(file).to_string(),
                                source: e,
                            });
                        }
                    }
                }
                self.buf = Some(buf);
                if self.err.is_none() {
                    self.plan_writes();
                }
            }
            TAG_WRITE => {
                let buf = buf.expect("write returns its buffer");
                if let Err(e) = res {
                    let (file, host, _) = self.dst[0];
                    self.set_err(Error::Io {
                        what: "writing",
                        path: cx.files.path(file).to_string(),
                        off: host,
                        source: e,
                    });
                }
                self.buf = Some(buf);
            }
            _ => {
                if let Err(e) = res {
                    let (file, host, _) = self.dst[0];
                    self.set_err(Error::Io {
                        what: "zeroing",
                        path: cx.files.path(file).to_string(),
                        off: host,
                        source: e,
                    });
                }
            }
        }
        self.pump(cx)
    }

    fn finish(self: Box<Self>) -> Outcome {
        Outcome {
            id: self.id,
            bytes: self.len,
            result: match self.err {
                Some(e) => Err(e),
                None => Ok(Some(self.salvaged)),
            },
            payload: None,
            zeros: self.zeros,
        }
    }
}

/// Host actions of a writer (zeroing, preallocation), done by a shard.
pub(crate) struct ActionWork {
    id: u64,
    bytes: u64,
    inner: CopyWork,
}

impl ActionWork {
    /// Build from writer actions; `idx` maps the image's [`FileId`]s to the job's files.
    pub(crate) fn new(id: u64, bytes: u64, actions: &[Action], idx: &[FileIdx]) -> ActionWork {
        let map = |f: &FileId| idx[f.0 as usize];
        let ios = actions
            .iter()
            .map(|a| match a {
                Action::PunchHole { file, host, len } => Io::Falloc {
                    file: map(file),
                    mode: FallocMode::PunchHole,
                    host: host.0,
                    len: *len,
                },
                Action::ZeroRange { file, host, len } => Io::Falloc {
                    file: map(file),
                    mode: FallocMode::ZeroRange,
                    host: host.0,
                    len: *len,
                },
                Action::WriteZeroes { file, host, len } => Io::WriteZeros {
                    file: map(file),
                    host: host.0,
                    len: *len,
                },
            })
            .collect();
        ActionWork {
            id,
            bytes,
            inner: CopyWork {
                id,
                guest: 0,
                len: bytes,
                src: Src::Zeros,
                dst: idx.iter().map(|i| (*i, 0, 0)).collect(),
                detect: None,
                target_zero: true,
                salvage: false,
                cfr: false,
                ios,
                buf: None,
                skip: 0,
                outstanding: 0,
                err: None,
                salvaged: 0,
                zeros: Vec::new(),
            },
        }
    }
}

impl Work for ActionWork {
    fn buffers(&self) -> usize {
        1
    }

    fn start(&mut self, cx: &mut Cx<'_>) -> Step {
        self.inner.buf = Some(cx.take_buf());
        self.inner.pump(cx)
    }

    fn complete(
        &mut self,
        cx: &mut Cx<'_>,
        tag: u16,
        res: stdio::Result<usize>,
        buf: Option<Buf>,
    ) -> Step {
        // A file system without fallocate modes: fall back to writing zeros is the
        // writer's business next time; report the error as is.
        self.inner.complete(cx, tag, res, buf)
    }

    fn finish(self: Box<Self>) -> Outcome {
        let mut o = Box::new(self.inner).finish();
        o.id = self.id;
        o.bytes = self.bytes;
        o
    }
}
