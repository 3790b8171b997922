//! [`ThreadQueue`]: the fallback backend, a small pread/pwrite thread pool.
//!
//! Used where io_uring is refused (seccomp profiles, `kernel.io_uring_disabled`) or forced with
//! `RIMG_IO=threads`. Same contract as the ring: ops move into the queue with their buffers and
//! come back in completions; short transfers and `EINTR`/`EAGAIN` are retried here, a read
//! stops at EOF, a write that makes no progress is an error.

use std::io;
use std::os::fd::RawFd;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::uring::sync_fallocate;
use super::{Arena, BackendKind, Completion, Op, OpKind, Queue};

/// Worker threads per queue unless the job asks for another number.
pub const DEFAULT_WORKERS: usize = 4;
/// Worker stack: the loops below need little, and address space is budgeted (RLIMIT_AS).
const WORKER_STACK: usize = 128 * 1024;
/// Largest single pread/pwrite; longer transfers loop.
const MAX_SYSCALL_LEN: usize = 1 << 30;

/// One op on its way to a worker, with its file already resolved to an fd.
struct Job {
    user: u64,
    fd: RawFd,
    /// a write through the page cache: one at a time per file (see [`BUFFERED_WRITERS`])
    serialize: bool,
    kind: OpKind,
}

/// Buffered writes to one file take its inode lock exclusively (ext4), so several at once
/// gain nothing: the waiters spin on the lock (`rwsem_spin_on_owner`), and where the owner
/// is slowed by page faults, as when fresh page-cache memory comes from a VM's host, they
/// burn CPU for it: a cold 2 GiB raw->raw convert took 3.8 CPU-s on eight pool threads of
/// two shards against qemu-img's 2.5. The pool threads of every shard queue here instead,
/// by file descriptor (the shards share the job's descriptors).
static BUFFERED_WRITERS: [std::sync::Mutex<()>; 16] = [const { std::sync::Mutex::new(()) }; 16];

/// A shard's thread-pool queue. See the module docs of [`crate::io`] for the ownership rules.
pub struct ThreadQueue {
    arena: Arena,
    depth: usize,
    files: Vec<RawFd>,
    /// whether each registered file is opened without O_DIRECT
    buffered: Vec<bool>,
    /// accepted ops whose completion was not yet returned by `reap`
    in_flight: usize,
    /// completions produced without a worker (validation errors)
    ready: Vec<Completion>,
    jobs: Option<Sender<Job>>,
    done: Receiver<Completion>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ThreadQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadQueue")
            .field("depth", &self.depth)
            .field("workers", &self.workers.len())
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl ThreadQueue {
    /// Start `min(depth, workers)` worker threads (`rimg-io-N`, at least one) for up to
    /// `depth` ops in flight (at least 1). Fails only when a thread cannot be spawned.
    pub fn new(arena: Arena, depth: usize, workers: usize) -> io::Result<ThreadQueue> {
        let depth = depth.max(1);
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
        let mut q = ThreadQueue {
            arena,
            depth,
            files: Vec::new(),
            buffered: Vec::new(),
            in_flight: 0,
            ready: Vec::new(),
            jobs: Some(jobs_tx),
            done: done_rx,
            workers: Vec::new(),
        };
        for i in 0..depth.min(workers).max(1) {
            let (rx, tx) = (jobs_rx.clone(), done_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("rimg-io-{i}"))
                .stack_size(WORKER_STACK)
                .spawn(move || worker(rx, tx))?; // on error `q` drops and joins the others
            q.workers.push(handle);
        }
        Ok(q)
    }
}

fn worker(jobs: Receiver<Job>, done: Sender<Completion>) {
    for job in jobs {
        if done.send(run(job)).is_err() {
            return;
        }
    }
}

/// Execute one op synchronously.
fn run(job: Job) -> Completion {
    let Job {
        user,
        fd,
        serialize,
        kind,
    } = job;
    let _turn = serialize.then(|| {
        BUFFERED_WRITERS[fd.unsigned_abs() as usize % BUFFERED_WRITERS.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    });
    match kind {
        OpKind::Read { off, mut buf, .. } => Completion {
            user,
            result: pread_full(fd, buf.as_mut_slice(), off),
            buf: Some(buf),
        },
        OpKind::Write {
            off,
            buf,
            start,
            len,
            ..
        } => Completion {
            user,
            result: pwrite_full(fd, &buf.as_slice()[start..start + len], off),
            buf: Some(buf),
        },
        OpKind::Fsync { data_only, .. } => Completion {
            user,
            result: fsync(fd, data_only).map(|()| 0),
            buf: None,
        },
        OpKind::Fallocate { mode, off, len, .. } => Completion {
            user,
            result: sync_fallocate(fd, mode, off, len).map(|()| 0),
            buf: None,
        },
    }
}

fn file_off(off: u64, done: usize) -> io::Result<libc::off_t> {
    off.checked_add(done as u64)
        .and_then(|o| libc::off_t::try_from(o).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether a failed call should simply be made again.
fn retry(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN))
}

/// Read all of `buf` at `off`, stopping early only at EOF. Returns the bytes read.
pub(crate) fn pread_full(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let n = rest.len().min(MAX_SYSCALL_LEN);
        // SAFETY: `rest` is a live, exclusively borrowed slice of at least `n` bytes.
        let r = unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), n, file_off(off, done)?) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if retry(&e) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as usize;
    }
    Ok(done)
}

/// Write all of `buf` at `off`. A write that makes no progress is `WriteZero`.
pub(crate) fn pwrite_full(fd: RawFd, buf: &[u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        let n = rest.len().min(MAX_SYSCALL_LEN);
        // SAFETY: `rest` is a live slice of at least `n` bytes; pwrite only reads it.
        let r = unsafe { libc::pwrite(fd, rest.as_ptr().cast(), n, file_off(off, done)?) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if retry(&e) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("write returned 0 after {done} of {} bytes", buf.len()),
            ));
        }
        done += r as usize;
    }
    Ok(done)
}

fn fsync(fd: RawFd, data_only: bool) -> io::Result<()> {
    loop {
        // SAFETY: no pointers; a bad fd is reported as EBADF.
        let r = unsafe {
            if data_only {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

impl Queue for ThreadQueue {
    fn kind(&self) -> BackendKind {
        BackendKind::Threads
    }

    fn buffers_registered(&self) -> bool {
        false
    }

    /// Fails with `EBUSY` while ops are in flight (same contract as the ring).
    fn register_files(&mut self, fds: &[RawFd]) -> io::Result<()> {
        if self.in_flight != 0 {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.files = fds.to_vec();
        self.buffered = fds
            .iter()
            .map(|&fd| {
                // SAFETY: F_GETFL takes no pointer; a bad fd answers -1.
                let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                fl >= 0 && fl & libc::O_DIRECT == 0
            })
            .collect();
        Ok(())
    }

    fn submit(&mut self, op: Op) -> Result<(), Op> {
        if self.in_flight >= self.depth {
            return Err(op);
        }
        let file = match &op.kind {
            OpKind::Read { file, .. }
            | OpKind::Write { file, .. }
            | OpKind::Fsync { file, .. }
            | OpKind::Fallocate { file, .. } => *file,
        };
        let err = match (&op.kind, self.files.get(file.0 as usize)) {
            (_, None) => Some(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file slot {} not registered", file.0),
            )),
            (
                OpKind::Write {
                    buf, start, len, ..
                },
                _,
            ) if start.checked_add(*len).is_none_or(|end| end > buf.len()) => Some(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("write of {len} bytes from a {}-byte buffer", buf.len()),
            )),
            _ => None,
        };
        self.in_flight += 1;
        let job = Job {
            user: op.user,
            fd: self.files.get(file.0 as usize).copied().unwrap_or(-1),
            serialize: matches!(op.kind, OpKind::Write { .. })
                && self.buffered.get(file.0 as usize).copied().unwrap_or(false),
            kind: op.kind,
        };
        let job = match (err, &self.jobs) {
            (None, Some(tx)) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // All workers are gone (cannot happen unless one panicked).
                Err(e) => (
                    e.into_inner(),
                    io::Error::other("I/O worker threads exited"),
                ),
            },
            (Some(err), _) => (job, err),
            (None, None) => (job, io::Error::other("I/O queue is shut down")),
        };
        let (job, err) = job;
        let buf = match job.kind {
            OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => Some(buf),
            OpKind::Fsync { .. } | OpKind::Fallocate { .. } => None,
        };
        self.ready.push(Completion {
            user: job.user,
            result: Err(err),
            buf,
        });
        Ok(())
    }

    /// `min` is capped at [`Queue::in_flight`], so this never waits for ops that do not exist.
    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> io::Result<()> {
        let min = min.min(self.in_flight);
        let mut got = self.ready.len();
        out.append(&mut self.ready);
        while got < min {
            match self.done.recv() {
                Ok(c) => {
                    out.push(c);
                    got += 1;
                }
                Err(_) => {
                    self.in_flight -= got;
                    return Err(io::Error::other("I/O worker threads exited"));
                }
            }
        }
        while let Ok(c) = self.done.try_recv() {
            out.push(c);
            got += 1;
        }
        self.in_flight -= got;
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn arena(&mut self) -> &mut Arena {
        &mut self.arena
    }
}

impl Drop for ThreadQueue {
    fn drop(&mut self) {
        // Closing the job channel ends each worker once the queued jobs are done.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
