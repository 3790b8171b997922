//! The block allocation table, loaded in chunks on demand.
//!
//! A 64 TiB image with 1 MiB blocks has a 512 MiB BAT; `info` runs under a 1 GiB address
//! space limit in OpenStack. So the BAT is read in chunks of 64 Ki entries (512 KiB) as
//! lookups need them, at most `MAX_CHUNKS` kept at once; chunks the writer changed stay.
//! Entries past the end of the file read as zero (not present), as QEMU reads them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::error::Result;
use crate::file::FileLayer;

/// Entries per chunk.
const CHUNK: u64 = 64 * 1024;
/// Unchanged chunks kept in memory at most (32 MiB).
const MAX_CHUNKS: usize = 64;

/// The BAT of one image.
pub struct Bat {
    file: Arc<FileLayer>,
    /// file offset of the BAT
    offset: u64,
    /// entries in the BAT
    entries: u64,
    /// entries inside the file when it was opened (the rest read as zero)
    stored: u64,
    chunks: HashMap<u64, Vec<u64>>,
    /// chunks with changes made in memory (never dropped)
    changed: HashSet<u64>,
}

impl Bat {
    /// The BAT of `entries` entries at `offset` in `file`.
    pub fn new(file: Arc<FileLayer>, offset: u64, entries: u64) -> Result<Bat> {
        let stored = entries.min(file.len()?.saturating_sub(offset) / 8);
        Ok(Bat {
            file,
            offset,
            entries,
            stored,
            chunks: HashMap::new(),
            changed: HashSet::new(),
        })
    }

    /// Entries in the BAT.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// Whether the BAT has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Chunk `c`, read from the file when not in memory.
    pub fn chunk(&mut self, c: u64) -> Result<&mut Vec<u64>> {
        if !self.chunks.contains_key(&c) {
            if self.chunks.len() >= MAX_CHUNKS {
                let drop: Vec<u64> = self
                    .chunks
                    .keys()
                    .filter(|k| !self.changed.contains(k))
                    .copied()
                    .collect();
                for k in drop {
                    self.chunks.remove(&k);
                }
            }
            let first = c * CHUNK;
            let n = CHUNK.min(self.entries.saturating_sub(first));
            let in_file = n.min(self.stored.saturating_sub(first));
            let mut raw = vec![0u8; (in_file * 8) as usize];
            self.file
                .read_exact_at(&mut raw, self.offset + first * 8, "vhdx BAT")?;
            let mut v: Vec<u64> = raw
                .chunks_exact(8)
                .map(|b| super::header::le64(b, 0))
                .collect();
            v.resize(n as usize, 0);
            self.chunks.insert(c, v);
        }
        Ok(self.chunks.get_mut(&c).expect("just inserted"))
    }

    /// Entry `i` (0 past the end of the BAT).
    pub fn get(&mut self, i: u64) -> Result<u64> {
        if i >= self.entries {
            return Ok(0);
        }
        let c = i / CHUNK;
        Ok(self.chunk(c)?[(i % CHUNK) as usize])
    }

    /// Set entry `i` in memory (`i` must be inside the BAT).
    pub fn set(&mut self, i: u64, e: u64) -> Result<()> {
        let c = i / CHUNK;
        self.chunk(c)?[(i % CHUNK) as usize] = e;
        self.changed.insert(c);
        Ok(())
    }

    /// Call `f` with the first index and the entries of each chunk in turn.
    pub fn for_each_chunk(&mut self, mut f: impl FnMut(u64, &[u64]) -> bool) -> Result<()> {
        let mut c = 0;
        while c * CHUNK < self.entries {
            let v = self.chunk(c)?;
            if !f(c * CHUNK, v) {
                break;
            }
            c += 1;
        }
        Ok(())
    }
}
