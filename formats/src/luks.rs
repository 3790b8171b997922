//! The `luks` format: a LUKS1 volume (header, key material, then the encrypted payload),
//! as QEMU reads and writes it and as Cinder stores encrypted volumes.
//!
//! Guest byte `g` lives at `payload_offset + g`, encrypted by 512-byte sectors whose IV is
//! the guest sector. The driver only maps; the engine decrypts after reads and encrypts
//! before writes (see [`Image::encryption`]). Without the key only `info` can open it, as
//! with qemu-img.

use std::sync::Arc;

use crate::crypto::cipher::SectorCipher;
use crate::crypto::luks::{self, CreateParams, LuksHeader};
use crate::driver::{
    Access, Action, CreateSpec, Encryption, FormatDriver, Image, ImageWriter, OpenOptions,
    Placement, Preallocation, Ticket,
};
use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::file::{FileLayer, FILE_OPTIONS};
use crate::opts::{OptKind, OptionDesc, OptionMap};
use crate::types::{FileId, GuestOff, HostOff};

/// The luks driver.
pub struct LuksDriver;

/// The one instance, listed in [`crate::registry::DRIVERS`].
pub static LUKS: LuksDriver = LuksDriver;

const fn opt(name: &'static str, kind: OptKind, help: &'static str) -> OptionDesc {
    OptionDesc { name, kind, help }
}

/// luks's create options, in qemu-img's declaration order.
static LUKS_OPTIONS: &[OptionDesc] = &[
    opt("size", OptKind::Size, "Virtual disk size"),
    opt(
        "key-secret",
        OptKind::Str,
        "ID of the secret that provides the keyslot passphrase",
    ),
    opt(
        "cipher-alg",
        OptKind::Str,
        "Name of encryption cipher algorithm",
    ),
    opt(
        "cipher-mode",
        OptKind::Str,
        "Name of encryption cipher mode",
    ),
    opt("ivgen-alg", OptKind::Str, "Name of IV generator algorithm"),
    opt(
        "ivgen-hash-alg",
        OptKind::Str,
        "Name of IV generator hash algorithm",
    ),
    opt(
        "hash-alg",
        OptKind::Str,
        "Name of encryption hash algorithm",
    ),
    opt(
        "iter-time",
        OptKind::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    opt(
        "detached-header",
        OptKind::Bool,
        "Create a detached LUKS header",
    ),
];

fn invalid(m: impl Into<String>) -> Error {
    Error::InvalidArgument(m.into())
}

/// The secret named by `key-secret`, with qemu's messages.
fn create_key(options: &OptionMap) -> Result<Vec<u8>> {
    let id = options
        .get("key-secret")
        .ok_or_else(|| invalid("Parameter 'key-secret' is required for cipher"))?;
    crate::crypto::secret(id).ok_or_else(|| invalid(format!("No secret with id '{id}'")))
}

/// Parse the cipher options as qemu's QAPI enums do.
fn create_params(options: &OptionMap) -> Result<CreateParams> {
    let mut p = CreateParams::default();
    let pick = |name: &str, allowed: &[&str], into: &mut String| -> Result<()> {
        if let Some(v) = options.get(name) {
            if !allowed.contains(&v) {
                return Err(invalid(format!(
                    "Parameter '{name}' does not accept value '{v}'"
                )));
            }
            *into = v.to_string();
        }
        Ok(())
    };
    const CIPHERS: &[&str] = &[
        "aes-128",
        "aes-192",
        "aes-256",
        "des",
        "3des",
        "cast5-128",
        "serpent-128",
        "serpent-192",
        "serpent-256",
        "twofish-128",
        "twofish-192",
        "twofish-256",
        "sm4",
    ];
    const HASHES: &[&str] = &[
        "md5",
        "sha1",
        "sha224",
        "sha256",
        "sha384",
        "sha512",
        "ripemd160",
    ];
    pick("cipher-alg", CIPHERS, &mut p.cipher_alg)?;
    pick(
        "cipher-mode",
        &["ecb", "cbc", "xts", "ctr"],
        &mut p.cipher_mode,
    )?;
    pick(
        "ivgen-alg",
        &["plain", "plain64", "essiv"],
        &mut p.ivgen_alg,
    )?;
    pick("hash-alg", HASHES, &mut p.hash_alg)?;
    if let Some(h) = options.get("ivgen-hash-alg") {
        if !HASHES.contains(&h) {
            return Err(invalid(format!(
                "Parameter 'ivgen-hash-alg' does not accept value '{h}'"
            )));
        }
        p.ivgen_hash_alg = Some(h.to_string());
    }
    if let Some(t) = options.get("iter-time") {
        p.iter_time = t
            .parse()
            .map_err(|_| invalid("Parameter 'iter-time' expects a number"))?;
    }
    Ok(p)
}

impl FormatDriver for LuksDriver {
    fn name(&self) -> &'static str {
        "luks"
    }

    fn probe(&self, head: &[u8], _file_len: u64) -> u32 {
        if head.len() >= 6 && &head[..6] == luks::MAGIC {
            100
        } else {
            0
        }
    }

    fn open(&self, file: Arc<FileLayer>, opts: &OpenOptions) -> Result<Box<dyn Image>> {
        if opts.snapshot.is_some() {
            return Err(Error::Snapshot(
                "Block format 'luks' used by device '' does not support temporarily loading internal snapshots"
                    .into(),
            ));
        }
        let path = file.path().to_string();
        // QEMU asks for the key before it reads the header.
        if opts.access != Access::Info && opts.key.is_none() {
            return Err(Error::Unsupported(
                "Parameter 'key-secret' is required for cipher".into(),
            ));
        }
        let mut b = vec![0u8; luks::HEADER_SIZE];
        let n = file.read_at_most(&mut b, 0, "LUKS header")?;
        b.truncate(n);
        let header = LuksHeader::parse(&b).map_err(Error::Unsupported)?;
        let file_len = file.len()?.div_ceil(512) * 512;
        if header.payload_offset > file_len {
            return Err(Error::OpenWhy {
                path,
                why: format!(
                    "LUKS payload is overflowing the size of the volume ({} bytes past the end)",
                    header.payload_offset - file_len
                ),
            });
        }
        let cipher = if opts.access == Access::Info {
            None
        } else {
            let key = opts.key.as_ref().ok_or_else(|| {
                Error::Unsupported("Parameter 'key-secret' is required for cipher".into())
            })?;
            let f = file.clone();
            let mut read = |o: u64, buf: &mut [u8]| {
                f.read_exact_at(buf, o, "LUKS key material")
                    .map_err(|e| e.to_string())
            };
            let master = header.unlock(key, &mut read).map_err(Error::Unsupported)?;
            Some(header.cipher(&master).map_err(Error::Unsupported)?)
        };
        Ok(Box::new(LuksImage {
            size: file_len - header.payload_offset,
            files: [file],
            header,
            cipher,
            write: opts.write(),
        }))
    }

    fn create_options(&self) -> &'static [OptionDesc] {
        LUKS_OPTIONS
    }

    fn create(&self, spec: &CreateSpec) -> Result<Vec<Action>> {
        let all: Vec<OptionDesc> = LUKS_OPTIONS.iter().chain(FILE_OPTIONS).copied().collect();
        spec.options.validate(&all)?;
        if spec.options.get("detached-header").is_some() {
            return Err(invalid("Parameter 'detached-header' is unexpected"));
        }
        let params = create_params(&spec.options)?;
        let key = create_key(&spec.options)?;
        let (area, header, _master) = luks::create(&params, &key).map_err(invalid)?;
        let size = spec.size.div_ceil(512) * 512;
        let file = FileLayer::create(&spec.path)?;
        // Only the header and the used key material; the unused slots stay holes.
        let used = area
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| (i + 1).div_ceil(4096) * 4096);
        file.write_all_at(&area[..used.min(area.len())], 0, "LUKS header")?;
        file.set_len(header.payload_offset + size)?;
        Ok(Vec::new())
    }

    fn measure(
        &self,
        size: u64,
        _data: Option<&[(u64, u64)]>,
        options: &OptionMap,
    ) -> Result<(u64, u64)> {
        // The header area of the default cipher (aes-256-xts: 64-byte keys) or the one
        // asked for, then the payload, all of it.
        let p = create_params(options)?;
        let bits: u64 = p
            .cipher_alg
            .rsplit('-')
            .next()
            .and_then(|b| b.parse().ok())
            .unwrap_or(256);
        let key_bytes = bits / 8 * if p.cipher_mode == "xts" { 2 } else { 1 };
        let header = 4096 + 8 * (key_bytes * 4000).div_ceil(4096) * 4096;
        let size = size.div_ceil(512) * 512;
        Ok((header + size, header + size))
    }
}

/// An open LUKS volume.
struct LuksImage {
    files: [Arc<FileLayer>; 1],
    header: LuksHeader,
    /// virtual size: the payload
    size: u64,
    cipher: Option<Arc<dyn SectorCipher>>,
    write: bool,
}

impl Image for LuksImage {
    fn format(&self) -> &'static str {
        "luks"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn files(&self) -> &[Arc<FileLayer>] {
        &self.files
    }

    fn map(&self, off: GuestOff, len: u64, out: &mut Vec<Extent>) -> Result<u64> {
        if off.0 >= self.size {
            return Ok(0);
        }
        let n = len.min(self.size - off.0);
        // Every payload byte is data: a hole in the file would decrypt to noise.
        crate::extent::push_merged(
            out,
            Extent::Data {
                file: FileId(0),
                host: HostOff(self.header.payload_offset + off.0),
                len: n,
            },
        );
        Ok(n)
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "type": "luks",
            "data": self.header.info_json_with(false, false),
        }))
    }

    fn encrypted(&self) -> bool {
        true
    }

    fn encryption(&self) -> Option<Encryption> {
        self.cipher.as_ref().map(|c| Encryption {
            file: FileId(0),
            base: self.header.payload_offset,
            cipher: c.clone(),
        })
    }

    fn writer(&self) -> Result<Box<dyn ImageWriter>> {
        if !self.write {
            return Err(Error::Unsupported(format!(
                "'{}' was opened read-only",
                self.files[0].path()
            )));
        }
        Ok(Box::new(LuksWriter {
            file: self.files[0].clone(),
            base: self.header.payload_offset,
            size: self.size,
        }))
    }
}

/// Writer of a LUKS volume: placements are the identity shifted by the payload offset.
struct LuksWriter {
    file: Arc<FileLayer>,
    base: u64,
    size: u64,
}

impl LuksWriter {
    fn check(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(invalid(format!(
                "write of {len} bytes at {off:#x} is past the end of '{}'",
                self.file.path()
            )));
        }
        Ok(())
    }
}

impl ImageWriter for LuksWriter {
    fn allocate(&mut self, off: GuestOff, len: u64, out: &mut Vec<Placement>) -> Result<Ticket> {
        self.check(off.0, len)?;
        out.push(Placement {
            guest: off,
            len,
            file: FileId(0),
            host: HostOff(self.base + off.0),
        });
        Ok(Ticket(0))
    }

    fn commit(&mut self, _tickets: &[Ticket]) -> Result<()> {
        Ok(())
    }

    fn zero(
        &mut self,
        off: GuestOff,
        len: u64,
        _may_unmap: bool,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        self.check(off.0, len)?;
        // Zeros must be encrypted like any data: the engine encrypts what it writes.
        out.push(Action::WriteZeroes {
            file: FileId(0),
            host: HostOff(self.base + off.0),
            len,
        });
        Ok(())
    }

    fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<Vec<Action>> {
        if prealloc != Preallocation::Off {
            return Err(Error::Unsupported(format!(
                "Unsupported preallocation mode: {}",
                prealloc.name()
            )));
        }
        let old = self.size;
        self.file.set_len(self.base + new_size)?;
        self.size = new_size;
        // Grown space must read as encrypted zeros.
        Ok(if new_size > old {
            vec![Action::WriteZeroes {
                file: FileId(0),
                host: HostOff(self.base + old),
                len: new_size - old,
            }]
        } else {
            Vec::new()
        })
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
