//! The parsers of a session object's tail: the locator, then the TOC it
//! points at (zlib inflation bounded by the locator, JSON, validation). The
//! CRC is computed here so that inputs reach past it into the TOC parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessionfs_core::tarball::reader::decode_toc;
use sessionfs_core::tarball::toc::{Locator, LOCATOR_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < LOCATOR_LEN {
        return;
    }
    let (head, toc) = data.split_at(LOCATOR_LEN);
    let size = u64::from_le_bytes(head[56..64].try_into().unwrap_or_default());
    let _ = Locator::decode(head, size);
    // A locator that passes its own checks, describing the fuzzed TOC bytes.
    let field =
        |i: usize| u64::from_le_bytes(head[16 + 8 * i..24 + 8 * i].try_into().unwrap_or_default());
    let locator = Locator {
        version: u32::from_le_bytes(head[8..12].try_into().unwrap_or_default()) % 3,
        toc_offset: field(0),
        toc_tar_offset: field(1) & !511,
        toc_len: toc.len() as u64,
        toc_raw_len: field(3) % (1 << 24),
        tar_size: field(4),
        object_size: size,
        toc_crc: crc32fast::hash(toc),
    };
    let _ = decode_toc(&locator, toc);
});
