//! Differential property test of the I/O queues.
//!
//! One random sequence of writes, reads, fallocates and fsyncs runs through every backend
//! (io_uring with registered buffers, io_uring unregistered, the thread pool), each on its own
//! temp file, buffered and with O_DIRECT, and against a plain `Vec<u8>` model. Every read must
//! return the model's bytes, and every final file must equal the model byte for byte.
//!
//! Many ops are kept in flight so completions arrive out of order; ops whose byte ranges
//! overlap are never in flight together (a barrier reaps everything first), since their order
//! would be undefined. Backends or O_DIRECT that the machine refuses are skipped with a
//! printed reason.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Once;

use proptest::prelude::*;
use rimg_engine::io::dio::{self, DioAlign};
use rimg_engine::io::threads::ThreadQueue;
use rimg_engine::io::uring::UringQueue;
use rimg_engine::io::{Arena, Completion, FallocMode, FileSlot, Op, OpKind, Queue};

/// Ops land within this many bytes (plus one op's length).
const SPACE: u64 = 8 << 20;
/// Largest op, and the arena's chunk size.
const MAX_LEN: usize = 256 << 10;
const CHUNKS: usize = 16;
const DEPTH: usize = 8;

#[derive(Clone, Debug)]
enum TOp {
    Write {
        off: u64,
        len: usize,
        seed: u8,
    },
    Read {
        off: u64,
        len: usize,
    },
    Falloc {
        off: u64,
        len: usize,
        mode: FallocMode,
    },
    Fsync {
        data_only: bool,
    },
}

fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![1..8192usize, 1..=MAX_LEN]
}

fn op_strategy() -> impl Strategy<Value = TOp> {
    let mode = prop_oneof![
        Just(FallocMode::PunchHole),
        Just(FallocMode::ZeroRange),
        Just(FallocMode::Allocate),
    ];
    prop_oneof![
        5 => (0..SPACE, len_strategy(), any::<u8>())
            .prop_map(|(off, len, seed)| TOp::Write { off, len, seed }),
        4 => (0..SPACE, len_strategy()).prop_map(|(off, len)| TOp::Read { off, len }),
        2 => (0..SPACE, len_strategy(), mode)
            .prop_map(|(off, len, mode)| TOp::Falloc { off, len, mode }),
        1 => any::<bool>().prop_map(|data_only| TOp::Fsync { data_only }),
    ]
}

/// Round offsets down and lengths up to the O_DIRECT alignment.
fn align_op(op: &TOp, a: u64) -> TOp {
    let fix = |off: u64, len: usize| {
        let off = off / a * a;
        let len = (len as u64).div_ceil(a).max(1) * a;
        (off, (len as usize).min(MAX_LEN / a as usize * a as usize))
    };
    match *op {
        TOp::Write { off, len, seed } => {
            let (off, len) = fix(off, len);
            TOp::Write { off, len, seed }
        }
        TOp::Read { off, len } => {
            let (off, len) = fix(off, len);
            TOp::Read { off, len }
        }
        TOp::Falloc { off, len, mode } => {
            let (off, len) = fix(off, len);
            TOp::Falloc { off, len, mode }
        }
        TOp::Fsync { data_only } => TOp::Fsync { data_only },
    }
}

/// Period of the data pattern: prime, so neighbouring blocks and different seeds differ.
const PERIOD: usize = 65521;

/// Bytes written by a write of `len` at `off` with `seed`: a slice of a fixed pseudo-random
/// table (copied, not computed per byte, to keep debug builds fast).
fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..PERIOD + MAX_LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    });
    let start = (off as usize + usize::from(seed) * 4099) % PERIOD;
    table[start..start + len].to_vec()
}

/// The file as it should be.
#[derive(Default)]
struct Model {
    data: Vec<u8>,
}

impl Model {
    fn write(&mut self, off: u64, bytes: &[u8]) {
        let end = off as usize + bytes.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[off as usize..end].copy_from_slice(bytes);
    }
    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let start = (off as usize).min(self.data.len());
        let end = (off as usize + len).min(self.data.len());
        self.data[start..end].to_vec()
    }
    fn falloc(&mut self, off: u64, len: usize, mode: FallocMode) {
        let end = off as usize + len;
        match mode {
            FallocMode::Allocate => {
                if self.data.len() < end {
                    self.data.resize(end, 0);
                }
            }
            FallocMode::PunchHole | FallocMode::ZeroRange => {
                let end = end.min(self.data.len());
                if (off as usize) < end {
                    self.data[off as usize..end].fill(0);
                }
            }
        }
    }
}

/// What an op touches, for deciding which ops may be in flight together.
#[derive(Clone, Copy, Debug)]
struct Span {
    /// `[start, end)` of the bytes it reads or changes
    start: u64,
    end: u64,
    /// whether it changes those bytes
    writes: bool,
    /// whether it is a read (whose returned length depends on the file size)
    is_read: bool,
    /// for a write or allocate that extends the file: the size before it
    grows_from: Option<u64>,
}

/// The span of `op` on a file of `size` bytes; `None` for fsync. Fallocate ranges are widened
/// to whole 4 KiB blocks (the filesystem may zero partial blocks around them).
fn touched(op: &TOp, size: u64) -> Option<Span> {
    let (start, end, writes, is_read) = match *op {
        TOp::Write { off, len, .. } => (off, off + len as u64, true, false),
        TOp::Read { off, len } => (off, off + len as u64, false, true),
        TOp::Falloc { off, len, .. } => (
            off / 4096 * 4096,
            (off + len as u64).div_ceil(4096) * 4096,
            true,
            false,
        ),
        TOp::Fsync { .. } => return None,
    };
    let grows = match *op {
        TOp::Write { off, len, .. }
        | TOp::Falloc {
            off,
            len,
            mode: FallocMode::Allocate,
        } => off + len as u64 > size,
        _ => false,
    };
    Some(Span {
        start,
        end,
        writes,
        is_read,
        grows_from: grows.then_some(size),
    })
}

/// Whether the two ops' outcomes depend on their order: overlapping bytes one of them changes,
/// or a read reaching past the size a concurrent op grows the file from.
fn conflicts(a: Span, b: Span) -> bool {
    let overlap = (a.writes || b.writes) && a.start < b.end && b.start < a.end;
    let size_race = |r: Span, g: Span| r.is_read && g.grows_from.is_some_and(|s| r.end > s);
    overlap || size_race(a, b) || size_race(b, a)
}

/// What the completion of an in-flight op must show.
enum Expect {
    Read(Vec<u8>),
    Len(usize),
    Zero,
}

struct Runner<'a> {
    q: &'a mut dyn Queue,
    model: Model,
    inflight: HashMap<u64, (TOp, Expect, Option<Span>)>,
    next_user: u64,
    label: &'a str,
}

impl Runner<'_> {
    fn check(&mut self, c: Completion) {
        let (op, expect, _) = self
            .inflight
            .remove(&c.user)
            .unwrap_or_else(|| panic!("{}: unknown completion {}", self.label, c.user));
        let n = match c.result {
            Ok(n) => n,
            Err(e) => panic!("{}: {op:?} failed: {e}", self.label),
        };
        match expect {
            Expect::Read(want) => {
                let buf = c.buf.expect("read returns its buffer");
                assert_eq!(n, want.len(), "{}: {op:?} length", self.label);
                assert!(
                    buf.as_slice()[..n] == want[..],
                    "{}: {op:?} returned wrong bytes",
                    self.label
                );
                self.q.arena().put(buf);
            }
            Expect::Len(len) => {
                assert_eq!(n, len, "{}: {op:?}", self.label);
                self.q.arena().put(c.buf.expect("write returns its buffer"));
            }
            Expect::Zero => {
                assert_eq!(n, 0, "{}: {op:?}", self.label);
                assert!(c.buf.is_none());
            }
        }
    }

    fn reap(&mut self, min: usize) {
        let mut out = Vec::new();
        self.q
            .reap(min, &mut out)
            .unwrap_or_else(|e| panic!("{}: reap: {e}", self.label));
        assert!(out.len() >= min.min(self.inflight.len()));
        for c in out {
            self.check(c);
        }
    }

    fn drain(&mut self) {
        while !self.inflight.is_empty() {
            self.reap(self.inflight.len());
        }
        assert_eq!(self.q.in_flight(), 0, "{}", self.label);
    }

    fn run(&mut self, op: TOp, step: usize) {
        let range = touched(&op, self.model.data.len() as u64);
        if let Some(r) = range {
            if self
                .inflight
                .values()
                .any(|(_, _, o)| o.is_some_and(|o| conflicts(o, r)))
            {
                self.drain();
            }
        }
        let user = self.next_user;
        self.next_user += 1;
        let file = FileSlot(0);
        let (kind, expect) = match op {
            TOp::Write { off, len, seed } => {
                let bytes = pattern(seed, off, len);
                self.model.write(off, &bytes);
                let mut buf = self.take_buf();
                // Odd seeds write from 4 KiB into the buffer (aligned for any O_DIRECT
                // memory alignment), to exercise `start`.
                let start = if seed % 2 == 1 && len + 4096 <= buf.len() {
                    4096
                } else {
                    0
                };
                buf.as_mut_slice()[start..start + len].copy_from_slice(&bytes);
                (
                    OpKind::Write {
                        file,
                        off,
                        buf,
                        start,
                        len,
                    },
                    Expect::Len(len),
                )
            }
            TOp::Read { off, len } => {
                let mut buf = self.take_buf();
                buf.as_mut_slice().fill(0xee);
                buf.set_len(len);
                (
                    OpKind::Read { file, off, buf },
                    Expect::Read(self.model.read(off, len)),
                )
            }
            TOp::Falloc { off, len, mode } => {
                self.model.falloc(off, len, mode);
                let len = len as u64;
                (
                    OpKind::Fallocate {
                        file,
                        mode,
                        off,
                        len,
                    },
                    Expect::Zero,
                )
            }
            TOp::Fsync { data_only } => (OpKind::Fsync { file, data_only }, Expect::Zero),
        };
        self.inflight.insert(user, (op, expect, range));
        let mut op = Op { user, kind };
        loop {
            match self.q.submit(op) {
                Ok(()) => break,
                Err(back) => {
                    assert_eq!(self.q.in_flight(), self.q.depth(), "{}", self.label);
                    op = back;
                    self.reap(1);
                }
            }
        }
        // Now and then look for completions without waiting.
        if step % 3 == 2 {
            self.reap(0);
        }
    }

    fn take_buf(&mut self) -> rimg_engine::io::Buf {
        loop {
            if let Some(b) = self.q.arena().take() {
                return b;
            }
            self.reap(1);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    UringRegistered,
    UringPlain,
    Threads,
}

fn make_queue(backend: Backend) -> Option<Box<dyn Queue>> {
    let arena = Arena::new(CHUNKS * MAX_LEN, MAX_LEN).expect("arena");
    static URING_SKIP: Once = Once::new();
    let uring = |arena, register| match UringQueue::with_buffer_registration(arena, DEPTH, register)
    {
        Ok(q) => Some(Box::new(q) as Box<dyn Queue>),
        Err((_, e)) => {
            URING_SKIP.call_once(|| eprintln!("skip io_uring cases: io_uring unavailable: {e}"));
            None
        }
    };
    match backend {
        Backend::UringRegistered => uring(arena, true),
        Backend::UringPlain => uring(arena, false),
        Backend::Threads => Some(Box::new(
            ThreadQueue::new(arena, DEPTH, rimg_engine::io::threads::DEFAULT_WORKERS)
                .expect("threads"),
        )),
    }
}

fn run_case(ops: &[TOp], backend: Backend, direct: bool) {
    static DIO_SKIP: Once = Once::new();
    static REG_NOTE: Once = Once::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    std::fs::File::create(&path).expect("create");
    let file = match dio::open_file(&path, true, direct) {
        Ok(f) => f,
        Err(e) if direct && dio::is_dio_refused(&e) => {
            DIO_SKIP.call_once(|| eprintln!("skip O_DIRECT cases: {e}"));
            return;
        }
        Err(e) => panic!("open {}: {e}", path.display()),
    };
    let Some(mut q) = make_queue(backend) else {
        return;
    };
    if let Backend::UringRegistered = backend {
        if !q.buffers_registered() {
            REG_NOTE.call_once(|| {
                eprintln!("note: buffer registration refused (RLIMIT_MEMLOCK?); unregistered path")
            });
        }
    }
    q.register_files(&[file.as_raw_fd()])
        .expect("register_files");
    let align: DioAlign = if direct {
        dio::dio_alignment(&file).expect("dio_alignment")
    } else {
        DioAlign { mem: 1, offset: 1 }
    };
    assert!(align.mem <= 4096, "arena chunks are only 4096-aligned");
    let label = format!("{backend:?} direct={direct}");
    let mut r = Runner {
        q: &mut *q,
        model: Model::default(),
        inflight: HashMap::new(),
        next_user: 0,
        label: &label,
    };
    for (i, op) in ops.iter().enumerate() {
        let op = if direct {
            align_op(op, u64::from(align.offset))
        } else {
            op.clone()
        };
        r.run(op, i);
    }
    r.drain();
    let model = std::mem::take(&mut r.model.data);
    let free = r.q.arena().free_count();
    assert_eq!(free, CHUNKS, "{label}: buffers lost");
    drop(q);
    drop(file);
    let on_disk = std::fs::read(&path).expect("read back");
    assert_eq!(on_disk.len(), model.len(), "{label}: file size");
    if on_disk != model {
        let i = (0..model.len()).find(|&i| on_disk[i] != model[i]);
        panic!("{label}: file differs from the model, first at byte {i:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn queues_match_model(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        for backend in [Backend::UringRegistered, Backend::UringPlain, Backend::Threads] {
            for direct in [false, true] {
                run_case(&ops, backend, direct);
            }
        }
    }
}

/// Dropping a queue with ops in flight must wait for them (no kernel writes into freed memory)
/// and must not hang.
#[test]
fn drop_with_ops_in_flight() {
    for backend in [Backend::UringRegistered, Backend::Threads] {
        let Some(mut q) = make_queue(backend) else {
            continue;
        };
        let f = tempfile::tempfile().expect("tempfile");
        q.register_files(&[f.as_raw_fd()]).expect("register");
        for i in 0..DEPTH as u64 {
            let buf = q.arena().take().expect("buf");
            let op = Op {
                user: i,
                kind: OpKind::Write {
                    file: FileSlot(0),
                    off: i * MAX_LEN as u64,
                    buf,
                    start: 0,
                    len: MAX_LEN,
                },
            };
            q.submit(op).expect("room");
        }
        let extra = q.arena().take().expect("buf");
        let back = q.submit(Op {
            user: 99,
            kind: OpKind::Read {
                file: FileSlot(0),
                off: 0,
                buf: extra,
            },
        });
        assert!(
            back.is_err(),
            "{backend:?}: queue over depth accepted an op"
        );
        drop(q);
        assert_eq!(
            f.metadata().expect("metadata").len(),
            (DEPTH * MAX_LEN) as u64,
            "{backend:?}: writes finished before drop returned"
        );
    }
}
