//! [`UringQueue`]: a shard's io_uring ring.
//!
//! One ring per shard, driven by one thread. Each accepted op gets a record in a slab; the slab
//! index is the SQE's `user_data`. The record owns the op (and so its buffer) until the final
//! completion is handed to the caller, so the kernel never writes into memory someone else
//! holds. Short transfers, `EAGAIN` and `EINTR` are resubmitted from the record.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::{Arena, BackendKind, Completion, FallocMode, Op, OpKind, Queue};

/// Largest single read/write SQE; longer transfers are split (as short transfers are).
const MAX_SQE_LEN: usize = 1 << 30;
/// Most entries a ring may have (`IORING_MAX_ENTRIES`).
const MAX_ENTRIES: usize = 32768;
/// How many `EBUSY`/`EAGAIN` answers from `io_uring_enter` in a row we tolerate while making no
/// progress before reporting the error.
const MAX_BUSY_SPINS: u32 = 10_000;

/// One accepted op whose final completion has not been produced yet.
struct Record {
    user: u64,
    kind: OpKind,
    /// bytes transferred so far (reads/writes)
    done: usize,
}

/// A shard's io_uring queue. See the module docs of [`crate::io`] for the ownership rules.
pub struct UringQueue {
    ring: IoUring,
    arena: Arena,
    depth: usize,
    buffers_registered: bool,
    files: Vec<RawFd>,
    files_registered: bool,
    fallocate_supported: bool,
    slab: Vec<Option<Record>>,
    free_slots: Vec<usize>,
    /// accepted ops whose completion was not yet returned by `reap` (kernel + `ready`)
    in_flight: usize,
    /// completions produced without the kernel (validation errors, empty transfers, …)
    ready: Vec<Completion>,
    /// scratch for draining the CQ: (user_data, result)
    cqes: Vec<(u64, i32)>,
}

impl std::fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringQueue")
            .field("depth", &self.depth)
            .field("buffers_registered", &self.buffers_registered)
            .field("files_registered", &self.files_registered)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// Expand `$body` with `$fd` bound to the right io_uring target for slot `$slot`: a
/// `types::Fixed` when files are registered, else a `types::Fd`. (The crate's target trait is
/// sealed, so this cannot be a generic function.)
macro_rules! with_target {
    ($q:expr, $slot:expr, |$fd:ident| $body:expr) => {
        if $q.files_registered {
            let $fd = types::Fixed($slot.0);
            $body
        } else {
            let $fd = types::Fd($q.files[$slot.0 as usize]);
            $body
        }
    };
}

impl UringQueue {
    /// Create a ring for up to `depth` ops in flight (at least 1, at most 32768; the ring has
    /// `depth` rounded up to a power of two entries) and register the arena's buffers when the
    /// kernel and RLIMIT_MEMLOCK allow.
    ///
    /// Fails (handing the arena back) when io_uring is unavailable (old kernel, seccomp,
    /// `kernel.io_uring_disabled`) or lacks the read, write or fsync opcodes, so the caller can
    /// fall back to [`super::threads::ThreadQueue`].
    pub fn new(arena: Arena, depth: usize) -> Result<UringQueue, (Arena, io::Error)> {
        Self::with_buffer_registration(arena, depth, true)
    }

    /// As [`UringQueue::new`], but registers the arena only when `register_buffers` is true.
    /// For tests and bench comparisons of the unregistered path.
    pub fn with_buffer_registration(
        arena: Arena,
        depth: usize,
        register_buffers: bool,
    ) -> Result<UringQueue, (Arena, io::Error)> {
        let depth = depth.clamp(1, MAX_ENTRIES);
        let entries = depth.next_power_of_two() as u32;
        let ring = match new_ring(entries) {
            Ok(r) => r,
            Err(e) => return Err((arena, e)),
        };
        let mut probe = Probe::new();
        if let Err(e) = ring.submitter().register_probe(&mut probe) {
            return Err((arena, e));
        }
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
        ] {
            if !probe.is_supported(code) {
                let e = io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks IORING_OP_{name}"),
                );
                return Err((arena, e));
            }
        }
        let fixed_ok = probe.is_supported(opcode::ReadFixed::CODE)
            && probe.is_supported(opcode::WriteFixed::CODE);
        let buffers_registered = register_buffers && fixed_ok && {
            let iov = arena.iovecs();
            // SAFETY: every iovec covers one chunk of the arena's mapping. The mapping outlives
            // the registration: the ring is dropped (closing the fd) no later than the arena,
            // the kernel holds its own page references while registered, and `Drop` waits for
            // every in-flight op before anything is released.
            unsafe { ring.submitter().register_buffers(&iov) }.is_ok()
        };
        Ok(UringQueue {
            ring,
            arena,
            depth,
            buffers_registered,
            files: Vec::new(),
            files_registered: false,
            fallocate_supported: probe.is_supported(opcode::Fallocate::CODE),
            slab: Vec::with_capacity(depth),
            free_slots: Vec::new(),
            in_flight: 0,
            ready: Vec::new(),
            cqes: Vec::with_capacity(depth),
        })
    }

    /// Whether the last [`Queue::register_files`] call registered the files with the kernel
    /// (otherwise ops use the plain fds).
    pub fn files_registered(&self) -> bool {
        self.files_registered
    }

    /// Ops the kernel (not `ready`) still owes a completion for.
    fn kernel_pending(&self) -> usize {
        self.in_flight - self.ready.len()
    }

    /// Check what can be checked before the kernel sees the op; `Some(result)` completes it
    /// at once.
    fn precheck(&self, kind: &OpKind) -> Option<io::Result<usize>> {
        let file = match kind {
            OpKind::Read { file, .. }
            | OpKind::Write { file, .. }
            | OpKind::Fsync { file, .. }
            | OpKind::Fallocate { file, .. } => *file,
        };
        if file.0 as usize >= self.files.len() {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file slot {} not registered", file.0),
            )));
        }
        match kind {
            OpKind::Read { buf, .. } if buf.is_empty() => Some(Ok(0)),
            OpKind::Write {
                buf, start, len, ..
            } if start.checked_add(*len).is_none_or(|end| end > buf.len()) => {
                Some(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("write of {len} bytes from a {}-byte buffer", buf.len()),
                )))
            }
            OpKind::Write { len: 0, .. } => Some(Ok(0)),
            OpKind::Fallocate {
                file,
                mode,
                off,
                len,
            } if !self.fallocate_supported => {
                Some(sync_fallocate(self.files[file.0 as usize], *mode, *off, *len).map(|()| 0))
            }
            _ => None,
        }
    }

    /// Build the SQE for the next (or only) step of slab record `idx`.
    fn build_sqe(&mut self, idx: usize) -> squeue::Entry {
        let fixed_bufs = self.buffers_registered;
        // Split the borrow: the record is mutated (buffer pointer) while `self.files` is read.
        let rec = self.slab[idx].as_mut().expect("live slab record");
        let done = rec.done;
        let entry = match &mut rec.kind {
            OpKind::Read { file, off, buf } => {
                let fixed = fixed_bufs && self.arena.owns(buf);
                let len = (buf.len() - done).min(MAX_SQE_LEN) as u32;
                let index = buf.index();
                // The pointer stays inside the chunk: `done < buf.len() <= capacity`.
                let ptr = buf.as_mut_ptr().wrapping_add(done);
                let off = *off + done as u64;
                let file = *file;
                if fixed {
                    with_target!(self, file, |fd| opcode::ReadFixed::new(fd, ptr, len, index)
                        .offset(off)
                        .build())
                } else {
                    with_target!(self, file, |fd| opcode::Read::new(fd, ptr, len)
                        .offset(off)
                        .build())
                }
            }
            OpKind::Write {
                file,
                off,
                buf,
                start,
                len,
            } => {
                let fixed = fixed_bufs && self.arena.owns(buf);
                let n = (*len - done).min(MAX_SQE_LEN) as u32;
                let index = buf.index();
                // Inside the chunk: `start + done < start + len <= buf.len() <= capacity`.
                let ptr = buf.as_mut_ptr().wrapping_add(*start + done).cast_const();
                let off = *off + done as u64;
                let file = *file;
                if fixed {
                    with_target!(self, file, |fd| opcode::WriteFixed::new(fd, ptr, n, index)
                        .offset(off)
                        .build())
                } else {
                    with_target!(self, file, |fd| opcode::Write::new(fd, ptr, n)
                        .offset(off)
                        .build())
                }
            }
            OpKind::Fsync { file, data_only } => {
                let flags = if *data_only {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                let file = *file;
                with_target!(self, file, |fd| opcode::Fsync::new(fd).flags(flags).build())
            }
            OpKind::Fallocate {
                file,
                mode,
                off,
                len,
            } => {
                let (file, mode, off, len) = (*file, falloc_flags(*mode), *off, *len);
                with_target!(self, file, |fd| opcode::Fallocate::new(fd, len)
                    .offset(off)
                    .mode(mode)
                    .build())
            }
        };
        entry.user_data(idx as u64)
    }

    /// Queue the SQE for record `idx`; on failure the record completes with the error.
    fn push_record(&mut self, idx: usize) {
        let entry = self.build_sqe(idx);
        let mut spins = 0;
        loop {
            // SAFETY: the SQE's buffer pointer and length lie inside a chunk owned by the
            // record in `slab[idx]`, which stays alive (and is not touched by us) until the
            // CQE for this `user_data` is processed; fds are kept open by the caller per the
            // `register_files` contract.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // The SQ is full (cannot happen while each record has at most one SQE and the ring
            // has `depth` entries, but stay correct): hand the SQEs to the kernel and retry.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if is_retry(&e) && spins < MAX_BUSY_SPINS => {
                    spins += 1;
                    std::thread::yield_now();
                }
                Err(e) => {
                    self.finish(idx, Err(e));
                    return;
                }
            }
        }
    }

    /// Remove record `idx` from the slab and queue its final completion.
    fn finish(&mut self, idx: usize, result: io::Result<usize>) {
        let rec = self.slab[idx].take().expect("live slab record");
        self.free_slots.push(idx);
        let buf = match rec.kind {
            OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => Some(buf),
            OpKind::Fsync { .. } | OpKind::Fallocate { .. } => None,
        };
        self.ready.push(Completion {
            user: rec.user,
            result,
            buf,
        });
    }

    /// Handle one CQE: resubmit the rest of a short transfer, or finish the record.
    fn on_cqe(&mut self, idx: usize, res: i32) {
        let Some(rec) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
            debug_assert!(false, "CQE for unknown user_data {idx}");
            return;
        };
        if res < 0 {
            let err = -res;
            if err == libc::EAGAIN || err == libc::EINTR {
                self.push_record(idx);
            } else {
                self.finish(idx, Err(io::Error::from_raw_os_error(err)));
            }
            return;
        }
        let n = res as usize;
        let (total, is_read) = match &rec.kind {
            OpKind::Read { buf, .. } => (buf.len(), true),
            OpKind::Write { len, .. } => (*len, false),
            OpKind::Fsync { .. } | OpKind::Fallocate { .. } => {
                self.finish(idx, Ok(0));
                return;
            }
        };
        if n == 0 {
            let done = rec.done;
            let result = if is_read {
                Ok(done)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("write returned 0 after {done} of {total} bytes"),
                ))
            };
            self.finish(idx, result);
            return;
        }
        rec.done = (rec.done + n).min(total);
        if rec.done == total {
            self.finish(idx, Ok(total));
        } else {
            self.push_record(idx);
        }
    }

    /// Move every available CQE into `self.cqes`, then process them. Returns how many CQEs.
    fn drain_cq(&mut self) -> usize {
        self.cqes.clear();
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let n = self.cqes.len();
        for i in 0..n {
            let (ud, res) = self.cqes[i];
            self.on_cqe(ud as usize, res);
        }
        n
    }
}

impl Queue for UringQueue {
    fn kind(&self) -> BackendKind {
        BackendKind::IoUring
    }

    fn buffers_registered(&self) -> bool {
        self.buffers_registered
    }

    /// Fails with `EBUSY` while ops are in flight (their slots would change meaning). A kernel
    /// refusal to register is not an error: ops then use the plain fds.
    fn register_files(&mut self, fds: &[RawFd]) -> io::Result<()> {
        if self.in_flight != 0 {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let sub = self.ring.submitter();
        if self.files_registered {
            // Failure leaves the old table registered; a fresh registration below then fails
            // too and we fall back to plain fds, which is still correct.
            let _ = sub.unregister_files();
            self.files_registered = false;
        }
        self.files = fds.to_vec();
        if !fds.is_empty() {
            self.files_registered = sub.register_files(fds).is_ok();
        }
        Ok(())
    }

    fn submit(&mut self, op: Op) -> Result<(), Op> {
        if self.in_flight >= self.depth {
            return Err(op);
        }
        self.in_flight += 1;
        if let Some(result) = self.precheck(&op.kind) {
            let buf = match op.kind {
                OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => Some(buf),
                OpKind::Fsync { .. } | OpKind::Fallocate { .. } => None,
            };
            self.ready.push(Completion {
                user: op.user,
                result,
                buf,
            });
            return Ok(());
        }
        let rec = Record {
            user: op.user,
            kind: op.kind,
            done: 0,
        };
        let idx = match self.free_slots.pop() {
            Some(i) => {
                self.slab[i] = Some(rec);
                i
            }
            None => {
                self.slab.push(Some(rec));
                self.slab.len() - 1
            }
        };
        self.push_record(idx);
        Ok(())
    }

    /// `min` is capped at [`Queue::in_flight`], so this never waits for ops that do not exist.
    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> io::Result<()> {
        let min = min.min(self.in_flight);
        let mut spins = 0;
        loop {
            let have = self.ready.len();
            let want = min.saturating_sub(have).min(self.kernel_pending());
            let sq_pending = !self.ring.submission().is_empty();
            if want == 0 && !sq_pending {
                // Nothing to wait for and nothing to submit: just pick up what is there.
                self.drain_cq();
                if self.ready.len() >= min && self.ring.submission().is_empty() {
                    break;
                }
                continue;
            }
            match self.ring.submit_and_wait(want) {
                Ok(_) => spins = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if is_retry(&e) => {
                    // EBUSY: the CQ is full of completions we have not drained; EAGAIN: the
                    // kernel is short of memory for a moment. Drain and try again.
                    if self.drain_cq() == 0 {
                        spins += 1;
                        if spins > MAX_BUSY_SPINS {
                            return Err(e);
                        }
                        std::thread::yield_now();
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.drain_cq();
            if self.ready.len() >= min && self.ring.submission().is_empty() {
                break;
            }
        }
        self.in_flight -= self.ready.len();
        out.append(&mut self.ready);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn kick(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            // Busy or short of memory: the next reap submits them.
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || is_retry(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn arena(&mut self) -> &mut Arena {
        &mut self.arena
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still be writing into (or reading from) buffers of in-flight ops.
        // Wait for all of them before the ring and the mapping go away.
        let mut sink = Vec::new();
        while self.kernel_pending() > 0 {
            if self.reap(1, &mut sink).is_err() {
                // Cannot wait: leak the records (their buffers keep the mapping alive) rather
                // than let the kernel write into memory that may be reused.
                std::mem::forget(std::mem::take(&mut self.slab));
                return;
            }
            sink.clear();
        }
    }
}

/// A ring of `entries` entries, set up for one thread: the kernel runs completion work only
/// when that thread asks for completions (`DEFER_TASKRUN`, which needs `SINGLE_ISSUER`) rather
/// than interrupting it for each one, as fio sets up its rings. Each shard creates, submits to
/// and reaps its ring on its own thread, which is what `SINGLE_ISSUER` promises. Kernels
/// before 6.1 refuse those flags: then `COOP_TASKRUN` alone (5.19), then no flags.
fn new_ring(entries: u32) -> io::Result<IoUring> {
    if let Ok(r) = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        return Ok(r);
    }
    if let Ok(r) = IoUring::builder().setup_coop_taskrun().build(entries) {
        return Ok(r);
    }
    IoUring::new(entries)
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
    )
}

/// The `fallocate(2)` mode bits for `mode`.
pub(crate) fn falloc_flags(mode: FallocMode) -> i32 {
    match mode {
        FallocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        FallocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        FallocMode::Allocate => 0,
    }
}

/// Blocking `fallocate(2)`, retried on `EINTR`.
pub(crate) fn sync_fallocate(fd: RawFd, mode: FallocMode, off: u64, len: u64) -> io::Result<()> {
    let (off, len) = match (i64::try_from(off), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::from_raw_os_error(libc::EFBIG)),
    };
    loop {
        // SAFETY: fallocate takes no pointers; a bad fd is reported as EBADF.
        let r = unsafe { libc::fallocate(fd, falloc_flags(mode), off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::FileSlot;
    use std::os::fd::AsRawFd;

    #[test]
    fn read_write_roundtrip() {
        let arena = Arena::new(4 * 65536, 65536).unwrap();
        let mut q = match UringQueue::new(arena, 4) {
            Ok(q) => q,
            Err((_, e)) => {
                eprintln!("skip: io_uring unavailable: {e}");
                return;
            }
        };
        let f = tempfile::tempfile().unwrap();
        q.register_files(&[f.as_raw_fd()]).unwrap();
        let mut b = q.arena().take().unwrap();
        b.as_mut_slice().fill(0xab);
        q.submit(Op {
            user: 1,
            kind: OpKind::Write {
                file: FileSlot(0),
                off: 4096,
                buf: b,
                start: 0,
                len: 65536,
            },
        })
        .unwrap();
        let mut out = Vec::new();
        q.reap(1, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(*out[0].result.as_ref().unwrap(), 65536);
        let b = out.pop().unwrap().buf.unwrap();
        q.arena().put(b);
        // Read past EOF: short read completes with what exists.
        let b = q.arena().take().unwrap();
        q.submit(Op {
            user: 2,
            kind: OpKind::Read {
                file: FileSlot(0),
                off: 32768,
                buf: b,
            },
        })
        .unwrap();
        q.reap(1, &mut out).unwrap();
        let c = out.pop().unwrap();
        assert_eq!(c.user, 2);
        assert_eq!(c.result.unwrap(), 4096 + 65536 - 32768);
        assert!(c.buf.unwrap().as_slice()[..100].iter().all(|&x| x == 0xab));
        // Bad slot completes with an error, not a panic.
        q.submit(Op {
            user: 3,
            kind: OpKind::Fsync {
                file: FileSlot(9),
                data_only: false,
            },
        })
        .unwrap();
        q.reap(1, &mut out).unwrap();
        assert!(out.pop().unwrap().result.is_err());
        assert_eq!(q.in_flight(), 0);
    }
}
