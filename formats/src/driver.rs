//! The contracts between format drivers and the rest of rimg.
//!
//! - [`FormatDriver`]: one static per format; probing, opening, creating, option tables.
//! - [`Image`]: an open image, shared by every shard (`Send + Sync`). Answers mapping
//!   queries with [`Extent`]s; never touches data bytes.
//! - [`ImageWriter`]: QEMU's proven two-phase write: `allocate` reserves host space and
//!   returns [`Placement`]s, the engine writes the data, `commit` publishes the metadata.
//!
//! Units: every offset and length is in bytes. Guest offsets are [`GuestOff`], host offsets
//! [`HostOff`]; a [`FileId`] indexes [`Image::files`].

use std::sync::Arc;

use crate::error::Result;
use crate::extent::Extent;
use crate::file::{FileLayer, FileOpen};
use crate::lock::Perms;
use crate::opts::{OptionDesc, OptionMap};
use crate::types::{FileId, GuestOff, HostOff};

/// What an open is for; decides read-write and the QEMU lock bytes, exactly as qemu-img's
/// commands take them (measured with strace on qemu-img 10.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Access {
    /// `info`: read-only, no locks taken or checked at all
    Info,
    /// read-only, holds "consistent read", shares everything (map, check, measure, compare,
    /// dd input, backing files, convert sources with `-U`)
    #[default]
    Read,
    /// read-only, holds "consistent read", refuses to share write and resize (convert sources)
    ReadUnshared,
    /// read-write, holds read and write, shares everything (convert/dd targets, amend ...)
    Write,
    /// read-write, holds read, write and resize, shares everything (resize)
    Resize,
}

/// An internal snapshot (`info`'s snapshot list, `convert -l`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// unique id string
    pub id: String,
    /// name (tag)
    pub name: String,
    /// saved VM state size in bytes
    pub vm_state_size: u64,
    /// creation time, seconds since the epoch
    pub date_sec: u32,
    /// creation time, nanoseconds part
    pub date_nsec: u32,
    /// guest clock at the snapshot, nanoseconds
    pub vm_clock_nsec: u64,
    /// instruction count, when recorded
    pub icount: Option<u64>,
    /// virtual disk size at the snapshot
    pub disk_size: u64,
    /// host offset of its L1 table
    pub l1_offset: u64,
    /// entries in its L1 table
    pub l1_size: u32,
}

/// The encryption of an image's data: sector `n` of the IV sequence is the 512 bytes at
/// host offset `base + n * 512` of `file`.
#[derive(Clone)]
pub struct Encryption {
    /// which of the image's files holds encrypted data
    pub file: FileId,
    /// host offset of IV sector 0
    pub base: u64,
    /// the cipher, keyed
    pub cipher: Arc<dyn crate::crypto::cipher::SectorCipher>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryption")
            .field("file", &self.file)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// How an image is to be opened.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// what for (read-write or not, which locks)
    pub access: Access,
    /// `-U`/`--force-share`: a read-only open shares every permission
    pub force_share: bool,
    /// do not take image locks at all (`file.locking=off`)
    pub no_lock: bool,
    /// read this internal snapshot instead of the active image (`convert -l`); read-only
    pub snapshot: Option<String>,
    /// opened by `check` (QEMU's BDRV_O_CHECK): inconsistencies that would refuse the open
    /// are left for [`Image::check`] to report
    pub check: bool,
    /// the key secret of an encrypted image (`encrypt.key-secret`), as bytes
    pub key: Option<Vec<u8>>,
}

impl OpenOptions {
    /// Options for `access` with defaults otherwise.
    pub fn new(access: Access) -> OpenOptions {
        OpenOptions {
            access,
            ..Default::default()
        }
    }

    /// Whether the image is opened read-write.
    pub fn write(&self) -> bool {
        matches!(self.access, Access::Write | Access::Resize)
    }

    /// The [`FileOpen`] for the image's own file.
    pub fn file_open(&self) -> FileOpen {
        let rd = Perms::CONSISTENT_READ;
        let (perm, shared, lock) = match self.access {
            Access::Info => (rd, Perms::ALL, false),
            Access::Read => (rd, Perms::ALL, true),
            Access::ReadUnshared if self.force_share => (rd, Perms::ALL, true),
            Access::ReadUnshared => (rd, rd.or(Perms::WRITE_UNCHANGED), true),
            Access::Write => (rd.or(Perms::WRITE), Perms::ALL, true),
            Access::Resize => (rd.or(Perms::WRITE).or(Perms::RESIZE), Perms::ALL, true),
        };
        FileOpen {
            write: self.write(),
            perm,
            shared,
            lock: lock && !self.no_lock,
        }
    }
}

/// Preallocation modes (`-o preallocation=` and `resize --preallocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// nothing allocated up front
    #[default]
    Off,
    /// metadata only (qcow2 and friends)
    Metadata,
    /// `fallocate` the data area
    Falloc,
    /// write zeros over the data area
    Full,
}

impl Preallocation {
    /// Parse qemu's name for the mode.
    pub fn parse(s: &str) -> Option<Preallocation> {
        Some(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return None,
        })
    }
    /// qemu's name for the mode.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// What `create` is asked to make.
#[derive(Clone, Debug)]
pub struct CreateSpec {
    /// path of the image file to create
    pub path: String,
    /// virtual size in bytes
    pub size: u64,
    /// validated `-o` options (the driver's own names; `size` is in `size`)
    pub options: OptionMap,
}

/// A backing file as recorded in an image header. Not opened here: see [`crate::Chain`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingRef {
    /// the name as stored (may be relative to the image's directory)
    pub name: String,
    /// the format as stored (`backing_fmt`), if any
    pub format: Option<String>,
}

/// A format driver: one static per format, listed in [`crate::registry::DRIVERS`].
pub trait FormatDriver: Sync {
    /// The format's name, exactly qemu-img's `-f` name.
    fn name(&self) -> &'static str;
    /// How sure the driver is that an image starting with `head` (up to 2 KiB of the file;
    /// shorter for short files) of total length `file_len` is its format: 0 = not mine,
    /// 1 = fallback (raw), 100 = certain (a magic number matched).
    fn probe(&self, head: &[u8], file_len: u64) -> u32;
    /// Open an image whose file is `file`. Must validate every header field before use and
    /// bound every allocation by the file size; must not do data I/O.
    fn open(&self, file: Arc<FileLayer>, opts: &OpenOptions) -> Result<Box<dyn Image>>;
    /// The options `create`, `measure` and `amend` accept for this format, in the order
    /// qemu-img prints them in the `Formatting` line.
    fn create_options(&self) -> &'static [OptionDesc];
    /// Check `-o` names and value types as qemu's option parser does (before anything is
    /// printed or created). The default checks against the create and protocol options.
    fn check_options(&self, opts: &OptionMap) -> Result<()> {
        let all: Vec<OptionDesc> = self
            .create_options()
            .iter()
            .chain(self.protocol_options())
            .copied()
            .collect();
        opts.validate(&all)
    }
    /// qemu-img's `Formatting '...'` line for this format, when it has its own layout
    /// (`None`: format, size, then the given options in declaration order).
    fn formatting_line(&self, path: &str, size: u64, opts: &OptionMap) -> Option<String> {
        let _ = (path, size, opts);
        None
    }
    /// Whether `convert -c` can write this format compressed.
    fn supports_compression(&self) -> bool {
        false
    }
    /// Options of the protocol layer under this format (`file`), accepted by `create` too.
    fn protocol_options(&self) -> &'static [OptionDesc] {
        crate::file::FILE_OPTIONS
    }
    /// Create a new image as `spec` says (the file is created or truncated). Writes metadata
    /// only; data preallocation the driver cannot do with `fallocate` (writing zeros for
    /// `preallocation=full`) is returned as [`Action`]s on the new image's files for the
    /// engine to perform.
    fn create(&self, spec: &CreateSpec) -> Result<Vec<Action>>;
    /// Bytes a new image needs: `(required, fully_allocated)` for an image of `size` bytes.
    /// `data` lists the guest ranges `(start, len)` of the source that hold data (allocated
    /// and not reading as zeros), in order; `None` when measuring from `--size`.
    fn measure(
        &self,
        size: u64,
        data: Option<&[(u64, u64)]>,
        options: &OptionMap,
    ) -> Result<(u64, u64)>;
}

/// An open image. Shared by all shards; every method takes `&self`.
pub trait Image: Send + Sync {
    /// The driver's name (`raw`, `qcow2` ...).
    fn format(&self) -> &'static str;
    /// Virtual (guest) size in bytes.
    fn virtual_size(&self) -> u64;
    /// The host files holding this image's data; [`FileId`] `i` is `files()[i]`. File 0 is
    /// the image file itself.
    fn files(&self) -> &[Arc<FileLayer>];
    /// The backing file recorded in the image, if any (not opened).
    fn backing(&self) -> Option<BackingRef> {
        None
    }
    /// Describe `len` bytes from `off` (a hint: the driver may stop early, e.g. at a table
    /// boundary). Appends extents to `out`, merged where contiguous, and returns the number
    /// of guest bytes covered. Returns 0 only when `off >= virtual_size()`. Extents past the
    /// virtual size are never returned.
    fn map(&self, off: GuestOff, len: u64, out: &mut Vec<Extent>) -> Result<u64>;
    /// The cluster size, for formats that have one (`cluster-size` in `info`).
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// Child nodes `info` lists besides `file` (QEMU's `children`), in the order QEMU
    /// prints them (before `file`): a name such as `extents.0` and the file. The default
    /// has none.
    fn child_files(&self) -> Vec<(String, FileId)> {
        Vec::new()
    }
    /// The name human `map` prints for file `file` of this image (`None`: the CLI's
    /// default, the image name for file 0 and an absolute path otherwise).
    fn map_file_name(&self, file: FileId) -> Option<String> {
        let _ = file;
        None
    }
    /// The `format-specific` data of `info --output=json` (`None` when qemu prints none).
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }
    /// Check the image's own consistency (`None`: the format has no checks, qemu-img's
    /// exit 63).
    fn check(&self) -> Option<Result<crate::qcow2::CheckReport>> {
        None
    }
    /// `check -r leaks` (`all` false) or `check -r all`: check and repair what can be
    /// repaired, reporting the repairs in `leaks_fixed` / `corruptions_fixed` and the
    /// per-cluster lines in `messages`. `None`: the format repairs nothing this way.
    fn check_repair(&self, all: bool) -> Option<Result<crate::qcow2::CheckReport>> {
        let _ = all;
        None
    }
    /// Whether `check -r` is done by this driver: opening the image read-write repaired
    /// what there was to repair, and [`Image::check`] reports it in `corruptions_fixed` /
    /// `leaks_fixed` (vhdx: the log is replayed on open).
    fn check_repairs(&self) -> bool {
        false
    }
    /// Whether QEMU reports no allocation status for this format (no `block_status`): `map`
    /// then shows every range of this layer as present data with no offset, whatever the
    /// extents say. The extents still tell the engine where the bytes are.
    fn opaque_allocation(&self) -> bool {
        false
    }
    /// The internal snapshots, in table order.
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }
    /// Whether QEMU's driver info (`bdrv_get_info`) is available for this image: when it is
    /// not (a vmdk whose extents differ in kind), `info` shows neither `cluster-size` nor
    /// `dirty-flag`. The default is `true`.
    fn info_available(&self) -> bool {
        true
    }
    /// Whether the image's data is encrypted (`encrypted` in `info`).
    fn encrypted(&self) -> bool {
        false
    }
    /// How to decrypt the image's data, when it is encrypted and was opened with its key:
    /// bytes of [`Extent::Data`] in `file` are encrypted by 512-byte sectors.
    fn encryption(&self) -> Option<Encryption> {
        None
    }
    /// Whether the image's dirty flag is set (`dirty-flag` in `info`).
    fn dirty(&self) -> bool {
        false
    }
    /// A writer, if the image was opened for writing.
    fn writer(&self) -> Result<Box<dyn ImageWriter>>;
}

/// Where the engine must write guest bytes of an allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// guest range start
    pub guest: GuestOff,
    /// guest range length
    pub len: u64,
    /// which of the image's files
    pub file: FileId,
    /// where in that file
    pub host: HostOff,
}

/// A host-side action the engine performs on behalf of a writer (no data buffer involved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// deallocate (reads return zeros)
    PunchHole {
        /// which file
        file: FileId,
        /// where
        host: HostOff,
        /// how much
        len: u64,
    },
    /// zero, keeping the blocks allocated
    ZeroRange {
        /// which file
        file: FileId,
        /// where
        host: HostOff,
        /// how much
        len: u64,
    },
    /// write zero bytes (when the file system supports neither of the above)
    WriteZeroes {
        /// which file
        file: FileId,
        /// where
        host: HostOff,
        /// how much
        len: u64,
    },
}

impl Action {
    /// The cheapest way to make `len` bytes at `host` of `layer` (the image's file `file`)
    /// read as zeros: written zeros on a block device, else a punched hole when `may_unmap`
    /// allows deallocating, else a zeroed range that keeps its blocks.
    pub fn zeroing(
        layer: &FileLayer,
        file: FileId,
        host: HostOff,
        len: u64,
        may_unmap: bool,
    ) -> Action {
        if layer.is_block_device() {
            Action::WriteZeroes { file, host, len }
        } else if may_unmap {
            Action::PunchHole { file, host, len }
        } else {
            Action::ZeroRange { file, host, len }
        }
    }
}

/// Identifies one allocation until it is committed or aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(pub u64);

/// The write side of an open image. Owned by one thread (the engine's metadata owner).
pub trait ImageWriter: Send {
    /// Reserve host space for guest bytes `[off, off+len)` and append where the engine must
    /// write them to `out`. No data I/O; no metadata is published yet.
    fn allocate(&mut self, off: GuestOff, len: u64, out: &mut Vec<Placement>) -> Result<Ticket>;
    /// Reserve `clen` bytes for the compressed form of the guest cluster at `off` (cluster
    /// aligned). The engine writes the compressed bytes at the returned placement's host
    /// offset (`len` = `clen`), then commits the ticket. Formats without compression refuse.
    fn allocate_compressed(&mut self, off: GuestOff, clen: u64) -> Result<(Placement, Ticket)> {
        let _ = (off, clen);
        Err(crate::error::Error::Unsupported(
            "Compression not supported for this file format".into(),
        ))
    }
    /// The cluster size compressed writes work in (`None`: no compression).
    fn compression_unit(&self) -> Option<(u64, crate::extent::Codec)> {
        None
    }
    /// Whether every write must be compressed (vmdk streamOptimized): `convert` then
    /// compresses without `-c`, and a unit that does not shrink is still written through
    /// [`ImageWriter::allocate_compressed`].
    fn always_compressed(&self) -> bool {
        false
    }
    /// Guest ranges `(start, len)` of units this writer allocated over a backing file that
    /// nothing has written or zeroed yet: they must hold the backing file's bytes (QEMU's
    /// copy-on-write). A caller that has those bytes (`convert -B`: the source's lower
    /// layers) writes them through `allocate`/`zero` before `flush`; `flush` refuses to
    /// publish a unit still missing some. The default has none.
    fn backing_fills(&mut self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// Whether `convert -c` writes plain (uncompressed) data into this image, as QEMU's
    /// vmdk does for extents that are not compressed. The default is `false`.
    fn compressed_writes_are_plain(&self) -> bool {
        false
    }
    /// Before `commit`: the engine wrote nothing to these guest ranges of `ticket` (they are
    /// all zeros on a target that reads as zeros). A format may drop allocations wholly
    /// inside them instead of publishing them. The default keeps everything.
    fn release_unwritten(&mut self, ticket: Ticket, zeros: &[(u64, u64)]) -> Result<()> {
        let _ = (ticket, zeros);
        Ok(())
    }
    /// Publish the metadata of allocations whose data writes have all completed.
    fn commit(&mut self, tickets: &[Ticket]) -> Result<()>;
    /// Make guest bytes `[off, off+len)` read as zeros. Appends host actions the engine must
    /// perform to `out`; `may_unmap` allows deallocating.
    fn zero(
        &mut self,
        off: GuestOff,
        len: u64,
        may_unmap: bool,
        out: &mut Vec<Action>,
    ) -> Result<()>;
    /// Change the virtual size to `new_size` (the caller has checked shrinking is allowed),
    /// preallocating any new area as `prealloc` says.
    /// Returns the zero-writing actions `preallocation=full` needs, for the engine.
    fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<Vec<Action>>;
    /// Write all metadata in order (refcounts → L2 → L1 → header) and sync.
    fn flush(&mut self) -> Result<()>;
    /// Finish: flush and clear the dirty state.
    fn close(self: Box<Self>) -> Result<()>;
}
