//! `convert -c`: one unit per target cluster, compressed on whichever shard takes it.
//!
//! A [`CompressWork`] gathers the cluster's bytes from its source pieces (plain data read
//! with pread, compressed data decoded, holes as zeros), detects an all-zero cluster, and
//! compresses the rest; the planner then reserves space for the result in the target
//! (which must happen in one place, so compressed clusters pack tightly) and sends a
//! [`WriteVecWork`] to write it.

use std::io as stdio;

use rimg_formats::Codec;

use crate::compress::compress;
use crate::copy::Src;
use crate::decompress::read_compressed;
use crate::files::{FileIdx, JobFiles};
use crate::io::{Buf, OpKind};
use crate::shard::{Cx, Outcome, Payload, Step, Work};
use crate::{zero, Error};

/// Compress one target cluster.
pub(crate) struct CompressWork {
    /// unit id (the planner's)
    pub id: u64,
    /// guest offset of the cluster
    pub guest: u64,
    /// guest bytes of the cluster inside the image
    pub len: u64,
    /// the cluster size (a short last cluster is padded with zeros)
    pub unit: u64,
    /// (offset in the cluster, length, source) in order
    pub pieces: Vec<(u64, u64, Src)>,
    /// codec of the target
    pub codec: Codec,
    /// turn read errors into zeros
    pub salvage: bool,
    result: Option<Result<Payload, Error>>,
}

impl CompressWork {
    /// A unit for the cluster of `len` guest bytes made of `pieces`.
    pub(crate) fn new(
        id: u64,
        guest: u64,
        len: u64,
        unit: u64,
        pieces: Vec<(u64, u64, Src)>,
        codec: Codec,
        salvage: bool,
    ) -> CompressWork {
        CompressWork {
            id,
            guest,
            len,
            unit,
            pieces,
            codec,
            salvage,
            result: None,
        }
    }

    fn gather(&self, files: &JobFiles, data: &mut [u8]) -> Result<(), Error> {
        for &(o, l, src) in &self.pieces {
            let dst = &mut data[o as usize..(o + l) as usize];
            let r = match src {
                Src::Zeros => {
                    dst.fill(0);
                    Ok(())
                }
                Src::Compressed(c) => read_compressed(files, &c, dst),
                Src::Data(f, h) => pread_full(files, f, h, dst),
            };
            if let Err(e) = r {
                if self.salvage {
                    dst.fill(0);
                } else {
                    let file = match src {
                        Src::Data(f, _) => f,
                        Src::Compressed(c) => c.file,
                        Src::Zeros => FileIdx(0),
                    };
                    return Err(Error::Read {
                        guest: self.guest + o,
                        path: files.path(file).to_string(),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }
}

fn pread_full(files: &JobFiles, f: FileIdx, off: u64, dst: &mut [u8]) -> stdio::Result<()> {
    // Past EOF (a raw tail): zeros. Encrypted sources are decrypted.
    files.pread_plain(f, off, dst)?;
    Ok(())
}

impl Work for CompressWork {
    fn buffers(&self) -> usize {
        0
    }

    fn start(&mut self, cx: &mut Cx<'_>) -> Step {
        let mut data = vec![0u8; self.unit as usize];
        let r = self
            .gather(cx.files, &mut data[..self.len as usize])
            .and_then(|()| {
                if zero::is_zero(&data) {
                    return Ok(Payload::Zero);
                }
                let mut out = Vec::new();
                let smaller = compress(self.codec, &data, &mut out).map_err(|e| Error::Io {
                    what: "compressing for",
                    path: String::from("target"),
                    off: 0,
                    source: e,
                })?;
                if smaller {
                    Ok(Payload::Compressed(out))
                } else {
                    data.truncate(self.len as usize);
                    Ok(Payload::Raw(data))
                }
            });
        self.result = Some(r);
        Step::Done
    }

    fn complete(
        &mut self,
        _cx: &mut Cx<'_>,
        _tag: u16,
        _res: stdio::Result<usize>,
        _buf: Option<Buf>,
    ) -> Step {
        Step::Done
    }

    fn finish(self: Box<Self>) -> Outcome {
        let (result, payload) = match self.result {
            Some(Ok(p)) => (Ok(None), Some(p)),
            Some(Err(e)) => (Err(e), None),
            None => (Ok(None), Some(Payload::Zero)),
        };
        Outcome {
            id: self.id,
            bytes: self.len,
            result,
            payload,
            zeros: Vec::new(),
        }
    }
}

/// Write bytes the planner holds (a compressed cluster, or one that did not compress) to
/// one or more host ranges, one buffer-full at a time.
pub(crate) struct WriteVecWork {
    id: u64,
    bytes: u64,
    data: Vec<u8>,
    /// (file, host offset, start in data, length)
    targets: Vec<(FileIdx, u64, usize, usize)>,
    next: usize,
    done_in_target: usize,
    buf: Option<Buf>,
    err: Option<Error>,
}

impl WriteVecWork {
    /// Write `data` to `targets`; `bytes` is the guest progress it stands for.
    pub(crate) fn new(
        id: u64,
        bytes: u64,
        data: Vec<u8>,
        targets: Vec<(FileIdx, u64, usize, usize)>,
    ) -> WriteVecWork {
        WriteVecWork {
            id,
            bytes,
            data,
            targets,
            next: 0,
            done_in_target: 0,
            buf: None,
            err: None,
        }
    }

    fn pump(&mut self, cx: &mut Cx<'_>) -> Step {
        while self.err.is_none() && self.next < self.targets.len() {
            let (file, host, start, len) = self.targets[self.next];
            if self.done_in_target >= len {
                self.next += 1;
                self.done_in_target = 0;
                continue;
            }
            let Some(mut buf) = self.buf.take() else {
                return Step::Pending;
            };
            let n = (len - self.done_in_target).min(buf.capacity());
            buf.set_len(buf.capacity());
            let s = start + self.done_in_target;
            buf.as_mut_slice()[..n].copy_from_slice(&self.data[s..s + n]);
            let off = host + self.done_in_target as u64;
            self.done_in_target += n;
            cx.submit(
                0,
                OpKind::Write {
                    file: cx.files.slot(file, off, n as u64),
                    off,
                    buf,
                    start: 0,
                    len: n,
                },
            );
            return Step::Pending;
        }
        if let Some(b) = self.buf.take() {
            cx.put_buf(b);
        }
        Step::Done
    }
}

impl Work for WriteVecWork {
    fn buffers(&self) -> usize {
        1
    }

    fn start(&mut self, cx: &mut Cx<'_>) -> Step {
        self.buf = Some(cx.take_buf());
        self.pump(cx)
    }

    fn complete(
        &mut self,
        cx: &mut Cx<'_>,
        _tag: u16,
        res: stdio::Result<usize>,
        buf: Option<Buf>,
    ) -> Step {
        self.buf = buf;
        if let Err(e) = res {
            let (file, host, _, _) = self.targets[self.next.min(self.targets.len() - 1)];
            self.err = Some(Error::Io {
                what: "writing",
                path: cx.files.path(file).to_string(),
                off: host,
                source: e,
            });
        }
        self.pump(cx)
    }

    fn finish(self: Box<Self>) -> Outcome {
        Outcome {
            id: self.id,
            bytes: self.bytes,
            result: match self.err {
                Some(e) => Err(e),
                None => Ok(None),
            },
            payload: None,
            zeros: Vec::new(),
        }
    }
}
