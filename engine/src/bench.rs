//! The bench job (`rimg bench`): `count` requests of `size` bytes at `offset + i * step`
//! (wrapping at the image end), `depth` in flight, spread over the shards; each shard runs
//! one [`BenchWork`] that keeps its share of the depth busy, taking request numbers from a
//! shared counter.

use std::io as stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use hdrhistogram::Histogram;
use rimg_formats::Image;

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
    /// fsync every N requests (0: never)
    pub flush_interval: u64,
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
    done: AtomicU64,
}

impl Shared {
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

/// Run a bench on `image` (a raw image: guest offset = host offset).
pub fn bench(image: &dyn Image, opts: &BenchOptions) -> Result<BenchResult> {
    let shards_hint = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let shards = shards_hint.min(opts.depth).max(1) as usize;
    let per_shard = opts.depth.div_ceil(shards as u64) as usize;
    let unit = (opts.size.div_ceil(4096) * 4096) as usize;
    let budget = (unit * per_shard * shards * 2).max(8 << 20);
    let engine = Engine::new(EngineConfig {
        shards,
        unit,
        budget,
        ..Default::default()
    });
    let mut files = JobFiles::default();
    let f = files.add(&engine, &image.files()[0], opts.write, opts.cache)?;
    if opts.write {
        files.mark_written(f);
    }
    let files = Arc::new(files);
    let merged = Arc::new(Mutex::new(new_histogram()));
    let started = Instant::now();
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        count: opts.count,
        size: opts.size,
        step: opts.step,
        offset: opts.offset,
        image_size: image.virtual_size(),
        write: opts.write,
        pattern: opts.pattern,
        flush_interval: opts.flush_interval,
        random: opts.random,
        deadline: opts.time_limit.map(|t| started + t),
        done: AtomicU64::new(0),
    });
    let pool = Pool::start(&engine, files.clone(), shards, per_shard)?;
    let n = shards.min(opts.count as usize).max(1);
    for s in 0..n {
        pool.send_to(
            s,
            Box::new(BenchWork {
                shared: shared.clone(),
                file: f,
                depth: per_shard,
                outstanding: 0,
                err: None,
                starts: vec![None; per_shard],
                free: (0..per_shard as u16).collect(),
                hist: new_histogram(),
                merged: merged.clone(),
            }),
        );
    }
    let mut err = None;
    for _ in 0..n {
        match pool.results.recv() {
            Ok(o) => {
                if let Err(e) = o.result {
                    err.get_or_insert(e);
                }
            }
            Err(_) => {
                err.get_or_insert(Error::Setup("shards stopped unexpectedly".into()));
                break;
            }
        }
    }
    pool.join();
    if let Some(e) = err {
        return Err(e);
    }
    files.flush()?;
    let elapsed = started.elapsed();
    let latency = merged.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(BenchResult {
        elapsed,
        requests: shared.done.load(Ordering::Relaxed),
        latency,
        path: engine.notes(),
    })
}

/// A histogram of nanosecond latencies, 1 ns .. 1 hour, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| Histogram::new_with_max(1 << 40, 2).expect("valid histogram bounds"))
}

/// Tag of flush ops; request ops are tagged with their slot number.
const TAG_FLUSH: u16 = u16::MAX;

/// One shard's share of a bench run.
struct BenchWork {
    shared: Arc<Shared>,
    file: FileIdx,
    depth: usize,
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
}

impl BenchWork {
    fn issue(&mut self, cx: &mut Cx<'_>, mut buf: Buf) -> Option<Buf> {
        if self.err.is_some() {
            return Some(buf);
        }
        let sh = &self.shared;
        if sh.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(buf);
        }
        let i = sh.next.fetch_add(1, Ordering::Relaxed);
        if i >= sh.count {
            return Some(buf);
        }
        let off = sh.offset_of(i);
        let size = sh.size;
        if off.checked_add(size).is_none_or(|e| e > sh.image_size) {
            self.err = Some(Error::Io {
                what: "Failed request:",
                path: String::new(),
                off,
                source: stdio::Error::from_raw_os_error(libc::EIO),
            });
            return Some(buf);
        }
        if sh.flush_interval > 0 && i > 0 && i.is_multiple_of(sh.flush_interval) {
            cx.submit(
                TAG_FLUSH,
                OpKind::Fsync {
                    file: cx.files.buffered_slot(self.file),
                    data_only: true,
                },
            );
            self.outstanding += 1;
        }
        buf.set_len(size as usize);
        let Some(tag) = self.free.pop() else {
            return Some(buf);
        };
        self.starts[tag as usize] = Some(Instant::now());
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
        cx.submit(tag, kind);
        self.outstanding += 1;
        None
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
        if let Err(e) = res {
            self.err.get_or_insert(Error::Io {
                what: "Failed request:",
                path: String::new(),
                off: 0,
                source: e,
            });
        }
        if tag != TAG_FLUSH {
            self.shared.done.fetch_add(1, Ordering::Relaxed);
            if let Some(t0) = self.starts.get_mut(tag as usize).and_then(Option::take) {
                let ns = t0.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                let _ = self.hist.record(ns.max(1));
            }
            self.free.push(tag);
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
