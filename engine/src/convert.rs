//! The convert job (also used by `dd`): copy guest ranges of source chains into a target.
//!
//! The planner (the calling thread) maps the sources in large windows, allocates target
//! space in guest order (so the target's layout equals an in-order copy even when shards
//! finish out of order), and sends one copy unit (`copy.rs`) per transfer unit to the shards. A shard
//! reads, detects zeros, writes, and reports; the planner then commits the unit's ticket.
//! Zero ranges become nothing (a target known to read as zeros), `fallocate` actions, or
//! explicit zero writes (`-S 0`: fully allocated).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rimg_formats::{Chain, Extent, GuestOff, Image, ImageWriter, Placement, Ticket};

use crate::copy::Src;
use crate::copy::{ActionWork, CopyWork};
use crate::files::{CacheMode, FileIdx, JobFiles};
use crate::shard::{Outcome, Payload, Pool, Work};
use crate::squeeze::{CompressWork, WriteVecWork};
use crate::{Engine, Error, Result};

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

/// Run a convert of `sources` (concatenated) into `target`.
pub fn convert(
    engine: &Engine,
    sources: &[Source<'_>],
    target: Target<'_>,
    opts: &ConvertOptions<'_>,
) -> Result<Stats> {
    // A transfer unit covers at least one target cluster, so a unit that finds a whole
    // cluster of zeros can leave it unallocated (2 MiB qcow2 clusters).
    let unit =
        (engine.config().unit as u64).max(target.image.cluster_size().unwrap_or(0).min(4 << 20));
    let total: u64 = sources.iter().map(|s| s.len).sum();

    // File table: every layer file of every source, then the target's files.
    let mut files = JobFiles::default();
    let mut src_idx: Vec<Vec<Vec<FileIdx>>> = Vec::new();
    for s in sources {
        let mut per_layer = Vec::new();
        for layer in s.chain.layers() {
            per_layer.push(files.add_image(engine, &*layer.image, false, opts.src_cache)?);
        }
        src_idx.push(per_layer);
    }
    let mut dst_idx = Vec::new();
    for i in files.add_image(engine, target.image, true, opts.dst_cache)? {
        files.mark_written(i);
        dst_idx.push(i);
    }
    let encrypted = src_idx
        .iter()
        .flatten()
        .flatten()
        .chain(&dst_idx)
        .any(|&i| files.encrypted(i));
    let files = Arc::new(files);
    let mut pool = Pool::start_with_unit(engine, files.clone(), usize::MAX, 1, unit as usize)?;
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
        encrypted,
    };
    // -c: the target's cluster size and codec; units are whole target clusters.
    let squeeze = if opts.compress || plan.writer.always_compressed() {
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
                let src = Src::from_extent(&ce, &src_idx[si]);
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
                        plan.copy(&dst_idx, t, n, piece_src, detect, target.is_zero, opts);
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
    /// a source is encrypted (no copy_file_range: bytes must pass through memory)
    encrypted: bool,
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
        let cfr = opts.copy_range
            && !self.encrypted
            && detect.is_none()
            && matches!(src, Src::Data(..))
            && dst.len() == 1;
        let w = Box::new(CopyWork::new(
            id,
            t,
            n,
            src,
            dst,
            detect,
            target_zero,
            opts.salvage,
            cfr,
        ));
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
