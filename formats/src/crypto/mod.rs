//! Disk encryption headers: what `info` shows of an encrypted image without its key.
//!
//! Only the headers are read here (QEMU's `info` opens images without their keys too);
//! decrypting data needs the key secret and is not implemented yet.

pub mod cipher;
pub mod luks;

use std::sync::Mutex;

/// Secrets given on the command line (`--object secret,id=...`), by id.
static SECRETS: Mutex<Vec<(String, Vec<u8>)>> = Mutex::new(Vec::new());

/// Remember secret `id` (a later definition of the same id wins).
pub fn register_secret(id: &str, bytes: Vec<u8>) {
    let mut s = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    s.retain(|(i, _)| i != id);
    s.push((id.to_string(), bytes));
}

/// The bytes of secret `id`.
pub fn secret(id: &str) -> Option<Vec<u8>> {
    SECRETS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(i, _)| i == id)
        .map(|(_, v)| v.clone())
}

/// Fill `buf` with random bytes from the kernel (`getrandom(2)`).
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}
