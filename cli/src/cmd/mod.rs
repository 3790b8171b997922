//! The commands, one module each, and the dispatcher with qemu-img's global options.

mod amend;
mod bench;
mod check;
mod compare;
mod convert;
mod create;
mod dd;
mod info;
mod map;
mod measure;
mod resize;
mod snapshot;

use anyhow::Result;

use crate::common::{progname, report, Exit};
use crate::getopt::{self, OptSpec, Parsed};

/// The version line callers parse (`qemu-img version X.Y.Z`), naming rimg after it.
pub const VERSION: &str = concat!(
    "qemu-img version 10.0.2 (rimg ",
    env!("CARGO_PKG_VERSION"),
    ")\nCopyright (c) 2026 the rimg developers; command-line compatible with QEMU's qemu-img"
);

/// A command: its name, its entry point and its one-line summary.
struct Command {
    name: &'static str,
    run: fn(&[String]) -> Result<i32>,
    summary: &'static str,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "amend",
        run: amend::run,
        summary: "Change options of an existing disk image",
    },
    Command {
        name: "bench",
        run: bench::run,
        summary: "Run a simple image benchmark",
    },
    Command {
        name: "bitmap",
        run: snapshot::run_bitmap,
        summary: "Perform modifications of the persistent bitmap in the image",
    },
    Command {
        name: "check",
        run: check::run,
        summary: "Check basic image integrity",
    },
    Command {
        name: "commit",
        run: snapshot::run_commit,
        summary: "Commit image to its backing file",
    },
    Command {
        name: "compare",
        run: compare::run,
        summary: "Check if two images have the same contents",
    },
    Command {
        name: "convert",
        run: convert::run,
        summary: "Copy one image to another with optional format conversion",
    },
    Command {
        name: "create",
        run: create::run,
        summary: "Create and format a new image file",
    },
    Command {
        name: "dd",
        run: dd::run,
        summary: "Copy input to output with optional format conversion",
    },
    Command {
        name: "info",
        run: info::run,
        summary: "Display information about an image",
    },
    Command {
        name: "map",
        run: map::run,
        summary: "Dump image metadata",
    },
    Command {
        name: "measure",
        run: measure::run,
        summary: "Calculate the file size required for a new image",
    },
    Command {
        name: "rebase",
        run: snapshot::run_rebase,
        summary: "Change the backing file of the image",
    },
    Command {
        name: "resize",
        run: resize::run,
        summary: "Resize an image",
    },
    Command {
        name: "snapshot",
        run: snapshot::run_snapshot,
        summary: "List or manipulate snapshots in the image",
    },
];

fn top_help() -> String {
    let mut s = format!(
        "{VERSION}\nQEMU disk image utility (rimg: an io_uring data mover with qemu-img's interface).  Usage:\n\n  \
         {p} [standard options] COMMAND [--help | command options]\n\n\
         Standard options:\n  -h, --help\n     display this help and exit\n  -V, --version\n     \
         display version info and exit\n  -T,--trace TRACE\n     accepted for compatibility and ignored\n  \
         --verbose\n     print engine diagnostics (backend, fallbacks, O_DIRECT) on stderr\n\n\
         Recognized commands (run {p} COMMAND --help for command-specific help):\n\n",
        p = progname()
    );
    for c in COMMANDS {
        s.push_str(&format!("  {} - {}\n", c.name, c.summary));
    }
    s.push_str("\nSupported image formats:\n\n  ");
    let names: Vec<&str> = rimg_formats::registry::DRIVERS
        .iter()
        .map(|d| d.name())
        .collect();
    s.push_str(&names.join(" "));
    s.push_str("\n\nSee the rimg README for how to report bugs.\n");
    s
}

const GLOBAL: &[OptSpec] = &[
    getopt::o('h', "help", false),
    getopt::o('V', "version", false),
    getopt::o('T', "trace", true),
    getopt::extra("verbose", false),
];

/// Run the program with `args` (without argv[0]); returns the exit code.
pub fn run(args: &[String]) -> i32 {
    let p = progname();
    // Global options stop at the first non-option (the command name), as qemu-img's "+hVT:".
    let (opts, i) = match getopt::parse_in_order(args, GLOBAL) {
        Ok(r) => r,
        Err(e) => {
            report(&format!("{e}\nTry '{p} --help' for more info"));
            return 1;
        }
    };
    for o in &opts {
        match GLOBAL[o.idx].long {
            "help" => {
                print!("{}", top_help());
                return 0;
            }
            "version" => {
                println!("{VERSION}");
                return 0;
            }
            "verbose" => crate::common::VERBOSE.store(true, std::sync::atomic::Ordering::Relaxed),
            _ => {}
        }
    }
    let Some(name) = args.get(i) else {
        report(&format!(
            "Not enough arguments\nTry '{p} --help' for more info"
        ));
        return 1;
    };
    let Some(cmd) = COMMANDS.iter().find(|c| c.name == name.as_str()) else {
        report(&format!(
            "Command not found: {name}\nTry '{p} --help' for more info"
        ));
        return 1;
    };
    match (cmd.run)(&args[i + 1..]) {
        Ok(code) => code,
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return *code;
            }
            report(&format!("{e:#}"));
            1
        }
    }
}

/// Parsed options of one command, looked up by long name (or short letter).
pub struct Opts {
    specs: &'static [OptSpec],
    parsed: Vec<Parsed>,
    /// positional arguments, in order
    pub pos: Vec<String>,
}

impl Opts {
    /// Whether the option named `name` (long name, or a one-letter short name) was given.
    pub fn has(&self, name: &str) -> bool {
        self.parsed.iter().any(|p| self.is(p, name))
    }

    /// The last value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.parsed
            .iter()
            .rev()
            .find(|p| self.is(p, name))
            .and_then(|p| p.val.as_deref())
    }

    /// Every value of `name`, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.parsed
            .iter()
            .filter(|p| self.is(p, name))
            .filter_map(|p| p.val.as_deref())
            .collect()
    }

    fn is(&self, p: &Parsed, name: &str) -> bool {
        let s = self.specs[p.idx];
        (!s.long.is_empty() && s.long == name)
            || (name.chars().count() == 1 && s.short == name.chars().next())
    }
}

/// Parse a command's arguments; `-h`/`--help` prints `help` and exits 0; usage errors are
/// reported as qemu-img reports them.
pub fn parse(cmd: &str, args: &[String], specs: &'static [OptSpec], help: &str) -> Result<Opts> {
    match getopt::parse(args, specs) {
        Ok((parsed, pos)) => {
            let o = Opts { specs, parsed, pos };
            if o.has("help") {
                print!("{help}");
                return Err(crate::common::exit_code(0));
            }
            for obj in o.all("object") {
                crate::common::check_object(obj)?;
            }
            Ok(o)
        }
        Err(e) => {
            eprintln!(
                "{p} {cmd}: {e}\nTry '{p} {cmd} --help' for more info",
                p = progname()
            );
            Err(crate::common::exit_code(1))
        }
    }
}

/// `Expecting one image file name` and friends: a usage error with the command's help hint.
pub fn usage_error(cmd: &str, msg: &str) -> anyhow::Error {
    report(&format!(
        "{msg}\nTry '{} {cmd} --help' for more info",
        progname()
    ));
    crate::common::exit_code(1)
}
