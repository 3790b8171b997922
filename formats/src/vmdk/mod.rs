//! The VMDK format (VMware's Virtual Disk Format 1.1), as QEMU reads and writes it.
//!
//! An image is a list of extents laid end to end in the guest address space. A
//! monolithicSparse or streamOptimized image is one hosted sparse extent whose file holds
//! an embedded descriptor; every other subformat is a text descriptor naming extent files
//! (FLAT/VMFS, SPARSE/VMFSSPARSE, SESPARSE). Sparse extents map grains through a grain
//! directory and grain tables (QEMU's L1/L2).
//!
//! Split by concern: [`descriptor`] (the text), `sparse` (extent headers and grain
//! directories), `map` (guest offsets into [`crate::Extent`]s), `create` and `options`
//! (new images), `write` (the writer) and `check`.

mod check;
mod create;
pub mod descriptor;
mod map;
pub mod options;
mod sparse;
mod write;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::driver::{
    Action, BackingRef, CreateSpec, FormatDriver, Image, ImageWriter, OpenOptions,
};
use crate::error::{Error, Result};
use crate::file::FileLayer;
use crate::opts::{OptionDesc, OptionMap};
use crate::types::{FileId, GuestOff};

/// The vmdk driver.
pub struct VmdkDriver;

/// The one instance, listed in [`crate::registry::DRIVERS`].
pub static VMDK: VmdkDriver = VmdkDriver;

/// The `createType`s QEMU opens from a descriptor file.
const DESCRIPTOR_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

/// Descriptor bytes QEMU reads at most.
const MAX_DESC: u64 = (1 << 20) - 1;

/// What QEMU's `vmdk_probe` says about a file head.
fn probe_head(buf: &[u8]) -> u32 {
    if buf.len() < 4 {
        return 0;
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic == sparse::VMDK3_MAGIC || magic == sparse::VMDK4_MAGIC {
        return 100;
    }
    let mut p = 0;
    let end = buf.len();
    while p < end {
        if buf[p] == b'#' {
            while p < end && buf[p] != b'\n' {
                p += 1;
            }
            p += 1;
            continue;
        }
        if buf[p] == b' ' {
            while p < end && buf[p] == b' ' {
                p += 1;
            }
            if p < end && buf[p] == b'\r' {
                p += 1;
            }
            if p == end || buf[p] != b'\n' {
                return 0;
            }
            p += 1;
            continue;
        }
        let rest = &buf[p..];
        for v in [b'1', b'2', b'3'] {
            let lf = [b"version=".as_slice(), &[v, b'\n']].concat();
            let crlf = [b"version=".as_slice(), &[v, b'\r', b'\n']].concat();
            if rest.starts_with(&lf) || rest.starts_with(&crlf) {
                return 100;
            }
        }
        return 0;
    }
    0
}

impl FormatDriver for VmdkDriver {
    fn name(&self) -> &'static str {
        "vmdk"
    }

    fn probe(&self, head: &[u8], _file_len: u64) -> u32 {
        probe_head(head)
    }

    fn open(&self, file: Arc<FileLayer>, opts: &OpenOptions) -> Result<Box<dyn Image>> {
        if opts.snapshot.is_some() {
            return Err(Error::Snapshot(
                "Block format 'vmdk' used by device '' does not support temporarily loading internal snapshots"
                    .into(),
            ));
        }
        Ok(Box::new(VmdkImage::open(file, opts)?))
    }

    fn create_options(&self) -> &'static [OptionDesc] {
        options::VMDK_OPTIONS
    }

    fn formatting_line(&self, path: &str, size: u64, opts: &OptionMap) -> Option<String> {
        Some(options::formatting_line(path, size, opts))
    }

    fn supports_compression(&self) -> bool {
        true
    }

    fn create(&self, spec: &CreateSpec) -> Result<Vec<Action>> {
        create::create(spec)
    }

    fn measure(
        &self,
        _size: u64,
        _data: Option<&[(u64, u64)]>,
        _options: &OptionMap,
    ) -> Result<(u64, u64)> {
        Err(Error::Unsupported(
            "Block driver 'vmdk' does not support size measurement".into(),
        ))
    }
}

/// Grain directory and tables of a sparse extent.
#[derive(Clone, Debug)]
pub(crate) struct SparseExtent {
    /// grains are deflate-compressed (streamOptimized)
    pub compressed: bool,
    /// grains start with a 12-byte marker (lba, size)
    pub has_marker: bool,
    /// grain table entry 1 reads as zeros
    pub has_zero_grain: bool,
    /// seSparse layout (64-bit tables)
    pub sesparse: bool,
    /// grain size in sectors
    pub cluster_sectors: u64,
    /// entries per grain table
    pub l2_size: u32,
    /// sectors one grain directory entry covers
    pub l1_entry_sectors: u32,
    /// grain directory, bytes
    pub l1_offset: u64,
    /// redundant grain directory, bytes (0: none)
    pub l1_backup_offset: u64,
    /// grain directory entries (sectors of grain tables; seSparse: raw entries)
    pub l1: Vec<u64>,
    /// redundant grain directory entries
    pub l1_backup: Option<Vec<u32>>,
    /// seSparse: grain tables area, sectors
    pub se_l2_tables_offset: u64,
    /// seSparse: grains area, sectors
    pub se_clusters_offset: u64,
    /// the header says the grain directory is at the end (found through the footer)
    pub gd_at_end: bool,
}

impl SparseExtent {
    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.cluster_sectors * 512
    }
}

/// How an extent stores its guest bytes.
#[derive(Clone, Debug)]
pub(crate) enum ExtentKind {
    /// verbatim, from `offset` bytes into the file
    Flat {
        /// start of the extent's data in its file, bytes
        offset: u64,
    },
    /// grains through a grain directory
    Sparse(Box<SparseExtent>),
}

/// One extent of an image.
#[derive(Clone, Debug)]
pub(crate) struct Extent {
    /// which of the image's files
    pub file: FileId,
    /// the type as the descriptor names it (`""` for a monolithic image's own extent)
    pub kind_name: String,
    /// size in sectors
    pub sectors: u64,
    /// guest offset of the extent's first byte
    pub start: u64,
    /// layout
    pub kind: ExtentKind,
    /// length of the extent's file at open
    pub file_len: u64,
}

impl Extent {
    /// Guest bytes the extent covers.
    pub fn len(&self) -> u64 {
        self.sectors.saturating_mul(512)
    }

    /// The sparse metadata, if the extent is sparse.
    pub fn sparse(&self) -> Option<&SparseExtent> {
        match &self.kind {
            ExtentKind::Sparse(s) => Some(s),
            ExtentKind::Flat { .. } => None,
        }
    }
}

/// Grain tables read so far: (extent index, grain directory index) -> entries.
type GtCache = HashMap<(usize, u64), Arc<Vec<u64>>>;

/// Grain tables kept in the cache before it is emptied.
const GT_CACHE_MAX: usize = 256;

/// An open vmdk image.
pub struct VmdkImage {
    files: Vec<Arc<FileLayer>>,
    extents: Vec<Extent>,
    create_type: String,
    cid: u32,
    parent_cid: u32,
    /// where the descriptor is in file 0 (0x200 in a sparse file, 0 in a descriptor file)
    desc_offset: u64,
    backing: Option<BackingRef>,
    size: u64,
    write: bool,
    gt_cache: Mutex<GtCache>,
    /// opened as a convert source over a parent whose CID is not our parent CID: QEMU
    /// then refuses to read the grains the parent would supply
    stale_parent: bool,
}

fn corrupt(path: &str, what: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_string(),
        what: what.into(),
    }
}

/// Open a sparse extent file (`SPARSE`/`VMFSSPARSE` lines, or the image itself).
fn open_sparse_file(
    f: &FileLayer,
    id: FileId,
    kind: &str,
    write: bool,
    head: &[u8],
) -> Result<Extent> {
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    match magic {
        sparse::VMDK3_MAGIC => sparse::open_vmdk3(f, id, kind),
        sparse::VMDK4_MAGIC => sparse::open_vmdk4(f, id, kind, write),
        _ => Err(corrupt(f.path(), "Image not in VMDK format")),
    }
}

/// The first bytes of `f` (QEMU's `vmdk_read_desc`): at least 4, at most 1 MiB - 1.
fn read_head(f: &FileLayer) -> Result<Vec<u8>> {
    // QEMU sees file lengths in whole sectors.
    let len = f.len()?.div_ceil(512) * 512;
    if len < 4 {
        return Err(corrupt(f.path(), "File is too small, not a valid image"));
    }
    sparse::read_padded(f, 0, len.min(MAX_DESC) as usize, "VMDK descriptor")
}

/// The directory part of `path` (up to and including the last `/`), as QEMU joins extent
/// names to it.
fn dir_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(i) => &path[..=i],
        None => "",
    }
}

/// The CID of the vmdk image at `path`, when it can be read (QEMU's `vmdk_read_cid` on
/// the parent).
fn parent_cid_of(path: &str) -> Option<u32> {
    let o = crate::file::FileOpen {
        lock: false,
        ..crate::file::FileOpen::read_only()
    };
    let f = FileLayer::open(path, &o).ok()?;
    let head = read_head(&f).ok()?;
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let at = if magic == sparse::VMDK3_MAGIC || magic == sparse::VMDK4_MAGIC {
        0x200
    } else {
        0
    };
    let mut d = sparse::read_padded(&f, at, descriptor::DESC_SIZE, "descriptor").ok()?;
    d.push(0);
    descriptor::read_cid(descriptor::c_str(&d), false)
}

impl VmdkImage {
    /// Open and validate every extent; grain tables are read on demand.
    pub fn open(file: Arc<FileLayer>, opts: &OpenOptions) -> Result<VmdkImage> {
        let path = file.path().to_string();
        let write = opts.write();
        let head = read_head(&file)?;
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let mut files = vec![file.clone()];
        let mut extents = Vec::new();
        let (create_type, desc_offset) =
            if magic == sparse::VMDK3_MAGIC || magic == sparse::VMDK4_MAGIC {
                let e = open_sparse_file(&file, FileId(0), "", write, &head)?;
                let ct = match e.sparse() {
                    Some(s) if s.compressed => "streamOptimized",
                    _ if magic == sparse::VMDK4_MAGIC => "monolithicSparse",
                    _ => "",
                };
                extents.push(e);
                (ct.to_string(), 0x200)
            } else {
                let desc = descriptor::c_str(&head);
                let Some(ct) = descriptor::quoted_value(desc, "createType", 128) else {
                    return Err(corrupt(&path, "invalid VMDK image descriptor"));
                };
                if !DESCRIPTOR_TYPES.contains(&ct.as_str()) {
                    return Err(Error::Unsupported(format!("Unsupported image type '{ct}'")));
                }
                let (lines, invalid) = descriptor::extent_lines(desc);
                for l in lines {
                    let epath = if l.file.starts_with('/') {
                        l.file.clone()
                    } else {
                        format!("{}{}", dir_of(&path), l.file)
                    };
                    let ef = Arc::new(FileLayer::open(&epath, &opts.file_open())?);
                    let id = FileId(files.len() as u32);
                    let e = match l.kind.as_str() {
                        "FLAT" | "VMFS" => Extent {
                            file: id,
                            kind_name: l.kind.clone(),
                            sectors: l.sectors,
                            start: 0,
                            kind: ExtentKind::Flat {
                                offset: l.flat_offset.saturating_mul(512),
                            },
                            file_len: ef.len()?,
                        },
                        "SESPARSE" => {
                            if write {
                                return Err(Error::Unsupported(
                                    "No write support for seSparse images available".into(),
                                ));
                            }
                            sparse::open_sesparse(&ef, id, &l.kind)?
                        }
                        _ => {
                            let h = read_head(&ef)?;
                            open_sparse_file(&ef, id, &l.kind, write, &h)?
                        }
                    };
                    files.push(ef);
                    extents.push(e);
                }
                if let Some(l) = invalid {
                    return Err(corrupt(&path, format!("Invalid extent line: {}", l.0)));
                }
                (ct, 0)
            };
        if extents.is_empty() {
            return Err(corrupt(
                &path,
                "invalid VMDK image descriptor: no usable extent",
            ));
        }
        let mut start = 0u64;
        for e in &mut extents {
            e.start = start;
            start = start.saturating_add(e.len());
        }
        if start > i64::MAX as u64 {
            return Err(corrupt(&path, "Can't get image size: File too large"));
        }
        let desc = sparse::read_padded(&file, desc_offset, descriptor::DESC_SIZE, "descriptor")?;
        let mut d = desc.clone();
        d.push(0);
        let d = descriptor::c_str(&d[..descriptor::DESC_SIZE]);
        let backing = match descriptor::parent_hint(d) {
            Ok(Some(name)) => Some(BackingRef {
                name,
                format: Some("vmdk".into()),
            }),
            Ok(None) => None,
            Err(descriptor::BadHint) => return Err(corrupt(&path, "Invalid argument")),
        };
        let bad_cid = || corrupt(&path, format!("Could not open '{path}': Invalid argument"));
        let cid = descriptor::read_cid(d, false).ok_or_else(bad_cid)?;
        let parent_cid = descriptor::read_cid(d, true).ok_or_else(bad_cid)?;
        let stale_parent = opts.access == crate::driver::Access::ReadUnshared
            && backing
                .as_ref()
                .and_then(|b| parent_cid_of(&crate::chain::resolve_backing(&path, &b.name)))
                .is_some_and(|c| c != parent_cid);
        Ok(VmdkImage {
            files,
            extents,
            create_type,
            cid,
            parent_cid,
            desc_offset,
            backing,
            size: start,
            write,
            gt_cache: Mutex::new(HashMap::new()),
            stale_parent,
        })
    }

    /// Index of the extent holding guest byte `off`.
    fn find_extent(&self, off: u64) -> Option<usize> {
        self.extents
            .iter()
            .position(|e| off >= e.start && off < e.start.saturating_add(e.len()))
    }

    /// Whether every extent has the same layout (QEMU's `vmdk_extents_type_eq`): only
    /// then does `info` report a cluster size.
    fn uniform(&self) -> bool {
        let first = &self.extents[0];
        self.extents.iter().all(|e| match (&first.kind, &e.kind) {
            (ExtentKind::Flat { .. }, ExtentKind::Flat { .. }) => true,
            (ExtentKind::Sparse(a), ExtentKind::Sparse(b)) => {
                a.compressed == b.compressed && a.cluster_sectors == b.cluster_sectors
            }
            _ => false,
        })
    }
}

impl Image for VmdkImage {
    fn format(&self) -> &'static str {
        "vmdk"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn files(&self) -> &[Arc<FileLayer>] {
        &self.files
    }

    fn backing(&self) -> Option<BackingRef> {
        self.backing.clone()
    }

    fn map(&self, off: GuestOff, len: u64, out: &mut Vec<crate::extent::Extent>) -> Result<u64> {
        map::map(self, off, len, out)
    }

    fn cluster_size(&self) -> Option<u64> {
        if !self.uniform() {
            return None;
        }
        self.extents[0].sparse().map(SparseExtent::grain_bytes)
    }

    fn info_available(&self) -> bool {
        self.uniform()
    }

    fn child_files(&self) -> Vec<(String, FileId)> {
        // QEMU lists the newest child first: extents.N ... extents.0, then `file`.
        self.extents
            .iter()
            .enumerate()
            .filter(|(_, e)| e.file != FileId(0))
            .map(|(i, e)| (format!("extents.{i}"), e.file))
            .rev()
            .collect()
    }

    fn map_file_name(&self, file: FileId) -> Option<String> {
        self.files
            .get(file.0 as usize)
            .map(|f| f.path().to_string())
    }

    fn format_specific(&self) -> Option<Value> {
        let extents: Vec<Value> = self
            .extents
            .iter()
            .map(|e| {
                let mut m = Map::new();
                let s = e.sparse();
                if s.is_some_and(|s| s.compressed) {
                    m.insert("compressed".into(), json!(true));
                }
                m.insert("virtual-size".into(), json!(e.len()));
                m.insert(
                    "filename".into(),
                    json!(self.files[e.file.0 as usize].path()),
                );
                if let Some(s) = s {
                    m.insert("cluster-size".into(), json!(s.grain_bytes()));
                }
                m.insert("format".into(), json!(e.kind_name));
                Value::Object(m)
            })
            .collect();
        Some(json!({
            "type": "vmdk",
            "data": {
                "cid": self.cid,
                "parent-cid": self.parent_cid,
                "create-type": self.create_type,
                "extents": extents,
            }
        }))
    }

    fn check(&self) -> Option<Result<crate::qcow2::CheckReport>> {
        Some(check::check(self))
    }

    fn writer(&self) -> Result<Box<dyn ImageWriter>> {
        if !self.write {
            return Err(Error::Unsupported(format!(
                "'{}' was opened read-only",
                self.files[0].path()
            )));
        }
        Ok(Box::new(write::VmdkWriter::new(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{Access, Placement};
    use crate::extent::Extent as E;
    use crate::types::HostOff;

    fn open(path: &str, access: Access) -> Box<dyn Image> {
        let o = OpenOptions::new(access);
        let f = Arc::new(FileLayer::open(path, &o.file_open()).unwrap());
        VMDK.open(f, &o).unwrap()
    }

    #[test]
    fn probe_like_qemu() {
        assert_eq!(probe_head(b"KDMV...."), 100);
        assert_eq!(probe_head(b"# c\n  \nversion=1\n"), 100);
        assert_eq!(probe_head(b"version=4\n"), 0);
        assert_eq!(probe_head(b"x"), 0);
    }

    #[test]
    fn create_write_map_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.vmdk").to_str().unwrap().to_string();
        let spec = CreateSpec {
            path: p.clone(),
            size: 4 << 20,
            options: OptionMap::parse("zeroed_grain=on"),
        };
        VMDK.create(&spec).unwrap();
        let img = open(&p, Access::Write);
        assert_eq!(img.virtual_size(), 4 << 20);
        assert_eq!(img.cluster_size(), Some(65536));
        let mut w = img.writer().unwrap();
        let mut pl: Vec<Placement> = Vec::new();
        let t = w.allocate(GuestOff(65536 + 100), 1000, &mut pl).unwrap();
        assert_eq!(pl.len(), 1);
        let host = pl[0].host;
        assert_eq!(host.0 % 512, 100);
        w.commit(&[t]).unwrap();
        let mut acts = Vec::new();
        w.zero(GuestOff(3 << 20), 65536, true, &mut acts).unwrap();
        assert!(acts.is_empty(), "a zeroed grain needs no host action");
        w.close().unwrap();
        drop(img);
        let img = open(&p, Access::Read);
        let mut v = Vec::new();
        img.map(GuestOff(0), 4 << 20, &mut v).unwrap();
        assert_eq!(
            v[0],
            E::Unallocated {
                len: 65536,
                at: None
            }
        );
        assert_eq!(
            v[1],
            E::Data {
                file: FileId(0),
                host: HostOff(host.0 - 100),
                len: 65536
            }
        );
        assert!(v.contains(&E::Zero {
            len: 65536,
            explicit: true,
            at: None
        }));
        let rep = img.check().unwrap().unwrap();
        assert!(rep.fatal.is_none() && rep.messages.is_empty());
    }
}
