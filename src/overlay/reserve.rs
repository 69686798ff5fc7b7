//! Space kept back on the overlays' disk so that deleting works when it is
//! full.
//!
//! Deleting is how space comes back, and a delete is a journal write (as is
//! the sync at an unmount, and the first writes of a remount). So a file of
//! up to [`RESERVE`] bytes is kept allocated beside the overlays, one per
//! overlay root (shared by its sessions and by every process using that
//! root, so a server with many sessions pays it once). An operation that
//! frees space and finds the disk full gives the reserve up and runs again;
//! space that comes free later goes back to the reserve first, before
//! anything else may take it; opening a journal on a disk fuller than the
//! reserve gives it up first. The binary names the file ([`set_file`]) when
//! it knows where overlays live; without it there is no reserve.
//!
//! What the file holds is read from the file itself (its length), not kept
//! in memory: another process may have given it up or taken it back. That
//! look (a `stat`) is made at most every [`LOOK_EVERY`] while the reserve
//! was whole at the last one and this process gave nothing up since: it
//! came before every delete, a tenth of what an `rm -rf` cost the mount.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

/// Bytes kept back.
pub const RESERVE: u64 = 8 << 20;

static FILE: OnceLock<PathBuf> = OnceLock::new();

/// Where the reserve lives (once per process; later calls are ignored).
pub fn set_file(path: PathBuf) {
    let _ = FILE.set(path);
}

fn file() -> Option<&'static Path> {
    FILE.get().map(PathBuf::as_path)
}

fn held(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// How long a whole reserve is taken as still whole without a look.
pub const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Whether the last look found the reserve whole, and this process has not
/// given it up since.
static WHOLE: AtomicBool = AtomicBool::new(false);
/// When that look was, in milliseconds since [`EPOCH`].
static LOOKED_AT: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn millis_now() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// Whether the reserve may be short: not known whole from a recent look.
fn may_be_short() -> bool {
    !WHOLE.load(Ordering::Acquire)
        || millis_now().saturating_sub(LOOKED_AT.load(Ordering::Relaxed))
            >= LOOK_EVERY.as_millis() as u64
}

fn looked(whole: bool) {
    LOOKED_AT.store(millis_now(), Ordering::Relaxed);
    WHOLE.store(whole, Ordering::Release);
}

/// Bytes available to an unprivileged writer on the reserve's disk.
pub fn available() -> Option<u64> {
    available_bytes(file()?.parent()?)
}

/// Gives the reserve up; whether there was any to give (and so whether an
/// operation that found no room may succeed when run again).
pub fn release() -> bool {
    let Some(path) = file() else {
        return false;
    };
    WHOLE.store(false, Ordering::Release);
    let held = held(path);
    if held == 0 || std::fs::remove_file(path).is_err() {
        return false;
    }
    tracing::warn!(
        "the overlays' disk is full: gave up the journal reserve ({held} bytes at {}) to let a delete or sync through",
        path.display()
    );
    true
}

/// Takes the reserve back, as far as there is room.
pub fn take_back() {
    let Some(path) = file() else {
        return;
    };
    if !may_be_short() {
        return;
    }
    let held = held(path);
    if held >= RESERVE {
        looked(true);
        return;
    }
    looked(false);
    let room = available().unwrap_or(0) / 4096 * 4096;
    let mut left = (RESERVE - held).min(room);
    if left == 0 {
        return;
    }
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let zeros = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        if f.write_all(&zeros[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
}

/// Bytes available to an unprivileged writer on the filesystem of `dir`.
fn available_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` is valid for one statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}
