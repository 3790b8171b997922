//! Zero detection: the hot CPU path of a sparse convert.

/// Whether every byte of `b` is zero. Works on 16-byte words, which the compiler vectorises.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    // OR 64-byte blocks together word by word; the compiler turns this into a vector loop.
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Split `b` (which starts at guest offset `start`) into runs of granules of `g` bytes
/// (aligned to guest offsets) that are all zero or not; calls `f(offset_in_b, len, zero)` for
/// each maximal run, in order.
pub(crate) fn runs(b: &[u8], start: u64, g: u64, mut f: impl FnMut(usize, usize, bool)) {
    let mut pos = 0usize;
    let mut run_start = 0usize;
    let mut run_zero: Option<bool> = None;
    while pos < b.len() {
        let guest = start + pos as u64;
        let to_boundary = (g - guest % g) as usize;
        let end = (pos + to_boundary).min(b.len());
        let z = is_zero(&b[pos..end]);
        match run_zero {
            Some(rz) if rz == z => {}
            Some(rz) => {
                f(run_start, pos - run_start, rz);
                run_start = pos;
                run_zero = Some(z);
            }
            None => run_zero = Some(z),
        }
        pos = end;
    }
    if let Some(rz) = run_zero {
        f(run_start, pos - run_start, rz);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn runs_follow_granules() {
        let mut v = vec![0u8; 4096 * 4];
        v[4096 + 5] = 1;
        v[4096 * 2 + 7] = 1;
        let mut got = Vec::new();
        runs(&v, 0, 4096, |o, l, z| got.push((o, l, z)));
        assert_eq!(
            got,
            vec![(0, 4096, true), (4096, 8192, false), (12288, 4096, true)]
        );
        // Unaligned start: first granule is short.
        let mut got = Vec::new();
        runs(&v[100..], 100, 4096, |o, l, z| got.push((o, l, z)));
        assert_eq!(got[0], (0, 3996, true));
    }
}
