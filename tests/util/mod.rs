//! Helpers of the differential test suite: run `rimg` and the real `qemu-img` side by side on the
//! same inputs, in a temp dir, and report both commands in full when they disagree.
//!
//! rimg prefixes its messages with the basename of `argv[0]`, so it is always run through a
//! symlink named `qemu-img` (see [`rimg_link`]): its stderr then reads `qemu-img: ...` exactly
//! like the real one's and the two outputs can be compared for equality. Every command runs with
//! its working directory set to the test dir and relative file names, so outputs that contain file
//! names match too.

#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::hash::Hasher;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The real qemu-img, the oracle.
pub const QEMU_IMG: &str = "/usr/bin/qemu-img";
/// The real qemu-io, used to build fixtures.
pub const QEMU_IO: &str = "/usr/bin/qemu-io";
/// The real qemu-nbd, used to hold images open.
pub const QEMU_NBD: &str = "/usr/bin/qemu-nbd";

/// 1 KiB.
pub const K: u64 = 1024;
/// 1 MiB.
pub const M: u64 = 1024 * 1024;

/// How long one command may run before it is killed and the test fails.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Path of a symlink named `qemu-img` that points at the rimg binary under test. Created once
/// (atomically: a fresh link renamed over the old one, so concurrent test processes agree).
pub fn rimg_link() -> &'static Path {
    static LINK: OnceLock<PathBuf> = OnceLock::new();
    LINK.get_or_init(|| {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_rimg"));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rimg-as-qemu-img");
        fs::create_dir_all(&dir).expect("create the symlink dir");
        let link = dir.join("qemu-img");
        let tmp = dir.join(format!(".qemu-img.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&bin, &tmp).expect("create the qemu-img symlink");
        fs::rename(&tmp, &link).expect("install the qemu-img symlink");
        link
    })
}

/// Which program a command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// the real `/usr/bin/qemu-img`
    Qemu,
    /// rimg, run as `qemu-img` through [`rimg_link`]
    Rimg,
}

impl Tool {
    /// The executable to run.
    pub fn program(self) -> PathBuf {
        match self {
            Tool::Qemu => PathBuf::from(QEMU_IMG),
            Tool::Rimg => rimg_link().to_path_buf(),
        }
    }

    /// Name used in reports.
    pub fn label(self) -> &'static str {
        match self {
            Tool::Qemu => "qemu-img",
            Tool::Rimg => "rimg",
        }
    }
}

/// A command about to run: program, arguments, working directory, extra environment.
pub struct Cmd {
    program: PathBuf,
    arg0: Option<String>,
    label: String,
    args: Vec<OsString>,
    cwd: PathBuf,
    env: Vec<(String, String)>,
    timeout: Duration,
}

impl Cmd {
    /// A command running `program` in `cwd`.
    pub fn new(program: impl AsRef<Path>, label: &str, cwd: &Path) -> Cmd {
        Cmd {
            program: program.as_ref().to_path_buf(),
            arg0: None,
            label: label.to_string(),
            args: Vec::new(),
            cwd: cwd.to_path_buf(),
            env: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Append arguments.
    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Cmd {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Run the program with this `argv[0]` (qemu-img's getopt messages start with `argv[0]`
    /// itself, not its basename).
    pub fn arg0(mut self, arg0: &str) -> Cmd {
        self.arg0 = Some(arg0.to_string());
        self
    }

    /// Set an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Cmd {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Set the environment variables in `env`.
    pub fn envs(mut self, env: &[(&str, &str)]) -> Cmd {
        for (k, v) in env {
            self.env.push((k.to_string(), v.to_string()));
        }
        self
    }

    /// Kill the command and fail when it runs longer than this.
    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    /// The command line, shell-quoted, for reports.
    pub fn command_line(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.env {
            let _ = write!(s, "{k}={} ", shell_quote(v));
        }
        if let Some(a0) = &self.arg0 {
            let _ = write!(s, "(argv[0]={}) ", shell_quote(a0));
        }
        s.push_str(&shell_quote(&self.program.to_string_lossy()));
        for a in &self.args {
            s.push(' ');
            s.push_str(&shell_quote(&a.to_string_lossy()));
        }
        s
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        if let Some(a0) = &self.arg0 {
            std::os::unix::process::CommandExt::arg0(&mut c, a0);
        }
        c.args(&self.args)
            .current_dir(&self.cwd)
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Start the command in the background with its output discarded.
    pub fn spawn_quiet(&self) -> Child {
        self.command()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.command_line()))
    }

    /// Run the command to completion (or to its timeout) and collect its output.
    pub fn run(&self) -> Run {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.command_line()));
        let mut out = child.stdout.take().expect("stdout pipe");
        let mut err = child.stderr.take().expect("stderr pipe");
        let out_reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let err_reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            match child.try_wait().expect("wait for child") {
                Some(st) => break st,
                None if start.elapsed() > self.timeout => {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait().expect("wait for killed child");
                }
                None if start.elapsed() < Duration::from_millis(100) => {
                    std::thread::sleep(Duration::from_micros(500))
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        Run {
            label: self.label.clone(),
            command: self.command_line(),
            cwd: self.cwd.clone(),
            status,
            stdout: out_reader.join().unwrap_or_default(),
            stderr: err_reader.join().unwrap_or_default(),
            timed_out,
            elapsed: start.elapsed(),
        }
    }
}

/// Quote `s` for a shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A finished command.
pub struct Run {
    /// `qemu-img`, `rimg`, `qemu-io`...
    pub label: String,
    /// the command line as run
    pub command: String,
    /// its working directory
    pub cwd: PathBuf,
    /// how it ended
    pub status: ExitStatus,
    /// everything it wrote on stdout
    pub stdout: Vec<u8>,
    /// everything it wrote on stderr
    pub stderr: Vec<u8>,
    /// killed because it ran too long
    pub timed_out: bool,
    /// how long it ran
    pub elapsed: Duration,
}

impl Run {
    /// The exit code, `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Exited with status 0.
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// stdout as text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text.
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// How it ended, in words.
    pub fn ending(&self) -> String {
        let mut s = match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => format!("{:?}", self.status),
        };
        if self.timed_out {
            s.push_str(" (TIMED OUT, killed)");
        }
        s
    }

    /// The whole run, for a failure report.
    pub fn describe(&self) -> String {
        format!(
            "--- {}: {}\n    cwd: {}\n    {} after {:.2?}\n    stdout ({} bytes):\n{}    stderr ({} bytes):\n{}",
            self.label,
            self.command,
            self.cwd.display(),
            self.ending(),
            self.elapsed,
            self.stdout.len(),
            indent(&self.out()),
            self.stderr.len(),
            indent(&self.err()),
        )
    }

    /// Something in stderr says the program panicked (or it died of a signal).
    pub fn panicked(&self) -> bool {
        let e = self.err();
        e.contains("panicked") || e.contains("RUST_BACKTRACE") || self.status.signal().is_some()
    }

    /// Fail unless it exited 0.
    pub fn assert_ok(&self) -> &Run {
        assert!(self.ok(), "command failed:\n{}", self.describe());
        self
    }

    /// Fail when it panicked.
    pub fn assert_no_panic(&self) -> &Run {
        assert!(!self.panicked(), "command panicked:\n{}", self.describe());
        self
    }
}

/// Indent every line of `s` for a report; mark an unterminated last line and show `\r`.
pub fn indent(s: &str) -> String {
    if s.is_empty() {
        return "        <empty>\n".to_string();
    }
    let mut out = String::new();
    for line in s.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b, true),
            None => (line, false),
        };
        out.push_str("        |");
        out.push_str(&body.replace('\r', "\\r"));
        if !nl {
            out.push_str("<no newline at end>");
        }
        out.push('\n');
    }
    out
}

/// The same command run by qemu-img and by rimg.
pub struct Pair {
    /// the real qemu-img's run
    pub qemu: Run,
    /// rimg's run
    pub rimg: Run,
}

impl Pair {
    /// `None` when both ended the same way and wrote the same stdout and stderr; else a report
    /// that shows both runs in full.
    pub fn diff(&self) -> Option<String> {
        self.diff_normalized(|s| s.to_string())
    }

    /// Like [`Pair::diff`], with both outputs passed through `norm` before comparing (for values
    /// that differ between two runs of qemu-img itself, such as auto-generated node names).
    pub fn diff_normalized(&self, norm: impl Fn(&str) -> String) -> Option<String> {
        let mut what = Vec::new();
        if self.rimg.panicked() {
            what.push("rimg PANICKED".to_string());
        }
        if self.rimg.timed_out {
            what.push("rimg TIMED OUT".to_string());
        }
        if self.qemu.code() != self.rimg.code() {
            what.push(format!(
                "exit: qemu-img {} vs rimg {}",
                self.qemu.ending(),
                self.rimg.ending()
            ));
        }
        let (qo, ro) = (norm(&self.qemu.out()), norm(&self.rimg.out()));
        if qo != ro {
            what.push(format!("stdout differs: {}", first_difference(&qo, &ro)));
        }
        let (qe, re) = (norm(&self.qemu.err()), norm(&self.rimg.err()));
        if qe != re {
            what.push(format!("stderr differs: {}", first_difference(&qe, &re)));
        }
        if what.is_empty() {
            return None;
        }
        Some(format!(
            "=== rimg differs from qemu-img: {}\n{}{}",
            what.join("; "),
            self.qemu.describe(),
            self.rimg.describe()
        ))
    }

    /// Fail unless both ended the same way with the same stdout and stderr.
    pub fn assert_same(&self) -> &Pair {
        if let Some(d) = self.diff() {
            panic!("{d}");
        }
        self
    }

    /// Both exited 0.
    pub fn both_ok(&self) -> bool {
        self.qemu.ok() && self.rimg.ok()
    }
}

/// Where two texts first differ, in words.
pub fn first_difference(a: &str, b: &str) -> String {
    let (mut la, mut lb) = (a.split('\n'), b.split('\n'));
    let mut n = 1;
    loop {
        match (la.next(), lb.next()) {
            (Some(x), Some(y)) if x == y => n += 1,
            (x, y) => {
                return format!(
                    "line {n}: qemu-img {:?} vs rimg {:?}",
                    x.unwrap_or("<end>"),
                    y.unwrap_or("<end>")
                )
            }
        }
    }
}

/// Collects every failed check of a test and fails the test once, at the end, with all of them:
/// one run shows every difference rather than only the first.
pub struct Checks {
    failures: Vec<String>,
    passed: usize,
}

impl Default for Checks {
    fn default() -> Self {
        Self::new()
    }
}

impl Checks {
    /// No failures yet.
    pub fn new() -> Checks {
        Checks {
            failures: Vec::new(),
            passed: 0,
        }
    }

    /// Record a failure unless rimg and qemu-img agreed exactly. Returns whether they agreed.
    pub fn same(&mut self, pair: &Pair) -> bool {
        self.record(pair.diff())
    }

    /// Like [`Checks::same`], comparing after `norm`.
    pub fn same_normalized(&mut self, pair: &Pair, norm: impl Fn(&str) -> String) -> bool {
        self.record(pair.diff_normalized(norm))
    }

    fn record(&mut self, diff: Option<String>) -> bool {
        match diff {
            None => {
                self.passed += 1;
                true
            }
            Some(d) => {
                self.failures.push(d);
                false
            }
        }
    }

    /// Record a failure with `msg()` unless `cond`.
    pub fn check(&mut self, cond: bool, msg: impl FnOnce() -> String) -> bool {
        if cond {
            self.passed += 1;
        } else {
            self.failures.push(format!("=== {}", msg()));
        }
        cond
    }

    /// Record a failure when rimg panicked in `run`.
    pub fn no_panic(&mut self, run: &Run) -> bool {
        self.check(!run.panicked(), || {
            format!("rimg panicked or died\n{}", run.describe())
        })
    }

    /// Record a failure.
    pub fn fail(&mut self, msg: impl Into<String>) {
        self.failures.push(format!("=== {}", msg.into()));
    }

    /// Record a failure when `r` is an error.
    pub fn result(&mut self, r: Result<(), String>) -> bool {
        match r {
            Ok(()) => {
                self.passed += 1;
                true
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// Fail the test when anything failed.
    pub fn finish(self) {}
}

impl Drop for Checks {
    fn drop(&mut self) {
        if !self.failures.is_empty() && !std::thread::panicking() {
            panic!(
                "{} of {} checks failed:\n\n{}",
                self.failures.len(),
                self.failures.len() + self.passed,
                self.failures.join("\n\n")
            );
        }
    }
}

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

/// Print a note that a case is skipped (shown with `--nocapture`, and in the output of a failed
/// test).
pub fn skip(reason: &str) {
    eprintln!("SKIPPED: {reason}");
}

/// Whether this kernel lets us set up an io_uring (container seccomp profiles often refuse it).
pub fn io_uring_available() -> Result<(), String> {
    // struct io_uring_params is 120 bytes; all zero asks for the defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(entries, params) reads and writes exactly the 120-byte
    // io_uring_params struct we pass; on success it returns a new fd, closed right below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            4 as libc::c_long,
            params.as_mut_ptr(),
        )
    };
    if fd < 0 {
        return Err(format!(
            "io_uring_setup refused: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is the io_uring fd just returned to us and owned by nobody else.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// A small deterministic pseudo-random generator (xorshift64*), for test data.
pub struct XorShift(u64);

impl XorShift {
    /// Seeded generator (a zero seed is replaced).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fill `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Replace the auto-generated node names qemu gives anonymous block nodes (`#block123`), which
/// differ between two runs of qemu-img itself.
pub fn normalize_node_names(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i + "#block".len()]);
        rest = &rest[i + "#block".len()..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            out.push('N');
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// A process started by a test (a `qemu-nbd`, a background `rimg`...), killed when the guard is
/// dropped, even when the test fails.
pub struct KillOnDrop {
    /// what it is, for reports
    pub what: String,
    pid: i32,
    child: Option<Child>,
}

impl KillOnDrop {
    /// Guard a child of ours.
    pub fn child(what: &str, child: Child) -> KillOnDrop {
        KillOnDrop {
            what: what.to_string(),
            pid: child.id() as i32,
            child: Some(child),
        }
    }

    /// Guard a process that is not our child (a daemon that forked), by its pid.
    pub fn pid(what: &str, pid: i32) -> KillOnDrop {
        KillOnDrop {
            what: what.to_string(),
            pid,
            child: None,
        }
    }

    /// Its process id.
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Whether our child has already exited (always `false` for a non-child).
    pub fn has_exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => false,
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        match &mut self.child {
            Some(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            None => {
                let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
                // Wait (briefly) until it is gone, so its locks are released.
                let start = Instant::now();
                while kill(Pid::from_raw(self.pid), None).is_ok()
                    && start.elapsed() < Duration::from_secs(5)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if kill(Pid::from_raw(self.pid), None).is_ok() {
                    let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
                }
            }
        }
    }
}

/// Whether some process holds an OFD lock (QEMU's image locking) on the file at `path`.
pub fn has_ofd_locks(path: &Path) -> bool {
    let ino = match fs::metadata(path) {
        Ok(m) => m.ino(),
        Err(_) => return false,
    };
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 5
            && f[1] == "OFDLCK"
            && f.iter().any(|x| {
                x.rsplit(':')
                    .next()
                    .and_then(|i| i.parse::<u64>().ok())
                    .is_some_and(|i| i == ino && x.matches(':').count() == 2)
            })
    })
}
