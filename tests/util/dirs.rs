//! Working directories for the tests: a [`Dir`] to build images in and run the tools
//! from, [`TestDir`] (owned, removed at the end), [`Twin`] (one directory per tool), and
//! file-state helpers to prove inputs were left unchanged.

use std::collections::hash_map::DefaultHasher;
use std::ffi::OsStr;
use std::fs;
use std::hash::Hasher;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;

/// A directory to work in (not owned): helpers to build image files and to run the tools with
/// this directory as the working directory.
#[derive(Clone, Debug)]
pub struct Dir {
    path: PathBuf,
}

impl Dir {
    /// A helper for an existing directory.
    pub fn at(path: impl Into<PathBuf>) -> Dir {
        Dir { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A command of `tool` running here, as `qemu-img` (its `argv[0]`), the way callers that
    /// find it in `$PATH` run it.
    pub fn cmd<S: AsRef<OsStr>>(&self, tool: Tool, args: &[S]) -> Cmd {
        Cmd::new(tool.program(), tool.label(), &self.path)
            .arg0("qemu-img")
            .args(args)
    }

    /// Run rimg (as `qemu-img`) here.
    pub fn rimg<S: AsRef<OsStr>>(&self, args: &[S]) -> Run {
        self.cmd(Tool::Rimg, args).run()
    }

    /// Run the real qemu-img here.
    pub fn qemu<S: AsRef<OsStr>>(&self, args: &[S]) -> Run {
        self.cmd(Tool::Qemu, args).run()
    }

    /// Run the same read-only command with both tools here: qemu-img first, then rimg.
    pub fn both<S: AsRef<OsStr>>(&self, args: &[S]) -> Pair {
        Pair {
            qemu: self.qemu(args),
            rimg: self.rimg(args),
        }
    }

    /// Run the real qemu-io on a raw image here with `-c` commands; fails the test on error.
    pub fn qemu_io<S: AsRef<str>>(&self, image: &str, commands: &[S]) {
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for c in commands {
            args.push("-c".into());
            args.push(c.as_ref().to_string());
        }
        args.push(image.into());
        Cmd::new(QEMU_IO, "qemu-io", &self.path)
            .args(&args)
            .run()
            .assert_ok();
    }

    /// Run the real qemu-io on an image of format `fmt` here with `-c` commands; fails the
    /// test on error.
    pub fn qemu_io_fmt<S: AsRef<str>>(&self, fmt: &str, image: &str, commands: &[S]) {
        let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
        for c in commands {
            args.push("-c".into());
            args.push(c.as_ref().to_string());
        }
        args.push(image.into());
        Cmd::new(QEMU_IO, "qemu-io", &self.path)
            .args(&args)
            .run()
            .assert_ok();
    }

    /// A sparse file of `size` bytes (no data at all).
    pub fn sparse(&self, name: &str, size: u64) -> &Dir {
        let f = fs::File::create(self.join(name)).expect("create sparse file");
        f.set_len(size).expect("set length");
        self
    }

    /// A sparse file of `size` bytes with `pattern` byte written by qemu-io at each
    /// `(pattern, offset, length)`.
    pub fn patterned(&self, name: &str, size: u64, writes: &[(u8, u64, u64)]) -> &Dir {
        self.sparse(name, size);
        self.write_patterns(name, writes)
    }

    /// Write `(pattern, offset, length)` ranges into an existing file with qemu-io.
    pub fn write_patterns(&self, name: &str, writes: &[(u8, u64, u64)]) -> &Dir {
        if writes.is_empty() {
            return self;
        }
        let cmds: Vec<String> = writes
            .iter()
            .map(|(p, off, len)| format!("write -P {p:#x} {off} {len}"))
            .collect();
        self.qemu_io(name, &cmds);
        self
    }

    /// A fully written file of `size` pseudo-random bytes (deterministic for a `seed`).
    pub fn dense(&self, name: &str, size: u64, seed: u64) -> &Dir {
        let mut f = fs::File::create(self.join(name)).expect("create dense file");
        let mut rng = XorShift::new(seed);
        let mut left = size;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n]).expect("write dense file");
            left -= n as u64;
        }
        self
    }

    /// A fully written file of `size` bytes all equal to `byte`.
    pub fn filled(&self, name: &str, size: u64, byte: u8) -> &Dir {
        let mut f = fs::File::create(self.join(name)).expect("create filled file");
        let buf = vec![byte; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n]).expect("write filled file");
            left -= n as u64;
        }
        self
    }

    /// Truncate or extend (with a hole) an existing file.
    pub fn set_len(&self, name: &str, len: u64) -> &Dir {
        fs::OpenOptions::new()
            .write(true)
            .open(self.join(name))
            .and_then(|f| f.set_len(len))
            .unwrap_or_else(|e| panic!("set length of {name}: {e}"));
        self
    }

    /// A file with exactly these bytes.
    pub fn write_bytes(&self, name: &str, bytes: &[u8]) -> &Dir {
        fs::write(self.join(name), bytes).expect("write file");
        self
    }

    /// Create a sub-directory.
    pub fn mkdir(&self, name: &str) -> &Dir {
        fs::create_dir_all(self.join(name)).expect("mkdir");
        self
    }

    /// Whether `name` exists (without following a final symlink).
    pub fn exists(&self, name: &str) -> bool {
        fs::symlink_metadata(self.join(name)).is_ok()
    }

    /// File length in bytes.
    pub fn len(&self, name: &str) -> u64 {
        fs::metadata(self.join(name))
            .unwrap_or_else(|e| panic!("stat {name}: {e}"))
            .len()
    }

    /// Bytes the file system allocated to the file (`du`'s view).
    pub fn allocated(&self, name: &str) -> u64 {
        fs::metadata(self.join(name))
            .unwrap_or_else(|e| panic!("stat {name}: {e}"))
            .blocks()
            * 512
    }

    /// The whole file.
    pub fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    /// What the file is now: absent, or its length and a hash of its content.
    pub fn state(&self, name: &str) -> FileState {
        file_state(&self.join(name))
    }
}

/// An owned temp dir, removed at the end of the test.
pub struct TestDir {
    _tmp: tempfile::TempDir,
    dir: Dir,
}

impl TestDir {
    /// A fresh empty directory.
    pub fn new() -> TestDir {
        let tmp = tempfile::Builder::new()
            .prefix("rimg-test-")
            .tempdir()
            .expect("create temp dir");
        let dir = Dir::at(tmp.path());
        TestDir { _tmp: tmp, dir }
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for TestDir {
    type Target = Dir;
    fn deref(&self) -> &Dir {
        &self.dir
    }
}

/// Two directories built the same way, one for each tool: for commands that write, each tool
/// gets its own copy of the inputs under the same relative names, so messages that name the
/// files still compare equal.
pub struct Twin {
    _tmp: tempfile::TempDir,
    /// qemu-img's directory
    pub q: Dir,
    /// rimg's directory
    pub r: Dir,
    /// a directory for read-only inputs both use, reached as `../s/NAME` from `q` and `r`
    pub s: Dir,
}

impl Default for Twin {
    fn default() -> Self {
        Self::new()
    }
}

impl Twin {
    /// Two fresh empty directories.
    pub fn new() -> Twin {
        let tmp = tempfile::Builder::new()
            .prefix("rimg-twin-")
            .tempdir()
            .expect("create temp dir");
        let q = Dir::at(tmp.path().join("q"));
        let r = Dir::at(tmp.path().join("r"));
        let s = Dir::at(tmp.path().join("s"));
        fs::create_dir(q.path()).expect("mkdir q");
        fs::create_dir(r.path()).expect("mkdir r");
        fs::create_dir(s.path()).expect("mkdir s");
        Twin { _tmp: tmp, q, r, s }
    }

    /// Do the same thing in both directories.
    pub fn each(&self, f: impl Fn(&Dir)) -> &Twin {
        f(&self.q);
        f(&self.r);
        self
    }

    /// The directory of `tool`.
    pub fn dir(&self, tool: Tool) -> &Dir {
        match tool {
            Tool::Qemu => &self.q,
            Tool::Rimg => &self.r,
        }
    }

    /// Run the command with qemu-img in its directory and with rimg in its own.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Pair {
        self.run_env(args, &[])
    }

    /// Like [`Twin::run`], with extra environment variables (for both).
    pub fn run_env<S: AsRef<OsStr>>(&self, args: &[S], env: &[(&str, &str)]) -> Pair {
        Pair {
            qemu: self.q.cmd(Tool::Qemu, args).envs(env).run(),
            rimg: self.r.cmd(Tool::Rimg, args).envs(env).run(),
        }
    }

    /// `Ok` when `name` is in the same state (absent, or same length and content) in both
    /// directories.
    pub fn same_file(&self, name: &str) -> Result<(), String> {
        let (q, r) = (self.q.state(name), self.r.state(name));
        if q == r {
            Ok(())
        } else {
            let detail = match (&q, &r) {
                (FileState::Present { .. }, FileState::Present { .. }) => {
                    files_equal(&self.q.join(name), &self.r.join(name))
                        .err()
                        .unwrap_or_default()
                }
                _ => String::new(),
            };
            Err(format!(
                "file {name:?} differs after the command: qemu-img left {q}, rimg left {r} {detail}"
            ))
        }
    }
}

impl Twin {
    /// The state of each of `names` in rimg's directory (the same as in qemu-img's, since both
    /// are built alike), taken before a command runs, for [`Twin::files_after`].
    pub fn states(&self, names: &[&str]) -> Vec<FileState> {
        names.iter().map(|n| self.r.state(n)).collect()
    }

    /// After `pair` ran: `Ok` when each of `names` is in the same state in both directories.
    /// One difference is accepted: when both commands failed and qemu-img left behind a file
    /// that did not exist before while rimg left nothing (a note is printed).
    pub fn files_after(
        &self,
        pair: &Pair,
        names: &[&str],
        before: &[FileState],
    ) -> Result<(), String> {
        let mut errors = Vec::new();
        for (name, before) in names.iter().zip(before) {
            if let Err(e) = self.same_file(name) {
                let cleaner = !pair.qemu.ok()
                    && !pair.rimg.ok()
                    && *before == FileState::Absent
                    && self.r.state(name) == FileState::Absent;
                if cleaner {
                    skip(&format!(
                        "`{}`: qemu-img failed and left {name:?} behind, rimg failed and left nothing",
                        pair.qemu.command
                    ));
                } else {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }
}

/// What a file is at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileState {
    /// nothing there
    Absent,
    /// a directory
    Directory,
    /// a file of `len` bytes whose content hashes to `hash`
    Present {
        /// length in bytes
        len: u64,
        /// content hash
        hash: u64,
    },
}

impl std::fmt::Display for FileState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileState::Absent => write!(f, "no file"),
            FileState::Directory => write!(f, "a directory"),
            FileState::Present { len, hash } => write!(f, "{len} bytes (hash {hash:016x})"),
        }
    }
}

/// The state of the file at `path`.
pub fn file_state(path: &Path) -> FileState {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return FileState::Absent,
    };
    if meta.is_dir() {
        return FileState::Directory;
    }
    let mut f = fs::File::open(path).expect("open for hashing");
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for hashing");
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    FileState::Present {
        len: meta.len(),
        hash: h.finish(),
    }
}

/// `Ok` when both files have the same length and bytes; else where they first differ.
pub fn files_equal(a: &Path, b: &Path) -> Result<(), String> {
    let open =
        |p: &Path| fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (la, lb) = (
        fa.metadata().map(|m| m.len()).unwrap_or(0),
        fb.metadata().map(|m| m.len()).unwrap_or(0),
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let first = loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            let o = pos + i as u64;
            break Some(format!(
                "first differing byte at offset {o} ({:#04x} vs {:#04x})",
                ba[i], bb[i]
            ));
        }
        if na != nb {
            break Some("one is a prefix of the other".to_string());
        }
        if na == 0 {
            break None;
        }
        pos += n as u64;
    };
    match first {
        None if la == lb => Ok(()),
        None => Err(format!(
            "{} ({la} bytes) and {} ({lb} bytes) differ in length",
            a.display(),
            b.display()
        )),
        Some(f) => Err(format!(
            "{} ({la} bytes) and {} ({lb} bytes) differ: {f}",
            a.display(),
            b.display()
        )),
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read error: {e}"),
        }
    }
    n
}

/// Run the real `qemu-img compare -f raw -F raw a b` in `dir`; `Ok` when it says identical.
pub fn qemu_compare_identical(dir: &Dir, a: &str, b: &str) -> Result<(), String> {
    let run = dir.qemu(&["compare", "-f", "raw", "-F", "raw", a, b]);
    if run.code() == Some(0) {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare says {a} and {b} are not identical\n{}",
            run.describe()
        ))
    }
}
