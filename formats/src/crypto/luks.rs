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
    /// the volume UUID as text
    pub uuid: String,
    /// the eight key slots
    pub slots: Vec<KeySlot>,
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
            return Err(format!("Unsupported LUKS version {version}"));
        }
        let slots = (0..8)
            .map(|i| {
                let s = &b[208 + i * 48..208 + (i + 1) * 48];
                KeySlot {
                    active: be32(s, 0) == SLOT_ACTIVE,
                    iterations: be32(s, 4),
                    key_offset: be32(s, 40) as u64 * 512,
                    stripes: be32(s, 44),
                }
            })
            .collect();
        Ok(LuksHeader {
            cipher_name: cstr(&b[8..40]),
            cipher_mode: cstr(&b[40..72]),
            hash_spec: cstr(&b[72..104]),
            payload_offset: be32(b, 104) as u64 * 512,
            key_bytes: be32(b, 108),
            mk_iterations: be32(b, 164),
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

    /// `info`'s `encrypt` block for a LUKS image, in qemu-img's key order.
    pub fn info_json(&self, detached: bool) -> Value {
        let (mode, ivgen) = self
            .cipher_mode
            .split_once('-')
            .unwrap_or((self.cipher_mode.as_str(), ""));
        let (ivgen_alg, ivgen_hash) = match ivgen.split_once(':') {
            Some((a, h)) => (a, Some(h)),
            None => (ivgen, None),
        };
        let mut m = Map::new();
        m.insert("ivgen-alg".into(), json!(ivgen_alg));
        m.insert("detached-header".into(), json!(detached));
        m.insert("hash-alg".into(), json!(self.hash_spec));
        m.insert("cipher-alg".into(), json!(self.cipher_alg()));
        m.insert("uuid".into(), json!(self.uuid));
        if let Some(h) = ivgen_hash {
            m.insert("ivgen-hash-alg".into(), json!(h));
        }
        m.insert("format".into(), json!("luks"));
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
        b[208..212].copy_from_slice(&SLOT_ACTIVE.to_be_bytes());
        b[248..252].copy_from_slice(&8u32.to_be_bytes());
        let h = LuksHeader::parse(&b).unwrap();
        assert_eq!(h.cipher_alg(), "aes-256");
        assert_eq!(h.payload_offset, 2_068_480);
        let j = h.info_json(false);
        assert_eq!(j["cipher-mode"], "xts");
        assert_eq!(j["ivgen-alg"], "plain64");
        assert_eq!(j["slots"][0]["key-offset"], 4096);
        assert!(LuksHeader::parse(&b[..100]).is_err());
    }
}
