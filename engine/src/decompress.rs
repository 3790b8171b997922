//! Decoding compressed clusters: CPU work done on the shard that moves the unit.

use std::cell::RefCell;
use std::io;

use rimg_formats::Codec;

use crate::files::{FileIdx, JobFiles};

thread_local! {
    /// Per-shard scratch: the compressed bytes and the decoded unit.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Where a compressed unit is and how to decode it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CompressedSrc {
    /// file holding the compressed bytes
    pub file: FileIdx,
    /// start of the compressed bytes
    pub host: u64,
    /// upper bound of their length
    pub clen_max: u64,
    /// codec
    pub codec: Codec,
    /// decoded unit size
    pub unit: u64,
    /// offset of the wanted range in the decoded unit
    pub skip: u64,
}

/// Decode `c` and copy `dst.len()` bytes from `c.skip` into `dst`.
pub(crate) fn read_compressed(
    files: &JobFiles,
    c: &CompressedSrc,
    dst: &mut [u8],
) -> io::Result<()> {
    if c.skip + dst.len() as u64 > c.unit || c.unit > 64 << 20 || c.clen_max > (64 << 20) + 512 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "compressed cluster descriptor out of range",
        ));
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (input, output) = &mut *s;
        input.resize(c.clen_max as usize, 0);
        let got = files.pread(c.file, c.host, input)?;
        output.resize(c.unit as usize, 0);
        decode(c.codec, &input[..got], output)?;
        let s0 = c.skip as usize;
        dst.copy_from_slice(&output[s0..s0 + dst.len()]);
        Ok(())
    })
}

/// Whether `codec`'s stream starts with a zlib header.
fn c_zlib_header(codec: Codec) -> bool {
    codec == Codec::ZlibStream
}

/// Decode `input` (which may carry trailing bytes of the next cluster) until `out` is full.
pub(crate) fn decode(codec: Codec, input: &[u8], out: &mut [u8]) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    match codec {
        Codec::Zlib | Codec::ZlibStream => {
            let mut d = flate2::Decompress::new(c_zlib_header(codec));
            loop {
                let (i, o) = (d.total_in() as usize, d.total_out() as usize);
                if o == out.len() {
                    return Ok(());
                }
                let st = d
                    .decompress(&input[i..], &mut out[o..], flate2::FlushDecompress::Finish)
                    .map_err(|_| bad("corrupt zlib-compressed cluster"))?;
                let progressed = d.total_in() as usize != i || d.total_out() as usize != o;
                if d.total_out() as usize == out.len() {
                    return Ok(());
                }
                if st == flate2::Status::StreamEnd || !progressed {
                    return Err(bad("zlib-compressed cluster decodes short"));
                }
            }
        }
        Codec::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|_| bad("zstd decoder"))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let before = (inb.pos(), outb.pos());
                let hint = d
                    .run(&mut inb, &mut outb)
                    .map_err(|_| bad("corrupt zstd-compressed cluster"))?;
                if outb.pos() == outb.capacity() {
                    return Ok(());
                }
                if (inb.pos(), outb.pos()) == before || (hint == 0 && inb.pos() == input.len()) {
                    return Err(bad("zstd-compressed cluster decodes short"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn zlib_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        c.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decode(Codec::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0x55; 300]);
        let mut out = vec![0u8; 65536];
        decode(Codec::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
