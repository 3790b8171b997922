//! The LUKS1 header (as QEMU writes it inside qcow2 images and in `luks` images), parsed for
//! `info`'s `encrypt` block.
//!
//! Layout (big-endian): magic `LUKS\xba\xbe`, version, cipher name, cipher mode, hash spec,
//! payload offset (sectors), key bytes, master key digest, salt and iterations, UUID, then
//! eight key slots of 48 bytes (active marker, iterations, salt, key material offset in
//! sectors, anti-forensic stripes).

use serde_json::{json, Map, Value};

/// Size of a LUKS1 header.
pub const HEADER_SIZE: usize = 592;
/// The magic at offset 0.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// A key slot in use.
const SLOT_ACTIVE: u32 = 0x00ac_71f3;

/// One key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// whether the slot holds a key
    pub active: bool,
    /// PBKDF2 iterations of the slot's passphrase
    pub iterations: u32,
    /// where the slot's key material starts, in bytes
    pub key_offset: u64,
    /// anti-forensic stripes
    pub stripes: u32,
    /// PBKDF2 salt of the slot
    pub salt: [u8; 32],
}

/// The parts of a LUKS1 header `info` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksHeader {
    /// cipher name (`aes`, `serpent`, `twofish`, `cast5`, `sm4` ...)
    pub cipher_name: String,
    /// cipher mode with IV generator (`xts-plain64`, `cbc-essiv:sha256` ...)
    pub cipher_mode: String,
    /// hash of the key derivation (`sha256` ...)
    pub hash_spec: String,
    /// where the encrypted payload starts, in bytes
    pub payload_offset: u64,
    /// master key length in bytes
    pub key_bytes: u32,
    /// PBKDF2 iterations of the master key digest
    pub mk_iterations: u32,
    /// PBKDF2 digest of the master key
    pub mk_digest: [u8; 20],
    /// salt of that digest
    pub mk_salt: [u8; 32],
    /// the volume UUID as text
    pub uuid: String,
    /// the eight key slots
    pub slots: Vec<KeySlot>,
}

use super::cipher::{SectorCipher, SECTOR};

/// Reads key material: `(offset from the LUKS header start, buffer)`.
pub type KeyMaterialReader<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), String> + 'a;

/// PBKDF2-HMAC with the LUKS hash `hash` into `out`.
fn pbkdf2(
    hash: &str,
    password: &[u8],
    salt: &[u8],
    rounds: u32,
    out: &mut [u8],
) -> Result<(), String> {
    match hash {
        "sha1" => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
        "sha256" => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
        "sha512" => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, out),
        h => return Err(format!("hash '{h}' is not supported by rimg yet")),
    }
    Ok(())
}

/// `hash` of `parts` concatenated.
fn digest(hash: &str, parts: &[&[u8]]) -> Result<Vec<u8>, String> {
    use sha2::Digest;
    fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
        let mut d = D::new();
        for p in parts {
            d.update(p);
        }
        d.finalize().to_vec()
    }
    Ok(match hash {
        "sha1" => run::<sha1::Sha1>(parts),
        "sha256" => run::<sha2::Sha256>(parts),
        "sha512" => run::<sha2::Sha512>(parts),
        h => return Err(format!("hash '{h}' is not supported by rimg yet")),
    })
}

/// The anti-forensic diffusion: each digest-sized piece of `block` replaced by the hash of
/// its index (big-endian) and itself.
fn diffuse(hash: &str, block: &mut [u8]) -> Result<(), String> {
    let ds = digest(hash, &[])?.len();
    for (i, piece) in block.chunks_mut(ds).enumerate() {
        let h = digest(hash, &[&(i as u32).to_be_bytes(), piece])?;
        let n = piece.len();
        piece.copy_from_slice(&h[..n]);
    }
    Ok(())
}

/// Merge anti-forensic stripes (`stripes` × `kb` bytes) back into the key.
fn af_merge(hash: &str, material: &[u8], kb: usize) -> Result<Vec<u8>, String> {
    let stripes = material.len() / kb;
    let mut d = vec![0u8; kb];
    for (i, stripe) in material.chunks_exact(kb).enumerate() {
        for (x, s) in d.iter_mut().zip(stripe) {
            *x ^= s;
        }
        if i + 1 < stripes {
            diffuse(hash, &mut d)?;
        }
    }
    Ok(d)
}

/// Split `key` into `stripes` anti-forensic stripes (the inverse of [`af_merge`]).
fn af_split(hash: &str, key: &[u8], stripes: usize) -> Result<Vec<u8>, String> {
    let kb = key.len();
    let mut out = vec![0u8; kb * stripes];
    super::random_bytes(&mut out[..kb * (stripes - 1)]).map_err(|e| e.to_string())?;
    let mut d = vec![0u8; kb];
    for i in 0..stripes - 1 {
        for (x, s) in d.iter_mut().zip(&out[i * kb..(i + 1) * kb]) {
            *x ^= s;
        }
        diffuse(hash, &mut d)?;
    }
    for (j, x) in d.iter().enumerate() {
        out[(stripes - 1) * kb + j] = x ^ key[j];
    }
    Ok(out)
}

/// PBKDF2 iterations that take about `ms` milliseconds here (at least 1000, as LUKS asks).
fn iterations_for(hash: &str, key_len: usize, ms: u64) -> Result<u32, String> {
    let probe = 1000u32;
    let mut out = vec![0u8; key_len];
    let t = std::time::Instant::now();
    pbkdf2(hash, b"probe", &[0u8; 32], probe, &mut out)?;
    let per = t.elapsed().as_secs_f64().max(1e-6) / probe as f64;
    let n = (ms as f64 / 1000.0 / per) as u64;
    Ok(n.clamp(1000, u32::MAX as u64) as u32)
}

/// What a new LUKS volume uses (qemu-img's `-o` names; its defaults by [`Default`]).
#[derive(Clone, Debug)]
pub struct CreateParams {
    /// `aes-128`, `aes-192`, `aes-256`
    pub cipher_alg: String,
    /// `xts`, `cbc`
    pub cipher_mode: String,
    /// `plain64`, `plain`, `essiv`
    pub ivgen_alg: String,
    /// hash of `essiv`
    pub ivgen_hash_alg: Option<String>,
    /// PBKDF2 hash
    pub hash_alg: String,
    /// milliseconds of PBKDF2 per unlock
    pub iter_time: u64,
}

impl Default for CreateParams {
    fn default() -> Self {
        CreateParams {
            cipher_alg: "aes-256".into(),
            cipher_mode: "xts".into(),
            ivgen_alg: "plain64".into(),
            ivgen_hash_alg: None,
            hash_alg: "sha256".into(),
            iter_time: 2000,
        }
    }
}

/// A new LUKS header area: the bytes from the header through the key material (the
/// payload starts at the returned header's `payload_offset`), and the master key.
pub fn create(p: &CreateParams, password: &[u8]) -> Result<(Vec<u8>, LuksHeader, Vec<u8>), String> {
    let (name, bits) = p
        .cipher_alg
        .split_once('-')
        .ok_or_else(|| format!("Unsupported cipher algorithm '{}'", p.cipher_alg))?;
    let bits: usize = bits
        .parse()
        .map_err(|_| format!("Unsupported cipher algorithm '{}'", p.cipher_alg))?;
    if name != "aes" || ![128, 192, 256].contains(&bits) {
        return Err(format!(
            "cipher '{}' is not supported by rimg yet",
            p.cipher_alg
        ));
    }
    let key_bytes = bits / 8 * if p.cipher_mode == "xts" { 2 } else { 1 };
    let mode = match &p.ivgen_hash_alg {
        Some(h) if p.ivgen_alg == "essiv" => format!("{}-essiv:{h}", p.cipher_mode),
        _ => format!("{}-{}", p.cipher_mode, p.ivgen_alg),
    };
    let stripes = 4000usize;
    let slot_bytes = (key_bytes * stripes).div_ceil(4096) * 4096;
    let first_slot = 4096usize;
    let payload = first_slot + 8 * slot_bytes;
    let mut master = vec![0u8; key_bytes];
    let mut mk_salt = [0u8; 32];
    let mut slot_salt = [0u8; 32];
    let mut uuid = [0u8; 16];
    for b in [
        &mut master[..],
        &mut mk_salt[..],
        &mut slot_salt[..],
        &mut uuid[..],
    ] {
        super::random_bytes(b).map_err(|e| e.to_string())?;
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let u = uuid.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let uuid_text = format!(
        "{}-{}-{}-{}-{}",
        &u[..8],
        &u[8..12],
        &u[12..16],
        &u[16..20],
        &u[20..]
    );
    // QEMU spends an eighth of the time on the master key digest.
    let iters = iterations_for(&p.hash_alg, key_bytes, p.iter_time)?;
    let mk_iters = (iters / 8).max(1000);
    let mut mk_digest = [0u8; 20];
    pbkdf2(&p.hash_alg, &master, &mk_salt, mk_iters, &mut mk_digest)?;
    let mut area = vec![0u8; payload];
    let h = &mut area[..HEADER_SIZE];
    h[..6].copy_from_slice(MAGIC);
    h[6..8].copy_from_slice(&1u16.to_be_bytes());
    h[8..8 + name.len()].copy_from_slice(name.as_bytes());
    h[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
    h[72..72 + p.hash_alg.len()].copy_from_slice(p.hash_alg.as_bytes());
    h[104..108].copy_from_slice(&((payload / 512) as u32).to_be_bytes());
    h[108..112].copy_from_slice(&(key_bytes as u32).to_be_bytes());
    h[112..132].copy_from_slice(&mk_digest);
    h[132..164].copy_from_slice(&mk_salt);
    h[164..168].copy_from_slice(&mk_iters.to_be_bytes());
    h[168..168 + uuid_text.len()].copy_from_slice(uuid_text.as_bytes());
    for i in 0..8 {
        let s = &mut h[208 + i * 48..208 + (i + 1) * 48];
        let active: u32 = if i == 0 { SLOT_ACTIVE } else { 0x0000_dead };
        s[0..4].copy_from_slice(&active.to_be_bytes());
        if i == 0 {
            s[4..8].copy_from_slice(&iters.to_be_bytes());
            s[8..40].copy_from_slice(&slot_salt);
        }
        s[40..44].copy_from_slice(&(((first_slot + i * slot_bytes) / 512) as u32).to_be_bytes());
        s[44..48].copy_from_slice(&(stripes as u32).to_be_bytes());
    }
    let header = LuksHeader::parse(&area[..HEADER_SIZE])?;
    // Slot 0: the master key split into stripes, encrypted with the passphrase's key.
    let mut derived = vec![0u8; key_bytes];
    pbkdf2(&p.hash_alg, password, &slot_salt, iters, &mut derived)?;
    let mut material = af_split(&p.hash_alg, &master, stripes)?;
    material.resize(material.len().div_ceil(SECTOR) * SECTOR, 0);
    header.cipher(&derived)?.encrypt(0, &mut material);
    area[first_slot..first_slot + material.len()].copy_from_slice(&material);
    Ok((area, header, master))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl LuksHeader {
    /// Parse a header; `Err` names what is wrong (QEMU's wording where it has one).
    pub fn parse(b: &[u8]) -> Result<LuksHeader, String> {
        if b.len() < HEADER_SIZE {
            return Err("LUKS header is truncated".into());
        }
        if &b[..6] != MAGIC {
            return Err("Volume is not in LUKS format".into());
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(format!("LUKS version {version} is not supported"));
        }
        let slots = (0..8)
            .map(|i| {
                let s = &b[208 + i * 48..208 + (i + 1) * 48];
                KeySlot {
                    active: be32(s, 0) == SLOT_ACTIVE,
                    iterations: be32(s, 4),
                    key_offset: be32(s, 40) as u64 * 512,
                    stripes: be32(s, 44),
                    salt: s[8..40].try_into().expect("32 bytes"),
                }
            })
            .collect();
        // QEMU's checks of the key slots, in its order and words.
        let key_bytes = be32(b, 108) as u64;
        let payload_sectors = be32(b, 104) as u64;
        let slot_at = |i: usize| &b[208 + i * 48..208 + (i + 1) * 48];
        let span = |s: &[u8]| {
            let start = be32(s, 40) as u64;
            let len = (key_bytes * be32(s, 44) as u64).div_ceil(512);
            (start, len)
        };
        for i in 0..8 {
            let s = slot_at(i);
            let (active, iters, stripes) = (be32(s, 0), be32(s, 4), be32(s, 44));
            if stripes != 4000 {
                return Err(format!(
                    "Keyslot {i} is corrupted (stripes {} != 4000)",
                    stripes as i32
                ));
            }
            if active != SLOT_ACTIVE && active != 0x0000_dead {
                return Err(format!("Keyslot {i} state (active/disable) is corrupted"));
            }
            if active == SLOT_ACTIVE && iters == 0 {
                return Err(format!("Keyslot {i} iteration count is zero"));
            }
            let (start1, len1) = span(s);
            if start1 < 4096 / 512 {
                return Err(format!("Keyslot {i} is overlapping with the LUKS header"));
            }
            if start1 + len1 > payload_sectors {
                return Err(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                ));
            }
            for j in i + 1..8 {
                let (start2, len2) = span(slot_at(j));
                if start1 + len1 > start2 && start2 + len2 > start1 {
                    return Err(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    ));
                }
            }
        }
        Ok(LuksHeader {
            cipher_name: cstr(&b[8..40]),
            cipher_mode: cstr(&b[40..72]),
            hash_spec: cstr(&b[72..104]),
            payload_offset: be32(b, 104) as u64 * 512,
            key_bytes: be32(b, 108),
            mk_iterations: be32(b, 164),
            mk_digest: b[112..132].try_into().expect("20 bytes"),
            mk_salt: b[132..164].try_into().expect("32 bytes"),
            uuid: cstr(&b[168..208]),
            slots,
        })
    }

    /// The cipher as QEMU names it: the algorithm and the key size in bits (the key of
    /// XTS is two keys of half the length).
    pub fn cipher_alg(&self) -> String {
        let mode = self.cipher_mode.split('-').next().unwrap_or("");
        let bytes = if mode == "xts" {
            self.key_bytes / 2
        } else {
            self.key_bytes
        };
        match self.cipher_name.as_str() {
            "aes" | "serpent" | "twofish" => format!("{}-{}", self.cipher_name, bytes * 8),
            "cast5" => "cast5-128".into(),
            other => other.to_string(),
        }
    }

    /// The cipher mode and IV generator: (`xts`, `plain64`, `None`), (`cbc`, `essiv`,
    /// `Some("sha256")`) ...
    pub fn mode_parts(&self) -> (&str, &str, Option<&str>) {
        let (mode, ivgen) = self
            .cipher_mode
            .split_once('-')
            .unwrap_or((self.cipher_mode.as_str(), ""));
        match ivgen.split_once(':') {
            Some((a, h)) => (mode, a, Some(h)),
            None => (mode, ivgen, None),
        }
    }

    /// The sector cipher of the volume for `key`.
    pub fn cipher(&self, key: &[u8]) -> Result<std::sync::Arc<dyn SectorCipher>, String> {
        let (mode, ivgen, hash) = self.mode_parts();
        super::cipher::make(&self.cipher_name, mode, ivgen, hash, key)
    }

    /// Recover the master key with `password`, trying each active key slot. `read(off,
    /// buf)` reads bytes at `off` from the start of the LUKS header.
    pub fn unlock(
        &self,
        password: &[u8],
        read: &mut KeyMaterialReader<'_>,
    ) -> Result<Vec<u8>, String> {
        let kb = self.key_bytes as usize;
        if kb == 0 || kb > 256 {
            return Err(format!("invalid LUKS key length {kb}"));
        }
        for slot in self.slots.iter().filter(|s| s.active) {
            if slot.stripes == 0 || slot.stripes > 4000 * 16 {
                return Err(format!("invalid LUKS stripe count {}", slot.stripes));
            }
            let mut derived = vec![0u8; kb];
            pbkdf2(
                &self.hash_spec,
                password,
                &slot.salt,
                slot.iterations,
                &mut derived,
            )?;
            let len = (kb * slot.stripes as usize).div_ceil(SECTOR) * SECTOR;
            let mut material = vec![0u8; len];
            read(slot.key_offset, &mut material)?;
            self.cipher(&derived)?.decrypt(0, &mut material);
            let key = af_merge(&self.hash_spec, &material[..kb * slot.stripes as usize], kb)?;
            let mut digest = [0u8; 20];
            pbkdf2(
                &self.hash_spec,
                &key,
                &self.mk_salt,
                self.mk_iterations,
                &mut digest,
            )?;
            if digest == self.mk_digest {
                return Ok(key);
            }
        }
        Err("Invalid password, cannot unlock any keyslot".into())
    }

    /// `info`'s `encrypt` block for a LUKS image, in qemu-img's key order (`format` is
    /// left out for the `luks` format's own block).
    pub fn info_json(&self, detached: bool) -> Value {
        self.info_json_with(detached, true)
    }

    /// As [`LuksHeader::info_json`], with or without the `format` key.
    pub fn info_json_with(&self, detached: bool, with_format: bool) -> Value {
        let (mode, ivgen_alg, ivgen_hash) = self.mode_parts();
        let mut m = Map::new();
        m.insert("ivgen-alg".into(), json!(ivgen_alg));
        m.insert("detached-header".into(), json!(detached));
        m.insert("hash-alg".into(), json!(self.hash_spec));
        m.insert("cipher-alg".into(), json!(self.cipher_alg()));
        m.insert("uuid".into(), json!(self.uuid));
        if let Some(h) = ivgen_hash {
            m.insert("ivgen-hash-alg".into(), json!(h));
        }
        if with_format {
            m.insert("format".into(), json!("luks"));
        }
        m.insert("cipher-mode".into(), json!(mode));
        let slots: Vec<Value> = self
            .slots
            .iter()
            .map(|s| {
                if s.active {
                    json!({"active": true, "iters": s.iterations, "key-offset": s.key_offset,
                           "stripes": s.stripes})
                } else {
                    json!({"active": false, "key-offset": s.key_offset})
                }
            })
            .collect();
        m.insert("slots".into(), Value::Array(slots));
        m.insert("payload-offset".into(), json!(self.payload_offset));
        m.insert("master-key-iters".into(), json!(self.mk_iterations));
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_header() {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..6].copy_from_slice(MAGIC);
        b[7] = 1;
        b[8..11].copy_from_slice(b"aes");
        b[40..51].copy_from_slice(b"xts-plain64");
        b[72..78].copy_from_slice(b"sha256");
        b[104..108].copy_from_slice(&4040u32.to_be_bytes());
        b[108..112].copy_from_slice(&64u32.to_be_bytes());
        b[164..168].copy_from_slice(&11635u32.to_be_bytes());
        for i in 0..8 {
            let s = 208 + i * 48;
            let active = if i == 0 { SLOT_ACTIVE } else { 0x0000_dead };
            b[s..s + 4].copy_from_slice(&active.to_be_bytes());
            b[s + 4..s + 8].copy_from_slice(&1000u32.to_be_bytes());
            b[s + 40..s + 44].copy_from_slice(&(8 + i as u32 * 504).to_be_bytes());
            b[s + 44..s + 48].copy_from_slice(&4000u32.to_be_bytes());
        }
        let h = LuksHeader::parse(&b).unwrap();
        assert_eq!(h.cipher_alg(), "aes-256");
        assert_eq!(h.payload_offset, 2_068_480);
        let j = h.info_json(false);
        assert_eq!(j["cipher-mode"], "xts");
        assert_eq!(j["ivgen-alg"], "plain64");
        assert_eq!(j["slots"][0]["key-offset"], 4096);
        assert!(LuksHeader::parse(&b[..100]).is_err());
        let mut bad = b.clone();
        bad[208 + 44..208 + 48].copy_from_slice(&4001u32.to_be_bytes());
        assert_eq!(
            LuksHeader::parse(&bad).unwrap_err(),
            "Keyslot 0 is corrupted (stripes 4001 != 4000)"
        );
    }

    #[test]
    fn created_headers_unlock() {
        let p = CreateParams {
            iter_time: 5,
            ..Default::default()
        };
        let (area, h, master) = create(&p, b"pw").unwrap();
        let mut read = |o: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&area[o as usize..o as usize + buf.len()]);
            Ok(())
        };
        assert_eq!(h.unlock(b"pw", &mut read).unwrap(), master);
        assert!(h.unlock(b"px", &mut read).is_err());
        assert_eq!(h.payload_offset, 2_068_480);
    }
}
