//! How long one read of an object may wait on the store (`--read-timeout-secs`).
//!
//! Process-wide, set once at start-up by `mount` and `serve`. A read that
//! has no answer by then fails (EIO in a mount, 5xx in the API) instead of
//! holding a FUSE thread or a request behind a stalled store. Readahead
//! is bounded by the same deadline: a segment it claimed is one a later
//! reader waits for, and a readahead stuck on a dead connection would make
//! that reader fail long after the store is back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static READ_DEADLINE_MS: AtomicU64 = AtomicU64::new(30_000);

/// Sets the deadline for every later read of an object.
pub fn set_read_deadline(d: Duration) {
    READ_DEADLINE_MS.store(
        d.as_millis().clamp(1, u128::from(u64::MAX)) as u64,
        Ordering::Relaxed,
    );
}

/// The deadline in force.
pub fn read_deadline() -> Duration {
    Duration::from_millis(READ_DEADLINE_MS.load(Ordering::Relaxed))
}
