//! The shard's buffer arena: one anonymous mapping cut into equal, page-aligned chunks.
//!
//! Every chunk starts on a page boundary (so on a 4096-byte boundary, which O_DIRECT needs on
//! every Linux filesystem and block device), and chunk `i` is registered buffer `i` when the
//! ring registers [`Arena::iovecs`]. A [`Buf`] is the exclusive owner of one chunk; it holds the
//! mapping alive through an `Arc`, so a buffer that outlives its arena (or its queue) never
//! dangles.

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

/// Page size the arena aligns chunks to. Linux on every architecture we build for uses at least
/// this; a larger page only makes the mapping more aligned.
const ALIGN: usize = 4096;

/// Most chunks an arena may hold: the chunk index must fit the `u16` registered-buffer index.
const MAX_CHUNKS: usize = 1 << 16;

/// One anonymous private mapping; unmapped when the last owner (arena or buffer) drops.
#[derive(Debug)]
struct Region {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: `Region` is only an owner of the mapping; it never reads or writes the bytes itself.
// Access to the bytes goes through `Buf`s, which cover disjoint chunks and are never shared.
unsafe impl Send for Region {}
// SAFETY: as above: `&Region` exposes nothing but the base address and length.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned in `Arena::new`, and this is the
        // last owner: every `Buf` holds an `Arc<Region>`, so no chunk is still reachable.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Size of a transparent huge page on x86_64 and arm64 (4 KiB base pages).
const HUGE: usize = 2 << 20;

/// Map `len` bytes of anonymous memory. Mappings of at least [`HUGE`] bytes start on a
/// [`HUGE`] boundary and ask for transparent huge pages (`MADV_HUGEPAGE`, a hint the kernel
/// may ignore): a 1 MiB buffer in 4 KiB pages is 256 memory segments, more than a
/// virtio-blk request takes (`max_segments` 254), so the block layer splits every 1 MiB
/// O_DIRECT request in two; physically contiguous huge pages make it one segment. qemu-img's
/// buffers are aligned the same way, and its 1 MiB writes go out whole.
fn map_region(len: usize) -> io::Result<NonNull<u8>> {
    // Only with 4 KiB pages: there 2 MiB is the huge page size and `len` (a multiple of
    // 4096) ends on a page boundary, so the tail below can be unmapped exactly.
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let extra = if len >= HUGE && page == ALIGN as libc::c_long {
        HUGE
    } else {
        0
    };
    let total = len
        .checked_add(extra)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "arena too large"))?;
    // SAFETY: a fresh anonymous private mapping at an address the kernel picks; no existing
    // memory is affected. The result is checked against MAP_FAILED below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let raw = ptr as usize;
    let start = if extra > 0 {
        raw.next_multiple_of(HUGE)
    } else {
        raw
    };
    // SAFETY: [raw, start) and [start + len, raw + total) lie inside the mapping just made
    // and nothing refers to them; unmapping them leaves exactly [start, start + len).
    unsafe {
        if start > raw {
            libc::munmap(ptr, start - raw);
        }
        let tail = raw + total - (start + len);
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        if extra > 0 {
            // A hint: without THP the mapping works the same, in small pages.
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
    NonNull::new(start as *mut u8).ok_or_else(|| io::Error::other("mmap gave NULL"))
}

/// A pool of equal, page-aligned buffers for one shard.
///
/// Buffers are taken with [`Arena::take`] and must be returned with [`Arena::put`] to be reused;
/// a dropped [`Buf`] is simply lost to the pool (its memory stays mapped until the arena and
/// every other buffer are gone).
#[derive(Debug)]
pub struct Arena {
    region: Arc<Region>,
    chunk: usize,
    count: usize,
    free: Vec<Buf>,
}

impl Arena {
    /// Map `total_bytes` of anonymous memory and cut it into `total_bytes / chunk` chunks (at
    /// least one). `chunk` is rounded up to a multiple of 4096 bytes.
    ///
    /// Memory is reserved, not touched: pages are faulted in on first use (or pinned when a
    /// ring registers the arena). Fails with `EINVAL` when `chunk` is 0 or the arena would have
    /// more than 65536 chunks, and with mmap's error when the address space is exhausted.
    pub fn new(total_bytes: usize, chunk: usize) -> io::Result<Arena> {
        if chunk == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "arena chunk size must be positive",
            ));
        }
        let chunk = chunk
            .checked_next_multiple_of(ALIGN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "arena chunk too large"))?;
        let count = (total_bytes / chunk).max(1);
        if count > MAX_CHUNKS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("arena of {count} chunks exceeds the {MAX_CHUNKS} buffer indices"),
            ));
        }
        let len = chunk
            .checked_mul(count)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "arena too large"))?;
        let base = map_region(len)?;
        let region = Arc::new(Region { base, len });
        // Reverse order so `take` hands out chunk 0 first (pop from the end).
        let free = (0..count)
            .rev()
            .map(|i| Buf {
                region: Arc::clone(&region),
                // SAFETY: `i * chunk < len`, so the pointer stays inside the mapping.
                ptr: unsafe { NonNull::new_unchecked(base.as_ptr().add(i * chunk)) },
                len: chunk,
                cap: chunk,
                // `count <= MAX_CHUNKS`, so `i < 65536` fits.
                index: i as u16,
            })
            .collect();
        Ok(Arena {
            region,
            chunk,
            count,
            free,
        })
    }

    /// Take a free buffer (its length reset to the chunk size; contents are whatever was left
    /// there, zeros on first use). `None` when all buffers are out.
    pub fn take(&mut self) -> Option<Buf> {
        self.free.pop()
    }

    /// Give a buffer back to the pool. Its length is reset to [`Arena::chunk_size`].
    ///
    /// A buffer from another arena is dropped instead (it never joins this pool).
    pub fn put(&mut self, mut b: Buf) {
        if !self.owns(&b) {
            debug_assert!(false, "Arena::put: buffer from another arena");
            return;
        }
        b.len = b.cap;
        self.free.push(b);
    }

    /// Bytes per buffer (a multiple of 4096).
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Number of buffers in the arena (taken or free).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Number of buffers currently free (available to [`Arena::take`]).
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// One iovec per chunk, in index order (`iovecs()[i]` is the chunk of buffer index `i`), for
    /// io_uring buffer registration. The pointers stay valid while the arena or any of its
    /// buffers lives.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                // The offset is inside the mapping (`i < count`); computing the address is safe,
                // only dereferencing it would not be.
                iov_base: self
                    .region
                    .base
                    .as_ptr()
                    .wrapping_add(i * self.chunk)
                    .cast(),
                iov_len: self.chunk,
            })
            .collect()
    }

    /// Whether `b` is a chunk of this arena (and so covered by its registration).
    pub(crate) fn owns(&self, b: &Buf) -> bool {
        Arc::ptr_eq(&self.region, &b.region)
    }
}

/// Exclusive owner of one arena chunk.
///
/// A `Buf` is moved, never shared: submitting an op moves it into the queue, and the completion
/// moves it back. Its length can be shortened with [`Buf::set_len`] (a read requests exactly
/// `len()` bytes); [`Arena::put`] restores the full chunk.
#[derive(Debug)]
pub struct Buf {
    region: Arc<Region>,
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    index: u16,
}

// SAFETY: a `Buf` is the only handle to its chunk (chunks are disjoint, `Buf` is not `Clone`),
// so moving it to another thread moves all access with it. `Region` is `Send + Sync`.
unsafe impl Send for Buf {}

impl Buf {
    /// Current length in bytes (the chunk size unless shortened by [`Buf::set_len`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `len()` is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the underlying chunk: the most `set_len` accepts.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Set the length used by reads and by `as_slice`. The bytes keep their contents.
    ///
    /// # Panics
    /// If `len > capacity()` (a caller bug, like slicing out of bounds).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "Buf::set_len({len}) beyond capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// The first `len()` bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the chunk is mapped (the `Arc<Region>` keeps it), initialised (anonymous
        // memory starts zeroed), `len <= cap` lies inside it, and `&self` excludes writers since
        // only this `Buf` reaches the chunk.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The first `len()` bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Registered-buffer index of this chunk (its position in [`Arena::iovecs`]).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Start of the chunk, for handing to the kernel. The pointer is valid for `capacity()`
    /// bytes while this `Buf` lives; using it while another reference to the bytes is live is
    /// the caller's responsibility.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_arenas_start_on_a_huge_page_boundary() {
        let mut a = Arena::new(3 << 20, 1 << 20).unwrap();
        let iov = a.iovecs();
        assert_eq!(iov[0].iov_base as usize % HUGE, 0);
        // Every chunk is usable end to end.
        let mut bufs: Vec<Buf> = std::iter::from_fn(|| a.take()).collect();
        assert_eq!(bufs.len(), 3);
        for (i, b) in bufs.iter_mut().enumerate() {
            b.as_mut_slice().fill(i as u8 + 1);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1));
        }
        // Small arenas are not padded out.
        let small = Arena::new(8192, 4096).unwrap();
        assert_eq!(small.count(), 2);
    }

    #[test]
    fn chunks_are_aligned_and_disjoint() {
        let mut a = Arena::new(5 * 8192 + 100, 8000).unwrap();
        assert_eq!(a.chunk_size(), 8192);
        assert_eq!(a.count(), 5);
        let iov = a.iovecs();
        assert_eq!(iov.len(), 5);
        let mut bufs: Vec<Buf> = std::iter::from_fn(|| a.take()).collect();
        assert_eq!(bufs.len(), 5);
        assert_eq!(a.free_count(), 0);
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.as_mut_ptr() as usize % 4096, 0);
            assert_eq!(b.as_mut_ptr().cast(), iov[b.index() as usize].iov_base);
            b.as_mut_slice().fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8));
        }
        let mut b = bufs.pop().unwrap();
        b.set_len(10);
        a.put(b);
        assert_eq!(a.take().unwrap().len(), 8192);
    }

    #[test]
    fn buf_outlives_arena() {
        let mut a = Arena::new(4096, 4096).unwrap();
        let mut b = a.take().unwrap();
        drop(a);
        b.as_mut_slice()[4095] = 7;
        assert_eq!(b.as_slice()[4095], 7);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(Arena::new(4096, 0).is_err());
        assert!(Arena::new(4096 * 70000, 4096).is_err());
        assert_eq!(Arena::new(0, 4096).unwrap().count(), 1);
    }
}
