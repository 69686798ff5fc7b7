//! The foreign-tarball index pass: gzip framing (members, headers, trailers),
//! inflation with access points, and the tar header walk, on arbitrary bytes,
//! with limits small enough that every input finishes quickly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessionfs_core::tarball::foreign::{index, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_tar_size: 16 << 20,
        max_entries: 10_000,
    };
    if let Ok(found) = index(data, limits) {
        for e in &found.entries {
            assert!(sessionfs_core::tarball::path::check_entry_path(&e.p).is_ok());
        }
    }
});
