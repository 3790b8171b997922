//! The qcow2 format (QEMU's docs/interop/qcow2.txt).
//!
//! Split by concern: [`header`] (header and extensions), [`map`] (L1/L2 lookup into
//! extents, with an L2 cache), `create`, `measure` and `options` (new images).
//! The driver translates guest offsets into [`Extent`]s — data, zero, unallocated and
//! compressed clusters, subclusters with extended L2 entries, clusters in an external data
//! file — and never touches guest data itself.

mod check;
mod create;
pub mod header;
mod map;
mod measure;
pub mod options;
pub use check::CheckReport;
mod refcount;
mod snapshot;
mod write;

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::driver::{
    Action, BackingRef, CreateSpec, FormatDriver, Image, ImageWriter, OpenOptions,
};
use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::file::FileLayer;
use crate::opts::{OptionDesc, OptionMap};
use crate::types::{FileId, GuestOff};

use header::{autoclear, compat, incompat, Extensions, Header};
use map::L2Cache;

/// The qcow2 driver.
pub struct Qcow2Driver;

/// The one instance, listed in [`crate::registry::DRIVERS`].
pub static QCOW2: Qcow2Driver = Qcow2Driver;

impl FormatDriver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, head: &[u8], _file_len: u64) -> u32 {
        if head.len() >= 8 && head[..4] == header::MAGIC.to_be_bytes() {
            let v = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            if v >= 2 {
                return 100;
            }
        }
        0
    }

    fn open(&self, file: Arc<FileLayer>, opts: &OpenOptions) -> Result<Box<dyn Image>> {
        Ok(Box::new(Qcow2Image::open(file, opts)?))
    }

    fn create_options(&self) -> &'static [OptionDesc] {
        options::QCOW2_OPTIONS
    }

    fn supports_compression(&self) -> bool {
        true
    }

    fn check_options(&self, opts: &OptionMap) -> Result<()> {
        options::check_types(opts)
    }

    fn formatting_line(&self, path: &str, size: u64, opts: &OptionMap) -> Option<String> {
        Some(options::formatting_line(path, size, opts))
    }

    fn create(&self, spec: &CreateSpec) -> Result<Vec<Action>> {
        create::create(spec)
    }

    fn measure(
        &self,
        size: u64,
        data: Option<&[(u64, u64)]>,
        options: &OptionMap,
    ) -> Result<(u64, u64)> {
        measure::measure(size, data, options)
    }
}

/// An open qcow2 image.
pub struct Qcow2Image {
    /// [0] the image file; [1] the external data file, when there is one
    files: Vec<Arc<FileLayer>>,
    header: Header,
    ext: Extensions,
    backing: Option<BackingRef>,
    /// the active L1 table (host offsets of L2 tables, with flag bits)
    l1: Vec<u64>,
    l2_cache: L2Cache,
    /// which file holds guest data
    data_file: FileId,
    /// opened read-write
    write: bool,
    snapshots: Vec<crate::driver::SnapshotInfo>,
    /// persistent bitmaps: (name, granularity, flags as QEMU names them)
    bitmaps: Vec<(String, u64, Vec<&'static str>)>,
    /// virtual size as seen (a snapshot's own size when reading one)
    size: u64,
    /// `info`'s `encrypt` block of an encrypted image
    encrypt: Option<Value>,
    /// the data cipher, when opened with the key
    cipher: Option<Arc<dyn crate::crypto::cipher::SectorCipher>>,
}

/// The feature names of the bits in `bits` (of `kind`), from the image's table, as QEMU
/// words its "Unsupported qcow2 feature(s)" error.
fn feature_names(ext: &Extensions, kind: u8, bits: u64) -> String {
    let mut names = Vec::new();
    for bit in 0..64u8 {
        if bits & (1u64 << bit) == 0 {
            continue;
        }
        match ext.features.iter().find(|f| f.kind == kind && f.bit == bit) {
            Some(f) => names.push(f.name.clone()),
            None => names.push(format!("Unknown incompatible feature: {:x}", 1u64 << bit)),
        }
    }
    names.join(", ")
}

impl Qcow2Image {
    /// Open and validate. Reads the header cluster and the L1 table (bounded by the file
    /// size and QEMU's 32 MiB limit); L2 tables are read on demand.
    pub fn open(file: Arc<FileLayer>, opts: &OpenOptions) -> Result<Qcow2Image> {
        let path = file.path().to_string();
        let file_len = file.len()?;
        let mut head = vec![0u8; 4096.min(file_len as usize).max(72)];
        let n = file.read_at_most(&mut head, 0, "qcow2 header")?;
        head.truncate(n);
        let header = Header::parse(&head, file_len, &path)?;
        // Re-read the whole first cluster for the extensions and the backing name.
        let first = header.cluster_size().min(file_len) as usize;
        let mut cluster0 = vec![0u8; first];
        file.read_exact_at(&mut cluster0, 0, "qcow2 header cluster")?;
        let ext = Extensions::parse(&cluster0, &header, &path)?;
        let unknown = header.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                feature_names(&ext, 0, unknown)
            )));
        }
        // Encrypted images open without their key for `info` only, as with QEMU; data
        // access needs the key secret. LUKS data is decrypted by the engine (the IV is the
        // host sector); legacy AES is not supported.
        let mut encryption = None;
        let encrypt = match header.crypt_method {
            0 => None,
            1 | 2 if opts.access != crate::driver::Access::Info && opts.key.is_none() => {
                return Err(Error::Unsupported(
                    "Parameter 'encrypt.key-secret' is required for cipher".into(),
                ))
            }
            1 if opts.access != crate::driver::Access::Info => {
                return Err(Error::Unsupported(
                    "AES-CBC encrypted qcow2 images are not supported by rimg".into(),
                ))
            }
            1 => Some(json!({"format": "aes"})),
            2 => {
                let (off, len) = ext.crypto.ok_or_else(|| Error::Corrupt {
                    path: path.clone(),
                    what: "Missing crypto header for crypt method 2".into(),
                })?;
                let hl = crate::crypto::luks::HEADER_SIZE;
                let mut b = vec![0u8; hl];
                let n = file.read_at_most(&mut b, off, "LUKS header")?;
                b.truncate(n);
                let corrupt = |what: String| Error::Corrupt {
                    path: path.clone(),
                    what,
                };
                let h = crate::crypto::luks::LuksHeader::parse(&b).map_err(corrupt)?;
                if let (Some(key), true) = (&opts.key, opts.access != crate::driver::Access::Info) {
                    let mut read = |o: u64, buf: &mut [u8]| {
                        if o.saturating_add(buf.len() as u64) > len {
                            return Err("LUKS key material lies outside its header".to_string());
                        }
                        file.read_exact_at(buf, off + o, "LUKS key material")
                            .map_err(|e| e.to_string())
                    };
                    let master = h.unlock(key, &mut read).map_err(Error::Unsupported)?;
                    encryption = Some(h.cipher(&master).map_err(Error::Unsupported)?);
                }
                Some(h.info_json(false))
            }
            m => {
                return Err(Error::Unsupported(format!(
                    "Unsupported encryption method: {m}"
                )))
            }
        };
        if opts.write() && header.incompatible_features & incompat::CORRUPT != 0 {
            return Err(Error::Corrupt {
                path: path.clone(),
                what: "qcow2: Image is corrupt; cannot be opened read/write".into(),
            });
        }
        if header.compression_type > 1 {
            return Err(Error::Unsupported(format!(
                "Unknown compression type '{}'",
                header.compression_type
            )));
        }
        let backing = if header.backing_file_offset != 0 {
            let o = header.backing_file_offset as usize;
            let name = &cluster0[o..o + header.backing_file_size as usize];
            Some(BackingRef {
                name: String::from_utf8_lossy(name).into_owned(),
                format: ext.backing_format.clone(),
            })
        } else {
            None
        };
        let snapshots = snapshot::read_table(&file, &header)?;
        let bitmaps = read_bitmap_directory(&file, &header, &ext)?;
        // The active L1 table, or the chosen snapshot's.
        let (l1_off, l1_size, size) = match &opts.snapshot {
            None => (header.l1_table_offset, header.l1_size, header.size),
            Some(sel) => {
                if opts.write() {
                    return Err(Error::Unsupported(
                        "a snapshot can only be opened read-only".into(),
                    ));
                }
                let s = snapshot::select(&snapshots, sel)
                    .ok_or_else(|| Error::Snapshot("Can't find snapshot".into()))?;
                (s.l1_offset, s.l1_size, s.disk_size)
            }
        };
        let mut raw_l1 = vec![0u8; l1_size as usize * 8];
        file.read_exact_at(&mut raw_l1, l1_off, "L1 table")?;
        let l1: Vec<u64> = raw_l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let mut files = vec![file];
        let mut data_file = FileId(0);
        if header.incompatible_features & incompat::DATA_FILE != 0 {
            let Some(name) = ext.data_file.clone() else {
                return Err(Error::Corrupt {
                    path: path.clone(),
                    what: "Missing data file name (external data file bit set)".into(),
                });
            };
            // QEMU opens the data file by the name as stored (relative to the working
            // directory), and `info` never opens it.
            if opts.access != crate::driver::Access::Info {
                let df = FileLayer::open(&name, &opts.file_open())?;
                files.push(Arc::new(df));
                data_file = FileId(1);
            }
        }
        let l2_cache = L2Cache::new(&header);
        Ok(Qcow2Image {
            files,
            header,
            ext,
            backing,
            l1,
            l2_cache,
            data_file,
            write: opts.write(),
            snapshots,
            bitmaps,
            size,
            encrypt,
            cipher: encryption,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }
}

impl Image for Qcow2Image {
    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn check(&self) -> Option<Result<CheckReport>> {
        Some(self.check_refcounts())
    }

    fn check_repair(&self, all: bool) -> Option<Result<CheckReport>> {
        if !self.write {
            return None;
        }
        Some(self.check_refcounts_repair(Some(all)))
    }

    fn snapshots(&self) -> Vec<crate::driver::SnapshotInfo> {
        self.snapshots.clone()
    }

    fn files(&self) -> &[Arc<FileLayer>] {
        &self.files
    }

    fn backing(&self) -> Option<BackingRef> {
        self.backing.clone()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.header.cluster_size())
    }

    fn map(&self, off: GuestOff, len: u64, out: &mut Vec<Extent>) -> Result<u64> {
        map::map(self, off, len, out)
    }

    fn format_specific(&self) -> Option<Value> {
        let h = &self.header;
        let mut d = Map::new();
        d.insert(
            "compat".into(),
            json!(if h.version >= 3 { "1.1" } else { "0.10" }),
        );
        d.insert(
            "compression-type".into(),
            json!(if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            }),
        );
        if h.version >= 3 {
            d.insert(
                "lazy-refcounts".into(),
                json!(h.compatible_features & compat::LAZY_REFCOUNTS != 0),
            );
        }
        if !self.bitmaps.is_empty() {
            let list: Vec<Value> = self
                .bitmaps
                .iter()
                .map(|(name, gran, flags)| {
                    json!({"flags": flags, "name": name, "granularity": gran})
                })
                .collect();
            d.insert("bitmaps".into(), Value::Array(list));
        }
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if h.version >= 3 {
            if let Some(df) = &self.ext.data_file {
                d.insert("data-file".into(), json!(df));
                d.insert(
                    "data-file-raw".into(),
                    json!(h.autoclear_features & autoclear::DATA_FILE_RAW != 0),
                );
            }
            if let Some(e) = &self.encrypt {
                d.insert("encrypt".into(), e.clone());
            }
            d.insert(
                "corrupt".into(),
                json!(h.incompatible_features & incompat::CORRUPT != 0),
            );
            d.insert("extended-l2".into(), json!(h.extended_l2()));
        }
        Some(json!({"type": "qcow2", "data": Value::Object(d)}))
    }

    fn dirty(&self) -> bool {
        self.header.incompatible_features & incompat::DIRTY != 0
    }

    fn encrypted(&self) -> bool {
        self.encrypt.is_some()
    }

    fn encryption(&self) -> Option<crate::driver::Encryption> {
        self.cipher.as_ref().map(|c| crate::driver::Encryption {
            file: self.data_file,
            base: 0,
            cipher: c.clone(),
        })
    }

    fn writer(&self) -> Result<Box<dyn ImageWriter>> {
        if self.encrypt.is_some() {
            return Err(Error::Unsupported(
                "writing to encrypted qcow2 images is not supported by rimg yet".into(),
            ));
        }
        if !self.bitmaps.is_empty() {
            // Writes would leave the bitmaps stale: refuse rather than corrupt them.
            return Err(Error::Unsupported(
                "writing to qcow2 images with persistent bitmaps is not supported by rimg yet"
                    .into(),
            ));
        }
        if !self.write {
            return Err(Error::Unsupported(format!(
                "'{}' was opened read-only",
                self.files[0].path()
            )));
        }
        Ok(Box::new(write::Qcow2Writer::new(
            self.files[0].clone(),
            self.header.clone(),
            &self.ext,
            self.l1.clone(),
            self.data_file,
        )?))
    }
}

/// The persistent bitmaps' directory (names, granularity, flags), when the bitmaps
/// extension is present and marked consistent. Bounded as QEMU bounds it.
fn read_bitmap_directory(
    file: &FileLayer,
    h: &Header,
    ext: &Extensions,
) -> Result<Vec<(String, u64, Vec<&'static str>)>> {
    let Some(b) = &ext.bitmaps else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & autoclear::BITMAPS == 0 {
        return Ok(Vec::new());
    }
    let bad = |what: &str| Error::Corrupt {
        path: file.path().to_string(),
        what: what.to_string(),
    };
    if b.nb_bitmaps > 65535 || b.directory_size > 64 << 20 {
        return Err(bad("Bitmap directory too large"));
    }
    if b.directory_offset
        .checked_add(b.directory_size)
        .is_none_or(|e| e > file.len().unwrap_or(0))
    {
        return Err(bad("Bitmap directory is past the end of the file"));
    }
    let mut dir = vec![0u8; b.directory_size as usize];
    file.read_exact_at(&mut dir, b.directory_offset, "bitmap directory")?;
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..b.nb_bitmaps {
        if off + 24 > dir.len() {
            return Err(bad("Bitmap directory entry out of bounds"));
        }
        let e = &dir[off..];
        let flags = u32::from_be_bytes([e[12], e[13], e[14], e[15]]);
        let gran_bits = u32::from(e[17]);
        let name_len = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let extra = u32::from_be_bytes([e[20], e[21], e[22], e[23]]) as usize;
        let end = 24 + extra + name_len;
        if off + end > dir.len() || gran_bits > 63 {
            return Err(bad("Bitmap directory entry out of bounds"));
        }
        let name = String::from_utf8_lossy(&e[24 + extra..end]).into_owned();
        let mut fl = Vec::new();
        if flags & 1 != 0 {
            fl.push("in-use");
        }
        if flags & 2 != 0 {
            fl.push("auto");
        }
        out.push((name, 1u64 << gran_bits, fl));
        off += end.div_ceil(8) * 8;
    }
    Ok(out)
}
