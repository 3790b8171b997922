//! Per-shard I/O queues: the only place data bytes meet the kernel.
//!
//! A shard owns exactly one [`Queue`]. Two implementations exist:
//! - [`uring::UringQueue`]: one io_uring ring (single issuer), registered buffers from the
//!   shard's [`Arena`] when RLIMIT_MEMLOCK allows, registered files.
//! - [`threads::ThreadQueue`]: a small pread/pwrite thread pool, used where io_uring is
//!   refused (container seccomp profiles) or when forced with `RIMG_IO=threads`.
//!
//! Ownership rule: [`Queue::submit`] takes the [`Op`] (and so its [`Buf`]); if the queue is
//! full it hands the op back untouched. The queue owns the buffer until the op's
//! [`Completion`] is returned by [`Queue::reap`], which gives the buffer back.
//! Short reads and writes are resubmitted by the queue itself until the whole length is done,
//! EOF is hit (reads), or an error occurs; a completion's `result` is the total byte count.

pub mod buf;
pub mod dio;
pub mod threads;
pub mod uring;

use std::io;
use std::os::fd::RawFd;

pub use buf::{Arena, Buf};

/// Index of a file registered with a queue through [`Queue::register_files`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileSlot(pub u32);

/// `fallocate(2)` modes the engine issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate, reads return zeros.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`: keep allocated, reads return zeros.
    ZeroRange,
    /// mode 0: allocate blocks (may extend the file).
    Allocate,
}

/// What an operation does. Offsets and lengths are in bytes of the registered file.
#[derive(Debug)]
pub enum OpKind {
    /// Read `buf.len()` bytes at `off` into `buf`. A read that hits EOF completes with the
    /// number of bytes read; the rest of `buf` is untouched. To read less than a whole chunk,
    /// shorten the buffer first with [`Buf::set_len`].
    Read {
        /// file to read from
        file: FileSlot,
        /// byte offset in the file
        off: u64,
        /// destination; its whole length is requested
        buf: Buf,
    },
    /// Write `len` bytes of `buf`, starting `start` bytes into it, at `off`.
    Write {
        /// file to write to
        file: FileSlot,
        /// byte offset in the file
        off: u64,
        /// source buffer
        buf: Buf,
        /// where in `buf` the bytes start (O_DIRECT needs `start` aligned like memory)
        start: usize,
        /// bytes to write (`start + len <= buf.len()`)
        len: usize,
    },
    /// `fsync(2)` (or `fdatasync(2)` when `data_only`).
    Fsync {
        /// file to sync
        file: FileSlot,
        /// use fdatasync
        data_only: bool,
    },
    /// `fallocate(2)` on a range.
    Fallocate {
        /// file to act on
        file: FileSlot,
        /// what to do
        mode: FallocMode,
        /// byte offset
        off: u64,
        /// byte length
        len: u64,
    },
}

/// One submission: `user` is returned unchanged in the completion.
#[derive(Debug)]
pub struct Op {
    /// caller's tag
    pub user: u64,
    /// the operation
    pub kind: OpKind,
}

/// The result of one [`Op`].
#[derive(Debug)]
pub struct Completion {
    /// the `user` tag of the op
    pub user: u64,
    /// total bytes transferred (0 for fsync/fallocate), or the error
    pub result: io::Result<usize>,
    /// the op's buffer, handed back (None for fsync/fallocate)
    pub buf: Option<Buf>,
}

/// Which implementation a queue uses; reported by `--verbose` and bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// io_uring ring
    IoUring,
    /// pread/pwrite thread pool
    Threads,
}

/// A shard's I/O queue. Not `Sync`: one thread (the shard) drives it.
pub trait Queue: Send {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Whether buffers from this queue's arena are registered with the kernel.
    fn buffers_registered(&self) -> bool;
    /// Register `fds` (replacing any earlier set); slot `i` names `fds[i]`. The fds must stay
    /// open until the queue is dropped or files are registered again.
    ///
    /// Only with no ops in flight: fails with `EBUSY` otherwise (a resubmitted short transfer
    /// would otherwise land on the new slot's file). Kernel registration is best effort: when
    /// the kernel refuses it, ops use the plain fds and this still returns `Ok`. An op naming a
    /// slot that is not registered completes with an `InvalidInput` error.
    fn register_files(&mut self, fds: &[RawFd]) -> io::Result<()>;
    /// Queue `op`. Returns it back when the queue is full, i.e. `in_flight() == depth()`
    /// (caller must reap first). Submission to the kernel may be deferred until
    /// [`Queue::reap`]. Errors found before any I/O (bad slot, `len > buf.len()`) do not
    /// reject the op: it is accepted and completes with the error.
    fn submit(&mut self, op: Op) -> Result<(), Op>;
    /// Submit everything queued, then wait until at least `min` completions are available
    /// (0: do not block) and append all available completions to `out`. `min` is capped at
    /// [`Queue::in_flight`], so asking for more never hangs. Completions come in any order;
    /// match them by `user`. An `Err` means the queue itself failed (e.g. `io_uring_enter`),
    /// not an op: op errors are in [`Completion::result`].
    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> io::Result<()>;
    /// Ops submitted whose completions were not yet reaped.
    fn in_flight(&self) -> usize;
    /// Most ops the queue accepts in flight at once.
    fn depth(&self) -> usize;
    /// The shard's buffer arena (take buffers here, put them back when done).
    fn arena(&mut self) -> &mut Arena;
    /// Hand the ops queued so far to the kernel now, without waiting for any, so the device
    /// can start on them before the next [`Queue::reap`]. A no-op where ops start at
    /// submission (the thread pool).
    fn kick(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How to choose the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring if it works here, else threads. `RIMG_IO=threads|uring` overrides.
    #[default]
    Auto,
    /// io_uring or fail
    IoUring,
    /// thread pool
    Threads,
}

impl BackendChoice {
    /// The choice for a job, made once before its shards start. `RIMG_IO=threads|uring`
    /// settles `Auto`. Otherwise a job that does all its I/O through the page cache
    /// (`page_cache_job`, see [`crate::files::JobFiles::page_cache_only`]) gets the thread
    /// pool:
    /// - io_uring hands buffered writes on the common file systems (ext4) to its io-wq
    ///   workers, one set per ring, and the shards' workers then spin on the target inode's
    ///   lock (perf: a fifth of a raw->raw convert's CPU time in `rwsem_spin_on_owner`),
    ///   where pwrite from the pool threads does not;
    /// - buffered reads the page cache does not hold yet were slower on the ring than with
    ///   pread on the pool (cold 2 x 2 GiB compare: 2.84 s against 2.65 s; warm 0.50 / 0.49).
    ///
    /// Jobs that read through the page cache and write with O_DIRECT keep `Auto` (the ring
    /// where it works: direct writes want its queue depth; a convert to an O_DIRECT target
    /// took 1.1 s on the ring, 1.7 s on the pool), as do jobs whose files are all O_DIRECT.
    /// A buffered target takes the pool even when the source is read with O_DIRECT.
    /// Explicit choices stand.
    pub fn resolve(self, page_cache_job: bool) -> BackendChoice {
        if self != BackendChoice::Auto {
            return self;
        }
        match std::env::var("RIMG_IO").ok().as_deref() {
            Some("threads") => BackendChoice::Threads,
            Some("uring" | "io_uring") => BackendChoice::IoUring,
            _ if page_cache_job => BackendChoice::Threads,
            _ => BackendChoice::Auto,
        }
    }
}

/// Create a queue for one shard from a [`BackendChoice::resolve`]d choice. `arena` is moved
/// in (its buffers are registered when the backend and RLIMIT_MEMLOCK allow). `depth` is the
/// most ops in flight; a thread-pool queue runs them on up to `workers` threads.
pub fn new_queue(
    choice: BackendChoice,
    arena: Arena,
    depth: usize,
    workers: usize,
) -> io::Result<Box<dyn Queue>> {
    match choice {
        BackendChoice::Threads => Ok(Box::new(threads::ThreadQueue::new(arena, depth, workers)?)),
        BackendChoice::IoUring => match uring::UringQueue::new(arena, depth) {
            Ok(q) => Ok(Box::new(q)),
            Err((_arena, e)) => Err(e),
        },
        BackendChoice::Auto => match uring::UringQueue::new(arena, depth) {
            Ok(q) => Ok(Box::new(q)),
            Err((arena, _e)) => Ok(Box::new(threads::ThreadQueue::new(arena, depth, workers)?)),
        },
    }
}
