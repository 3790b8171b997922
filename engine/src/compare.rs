//! The compare job: map two chains in lockstep and read only where data may differ.
//!
//! Ranges where both sides read as zeros without data are equal without I/O; where one side
//! has data and the other none, only that side is read and checked for zeros; where both have
//! data, both are read and compared. The lowest mismatching offset wins even though shards
//! finish out of order: the planner stops dispatching past a known mismatch and waits for
//! everything below it.

use std::io as stdio;
use std::sync::Arc;

use rimg_formats::{Chain, ChainExtent, Extent, GuestOff};

use crate::copy::Src;
use crate::decompress::read_compressed;
use crate::files::{CacheMode, FileIdx, JobFiles};
use crate::io::{Buf, OpKind};
use crate::shard::{Cx, Outcome, Pool, Step, Work};
use crate::{zero, Engine, Error, Result};

/// How a compare ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareResult {
    /// same content (and, in strict mode, same allocation and size)
    Identical,
    /// first differing byte lies in the 512-byte sector at this offset
    ContentMismatch(u64),
    /// strict mode: allocation status differs at this offset
    StatusMismatch(u64),
    /// strict mode: the virtual sizes differ
    SizeMismatch,
}

/// Options of a compare.
pub struct CompareOptions<'a> {
    /// `-s`: allocation status and size must match too
    pub strict: bool,
    /// cache mode for both images (`-T`)
    pub cache: CacheMode,
    /// progress callback (bytes done, total)
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    /// called once when the common part is equal and the sizes differ (qemu prints
    /// "Warning: Image size mismatch!" at that point)
    pub on_size_mismatch: Option<&'a dyn Fn()>,
}

/// What QEMU's block layer would say of a range starting at `off`: (allocated, data, zero,
/// eof). `eof` is QEMU's BDRV_BLOCK_EOF: the range runs to the end of the image, which
/// strict mode compares too (a hole to the end differs from a hole followed by data).
/// A layer QEMU has no allocation status for (vhdx: [`rimg_formats::Image::opaque_allocation`])
/// is allocated data everywhere with no offset (the fifth flag), and answers a query for
/// everything up to the end of the image at once: as the top layer it always says `eof`.
fn status(ce: &ChainExtent, c: &Chain, off: u64, size: u64) -> (bool, bool, bool, bool, bool) {
    let layers = c.layers().len();
    let eof = off + ce.extent.len() >= size;
    if c.layers()
        .get(ce.depth)
        .is_some_and(|l| l.image.opaque_allocation())
    {
        return (true, true, false, ce.depth == 0 || eof, true);
    }
    match ce.extent {
        Extent::Data { .. } | Extent::Compressed { .. } => (true, true, false, eof, false),
        Extent::Zero { .. } => (true, false, true, eof, false),
        Extent::DataHole { .. } => (true, true, true, eof, false),
        _ => (ce.depth < layers, false, true, eof, false),
    }
}

/// Map a chain, naming the image and offset when it fails.
fn map_at(c: &Chain, off: u64, len: u64, out: &mut Vec<ChainExtent>) -> Result<u64> {
    c.map(GuestOff(off), len, out).map_err(|source| Error::Map {
        image: c.layers()[0].filename.clone(),
        off,
        source,
    })
}

/// Compare `a` and `b`.
pub fn compare(
    engine: &Engine,
    a: &Chain,
    b: &Chain,
    opts: &CompareOptions<'_>,
) -> Result<CompareResult> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    if opts.strict && sa != sb {
        return Ok(CompareResult::SizeMismatch);
    }
    let mut files = JobFiles::default();
    let mut idx: [Vec<Vec<FileIdx>>; 2] = [Vec::new(), Vec::new()];
    for (k, c) in [a, b].iter().enumerate() {
        for layer in c.layers() {
            idx[k].push(files.add_image(engine, &*layer.image, false, opts.cache)?);
        }
    }
    let files = Arc::new(files);
    let mut pool = Pool::start(engine, files, usize::MAX, 2)?;
    let unit = engine.config().unit as u64;
    let total = sa.max(sb);
    let mut run = Run {
        pool: &mut pool,
        inflight: 0,
        max_inflight: 32,
        mismatch: None,
        err: None,
        done: 0,
        total,
        progress: opts.progress,
    };
    let side = |k: usize, ce: &ChainExtent| Src::from_extent(ce, &idx[k]);

    // Common part, in lockstep.
    let common = sa.min(sb);
    let mut status_mismatch = None;
    let (mut ea, mut eb): (Vec<ChainExtent>, Vec<ChainExtent>) = (Vec::new(), Vec::new());
    let (mut ia, mut ib) = (0usize, 0usize);
    let mut off = 0u64;
    while off < common && run.err.is_none() {
        if run.mismatch.is_some_and(|m| m <= off) {
            break;
        }
        if ia == ea.len() {
            ea.clear();
            ia = 0;
            if map_at(a, off, common - off, &mut ea)? == 0 {
                break;
            }
        }
        if ib == eb.len() {
            eb.clear();
            ib = 0;
            if map_at(b, off, common - off, &mut eb)? == 0 {
                break;
            }
        }
        let (xa, xb) = (&ea[ia], &eb[ib]);
        let n = xa.extent.len().min(xb.extent.len()).min(common - off);
        let (st_a, st_b) = (status(xa, a, off, sa), status(xb, b, off, sb));
        if opts.strict && st_a != st_b {
            status_mismatch = Some(off);
            break;
        }
        let (da, db) = (side(0, xa), side(1, xb));
        if da != Src::Zeros || db != Src::Zeros {
            let mut d = 0;
            while d < n {
                let g = off + d;
                let m = (unit - g % unit).min(n - d);
                run.send(Box::new(CompareWork::new(
                    g,
                    m,
                    da.advance(d),
                    db.advance(d),
                )));
                d += m;
            }
        } else {
            run.done += n;
        }
        // Advance both cursors by n.
        for (e, i) in [(&mut ea, &mut ia), (&mut eb, &mut ib)] {
            if e[*i].extent.len() == n {
                *i += 1;
            } else {
                let rest = e[*i].extent.advance(n);
                e[*i].extent = rest;
            }
        }
        off += n;
    }
    run.drain_to(1);
    if let Some(e) = run.err.take() {
        drop(run);
        pool.join();
        return Err(e);
    }
    if let Some(m) = run.mismatch {
        if status_mismatch.is_none_or(|s| m < s) {
            drop(run);
            pool.join();
            return Ok(CompareResult::ContentMismatch(m));
        }
    }
    if let Some(s) = status_mismatch {
        drop(run);
        pool.join();
        return Ok(CompareResult::StatusMismatch(s));
    }

    // The tail of the larger image must read as zeros.
    if sa != sb {
        if let Some(f) = opts.on_size_mismatch {
            f();
        }
        let (big, k) = if sa > sb { (a, 0) } else { (b, 1) };
        let mut off = common;
        let mut ex = Vec::new();
        while off < total && run.err.is_none() && run.mismatch.is_none() {
            ex.clear();
            let got = map_at(big, off, total - off, &mut ex)?;
            if got == 0 {
                break;
            }
            for ce in &ex {
                let n = ce.extent.len();
                let s = side(k, ce);
                if s != Src::Zeros {
                    let mut d = 0;
                    while d < n {
                        let g = off + d;
                        let m = (unit - g % unit).min(n - d);
                        run.send(Box::new(CompareWork::new(g, m, s.advance(d), Src::Zeros)));
                        d += m;
                    }
                } else {
                    run.done += n;
                }
                off += n;
            }
        }
        run.drain_to(1);
    }
    let (err, mismatch) = (run.err.take(), run.mismatch);
    drop(run);
    pool.join();
    if let Some(e) = err {
        return Err(e);
    }
    Ok(match mismatch {
        Some(m) => CompareResult::ContentMismatch(m),
        None => CompareResult::Identical,
    })
}

struct Run<'a> {
    pool: &'a mut Pool,
    inflight: usize,
    max_inflight: usize,
    mismatch: Option<u64>,
    err: Option<Error>,
    done: u64,
    total: u64,
    progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

impl Run<'_> {
    fn send(&mut self, w: Box<dyn Work>) {
        self.drain_to(self.max_inflight);
        self.inflight += 1;
        self.pool.send(w);
    }

    fn on(&mut self, o: Outcome) {
        self.inflight -= 1;
        match o.result {
            Ok(Some(m)) => {
                self.mismatch = Some(self.mismatch.map_or(m, |x| x.min(m)));
            }
            Ok(None) => {
                self.done += o.bytes;
                if let Some(p) = self.progress {
                    p(self.done, self.total);
                }
            }
            Err(e) => {
                self.err.get_or_insert(e);
            }
        }
    }

    fn drain_to(&mut self, limit: usize) {
        while let Ok(o) = self.pool.results.try_recv() {
            self.on(o);
        }
        while self.inflight >= limit && self.inflight > 0 {
            match self.pool.results.recv() {
                Ok(o) => self.on(o),
                Err(_) => {
                    self.err
                        .get_or_insert(Error::Setup("shards stopped unexpectedly".into()));
                    self.inflight = 0;
                }
            }
        }
    }
}

/// Compare one unit: read one or both sides.
struct CompareWork {
    guest: u64,
    len: u64,
    sides: [Src; 2],
    bufs: [Option<Buf>; 2],
    skips: [usize; 2],
    outstanding: usize,
    err: Option<Error>,
    mismatch: Option<u64>,
}

impl CompareWork {
    fn new(guest: u64, len: u64, a: Src, b: Src) -> CompareWork {
        CompareWork {
            guest,
            len,
            sides: [a, b],
            bufs: [None, None],
            skips: [0, 0],
            outstanding: 0,
            err: None,
            mismatch: None,
        }
    }

    fn data(&self, k: usize) -> &[u8] {
        let b = self.bufs[k].as_ref().expect("read finished");
        &b.as_slice()[self.skips[k]..self.skips[k] + self.len as usize]
    }

    fn judge(&mut self) {
        let first_diff = match (self.sides[0] != Src::Zeros, self.sides[1] != Src::Zeros) {
            (true, true) => {
                let (x, y) = (self.data(0), self.data(1));
                if x == y {
                    None
                } else {
                    x.iter().zip(y).position(|(p, q)| p != q)
                }
            }
            (true, false) | (false, true) => {
                let k = usize::from(self.sides[0] == Src::Zeros);
                let d = self.data(k);
                if zero::is_zero(d) {
                    None
                } else {
                    d.iter().position(|&v| v != 0)
                }
            }
            (false, false) => None,
        };
        if let Some(i) = first_diff {
            self.mismatch = Some((self.guest + i as u64) / 512 * 512);
        }
    }
}

impl CompareWork {
    /// Every side is in: judge, and give the buffers back.
    fn settle(&mut self, cx: &mut Cx<'_>) {
        if self.err.is_none() {
            self.judge();
        }
        for b in self.bufs.iter_mut() {
            if let Some(b) = b.take() {
                cx.put_buf(b);
            }
        }
    }
}

impl Work for CompareWork {
    fn buffers(&self) -> usize {
        2
    }

    fn start(&mut self, cx: &mut Cx<'_>) -> Step {
        for k in 0..2 {
            let (file, host) = match self.sides[k] {
                Src::Zeros => continue,
                Src::Data(f, h) => (f, h),
                Src::Compressed(c) => {
                    let mut buf = cx.take_buf();
                    buf.set_len(self.len as usize);
                    if let Err(e) = read_compressed(cx.files, &c, buf.as_mut_slice()) {
                        self.err.get_or_insert(Error::Read {
                            guest: self.guest,
                            path: cx.files.path(c.file).to_string(),
                            source: e,
                        });
                    }
                    self.skips[k] = 0;
                    self.bufs[k] = Some(buf);
                    continue;
                }
            };
            let mut buf = cx.take_buf();
            let align = cx.files.align(file);
            let a_start = host / align * align;
            let a_end = (host + self.len).div_ceil(align) * align;
            let (off, rlen, skip) = if (a_end - a_start) as usize <= buf.capacity() {
                (a_start, a_end - a_start, (host - a_start) as usize)
            } else {
                (host, self.len, 0)
            };
            self.skips[k] = skip;
            buf.set_len(rlen as usize);
            let slot = cx.files.slot(file, off, rlen);
            cx.submit(
                k as u16,
                OpKind::Read {
                    file: slot,
                    off,
                    buf,
                },
            );
            self.outstanding += 1;
        }
        if self.outstanding == 0 {
            self.settle(cx);
            Step::Done
        } else {
            Step::Pending
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
        let k = usize::from(tag);
        let mut buf = buf.expect("read returns its buffer");
        let want = self.skips[k] + self.len as usize;
        match res {
            Ok(n) if n < want => {
                buf.set_len(buf.capacity());
                buf.as_mut_slice()[n..want].fill(0);
            }
            Ok(_) => {}
            Err(e) => {
                let Src::Data(file, _) = self.sides[k] else {
                    unreachable!("only data sides are read through the queue")
                };
                self.err.get_or_insert(Error::Read {
                    guest: self.guest,
                    path: cx.files.path(file).to_string(),
                    source: e,
                });
            }
        }
        if let (Src::Data(file, host), None) = (self.sides[k], &self.err) {
            if cx.files.encrypted(file) {
                let n = want.div_ceil(512) * 512;
                buf.set_len(buf.capacity().min(n.max(buf.len())));
                let at = host - self.skips[k] as u64;
                let end = n.min(buf.len());
                if let Err(e) = cx.files.decrypt(file, at, &mut buf.as_mut_slice()[..end]) {
                    self.err.get_or_insert(Error::Read {
                        guest: self.guest,
                        path: cx.files.path(file).to_string(),
                        source: e,
                    });
                }
            }
        }
        self.bufs[k] = Some(buf);
        if self.outstanding > 0 {
            return Step::Pending;
        }
        self.settle(cx);
        Step::Done
    }

    fn finish(self: Box<Self>) -> Outcome {
        Outcome {
            id: self.guest,
            bytes: self.len,
            result: match self.err {
                Some(e) => Err(e),
                None => Ok(self.mismatch),
            },
            payload: None,
            zeros: Vec::new(),
        }
    }
}
