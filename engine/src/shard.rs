//! Shards: one pinned thread each, with its own I/O queue and buffer arena, running
//! [`Work`] units — small state machines that issue ops and react to their completions.
//!
//! The planner (the job's calling thread) sends units to shards over bounded channels, so it
//! never runs far ahead of the I/O, and receives one [`Outcome`] per unit over an unbounded
//! channel (so a shard never blocks on reporting).

use std::collections::VecDeque;
use std::io as stdio;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TryRecvError};

use crate::files::JobFiles;
use crate::io::{self, Arena, BackendKind, Buf, Completion, Op, OpKind, Queue};
use crate::{Engine, Error, Result};

/// What a unit reports when it is done.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// the unit's id, as the planner numbered it
    pub id: u64,
    /// guest bytes the unit accounted for (progress)
    pub bytes: u64,
    /// `Ok(Some(off))`: a compare unit found a mismatch at guest offset `off`
    pub result: Result<Option<u64>>,
    /// bytes a unit produced for the planner (a compressed cluster)
    pub payload: Option<Payload>,
    /// guest ranges a copy unit found all-zero and did not write (fresh targets)
    pub zeros: Vec<(u64, u64)>,
}

/// What a compress unit hands back to the planner.
#[derive(Debug)]
pub(crate) enum Payload {
    /// the cluster reads as zeros: nothing to write
    Zero,
    /// compressed bytes
    Compressed(Vec<u8>),
    /// the cluster did not compress: its bytes as they are
    Raw(Vec<u8>),
}

/// Whether a unit has finished.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// ops are still in flight
    Pending,
    /// finished; [`Work::finish`] is called next
    Done,
}

/// A unit of work on a shard.
pub(crate) trait Work: Send {
    /// Buffers [`Cx::take_buf`] will be asked for at once (must be ≤ 2).
    fn buffers(&self) -> usize;
    /// Issue the first ops (or finish at once).
    fn start(&mut self, cx: &mut Cx<'_>) -> Step;
    /// The op tagged `tag` completed with `res`; its buffer, if any, is `buf`.
    fn complete(
        &mut self,
        cx: &mut Cx<'_>,
        tag: u16,
        res: stdio::Result<usize>,
        buf: Option<Buf>,
    ) -> Step;
    /// Report. Every buffer must have been given back with [`Cx::put_buf`] by now.
    fn finish(self: Box<Self>) -> Outcome;
}

/// What a unit may do: submit ops, take and return buffers, look at the file table.
pub(crate) struct Cx<'a> {
    q: &'a mut dyn Queue,
    pending: &'a mut VecDeque<Op>,
    unit: u32,
    /// the job's files
    pub files: &'a JobFiles,
}

impl Cx<'_> {
    /// Submit an op tagged `tag` (queued locally if the ring is full).
    pub fn submit(&mut self, tag: u16, kind: OpKind) {
        let op = Op {
            user: (u64::from(self.unit) << 16) | u64::from(tag),
            kind,
        };
        if !self.pending.is_empty() {
            self.pending.push_back(op);
            return;
        }
        if let Err(op) = self.q.submit(op) {
            self.pending.push_back(op);
        }
    }

    /// Hand what was submitted so far to the kernel now (see [`Queue::kick`]); an error
    /// there shows again at the next reap.
    pub fn kick(&mut self) {
        let _ = self.q.kick();
    }

    /// A buffer from the shard's arena (the shard checked [`Work::buffers`] are free).
    pub fn take_buf(&mut self) -> Buf {
        let mut b = self
            .q
            .arena()
            .take()
            .expect("shard checked that the unit's buffers are free");
        let cap = b.capacity();
        b.set_len(cap);
        b
    }

    /// Give a buffer back.
    pub fn put_buf(&mut self, b: Buf) {
        self.q.arena().put(b);
    }
}

/// A running set of shards for one job.
pub(crate) struct Pool {
    txs: Vec<Sender<Box<dyn Work>>>,
    handles: Vec<JoinHandle<()>>,
    /// one outcome per unit sent
    pub results: Receiver<Outcome>,
    next: usize,
}

/// Set-up facts each shard reports back once its queue exists.
type Ready = std::result::Result<(BackendKind, bool), String>;

impl Pool {
    /// Start `engine.shard_count()` shards (at most `max_shards`) sharing `files`. Each gets
    /// `budget / shards` bytes of buffers in chunks of `unit` bytes, and runs at most as many
    /// units at once as its buffers allow (each unit needs up to `bufs_per_unit`).
    pub fn start(
        engine: &Engine,
        files: Arc<JobFiles>,
        max_shards: usize,
        bufs_per_unit: usize,
    ) -> Result<Pool> {
        Pool::start_with_unit(
            engine,
            files,
            max_shards,
            bufs_per_unit,
            engine.config().unit,
        )
    }

    /// As [`Pool::start`], with buffers of `unit` bytes instead of the configured size.
    pub fn start_with_unit(
        engine: &Engine,
        files: Arc<JobFiles>,
        max_shards: usize,
        bufs_per_unit: usize,
        unit: usize,
    ) -> Result<Pool> {
        let cfg = engine.config();
        // Every shard needs room for two units; the budget bounds the shard count, so the
        // total stays within it whatever the core count.
        let min_per_shard = unit * 2 * bufs_per_unit.max(1);
        let n = engine
            .shard_count()
            .min(max_shards.max(1))
            .min((cfg.budget / min_per_shard).max(1));
        let per_shard = (cfg.budget / n).max(min_per_shard);
        let chunks = per_shard / unit;
        let max_units = (chunks / bufs_per_unit.max(1)).max(1);
        let depth = (max_units * 2).max(bufs_per_unit).clamp(8, 1024);
        let (res_tx, results) = unbounded();
        let (ready_tx, ready_rx) = unbounded::<Ready>();
        let cpus = std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(1);
        let backend = cfg
            .backend
            .resolve(files.page_cache_only(cfg.cached_reads_on_pool));
        let reap_batch = usize::from(cfg.reap_batch_percent.min(100));
        let io_threads = if cfg.io_threads == 0 {
            io::threads::DEFAULT_WORKERS
        } else {
            cfg.io_threads
        };
        let mut txs = Vec::new();
        let mut handles = Vec::new();
        for i in 0..n {
            let (tx, rx) = bounded::<Box<dyn Work>>(max_units);
            let files = files.clone();
            let res_tx = res_tx.clone();
            let ready_tx = ready_tx.clone();
            // A lone shard is left to the scheduler: pinned to one CPU, it waits there
            // for completions that the device's interrupt raises on another (one
            // cross-CPU wakeup per batch; bench 4k qd32 on a one-queue virtio disk: -25 %).
            let pin = n > 1 && n <= cpus;
            let h = std::thread::Builder::new()
                .name(format!("rimg-shard-{i}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    if pin {
                        let mut set = nix::sched::CpuSet::new();
                        if set.set(i % cpus).is_ok() {
                            let _ =
                                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
                        }
                    }
                    let q = Arena::new(per_shard, unit)
                        .and_then(|arena| io::new_queue(backend, arena, depth, io_threads))
                        .and_then(|mut q| {
                            q.register_files(&files.fds())?;
                            Ok(q)
                        });
                    let mut q = match q {
                        Ok(q) => {
                            let _ = ready_tx.send(Ok((q.kind(), q.buffers_registered())));
                            q
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    drop(ready_tx);
                    run_shard(q.as_mut(), &files, &rx, &res_tx, max_units, reap_batch);
                })
                .map_err(|e| Error::Setup(format!("starting shard thread: {e}")))?;
            txs.push(tx);
            handles.push(h);
        }
        drop(ready_tx);
        let mut backend = BackendKind::IoUring;
        let mut registered = true;
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok((k, r))) => {
                    if k == BackendKind::Threads {
                        backend = k;
                    }
                    registered &= r;
                }
                Ok(Err(e)) => {
                    drop(txs);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(Error::Setup(e));
                }
                Err(_) => return Err(Error::Setup("a shard thread died".into())),
            }
        }
        engine.note(format!(
            "{n} shard(s), backend {}, buffers {}registered, {} x {} KiB per shard",
            match backend {
                BackendKind::IoUring => "io_uring",
                BackendKind::Threads => "threads (pread/pwrite)",
            },
            if registered { "" } else { "not " },
            chunks,
            unit >> 10
        ));
        Ok(Pool {
            txs,
            handles,
            results,
            next: 0,
        })
    }

    /// Send a unit to shard `shard % len()` (blocks while that shard is full).
    pub fn send_to(&self, shard: usize, w: Box<dyn Work>) {
        let _ = self.txs[shard % self.txs.len()].send(w);
    }

    /// Send a unit to the next shard in turn.
    pub fn send(&mut self, w: Box<dyn Work>) {
        let s = self.next;
        self.next = self.next.wrapping_add(1);
        self.send_to(s, w);
    }

    /// Stop accepting units, wait for the shards to drain and exit.
    pub fn join(self) {
        drop(self.txs);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

fn run_shard(
    q: &mut dyn Queue,
    files: &JobFiles,
    rx: &Receiver<Box<dyn Work>>,
    res_tx: &Sender<Outcome>,
    max_units: usize,
    reap_batch_percent: usize,
) {
    let mut units: Vec<Option<Box<dyn Work>>> = Vec::new();
    let mut free_slots: Vec<u32> = Vec::new();
    let mut pending: VecDeque<Op> = VecDeque::new();
    let mut waiting: Option<Box<dyn Work>> = None;
    let mut active = 0usize;
    let mut closed = false;
    let mut comps: Vec<Completion> = Vec::new();
    loop {
        // Push ops that did not fit earlier.
        while let Some(op) = pending.pop_front() {
            if let Err(op) = q.submit(op) {
                pending.push_front(op);
                break;
            }
        }
        // Take new units while there is room.
        while active < max_units {
            let next = match waiting.take() {
                Some(w) => w,
                None if closed => break,
                None if active == 0 && pending.is_empty() => match rx.recv() {
                    Ok(w) => w,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                },
                None => match rx.try_recv() {
                    Ok(w) => w,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                },
            };
            if q.arena().free_count() < next.buffers() {
                waiting = Some(next);
                break;
            }
            let slot = free_slots.pop().unwrap_or_else(|| {
                units.push(None);
                (units.len() - 1) as u32
            });
            let mut w = next;
            let step = {
                let mut cx = Cx {
                    q: &mut *q,
                    pending: &mut pending,
                    unit: slot,
                    files,
                };
                w.start(&mut cx)
            };
            if step == Step::Done {
                let _ = res_tx.send(w.finish());
                free_slots.push(slot);
            } else {
                units[slot as usize] = Some(w);
                active += 1;
            }
        }
        if active == 0 && pending.is_empty() && waiting.is_none() {
            if closed {
                return;
            }
            continue;
        }
        comps.clear();
        let min = (q.in_flight() * reap_batch_percent / 100).max(1);
        if let Err(e) = q.reap(min, &mut comps) {
            // The queue itself failed: fail every active unit.
            for (slot, u) in units.iter_mut().enumerate() {
                if let Some(u) = u.take() {
                    let mut o = u.finish();
                    o.result = Err(Error::Setup(format!("I/O queue failed: {e}")));
                    let _ = res_tx.send(o);
                    free_slots.push(slot as u32);
                }
            }
            return;
        }
        for c in comps.drain(..) {
            let slot = (c.user >> 16) as u32;
            let tag = (c.user & 0xffff) as u16;
            let Some(w) = units.get_mut(slot as usize).and_then(Option::as_mut) else {
                continue;
            };
            let step = {
                let mut cx = Cx {
                    q: &mut *q,
                    pending: &mut pending,
                    unit: slot,
                    files,
                };
                w.complete(&mut cx, tag, c.result, c.buf)
            };
            if step == Step::Done {
                if let Some(w) = units[slot as usize].take() {
                    let _ = res_tx.send(w.finish());
                }
                free_slots.push(slot);
                active -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::CacheMode;
    use crate::io::BackendChoice;
    use crate::EngineConfig;
    use rimg_formats::FileLayer;

    fn layer(dir: &std::path::Path, name: &str) -> FileLayer {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        FileLayer::create(p.to_str().unwrap()).unwrap()
    }

    #[test]
    fn buffered_writes_run_on_the_thread_pool() {
        if std::env::var_os("RIMG_IO").is_some() {
            return; // the override wins, by design
        }
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(EngineConfig::default());
        let src = layer(dir.path(), "src");
        let dst = layer(dir.path(), "dst");

        let mut read_only = JobFiles::default();
        read_only
            .add(&engine, &src, false, CacheMode::Writeback)
            .unwrap();
        // Buffered reads alone: the pool, unless the job keeps them on the ring (bench).
        assert_eq!(
            BackendChoice::Auto.resolve(read_only.page_cache_only(true)),
            BackendChoice::Threads
        );
        assert_eq!(
            BackendChoice::Auto.resolve(read_only.page_cache_only(false)),
            BackendChoice::Auto
        );
        let mut direct = JobFiles::default();
        direct.add(&engine, &src, false, CacheMode::None).unwrap();
        direct
            .add(&engine, &dst, false, CacheMode::Writeback)
            .unwrap();
        if direct.align(crate::files::FileIdx(0)) > 1 {
            // (O_DIRECT was accepted here: not on tmpfs.)
            assert_eq!(
                BackendChoice::Auto.resolve(direct.page_cache_only(true)),
                BackendChoice::Auto
            );
        }

        let mut buffered = JobFiles::default();
        buffered
            .add(&engine, &src, false, CacheMode::Writeback)
            .unwrap();
        buffered
            .add(&engine, &dst, true, CacheMode::Writeback)
            .unwrap();
        assert_eq!(
            BackendChoice::Auto.resolve(buffered.page_cache_only(false)),
            BackendChoice::Threads
        );
        // An explicit choice is kept.
        assert_eq!(
            BackendChoice::IoUring.resolve(buffered.page_cache_only(true)),
            BackendChoice::IoUring
        );
    }
}
