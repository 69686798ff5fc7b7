//! Random access into plain gzip, zran style: during one pass, an access
//! point is recorded at a deflate block boundary about every [`SPAN`] bytes of
//! output, holding where it is in the compressed and the inflated stream, the
//! bit offset of the block start inside its byte, and the 32 KiB of output
//! before it (the dictionary the next block may refer back to). Later, any
//! range inflates from the nearest point before it.
//!
//! Resuming mid-stream needs zlib's `inflatePrime` and `inflateSetDictionary`,
//! which flate2 does not expose; [`RawInflater`] wraps them from
//! `libz-rs-sys` (zlib's C API, implemented in Rust). It is the only `unsafe`
//! in the crate, kept to this type.

use std::os::raw::c_int;

use libz_rs_sys as z;

use super::deflate::{zlib_compress, zlib_decompress_exact};
use super::TarballError;

/// Output between access points.
pub const SPAN: u64 = 1 << 20;
/// Deflate's window: how far back a block may refer.
pub const WINDOW: usize = 32 * 1024;

/// Where inflation can resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessPoint {
    /// Object offset of the first whole byte of the block (the block starts
    /// `bits` bits before it when `bits` > 0).
    pub co: u64,
    pub bits: u8,
    /// Offset in the inflated (tar) stream.
    pub uo: u64,
    /// The preceding output, up to 32 KiB, zlib-compressed; empty at the
    /// start of a gzip member.
    pub window: Vec<u8>,
    /// Length of the window once inflated.
    pub window_len: u32,
}

impl AccessPoint {
    pub fn new(co: u64, bits: u8, uo: u64, window: &[u8]) -> AccessPoint {
        AccessPoint {
            co,
            bits,
            uo,
            window: if window.is_empty() {
                Vec::new()
            } else {
                zlib_compress(window)
            },
            window_len: window.len() as u32,
        }
    }

    fn dictionary(&self) -> Result<Vec<u8>, TarballError> {
        if self.window_len == 0 {
            return Ok(Vec::new());
        }
        zlib_decompress_exact(&self.window, self.window_len as usize)
            .map_err(|e| TarballError::Corrupt(format!("access point window: {e:?}")))
    }
}

/// What one `inflate` call did.
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    pub stream_end: bool,
    /// At the end of a deflate block that is not the last one.
    pub at_block_boundary: bool,
    /// Unused bits in the last consumed byte.
    pub bits: u8,
}

/// A raw (headerless) deflate decoder with zlib's resume operations.
pub struct RawInflater {
    // Boxed: zlib keeps a pointer back to the stream, so it must not move.
    strm: Box<z::z_stream>,
}

// SAFETY: the stream and its state are owned by this value alone and are only
// touched through `&mut self`; nothing in them is tied to a thread.
unsafe impl Send for RawInflater {}

fn zlib_error(what: &str, code: c_int) -> TarballError {
    TarballError::Corrupt(format!("deflate stream: {what} failed ({code})"))
}

impl RawInflater {
    pub fn new() -> Result<RawInflater, TarballError> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a default-initialised stream (allocator set), boxed
        // so its address is stable; the version and size are this library's own.
        let code = unsafe {
            z::inflateInit2_(
                &mut *strm,
                -15,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if code != z::Z_OK {
            return Err(zlib_error("inflateInit2", code));
        }
        Ok(RawInflater { strm })
    }

    /// Starts a new deflate stream (the next gzip member).
    pub fn reset(&mut self) -> Result<(), TarballError> {
        // SAFETY: the stream was initialised by `new` and not ended.
        let code = unsafe { z::inflateReset(&mut *self.strm) };
        if code != z::Z_OK {
            return Err(zlib_error("inflateReset", code));
        }
        Ok(())
    }

    /// Resumes at an access point: the bits of the partial byte, then the dictionary.
    pub fn resume(
        &mut self,
        bits: u8,
        partial_byte: u8,
        dictionary: &[u8],
    ) -> Result<(), TarballError> {
        if bits > 0 {
            let value = c_int::from(partial_byte >> (8 - bits));
            // SAFETY: initialised stream; bits is 1..=7 as inflatePrime requires.
            let code = unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), value) };
            if code != z::Z_OK {
                return Err(zlib_error("inflatePrime", code));
            }
        }
        if !dictionary.is_empty() {
            // SAFETY: initialised raw stream; the pointer and length describe a live slice.
            let code = unsafe {
                z::inflateSetDictionary(
                    &mut *self.strm,
                    dictionary.as_ptr(),
                    dictionary.len() as z::uInt,
                )
            };
            if code != z::Z_OK {
                return Err(zlib_error("inflateSetDictionary", code));
            }
        }
        Ok(())
    }

    /// Inflates from `input` into `output`, stopping at block boundaries when
    /// `stop_at_blocks` is set.
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_blocks: bool,
    ) -> Result<Step, TarballError> {
        let avail_in = input.len().min(u32::MAX as usize);
        let avail_out = output.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in as z::uInt;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out as z::uInt;
        let flush = if stop_at_blocks {
            z::Z_BLOCK
        } else {
            z::Z_NO_FLUSH
        };
        // SAFETY: initialised stream; next_in/next_out point into live slices
        // whose lengths bound avail_in/avail_out, and are cleared below.
        let code = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = avail_in - self.strm.avail_in as usize;
        let produced = avail_out - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.next_out = std::ptr::null_mut();
        match code {
            z::Z_OK | z::Z_STREAM_END | z::Z_BUF_ERROR => {}
            z::Z_NEED_DICT => return Err(zlib_error("inflate (needs a dictionary)", code)),
            other => return Err(zlib_error("inflate", other)),
        }
        let data_type = self.strm.data_type;
        Ok(Step {
            consumed,
            produced,
            stream_end: code == z::Z_STREAM_END,
            at_block_boundary: data_type & 128 != 0 && data_type & 64 == 0,
            bits: (data_type & 7) as u8,
        })
    }
}

impl Drop for RawInflater {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, ended exactly once here.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

/// Inflates tar bytes `start..end` from `compressed`, which begins at the
/// access point's partial byte (or its first byte when `bits` is 0) and runs
/// at least to the end of the wanted output. Output is bounded by the range.
pub fn inflate_from_point(
    point: &AccessPoint,
    compressed: &[u8],
    start: u64,
    end: u64,
) -> Result<Vec<u8>, TarballError> {
    let mut inflater = RawInflater::new()?;
    let mut input = compressed;
    let partial = if point.bits > 0 {
        let (&first, rest) = input
            .split_first()
            .ok_or_else(|| TarballError::Corrupt("empty span".into()))?;
        input = rest;
        first
    } else {
        0
    };
    inflater.resume(point.bits, partial, &point.dictionary()?)?;
    let mut skip = start - point.uo;
    let want = (end - start) as usize;
    let mut out = Vec::with_capacity(want);
    let mut buf = vec![0u8; 256 * 1024];
    while out.len() < want {
        let step = inflater.inflate(input, &mut buf, false)?;
        input = &input[step.consumed..];
        let mut produced = &buf[..step.produced];
        let skipped = (skip as usize).min(produced.len());
        skip -= skipped as u64;
        produced = &produced[skipped..];
        let take = produced.len().min(want - out.len());
        out.extend_from_slice(&produced[..take]);
        if step.stream_end || (step.consumed == 0 && step.produced == 0) {
            break;
        }
    }
    if out.len() < want {
        return Err(TarballError::Corrupt(format!(
            "the deflate stream ends {} bytes before the index says",
            want - out.len()
        )));
    }
    Ok(out)
}
