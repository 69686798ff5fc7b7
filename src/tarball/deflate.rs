//! The deflate and gzip framing of a session object.
//!
//! A session object is one gzip member (so every gzip reader, including those
//! that stop after the first member, reads all of it) whose deflate stream is
//! cut into segments: each segment is compressed by a fresh raw deflater and
//! ended with a full flush, so it ends byte-aligned, is not final, and inflates
//! on its own from its offset. The tail (table of contents, locator, end of
//! archive) is written as stored blocks so its bytes sit raw in the object.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use libdeflater::{DecompressionError, Decompressor};

/// gzip header: deflate, no name, no mtime (the same tree gives the same bytes),
/// OS "unknown".
pub const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
/// gzip trailer: CRC32 and ISIZE, both little-endian.
pub const GZIP_TRAILER_LEN: usize = 8;
/// A stored block's header once the stream is byte-aligned: BFINAL/BTYPE byte, LEN, NLEN.
pub const STORED_HEADER_LEN: usize = 5;
const MAX_STORED: usize = 65_535;
/// Deflate cannot expand data more than about 1032:1; anything claiming more is corrupt or hostile.
pub const MAX_INFLATE_RATIO: u64 = 1032;

/// Compresses one segment: raw deflate, ended with a full flush, not final.
pub fn compress_segment(data: &[u8], level: u32) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 3 + 128);
    let mut input = data;
    loop {
        if out.capacity() - out.len() < 256 {
            out.reserve(out.capacity().max(4096));
        }
        let before = c.total_in();
        // Compressing into a Vec with spare room cannot fail: errors only come
        // from misuse of the stream state, which this loop does not do.
        c.compress_vec(input, &mut out, FlushCompress::Full)
            .expect("deflate into a growable buffer");
        input = &input[usize::try_from(c.total_in() - before).unwrap_or(input.len())..];
        // The flush is complete once everything is consumed and output room remains.
        if input.is_empty() && out.len() < out.capacity() {
            return out;
        }
    }
}

/// Appends `data` as stored blocks; only the last gets BFINAL when `last` is set.
pub fn stored_blocks(data: &[u8], last: bool, out: &mut Vec<u8>) {
    let mut chunks = data.chunks(MAX_STORED).peekable();
    if chunks.peek().is_none() {
        push_stored(&[], last, out);
        return;
    }
    while let Some(chunk) = chunks.next() {
        push_stored(chunk, last && chunks.peek().is_none(), out);
    }
}

fn push_stored(chunk: &[u8], last: bool, out: &mut Vec<u8>) {
    let len = chunk.len() as u16;
    out.push(u8::from(last));
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(chunk);
}

pub fn gzip_trailer(crc: u32, total_len: u64) -> [u8; 8] {
    let mut t = [0u8; 8];
    t[..4].copy_from_slice(&crc.to_le_bytes());
    t[4..].copy_from_slice(&(total_len as u32).to_le_bytes());
    t
}

/// Why a segment did not inflate to what the index promised.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    Corrupt(String),
    /// More output than the index promised: corrupt, or a bomb.
    TooLong,
    TooShort {
        got: usize,
    },
}

/// Inflates a raw deflate span that must produce exactly `expected` bytes.
/// Never allocates more than `expected` (plus one byte to detect excess).
pub fn inflate_exact(compressed: &[u8], expected: usize) -> Result<Vec<u8>, InflateError> {
    inflate_exact_into(compressed, expected, Vec::new())
}

/// [`inflate_exact`] into `out`'s memory (its bytes are dropped): a
/// buffer used before, so inflating segment after segment does not free
/// and allocate megabytes each time.
///
/// It inflates with libdeflate, which decodes a whole buffer of known size
/// faster than zlib (here, on one core: the tarball benchmark's segments
/// 480–500 MiB/s against 390–410; 100 MiB of source-like text packed at
/// level 6, 740–780 against 400–420); a segment's size is always known.
/// The output buffer is exactly `expected` bytes, so no input can make it
/// write more: excess is [`InflateError::TooLong`].
pub fn inflate_exact_into(
    compressed: &[u8],
    expected: usize,
    mut out: Vec<u8>,
) -> Result<Vec<u8>, InflateError> {
    thread_local! {
        /// libdeflate's state (about 10 KiB), kept per thread.
        static DECODER: RefCell<Decompressor> = RefCell::new(Decompressor::new());
    }
    // Only room the buffer never had is zeroed: the decoder overwrites
    // the rest, and bytes it does not reach are never returned.
    out.truncate(expected);
    out.resize(expected, 0);
    // A segment ends in a full flush, not in a final block, and libdeflate
    // inflates only whole streams: an empty final stored block ends it.
    let mut input = inputs::take();
    input.extend_from_slice(compressed);
    input.extend_from_slice(&FINAL_EMPTY_BLOCK);
    let got = DECODER.with_borrow_mut(|decoder| decoder.deflate_decompress(&input, &mut out));
    inputs::give(input);
    match got {
        Ok(n) if n == expected => Ok(out),
        Ok(n) => Err(InflateError::TooShort { got: n }),
        Err(DecompressionError::InsufficientSpace) => Err(InflateError::TooLong),
        Err(DecompressionError::BadData) => {
            Err(InflateError::Corrupt("invalid deflate data".into()))
        }
    }
}

/// Buffers for a segment's compressed bytes with the final block added,
/// reused by whichever thread inflates next. A few, not one per thread:
/// a mount reads on up to hundreds of blocking threads, and a buffer of up
/// to a segment's size kept by each would be memory no reader uses.
mod inputs {
    use std::sync::Mutex;

    const KEPT: usize = 4;

    static INPUTS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    pub fn take() -> Vec<u8> {
        let mut kept = INPUTS.lock().unwrap_or_else(|p| p.into_inner());
        kept.pop().unwrap_or_default()
    }

    pub fn give(mut buf: Vec<u8>) {
        buf.clear();
        let mut kept = INPUTS.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < KEPT {
            kept.push(buf);
        }
    }
}

/// An empty stored block with BFINAL set, on a byte boundary.
const FINAL_EMPTY_BLOCK: [u8; STORED_HEADER_LEN] = [1, 0, 0, 0xff, 0xff];

/// zlib-compresses a small buffer (the table of contents).
/// Compresses what is written to it as [`zlib_compress`] would, counting
/// the bytes written: a TOC is serialised into it, never held whole (200,000
/// entries are about 67 MB of JSON).
pub struct ZlibSink {
    inner: flate2::write::ZlibEncoder<Vec<u8>>,
    written: u64,
}

impl ZlibSink {
    pub fn new() -> ZlibSink {
        ZlibSink {
            inner: flate2::write::ZlibEncoder::new(Vec::new(), Compression::new(9)),
            written: 0,
        }
    }

    /// The compressed bytes, and how many bytes were written.
    pub fn finish(self) -> std::io::Result<(Vec<u8>, u64)> {
        Ok((self.inner.finish()?, self.written))
    }
}

impl Default for ZlibSink {
    fn default() -> Self {
        ZlibSink::new()
    }
}

impl std::io::Write for ZlibSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub fn zlib_compress(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(9), true);
    let mut out = Vec::with_capacity(data.len() / 4 + 128);
    loop {
        if out.capacity() - out.len() < 256 {
            out.reserve(out.capacity().max(4096));
        }
        let consumed = usize::try_from(c.total_in()).unwrap_or(data.len());
        let status = c
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Finish)
            .expect("deflate into a growable buffer");
        if status == Status::StreamEnd {
            return out;
        }
    }
}

/// Inflates a zlib buffer whose inflated size is known; bounded like `inflate_exact`.
pub fn zlib_decompress_exact(compressed: &[u8], expected: usize) -> Result<Vec<u8>, InflateError> {
    let mut d = Decompress::new(true);
    let mut out = Vec::with_capacity(expected + 1);
    let status = d
        .decompress_vec(compressed, &mut out, FlushDecompress::Finish)
        .map_err(|e| InflateError::Corrupt(e.to_string()))?;
    if out.len() > expected {
        return Err(InflateError::TooLong);
    }
    if status != Status::StreamEnd {
        return if out.len() == expected + 1 {
            Err(InflateError::TooLong)
        } else {
            Err(InflateError::TooShort { got: out.len() })
        };
    }
    if out.len() < expected {
        return Err(InflateError::TooShort { got: out.len() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn segments_inflate_alone_and_together() {
        let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let b = b"hello segment two".repeat(1000);
        let ca = compress_segment(&a, 6);
        let cb = compress_segment(&b, 6);
        assert!(ca.ends_with(&[0, 0, 0xff, 0xff]));
        assert_eq!(inflate_exact(&cb, b.len()).unwrap(), b);
        assert_eq!(inflate_exact(&ca, a.len()).unwrap(), a);
        // As one gzip member, read by a standard decoder.
        let mut obj = GZIP_HEADER.to_vec();
        obj.extend_from_slice(&ca);
        obj.extend_from_slice(&cb);
        stored_blocks(b"tail", true, &mut obj);
        let mut all = a.clone();
        all.extend_from_slice(&b);
        all.extend_from_slice(b"tail");
        let mut h = crc32fast::Hasher::new();
        h.update(&all);
        obj.extend_from_slice(&gzip_trailer(h.finalize(), all.len() as u64));
        let mut got = Vec::new();
        flate2::read::GzDecoder::new(&obj[..])
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, all);
    }

    #[test]
    fn inflation_is_bounded() {
        let zeros = vec![0u8; 1 << 20];
        let c = compress_segment(&zeros, 6);
        assert_eq!(inflate_exact(&c, 1000), Err(InflateError::TooLong));
        assert!(matches!(
            inflate_exact(&c, 2 << 20),
            Err(InflateError::TooShort { .. })
        ));
        assert!(inflate_exact(b"\xff\xff\xff garbage", 10).is_err());
        // Into a used buffer: its old bytes go, its room is used, the bound holds.
        let used = vec![9u8; 3 << 20];
        let at = used.as_ptr();
        let got = inflate_exact_into(&c, zeros.len(), used).unwrap();
        assert_eq!((got == zeros, got.as_ptr()), (true, at));
        assert_eq!(
            inflate_exact_into(&c, 1000, vec![1u8; 4 << 20]),
            Err(InflateError::TooLong)
        );
        let z = zlib_compress(&zeros);
        assert_eq!(zlib_decompress_exact(&z, zeros.len()).unwrap(), zeros);
        assert_eq!(zlib_decompress_exact(&z, 10), Err(InflateError::TooLong));
    }

    #[test]
    fn stored_blocks_split_at_64k() {
        let data = vec![7u8; 150_000];
        let mut out = Vec::new();
        stored_blocks(&data, true, &mut out);
        assert_eq!(out.len(), data.len() + 3 * STORED_HEADER_LEN);
        assert_eq!(inflate_exact(&out, data.len()).unwrap(), data);
    }
}
