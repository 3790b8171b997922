//! Helpers of the differential test suite: run `rimg` and the real `qemu-img` side by side on the
//! same inputs, in a temp dir, and report both commands in full when they disagree.
//!
//! rimg prefixes its messages with the basename of `argv[0]`, so it is always run through a
//! symlink named `qemu-img` (see [`rimg_link`]): its stderr then reads `qemu-img: ...` exactly
//! like the real one's and the two outputs can be compared for equality. Every command runs with
//! its working directory set to the test dir and relative file names, so outputs that contain file
//! names match too.

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod dirs;
pub use dirs::*;

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
