//! rimg's data mover.
//!
//! Every data byte rimg moves goes through here: format drivers (the `rimg-formats` crate)
//! only say where bytes live ([`rimg_formats::Extent`]) and where they go
//! ([`rimg_formats::Placement`]). The engine runs jobs ([`convert`], [`compare`],
//! [`actions`]) on a pool of shards: one pinned thread per shard, each with its own I/O
//! queue ([`io::Queue`]: an io_uring ring, or a pread/pwrite thread pool where io_uring is
//! refused) and its own slice of one memory budget.
//!
//! Commands that move no bulk data never construct an engine, so they start no threads
//! and reserve no buffers.
#![deny(missing_docs)]

pub mod actions;
pub mod bench;
pub mod compare;
mod compress;
pub mod convert;
mod copy;
mod decompress;
mod files;
pub mod io;
mod shard;
mod squeeze;
mod zero;

use std::sync::Mutex;

pub use files::CacheMode;
pub use io::BackendChoice;

/// Default total buffer memory of all shards together (bytes of address space).
pub const DEFAULT_BUDGET: usize = 64 << 20;

/// Default size of one transfer unit (and of one buffer).
pub const DEFAULT_UNIT: usize = 1 << 20;

/// Engine settings. `Default` is what the CLI uses unless told otherwise.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// number of shards; 0 = one per online CPU
    pub shards: usize,
    /// io_uring, threads, or pick automatically (`RIMG_IO` overrides `Auto`)
    pub backend: BackendChoice,
    /// total buffer memory for all shards together
    pub budget: usize,
    /// bytes per transfer unit / buffer
    pub unit: usize,
    /// a shard waits for this percentage of its ops in flight (at least one) to complete
    /// before it handles completions; 0 = each as it comes
    pub reap_batch_percent: u8,
    /// worker threads of each shard's thread-pool queue; 0 = the default (4)
    pub io_threads: usize,
    /// a job whose files are all read and written through the page cache runs on the
    /// thread pool (see [`BackendChoice::resolve`]); bench clears it, so `-i` left unset
    /// keeps its cached reads on the ring, one op per system call without a hand-over
    pub cached_reads_on_pool: bool,
}

impl Default for EngineConfig {
    /// Defaults; `RIMG_UNIT_KIB` overrides the unit size (for tuning experiments).
    fn default() -> Self {
        let unit = std::env::var("RIMG_UNIT_KIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|k| (4..=16384).contains(k) && k.is_power_of_two())
            .map_or(DEFAULT_UNIT, |k| k << 10);
        EngineConfig {
            shards: 0,
            backend: BackendChoice::Auto,
            budget: DEFAULT_BUDGET,
            unit,
            reap_batch_percent: 0,
            io_threads: 0,
            cached_reads_on_pool: true,
        }
    }
}

/// An error of a job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A format-layer error (mapping, allocation, commit).
    #[error(transparent)]
    Format(#[from] rimg_formats::Error),
    /// A data I/O failed.
    #[error("error while {what} '{path}' at offset {off}: {}", rimg_formats::error::strerror(.source))]
    Io {
        /// "reading", "writing" ...
        what: &'static str,
        /// the file
        path: String,
        /// byte offset in that file
        off: u64,
        /// the cause
        #[source]
        source: std::io::Error,
    },
    /// Reading guest data failed (a read error, or a compressed cluster that does not
    /// decode), worded as qemu-img words it.
    #[error("error while reading at byte {guest}: {}", read_strerror(.source))]
    Read {
        /// guest offset of the unit that failed
        guest: u64,
        /// the image file
        path: String,
        /// the cause
        #[source]
        source: std::io::Error,
    },
    /// Mapping a source failed at guest offset `off` (its block status could not be read).
    #[error("{source}")]
    Map {
        /// which image (as named)
        image: String,
        /// guest offset of the failed lookup
        off: u64,
        /// the cause
        #[source]
        source: rimg_formats::Error,
    },
    /// Setting up the engine failed (ring, buffers, threads).
    #[error("engine setup: {0}")]
    Setup(String),
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// The engine: configuration plus what the probes found, for `--verbose`.
pub struct Engine {
    cfg: EngineConfig,
    notes: Mutex<Vec<String>>,
}

impl Engine {
    /// An engine with `cfg`. Starts nothing: shards exist only while a job runs.
    pub fn new(cfg: EngineConfig) -> Engine {
        Engine {
            cfg,
            notes: Mutex::new(Vec::new()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Number of shards a job will start (`RIMG_SHARDS` overrides the configuration).
    pub fn shard_count(&self) -> usize {
        if let Some(n) = std::env::var("RIMG_SHARDS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
        {
            return n.min(64);
        }
        if self.cfg.shards > 0 {
            return self.cfg.shards;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 64)
    }

    /// Record a probe result or fallback once (shown with `--verbose`).
    pub(crate) fn note(&self, s: String) {
        let mut n = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        if !n.contains(&s) {
            n.push(s);
        }
    }

    /// What the probes found and which fallbacks were taken, one line each.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// QEMU reports undecodable data as an I/O error.
pub fn read_strerror(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::InvalidData {
        "Input/output error".into()
    } else {
        rimg_formats::error::strerror(e)
    }
}
