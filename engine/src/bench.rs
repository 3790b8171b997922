//! The bench job (`rimg bench`): `count` requests of `size` bytes at `offset + i * step`
//! (wrapping at the image end), `depth` in flight, spread over the shards; each shard runs
//! one [`BenchWork`] that keeps its share of the depth busy, taking request numbers from a
//! shared counter.
//!
//! Raw images are read and written at the guest offset. Other formats go through the
//! format: a read maps its range through the chain (unallocated and zero ranges need no
//! I/O, as in QEMU), a write allocates through the image's writer and commits when its data
//! is written, so `bench -w` on qcow2 measures rimg's qcow2 write path.
//!
//! `--flush-interval N` flushes every N requests: by default the queue drains first (the
//! run proceeds in phases of N requests, each followed by a flush of the metadata and an
//! fsync); with `--no-drain` the flush is issued among the requests in flight.

use std::io as stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use hdrhistogram::Histogram;
use rimg_formats::{Chain, ChainExtent, Extent, GuestOff, Image, ImageWriter, Placement, Ticket};

use crate::files::{CacheMode, FileIdx, JobFiles};
use crate::io::{Buf, OpKind};
use crate::shard::{Cx, Outcome, Pool, Step, Work};
use crate::{Engine, EngineConfig, Error, Result};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// number of requests
    pub count: u64,
    /// requests in flight
    pub depth: u64,
    /// bytes per request
    pub size: u64,
    /// distance between request offsets
    pub step: u64,
    /// offset of the first request
    pub offset: u64,
    /// write instead of read
    pub write: bool,
    /// byte written by write requests
    pub pattern: u8,
    /// cache mode (`-t`)
    pub cache: CacheMode,
    /// flush every N requests (0: never)
    pub flush_interval: u64,
    /// drain the queue before each flush (qemu-img's default; `--no-drain` clears it)
    pub drain: bool,
    /// the I/O path (`-i threads` / `-i io_uring`; `Auto` otherwise)
    pub backend: crate::BackendChoice,
    /// random offsets: a seeded pattern of `step`-aligned offsets in
    /// `[offset, image size - size]` instead of the sequential walk
    pub random: Option<u64>,
    /// stop issuing requests after this long (the count is then an upper bound)
    pub time_limit: Option<Duration>,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// wall time of the run
    pub elapsed: Duration,
    /// requests completed
    pub requests: u64,
    /// request latencies in nanoseconds, merged from every shard
    pub latency: Histogram<u64>,
    /// the I/O path the shards used (backend, registered buffers, O_DIRECT)
    pub path: Vec<String>,
}

struct Shared {
    next: AtomicU64,
    /// request numbers below this may be issued (the end of the current phase)
    end: AtomicU64,
    count: u64,
    size: u64,
    step: u64,
    offset: u64,
    image_size: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    random: Option<u64>,
    deadline: Option<Instant>,
    started: Instant,
    done: AtomicU64,
}

impl Shared {
    /// Progress so far, in the units of [`Shared::total_hint`]: requests, or elapsed
    /// milliseconds of a time-limited run.
    fn progress(&self, started: Instant) -> u64 {
        match self.deadline {
            Some(d) => (started.elapsed().as_millis() as u64)
                .min(d.saturating_duration_since(started).as_millis() as u64),
            None => self.done.load(Ordering::Relaxed),
        }
    }

    /// What [`Shared::progress`] counts up to.
    fn total_hint(&self) -> u64 {
        match self.deadline {
            Some(d) => d.saturating_duration_since(self.started).as_millis() as u64,
            None => self.count,
        }
    }

    /// Offset of request `i`: the first at `offset`, then `step` further each time, taken
    /// modulo the image size (as qemu-img bench advances it).
    fn offset_of(&self, i: u64) -> u64 {
        if let Some(seed) = self.random {
            // splitmix64 of (seed, i): a reproducible pattern over the range.
            let align = self.step.max(1);
            let span = self.image_size.saturating_sub(self.offset + self.size) / align + 1;
            let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            return self.offset + (z % span) * align;
        }
        if i == 0 || self.image_size == 0 {
            return self.offset;
        }
        ((self.offset % self.image_size) as u128 + (i as u128) * (self.step as u128))
            .rem_euclid(self.image_size as u128) as u64
    }
}

/// How requests reach the image.
pub enum Target<'a> {
    /// a raw image: guest offset = host offset in its one file
    Raw(&'a dyn Image),
    /// any format: reads map through the chain; writes allocate and commit through the
    /// writer (shared by the shards under a lock; metadata work is small next to the I/O)
    Mapped {
        /// the chain to read through (layer 0 is the image benchmarked)
        chain: Arc<Chain>,
        /// the writer of layer 0, for `-w`
        writer: Option<Box<dyn ImageWriter>>,
    },
}

/// Run a bench on a raw image (guest offset = host offset).
pub fn bench(image: &dyn Image, opts: &BenchOptions) -> Result<BenchResult> {
    run(Target::Raw(image), opts, None)
}

/// Run a bench on `target`, calling `progress(done, total)` now and then from this thread.
pub fn run(
    target: Target<'_>,
    opts: &BenchOptions,
    progress: Option<&dyn Fn(u64, u64)>,
) -> Result<BenchResult> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let most_shards = cpus.min(opts.depth).max(1) as usize;
    let unit = (opts.size.div_ceil(4096) * 4096) as usize;
    let budget = (unit * opts.depth.max(1) as usize * 2 + unit * most_shards * 2).max(8 << 20);
    let engine = Engine::new(EngineConfig {
        shards: most_shards,
        unit,
        budget,
        backend: opts.backend,
        // Completions handled half a shard's depth at a time, so the requests a shard then
        // submits together are neighbours the block layer merges. qemu-img's event loop ends
        // up the same way (its 32 sequential 4k writes reach the device as one request);
        // taking completions one by one, a shard's requests stay split into several small
        // ones (4k qd32 writes: 20k device requests for 100k, qemu-img 3k; 12 % slower).
        // Neutral for random reads, where nothing merges.
        reap_batch_percent: 50,
        // On the thread pool (`-i threads`) every request in flight has a thread, as in
        // qemu-img's pool (up to 64 threads), so the depth asked for is the depth the
        // file sees.
        io_threads: opts.depth.clamp(1, 64) as usize,
        cached_reads_on_pool: false,
    });
    let mut files = JobFiles::default();
    let (image_size, mapped) = match target {
        Target::Raw(image) => {
            let f = files.add(&engine, &image.files()[0], opts.write, opts.cache)?;
            if opts.write {
                files.mark_written(f);
            }
            (image.virtual_size(), None)
        }
        Target::Mapped { chain, writer } => {
            let mut table = Vec::new();
            for (depth, layer) in chain.layers().iter().enumerate() {
                let w = opts.write && depth == 0;
                let v = files.add_image(&engine, &*layer.image, w, opts.cache)?;
                if w {
                    for &i in &v {
                        files.mark_written(i);
                    }
                }
                table.push(v);
            }
            let size = chain.virtual_size();
            (
                size,
                Some(Mapped {
                    chain,
                    writer: writer.map(|w| Arc::new(Mutex::new(w))),
                    files: Arc::new(table),
                }),
            )
        }
    };
    let file = FileIdx(0);
    // One shard unless requests cost CPU time of their own: a single submitter keeps
    // sequential requests in order, so the block layer merges them as it does qemu-img's and
    // fio's, and one thread issues a raw image's requests far faster than a disk serves them
    // (4k qd32 on this project's virtio disk, one shard against two: reads 0.47 s / 0.63 s,
    // writes 0.54 s / 0.64 s). Writes through a format (allocation, metadata commit) and
    // encrypted images spread over the shards (qcow2 1 MiB qd4 writes: 1.04 s / 1.35 s).
    let cpu_bound = mapped.as_ref().is_some_and(|m| m.writer.is_some()) || files.any_encrypted();
    // (Depths beyond what one shard's buffer indices hold are spread too.)
    let shards = if cpu_bound || opts.depth > 16 << 10 {
        most_shards
    } else {
        1
    };
    let per_shard = opts.depth.div_ceil(shards as u64) as usize;
    let files = Arc::new(files);
    let merged = Arc::new(Mutex::new(new_histogram()));
    // The clock starts once the shards are up (threads, rings, registered buffers), as
    // qemu-img bench's starts after the image is open and its buffers allocated.
    let pool = Pool::start(&engine, files.clone(), shards, per_shard)?;
    let started = Instant::now();
    // With a drained flush interval, requests run in phases of that many: each phase ends
    // when all its requests completed, then the image is flushed.
    let drained = opts.flush_interval > 0 && opts.drain;
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        end: AtomicU64::new(if drained {
            opts.flush_interval.min(opts.count)
        } else {
            opts.count
        }),
        count: opts.count,
        size: opts.size,
        step: opts.step,
        offset: opts.offset,
        image_size,
        write: opts.write,
        pattern: opts.pattern,
        flush_interval: if drained { 0 } else { opts.flush_interval },
        random: opts.random,
        deadline: opts.time_limit.map(|t| started + t),
        started,
        done: AtomicU64::new(0),
    });
    let mut err = None;
    loop {
        let n = shards;
        for s in 0..n {
            pool.send_to(
                s,
                Box::new(BenchWork {
                    shared: shared.clone(),
                    file,
                    depth: per_shard,
                    claimed: 0..0,
                    outstanding: 0,
                    err: None,
                    starts: vec![None; per_shard],
                    free: (0..per_shard as u16).collect(),
                    hist: new_histogram(),
                    merged: merged.clone(),
                    mapped: mapped.clone(),
                    slots: (0..per_shard).map(|_| SlotState::default()).collect(),
                    queued_end: None,
                    exts: Vec::new(),
                    placements: Vec::new(),
                }),
            );
        }
        let mut left = n;
        while left > 0 {
            match pool.results.recv_timeout(Duration::from_millis(200)) {
                Ok(o) => {
                    left -= 1;
                    if let Err(e) = o.result {
                        err.get_or_insert(e);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    err.get_or_insert(Error::Setup("shards stopped unexpectedly".into()));
                    left = 0;
                }
            }
            if let Some(p) = progress {
                p(shared.progress(started), shared.total_hint());
            }
        }
        if err.is_some() || !drained {
            break;
        }
        // End of a phase: every request of it completed; flush, then start the next.
        flush_all(mapped.as_ref(), &files)?;
        let end = shared.end.load(Ordering::Relaxed);
        shared.next.store(end, Ordering::Relaxed);
        if end >= opts.count || shared.deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        shared.end.store(
            (end + opts.flush_interval).min(opts.count),
            Ordering::Relaxed,
        );
    }
    // The run ends when the last request completes; closing the image (metadata, the final
    // flush) comes after, outside the figure, as qemu-img bench times it.
    let elapsed = started.elapsed();
    pool.join();
    if let Some(e) = err {
        return Err(e);
    }
    if let Some(w) = mapped.and_then(|m| m.writer) {
        // The shards are gone, so this is the last reference.
        let w = Arc::into_inner(w)
            .ok_or_else(|| Error::Setup("bench: the image writer is still shared".into()))?;
        let w = w.into_inner().unwrap_or_else(|e| e.into_inner());
        w.close().map_err(Error::Format)?;
    }
    files.flush()?;
    let latency = merged.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(BenchResult {
        elapsed,
        requests: shared.done.load(Ordering::Relaxed),
        latency,
        path: engine.notes(),
    })
}

/// Write the writer's metadata and fsync every written file (a `--flush-interval` barrier).
fn flush_all(mapped: Option<&Mapped>, files: &JobFiles) -> Result<()> {
    if let Some(w) = mapped.and_then(|m| m.writer.as_ref()) {
        w.lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush()
            .map_err(Error::Format)?;
    }
    files.sync_written()
}

/// A histogram of nanosecond latencies, 1 ns .. 1 hour, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| Histogram::new_with_max(1 << 40, 2).expect("valid histogram bounds"))
}

/// Tag of flush ops; request ops are tagged with their slot number.
const TAG_FLUSH: u16 = u16::MAX;

/// What a formatted (non-raw) target shares with every shard.
#[derive(Clone)]
struct Mapped {
    chain: Arc<Chain>,
    writer: Option<Arc<Mutex<Box<dyn ImageWriter>>>>,
    /// job file of each layer's files: `files[depth][file]`
    files: Arc<Vec<Vec<FileIdx>>>,
}

/// One piece of I/O of a request on a formatted target.
#[derive(Clone, Copy, Debug)]
struct Piece {
    file: FileIdx,
    host: u64,
    len: u64,
}

/// The state of a request slot on a formatted target.
#[derive(Default)]
struct SlotState {
    /// pieces still to do, in reverse order
    pieces: Vec<Piece>,
    /// the write's allocation, committed when its pieces are done
    ticket: Option<Ticket>,
    /// the piece in flight (decrypted when an encrypted read completes)
    current: Option<Piece>,
}

/// One shard's share of a bench run.
struct BenchWork {
    shared: Arc<Shared>,
    file: FileIdx,
    depth: usize,
    /// request numbers taken from the shared counter and not issued yet
    claimed: std::ops::Range<u64>,
    outstanding: usize,
    err: Option<Error>,
    /// submit time of the request in each slot
    starts: Vec<Option<Instant>>,
    /// free slots
    free: Vec<u16>,
    /// this shard's latencies
    hist: Histogram<u64>,
    /// where they go at the end
    merged: Arc<Mutex<Histogram<u64>>>,
    /// `Some` for formats other than raw
    mapped: Option<Mapped>,
    slots: Vec<SlotState>,
    /// file and end offset of the last transfer submitted (see [`BenchWork::submit`])
    queued_end: Option<(FileIdx, u64)>,
    exts: Vec<ChainExtent>,
    placements: Vec<Placement>,
}

/// An I/O error of a request.
fn request_error(off: u64, source: stdio::Error) -> Error {
    Error::Io {
        what: "Failed request:",
        path: String::new(),
        off,
        source,
    }
}

impl BenchWork {
    /// The next request number for this shard. Numbers are taken from the shared counter a
    /// run of `depth` at a time, so the requests one shard submits together are neighbours
    /// the block layer can merge, as they are when one thread issues them all (qemu-img).
    fn claim(&mut self) -> Option<u64> {
        let end = self.shared.end.load(Ordering::Relaxed);
        if self.claimed.start < self.claimed.end.min(end) {
            let i = self.claimed.start;
            self.claimed.start += 1;
            return Some(i);
        }
        if self.shared.next.load(Ordering::Relaxed) >= end {
            return None;
        }
        let run = self.depth.max(1) as u64;
        let first = self.shared.next.fetch_add(run, Ordering::Relaxed);
        if first >= end {
            return None;
        }
        self.claimed = first + 1..(first + run).min(end);
        Some(first)
    }

    /// Issue requests until the slots are full or the run is over; `buf` is a free buffer.
    /// Returns the buffer when no request took it.
    fn issue(&mut self, cx: &mut Cx<'_>, mut buf: Buf) -> Option<Buf> {
        loop {
            if self.err.is_some() {
                return Some(buf);
            }
            let sh = self.shared.clone();
            if sh.deadline.is_some_and(|d| Instant::now() >= d) {
                return Some(buf);
            }
            let Some(i) = self.claim() else {
                return Some(buf);
            };
            let off = sh.offset_of(i);
            let size = sh.size;
            if off.checked_add(size).is_none_or(|e| e > sh.image_size) {
                self.err = Some(request_error(
                    off,
                    stdio::Error::from_raw_os_error(libc::EIO),
                ));
                return Some(buf);
            }
            if sh.flush_interval > 0 && i > 0 && i.is_multiple_of(sh.flush_interval) {
                if let Err(e) = self.flush_metadata() {
                    self.err = Some(e);
                    return Some(buf);
                }
                cx.submit(
                    TAG_FLUSH,
                    OpKind::Fsync {
                        file: cx.files.buffered_slot(self.file),
                        data_only: true,
                    },
                );
                self.outstanding += 1;
            }
            let Some(tag) = self.free.pop() else {
                return Some(buf);
            };
            self.starts[tag as usize] = Some(Instant::now());
            if self.mapped.is_none() {
                buf.set_len(size as usize);
                let slot = cx.files.slot(self.file, off, size);
                let kind = if sh.write {
                    OpKind::Write {
                        file: slot,
                        off,
                        buf,
                        start: 0,
                        len: size as usize,
                    }
                } else {
                    OpKind::Read {
                        file: slot,
                        off,
                        buf,
                    }
                };
                self.submit(cx, tag, kind, (self.file, off, size));
                return None;
            }
            if let Err(e) = self.plan(cx, tag, off, size) {
                self.err = Some(e);
                self.free.push(tag);
                return Some(buf);
            }
            match self.next_piece(cx, tag, buf) {
                None => return None,
                Some(b) => {
                    // Nothing to do on disk (zeros, or decoded in place): done already.
                    if let Err(e) = self.request_done(tag) {
                        self.err = Some(e);
                    }
                    buf = b;
                }
            }
        }
    }

    /// Write the writer's metadata before a no-drain flush.
    fn flush_metadata(&self) -> Result<()> {
        if let Some(w) = self.mapped.as_ref().and_then(|m| m.writer.as_ref()) {
            w.lock()
                .unwrap_or_else(|e| e.into_inner())
                .flush()
                .map_err(Error::Format)?;
        }
        Ok(())
    }

    /// Work out the pieces of the request in slot `tag`.
    fn plan(&mut self, cx: &mut Cx<'_>, tag: u16, off: u64, size: u64) -> Result<()> {
        let m = self.mapped.as_ref().expect("mapped target");
        let slot = &mut self.slots[tag as usize];
        slot.pieces.clear();
        slot.ticket = None;
        if self.shared.write {
            let w = m.writer.as_ref().ok_or_else(|| {
                Error::Setup("bench: the image was not opened for writing".into())
            })?;
            self.placements.clear();
            let t = w
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allocate(GuestOff(off), size, &mut self.placements)
                .map_err(Error::Format)?;
            slot.ticket = Some(t);
            for p in self.placements.iter().rev() {
                slot.pieces.push(Piece {
                    file: m.files[0][p.file.0 as usize],
                    host: p.host.0,
                    len: p.len,
                });
            }
            return Ok(());
        }
        let mut pos = off;
        let end = off + size;
        while pos < end {
            self.exts.clear();
            let n = m
                .chain
                .map(GuestOff(pos), end - pos, &mut self.exts)
                .map_err(Error::Format)?;
            if n == 0 {
                break;
            }
            for ce in &self.exts {
                match ce.extent {
                    Extent::Data { file, host, len } => slot.pieces.push(Piece {
                        file: m.files[ce.depth][file.0 as usize],
                        host: host.0,
                        len,
                    }),
                    Extent::Compressed {
                        file,
                        host,
                        clen_max,
                        codec,
                        unit,
                        ..
                    } => {
                        // Decoded here, on the shard, as a read of the compressed bytes.
                        let f = m.files[ce.depth][file.0 as usize];
                        let mut input = vec![0u8; clen_max as usize];
                        let got = cx
                            .files
                            .pread(f, host.0, &mut input)
                            .map_err(|e| request_error(host.0, e))?;
                        let mut out = vec![0u8; unit as usize];
                        crate::decompress::decode(codec, &input[..got], &mut out)
                            .map_err(|e| request_error(host.0, e))?;
                    }
                    _ => {}
                }
            }
            pos += n;
        }
        slot.pieces.reverse();
        Ok(())
    }

    /// Submit the next piece of slot `tag` with `buf`; returns the buffer when none is left.
    fn next_piece(&mut self, cx: &mut Cx<'_>, tag: u16, mut buf: Buf) -> Option<Buf> {
        let Some(p) = self.slots[tag as usize].pieces.pop() else {
            return Some(buf);
        };
        buf.set_len(p.len as usize);
        self.slots[tag as usize].current = Some(p);
        if self.shared.write && cx.files.encrypted(p.file) {
            // Ciphertext of the pattern, as QEMU's crypto layer writes it.
            buf.as_mut_slice().fill(self.shared.pattern);
            if let Err(e) = cx.files.encrypt(p.file, p.host, buf.as_mut_slice()) {
                self.err.get_or_insert(request_error(p.host, e));
                return Some(buf);
            }
        }
        let slot = cx.files.slot(p.file, p.host, p.len);
        let kind = if self.shared.write {
            OpKind::Write {
                file: slot,
                off: p.host,
                buf,
                start: 0,
                len: p.len as usize,
            }
        } else {
            OpKind::Read {
                file: slot,
                off: p.host,
                buf,
            }
        };
        self.submit(cx, tag, kind, (p.file, p.host, p.len));
        None
    }

    /// Submit `kind`, a transfer of `at = (file, offset, length)`. Requests that continue
    /// one another wait in the ring and go to the kernel together, where the block layer
    /// merges them; one that does not continue the last sends those before it on their way
    /// first, so with random offsets each request reaches the device as soon as it is
    /// issued (as fio submits them) instead of waiting for the shard's next reap.
    fn submit(&mut self, cx: &mut Cx<'_>, tag: u16, kind: OpKind, at: (FileIdx, u64, u64)) {
        let (file, off, len) = at;
        if self.queued_end.is_some_and(|e| e != (file, off)) {
            cx.kick();
        }
        self.queued_end = Some((file, off + len));
        cx.submit(tag, kind);
        self.outstanding += 1;
    }

    /// The request in slot `tag` completed: commit its allocation, count it, free the slot.
    fn request_done(&mut self, tag: u16) -> Result<()> {
        let ticket = self
            .slots
            .get_mut(tag as usize)
            .and_then(|s| s.ticket.take());
        if let (Some(t), Some(w)) = (ticket, self.mapped.as_ref().and_then(|m| m.writer.as_ref())) {
            w.lock()
                .unwrap_or_else(|e| e.into_inner())
                .commit(&[t])
                .map_err(Error::Format)?;
        }
        self.shared.done.fetch_add(1, Ordering::Relaxed);
        if let Some(t0) = self.starts.get_mut(tag as usize).and_then(Option::take) {
            let ns = t0.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            let _ = self.hist.record(ns.max(1));
        }
        self.free.push(tag);
        Ok(())
    }
}

impl Work for BenchWork {
    fn buffers(&self) -> usize {
        self.depth
    }

    fn start(&mut self, cx: &mut Cx<'_>) -> Step {
        let pattern = self.shared.pattern;
        for _ in 0..self.depth {
            let mut b = cx.take_buf();
            b.as_mut_slice().fill(pattern);
            if let Some(b) = self.issue(cx, b) {
                cx.put_buf(b);
                break;
            }
        }
        if self.outstanding == 0 {
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
        let failed = match res {
            Err(e) => {
                self.err.get_or_insert(request_error(0, e));
                true
            }
            Ok(_) => false,
        };
        if tag != TAG_FLUSH {
            let mut buf = buf;
            if failed {
                // A failed request publishes nothing.
                if let Some(s) = self.slots.get_mut(tag as usize) {
                    s.pieces.clear();
                    s.ticket = None;
                }
            }
            if self.mapped.is_some() && !failed {
                let cur = self
                    .slots
                    .get_mut(tag as usize)
                    .and_then(|s| s.current.take());
                if let (Some(p), Some(b), false) = (cur, buf.as_mut(), self.shared.write) {
                    if cx.files.encrypted(p.file) {
                        if let Err(e) = cx.files.decrypt(p.file, p.host, b.as_mut_slice()) {
                            self.err.get_or_insert(request_error(p.host, e));
                        }
                    }
                }
                if let Some(b) = buf.take() {
                    // More pieces of the same request first.
                    buf = self.next_piece(cx, tag, b);
                    if buf.is_none() {
                        return Step::Pending;
                    }
                }
            }
            if let Err(e) = self.request_done(tag) {
                self.err.get_or_insert(e);
            }
            if let Some(mut b) = buf {
                if self.shared.write {
                    b.set_len(b.capacity());
                    b.as_mut_slice().fill(self.shared.pattern);
                }
                if let Some(b) = self.issue(cx, b) {
                    cx.put_buf(b);
                }
            }
        }
        if self.outstanding == 0 {
            Step::Done
        } else {
            Step::Pending
        }
    }

    fn finish(self: Box<Self>) -> Outcome {
        if let Ok(mut m) = self.merged.lock() {
            let _ = m.add(&self.hist);
        }
        Outcome {
            id: 0,
            bytes: 0,
            result: match self.err {
                Some(e) => Err(e),
                None => Ok(None),
            },
            payload: None,
            zeros: Vec::new(),
        }
    }
}
