//! Compressing clusters for `convert -c`: CPU work done on every shard in parallel.

use std::cell::RefCell;
use std::io;

use rimg_formats::Codec;

thread_local! {
    /// Per-shard compressor state, reused across clusters.
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
}

/// Compress `input` with `codec` into `out` (cleared first). Returns false when the result
/// would not be smaller than `input` (the cluster is then stored uncompressed, as QEMU does).
///
/// zlib output is raw deflate with a 4 KiB window (QEMU inflates qcow2 clusters with
/// window bits -12, so a larger window would not decode there).
pub(crate) fn compress(codec: Codec, input: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
    out.clear();
    let limit = input.len().saturating_sub(1);
    match codec {
        Codec::Zlib => DEFLATE.with(|c| {
            let mut c = c.borrow_mut();
            let z = c.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            z.reset();
            out.reserve(limit);
            let st = z
                .compress_vec(input, out, flate2::FlushCompress::Finish)
                .map_err(|e| io::Error::other(format!("deflate: {e}")))?;
            Ok(st == flate2::Status::StreamEnd && out.len() <= limit)
        }),
        Codec::ZlibStream => {
            // A complete zlib stream, stored even when it does not shrink (vmdk
            // streamOptimized grains are always compressed).
            let mut z = flate2::Compress::new(flate2::Compression::default(), true);
            out.reserve(input.len() + input.len() / 1000 + 64);
            loop {
                let st = z
                    .compress_vec(
                        &input[z.total_in() as usize..],
                        out,
                        flate2::FlushCompress::Finish,
                    )
                    .map_err(|e| io::Error::other(format!("deflate: {e}")))?;
                if st == flate2::Status::StreamEnd {
                    return Ok(true);
                }
                out.reserve(out.len().max(4096));
            }
        }
        Codec::Zstd => {
            let c = zstd::bulk::compress(input, 0)
                .map_err(|e| io::Error::other(format!("zstd: {e}")))?;
            if c.len() > limit {
                return Ok(false);
            }
            out.extend_from_slice(&c);
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_every_codec() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7 % 256) as u8).collect();
        for codec in [Codec::Zlib, Codec::Zstd, Codec::ZlibStream] {
            let mut c = Vec::new();
            assert!(compress(codec, &data, &mut c).unwrap());
            assert!(c.len() < data.len());
            let mut out = vec![0u8; data.len()];
            crate::decompress::decode(codec, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
        // Random data does not shrink.
        let mut x = 1u64;
        let rnd: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut c = Vec::new();
        assert!(!compress(Codec::Zlib, &rnd, &mut c).unwrap());
    }
}
