//! Sector ciphers: AES in XTS or CBC mode with QEMU's IV generators (`plain`, `plain64`,
//! `essiv`), working on whole 512-byte sectors in place.

use std::sync::Arc;

use aes::cipher::block_padding::NoPadding;
use aes::cipher::consts::U16;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, BlockSizeUser,
    InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};

/// Bytes per encryption sector.
pub const SECTOR: usize = 512;

/// A cipher over 512-byte sectors. `sector` is the IV sector number of the first sector
/// of `buf`; `buf` holds whole sectors.
pub trait SectorCipher: Send + Sync {
    /// Decrypt in place.
    fn decrypt(&self, sector: u64, buf: &mut [u8]);
    /// Encrypt in place.
    fn encrypt(&self, sector: u64, buf: &mut [u8]);
}

/// XTS with the `plain64` tweak (the sector number, little-endian).
struct Xts<C: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16>> {
    xts: xts_mode::Xts128<C>,
}

impl<C> SectorCipher for Xts<C>
where
    C: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn decrypt(&self, sector: u64, buf: &mut [u8]) {
        self.xts
            .decrypt_area(buf, SECTOR, sector as u128, xts_mode::get_tweak_default);
    }
    fn encrypt(&self, sector: u64, buf: &mut [u8]) {
        self.xts
            .encrypt_area(buf, SECTOR, sector as u128, xts_mode::get_tweak_default);
    }
}

/// How a CBC sector's IV is made.
enum IvGen {
    /// the sector number, 32-bit little-endian
    Plain,
    /// the sector number, 64-bit little-endian
    Plain64,
    /// the sector number encrypted with AES-256 keyed by SHA-256 of the volume key
    Essiv(Box<Aes256>),
}

impl IvGen {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                let mut b = aes::Block::from(iv);
                c.encrypt_block(&mut b);
                iv.copy_from_slice(&b);
            }
        }
        iv
    }
}

/// CBC, one chain per sector.
struct Cbc<C> {
    cipher: C,
    ivgen: IvGen,
}

impl<C> SectorCipher for Cbc<C>
where
    C: BlockCipher
        + BlockEncrypt
        + BlockDecrypt
        + BlockSizeUser<BlockSize = U16>
        + Clone
        + Send
        + Sync,
{
    fn decrypt(&self, sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            let iv = self.ivgen.iv(sector + i as u64);
            let d = cbc::Decryptor::<C>::inner_iv_init(self.cipher.clone(), &iv.into());
            // Whole blocks: NoPadding cannot fail on them.
            let _ = d.decrypt_padded_mut::<NoPadding>(s);
        }
    }
    fn encrypt(&self, sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            let iv = self.ivgen.iv(sector + i as u64);
            let e = cbc::Encryptor::<C>::inner_iv_init(self.cipher.clone(), &iv.into());
            let n = s.len();
            let _ = e.encrypt_padded_mut::<NoPadding>(s, n);
        }
    }
}

/// Build the cipher `alg` (`aes`), `mode` (`xts`, `cbc`), `ivgen` (`plain`, `plain64`,
/// `essiv` with `ivgen_hash`) for `key`. `Err` names what is not supported.
pub fn make(
    alg: &str,
    mode: &str,
    ivgen: &str,
    ivgen_hash: Option<&str>,
    key: &[u8],
) -> Result<Arc<dyn SectorCipher>, String> {
    if alg != "aes" {
        return Err(format!("cipher '{alg}' is not supported by rimg yet"));
    }
    match mode {
        "xts" => {
            if ivgen != "plain64" {
                return Err(format!(
                    "XTS with IV generator '{ivgen}' is not supported by rimg yet"
                ));
            }
            let (k1, k2) = key.split_at(key.len() / 2);
            Ok(match key.len() {
                32 => Arc::new(Xts {
                    xts: xts_mode::Xts128::new(
                        Aes128::new_from_slice(k1).map_err(|e| e.to_string())?,
                        Aes128::new_from_slice(k2).map_err(|e| e.to_string())?,
                    ),
                }),
                64 => Arc::new(Xts {
                    xts: xts_mode::Xts128::new(
                        Aes256::new_from_slice(k1).map_err(|e| e.to_string())?,
                        Aes256::new_from_slice(k2).map_err(|e| e.to_string())?,
                    ),
                }),
                n => return Err(format!("invalid XTS key length {n}")),
            })
        }
        "cbc" => {
            let ivgen = match (ivgen, ivgen_hash) {
                ("plain", _) => IvGen::Plain,
                ("plain64", _) => IvGen::Plain64,
                ("essiv", Some("sha256")) => {
                    use sha2::Digest;
                    let salt = sha2::Sha256::digest(key);
                    IvGen::Essiv(Box::new(
                        Aes256::new_from_slice(&salt).map_err(|e| e.to_string())?,
                    ))
                }
                (g, h) => {
                    return Err(format!(
                        "IV generator '{g}' (hash {}) is not supported by rimg yet",
                        h.unwrap_or("none")
                    ))
                }
            };
            Ok(match key.len() {
                16 => Arc::new(Cbc {
                    cipher: Aes128::new_from_slice(key).map_err(|e| e.to_string())?,
                    ivgen,
                }),
                24 => Arc::new(Cbc {
                    cipher: Aes192::new_from_slice(key).map_err(|e| e.to_string())?,
                    ivgen,
                }),
                32 => Arc::new(Cbc {
                    cipher: Aes256::new_from_slice(key).map_err(|e| e.to_string())?,
                    ivgen,
                }),
                n => return Err(format!("invalid AES key length {n}")),
            })
        }
        m => Err(format!("cipher mode '{m}' is not supported by rimg yet")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
        for (mode, ivgen, hash, klen) in [
            ("xts", "plain64", None, 64),
            ("xts", "plain64", None, 32),
            ("cbc", "plain64", None, 16),
            ("cbc", "plain", None, 32),
            ("cbc", "essiv", Some("sha256"), 32),
        ] {
            let key: Vec<u8> = (0..klen as u8).collect();
            let c = make("aes", mode, ivgen, hash, &key).unwrap();
            let mut b = data.clone();
            c.encrypt(5, &mut b);
            assert_ne!(b, data);
            c.decrypt(5, &mut b);
            assert_eq!(b, data, "{mode}-{ivgen}");
        }
    }
}
