//! Local caches between sessionfs and the object store.
//!
//! - [`blocks`]: object bytes on local disk, in checksummed fixed-size blocks
//!   under a byte budget, shared safely by concurrent readers and processes.
//!
//! [`crate::store::cached::CachedStore`] puts the block cache in front of any
//! store, so the readers above it need not know it is there.

pub mod blocks;
