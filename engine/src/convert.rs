//! The convert job (also used by `dd`): copy guest ranges of source chains into a target.
//!
//! The planner (the calling thread) maps the sources in large windows, allocates target
//! space in guest order (so the target's layout equals an in-order copy even when shards
//! finish out of order), and sends one [`CopyWork`] per transfer unit to the shards. A shard
//! reads, detects zeros, writes, and reports; the planner then commits the unit's ticket.
//! Zero ranges become nothing (a target known to read as zeros), `fallocate` actions, or
//! explicit zero writes (`-S 0`: fully allocated).

use std::collections::{HashMap, VecDeque};
use std::io as stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rimg_formats::{
    Action, Chain, Extent, FileId, GuestOff, Image, ImageWriter, Placement, Ticket,
};

use crate::decompress::{read_compressed, CompressedSrc};
use crate::files::{CacheMode, FileIdx, JobFiles};
use crate::io::{Buf, FallocMode, FileSlot, OpKind};
use crate::shard::{Cx, Outcome, Payload, Pool, Step, Work};
use crate::squeeze::{CompressWork, WriteVecWork};
use crate::{zero, Engine, Error, Result};

/// A guest range of one source chain to copy.
pub struct Source<'a> {
    /// the chain to read
    pub chain: &'a Chain,
    /// first guest byte to copy
    pub start: u64,
    /// bytes to copy (clipped to the chain's virtual size; the rest reads as zeros)
    pub len: u64,
}

/// The target of a convert.
pub struct Target<'a> {
    /// the open target image (its files receive the data)
    pub image: &'a dyn Image,
    /// its writer
    pub writer: &'a mut dyn ImageWriter,
    /// guest offset in the target where the first source byte goes
    pub offset: u64,
    /// the target already reads as zeros everywhere (freshly created, or `--target-is-zero`)
    pub is_zero: bool,
}

/// How to convert.
pub struct ConvertOptions<'a> {
    /// `-S`: zero granule for sparse detection; `Some(0)` means fully allocate (write zeros
    /// everywhere); `None` means copy data as read without detection (zeros are still
    /// skipped where the source has none).
    pub sparse: Option<u64>,
    /// `-T`: cache mode of the sources
    pub src_cache: CacheMode,
    /// `-t`: cache mode of the target
    pub dst_cache: CacheMode,
    /// `-C`: offload copies to copy_file_range where no transform is needed
    pub copy_range: bool,
    /// `-m`: most transfer units in flight (qemu's coroutines)
    pub parallel: usize,
    /// `-r`: bytes per second limit
    pub rate: Option<u64>,
    /// `--salvage`: read errors become zeros instead of failing
    pub salvage: bool,
    /// `-c`: write every target cluster compressed (formats that support it)
    pub compress: bool,
    /// `-B`: the target has the source's backing file; copy only what the source's top
    /// layer holds and leave the rest unallocated
    pub top_layer_only: bool,
    /// called with (bytes done, bytes total) as units complete
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

/// What a convert did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// guest bytes covered
    pub bytes: u64,
    /// read errors turned into zeros by `--salvage`
    pub salvaged: u64,
}

/// Window of guest bytes mapped at a time.
const MAP_WINDOW: u64 = 1 << 30;

/// Sticky: copy_file_range failed with "not here" once, use read+write from then on.
static CFR_BROKEN: AtomicBool = AtomicBool::new(false);

/// Run a convert of `sources` (concatenated) into `target`.
pub fn convert(
    engine: &Engine,
    sources: &[Source<'_>],
    target: Target<'_>,
    opts: &ConvertOptions<'_>,
) -> Result<Stats> {
    let unit = engine.config().unit as u64;
    let total: u64 = sources.iter().map(|s| s.len).sum();

    // File table: every layer file of every source, then the target's files.
    let mut files = JobFiles::default();
    let mut src_idx: Vec<Vec<Vec<FileIdx>>> = Vec::new();
    for s in sources {
        let mut per_layer = Vec::new();
        for layer in s.chain.layers() {
            let mut v = Vec::new();
            for f in layer.image.files() {
                v.push(files.add(engine, f, false, opts.src_cache)?);
            }
            per_layer.push(v);
        }
        src_idx.push(per_layer);
    }
    let mut dst_idx = Vec::new();
    for f in target.image.files() {
        let i = files.add(engine, f, true, opts.dst_cache)?;
        files.mark_written(i);
        dst_idx.push(i);
    }
    let files = Arc::new(files);
    let mut pool = Pool::start(engine, files.clone(), usize::MAX, 1)?;
    let max_inflight = opts.parallel.max(1) * 2;

    let mut plan = Planner {
        pool: &mut pool,
        writer: target.writer,
        tickets: HashMap::new(),
        inflight: 0,
        max_inflight,
        done: 0,
        total,
        next_id: 0,
        err: None,
        salvaged: 0,
        progress: opts.progress,
        started: Instant::now(),
        dispatched: 0,
        rate: opts.rate,
        payloads: VecDeque::new(),
        cluster_of: HashMap::new(),
        dst_idx: dst_idx.clone(),
        target_zero: target.is_zero,
    };
    // -c: the target's cluster size and codec; units are whole target clusters.
    let squeeze = if opts.compress {
        match plan.writer.compression_unit() {
            Some(u) => Some(u),
            None => {
                drop(plan);
                pool.join();
                return Err(Error::Format(rimg_formats::Error::Unsupported(
                    "Compression not supported for this file format".into(),
                )));
            }
        }
    } else {
        None
    };
    // The cluster being gathered for compression: (start, pieces, has data).
    let mut gathering: Option<Gathered> = None;
    let detect = match opts.sparse {
        Some(0) => None,
        other => other,
    };
    let full = opts.sparse == Some(0);
    let mut tgt = target.offset;
    let mut exts = Vec::new();
    'sources: for (si, s) in sources.iter().enumerate() {
        let vsize = s.chain.virtual_size();
        let mut off = s.start;
        let end = s.start + s.len;
        while off < end {
            if plan.err.is_some() {
                break 'sources;
            }
            exts.clear();
            let want = (end - off).min(MAP_WINDOW);
            let covered = if off >= vsize {
                exts.push(rimg_formats::ChainExtent {
                    depth: s.chain.layers().len(),
                    extent: Extent::Unallocated {
                        len: want,
                        at: None,
                    },
                    shown_depth: 0,
                });
                want
            } else {
                match s.chain.map(GuestOff(off), want.min(vsize - off), &mut exts) {
                    Ok(0) => {
                        // Nothing more mapped: the rest reads as zeros.
                        exts.push(rimg_formats::ChainExtent {
                            depth: s.chain.layers().len(),
                            extent: Extent::Unallocated {
                                len: want,
                                at: None,
                            },
                            shown_depth: 0,
                        });
                        want
                    }
                    Ok(n) => n,
                    Err(e) => {
                        plan.fail(Error::Map {
                            image: s.chain.layers()[0].filename.clone(),
                            off,
                            source: e,
                        });
                        break 'sources;
                    }
                }
            };
            for ce in exts.drain(..) {
                let len = ce.extent.len();
                if opts.top_layer_only && ce.depth != 0 {
                    // The target's backing file shows through here.
                    tgt += len;
                    plan.done += len;
                    continue;
                }
                let src = match ce.extent {
                    Extent::Data { file, host, .. } => {
                        Src::Data(src_idx[si][ce.depth][file.0 as usize], host.0)
                    }
                    Extent::Compressed {
                        file,
                        host,
                        clen_max,
                        codec,
                        unit,
                        skip,
                        ..
                    } => Src::Compressed(CompressedSrc {
                        file: src_idx[si][ce.depth][file.0 as usize],
                        host: host.0,
                        clen_max,
                        codec,
                        unit,
                        skip,
                    }),
                    _ => Src::Zeros,
                };
                if let Some((cs, codec)) = squeeze {
                    // Split at target cluster boundaries and gather whole clusters.
                    let mut done = 0;
                    while done < len {
                        let t = tgt + done;
                        let cstart = t / cs * cs;
                        let n = (cs - t % cs).min(len - done);
                        if gathering.as_ref().is_some_and(|g| g.0 != cstart) {
                            let (gs, pieces, data) = gathering.take().expect("checked");
                            plan.squeeze(gs, cs, pieces, data, codec, opts.salvage);
                        }
                        let g = gathering.get_or_insert_with(|| (cstart, Vec::new(), false));
                        let piece = src.advance(done);
                        g.2 |= piece != Src::Zeros;
                        g.1.push((t - cstart, n, piece));
                        done += n;
                    }
                    tgt += len;
                    plan.process_payloads();
                    continue;
                }
                // Split at target unit boundaries.
                let mut done = 0;
                while done < len {
                    let t = tgt + done;
                    let n = (unit - t % unit).min(len - done);
                    let piece_src = src.advance(done);
                    if piece_src != Src::Zeros || full {
                        plan.copy(
                            &files,
                            &dst_idx,
                            t,
                            n,
                            piece_src,
                            detect,
                            target.is_zero,
                            opts,
                        );
                    } else if !target.is_zero {
                        plan.zero(&dst_idx, t, n);
                    } else {
                        plan.done += n;
                    }
                    done += n;
                }
                tgt += len;
            }
            off += covered;
        }
    }
    if let (Some((cs, codec)), Some((gs, pieces, data))) = (squeeze, gathering.take()) {
        plan.squeeze(gs, cs, pieces, data, codec, opts.salvage);
    }
    plan.drain_all();
    let err = plan.err.take();
    let stats = Stats {
        bytes: plan.done,
        salvaged: plan.salvaged,
    };
    drop(plan);
    pool.join();
    if let Some(e) = err {
        return Err(e);
    }
    // Metadata after data, then one sync of everything the cache mode wants synced.
    target.writer.flush()?;
    files.flush()?;
    if let Some(p) = opts.progress {
        p(total, total);
    }
    Ok(stats)
}

struct Planner<'a, 'w> {
    pool: &'a mut Pool,
    writer: &'w mut dyn ImageWriter,
    tickets: HashMap<u64, Ticket>,
    inflight: usize,
    max_inflight: usize,
    done: u64,
    total: u64,
    next_id: u64,
    err: Option<Error>,
    salvaged: u64,
    progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    started: Instant,
    dispatched: u64,
    rate: Option<u64>,
    /// compress outcomes waiting for space in the target
    payloads: VecDeque<(u64, u64, Payload)>,
    /// compress unit id -> guest start of its cluster
    cluster_of: HashMap<u64, u64>,
    dst_idx: Vec<FileIdx>,
    target_zero: bool,
}

impl Planner<'_, '_> {
    fn fail(&mut self, e: Error) {
        if self.err.is_none() {
            self.err = Some(e);
        }
    }

    fn on_outcome(&mut self, o: Outcome) {
        self.inflight -= 1;
        if let (Ok(_), Some(p)) = (&o.result, o.payload) {
            // A compressed cluster: space is reserved, and the write sent, from the main loop.
            self.payloads.push_back((o.id, o.bytes, p));
            return;
        }
        let ticket = self.tickets.remove(&o.id);
        match o.result {
            Ok(salvaged) => {
                self.salvaged += salvaged.unwrap_or(0);
                if let Some(t) = ticket {
                    // Clusters the unit found all-zero stay unallocated, as qemu-img leaves them.
                    let r = if o.zeros.is_empty() {
                        Ok(())
                    } else {
                        self.writer.release_unwritten(t, &o.zeros)
                    };
                    if let Err(e) = r.and_then(|()| self.writer.commit(&[t])) {
                        self.fail(e.into());
                    }
                }
                self.done += o.bytes;
                if let Some(p) = self.progress {
                    p(self.done, self.total);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    /// Receive outcomes until fewer than `limit` units are in flight.
    fn drain_to(&mut self, limit: usize) {
        while let Ok(o) = self.pool.results.try_recv() {
            self.on_outcome(o);
        }
        while self.inflight >= limit {
            match self.pool.results.recv() {
                Ok(o) => self.on_outcome(o),
                Err(_) => {
                    self.fail(Error::Setup("shards stopped unexpectedly".into()));
                    self.inflight = 0;
                }
            }
        }
    }

    fn drain_all(&mut self) {
        loop {
            self.drain_to(1);
            if self.payloads.is_empty() {
                break;
            }
            self.process_payloads();
        }
    }

    /// Dispatch one compress unit for the cluster at `start` (nothing when it has no data).
    fn squeeze(
        &mut self,
        start: u64,
        cs: u64,
        pieces: Vec<(u64, u64, Src)>,
        has_data: bool,
        codec: rimg_formats::Codec,
        salvage: bool,
    ) {
        let len: u64 = pieces.iter().map(|p| p.1).sum();
        let first = pieces.first().map_or(0, |p| p.0);
        if !has_data {
            if !self.target_zero {
                let dst = self.dst_idx.clone();
                self.zero(&dst, start + first, len);
            } else {
                self.done += len;
            }
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.cluster_of.insert(id, start);
        // A cluster is compressed whole: pieces cover it from `first`; anything before
        // (a source that starts mid-cluster) reads as zeros.
        let mut full = Vec::with_capacity(pieces.len() + 1);
        if first > 0 {
            full.push((0, first, Src::Zeros));
        }
        full.extend(pieces);
        let total: u64 = full.iter().map(|p| p.1).sum();
        let w = CompressWork::new(id, start, total, cs, full, codec, salvage);
        self.dispatch(Box::new(w), None, id, total);
    }

    /// Reserve target space for finished compress units and send their writes.
    fn process_payloads(&mut self) {
        while let Some((id, bytes, p)) = self.payloads.pop_front() {
            let Some(start) = self.cluster_of.remove(&id) else {
                continue;
            };
            if self.err.is_some() {
                continue;
            }
            let res = match p {
                Payload::Zero => {
                    if self.target_zero {
                        self.done += bytes;
                        Ok(None)
                    } else {
                        let mut actions = Vec::new();
                        self.writer
                            .zero(GuestOff(start), bytes, true, &mut actions)
                            .map(|()| {
                                let wid = self.next_id;
                                self.next_id += 1;
                                Some((
                                    Box::new(ActionWork::new(wid, bytes, &actions, &self.dst_idx))
                                        as Box<dyn Work>,
                                    None,
                                    wid,
                                ))
                            })
                    }
                }
                Payload::Compressed(v) => self
                    .writer
                    .allocate_compressed(GuestOff(start), v.len() as u64)
                    .map(|(pl, t)| {
                        let wid = self.next_id;
                        self.next_id += 1;
                        let tgt = vec![(self.dst_idx[pl.file.0 as usize], pl.host.0, 0, v.len())];
                        Some((
                            Box::new(WriteVecWork::new(wid, bytes, v, tgt)) as Box<dyn Work>,
                            Some(t),
                            wid,
                        ))
                    }),
                Payload::Raw(v) => {
                    let mut pls = Vec::new();
                    self.writer
                        .allocate(GuestOff(start), bytes, &mut pls)
                        .map(|t| {
                            let wid = self.next_id;
                            self.next_id += 1;
                            let tgt = pls
                                .iter()
                                .map(|p| {
                                    (
                                        self.dst_idx[p.file.0 as usize],
                                        p.host.0,
                                        (p.guest.0 - start) as usize,
                                        p.len as usize,
                                    )
                                })
                                .collect();
                            Some((
                                Box::new(WriteVecWork::new(wid, bytes, v, tgt)) as Box<dyn Work>,
                                Some(t),
                                wid,
                            ))
                        })
                }
            };
            match res {
                Ok(Some((w, t, wid))) => self.dispatch(w, t, wid, 0),
                Ok(None) => {}
                Err(e) => self.fail(e.into()),
            }
        }
    }

    fn throttle(&mut self, n: u64) {
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(self.dispatched as f64 / rate as f64);
            let el = self.started.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
        self.dispatched += n;
    }

    fn dispatch(&mut self, w: Box<dyn Work>, ticket: Option<Ticket>, id: u64, n: u64) {
        self.drain_to(self.max_inflight);
        self.throttle(n);
        if let Some(t) = ticket {
            self.tickets.insert(id, t);
        }
        self.inflight += 1;
        // Consecutive units go to consecutive shards.
        self.pool.send(w);
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
        &mut self,
        files: &JobFiles,
        dst_idx: &[FileIdx],
        t: u64,
        n: u64,
        src: Src,
        detect: Option<u64>,
        target_zero: bool,
        opts: &ConvertOptions<'_>,
    ) {
        let mut placements: Vec<Placement> = Vec::new();
        let ticket = match self.writer.allocate(GuestOff(t), n, &mut placements) {
            Ok(tk) => tk,
            Err(e) => return self.fail(e.into()),
        };
        let dst: Vec<(FileIdx, u64, u64)> = placements
            .iter()
            .map(|p| (dst_idx[p.file.0 as usize], p.host.0, p.len))
            .collect();
        let id = self.next_id;
        self.next_id += 1;
        let cfr =
            opts.copy_range && detect.is_none() && matches!(src, Src::Data(..)) && dst.len() == 1;
        let w = Box::new(CopyWork {
            id,
            guest: t,
            len: n,
            src,
            dst,
            detect,
            target_zero,
            salvage: opts.salvage,
            cfr,
            ios: VecDeque::new(),
            buf: None,
            skip: 0,
            outstanding: 0,
            err: None,
            salvaged: 0,
            zeros: Vec::new(),
        });
        let _ = files;
        self.dispatch(w, Some(ticket), id, n);
    }

    fn zero(&mut self, dst_idx: &[FileIdx], t: u64, n: u64) {
        let mut actions = Vec::new();
        if let Err(e) = self.writer.zero(GuestOff(t), n, true, &mut actions) {
            return self.fail(e.into());
        }
        let id = self.next_id;
        self.next_id += 1;
        let w = Box::new(ActionWork::new(id, n, &actions, dst_idx));
        self.dispatch(w, None, id, 0);
    }
}

/// A target cluster being gathered for compression: (guest start, pieces, has data).
type Gathered = (u64, Vec<(u64, u64, Src)>, bool);

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
struct CopyWork {
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
                    let (slot, host, start, len) = match self.ios.pop_front() {
                        Some(Io::Write {
                            file,
                            host,
                            buf_off,
                            len,
                        }) => (
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
                            (cx.files.slot(file, host, n as u64), host, 0, n)
                        }
                        _ => unreachable!("front was a write"),
                    };
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
                        let Src::Data(file, host) = self.src else {
                            unreachable!("only data sources are read through the queue")
                        };
                        if self.salvage {
                            buf.set_len(buf.capacity());
                            buf.as_mut_slice()[..want].fill(0);
                            self.salvaged += self.len;
                        } else {
                            let _ = host;
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
