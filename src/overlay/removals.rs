//! Overlay files of freed inodes, removed by a thread of their own.
//!
//! Removing a file that was just written is the slow part of an unlink on
//! ext4 (its dirty pages dropped, its blocks freed: 50–250 µs here), and a
//! mount frees an inode on its FUSE thread, between two requests: `rm -rf`
//! of files written a moment before waited for every removal before the
//! kernel's next request was even read. [`queue`] hands the file to one
//! worker thread for the whole process instead. The API's PUT does the
//! same with the file its new bytes replace (`Content::install`), which a
//! rename over it freed under the session's locks.
//!
//! Nothing may meet a queued file as a live inode's: whatever names an
//! overlay file first calls [`settle`], which removes a queued file at once
//! (or waits for the worker's removal under way). Space comes back a moment
//! later than the unlink's answer, so a write or a journal record that
//! finds the disk full calls [`drain`] and tries again. A crash loses the
//! queue; the next open of the overlay removes files that no inode names.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard};

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Removing,
}

#[derive(Default)]
struct Queue {
    order: VecDeque<PathBuf>,
    state: HashMap<PathBuf, State>,
    worker: bool,
    /// The worker waits for work: a queue must wake it. (A wake is a
    /// system call, which the FUSE thread should not pay per file while
    /// the worker is busy anyway.)
    idle: bool,
    /// Callers of [`settle`] and [`drain`] waiting for removals.
    waiting: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a file is queued and the worker is idle.
    work: Condvar,
    /// Signalled when a file is gone and someone waits for that.
    gone: Condvar,
}

static SHARED: LazyLock<Shared> = LazyLock::new(|| Shared {
    queue: Mutex::new(Queue::default()),
    work: Condvar::new(),
    gone: Condvar::new(),
});

/// Waits for a removal, as one of [`Queue::waiting`].
fn wait_gone(mut q: MutexGuard<'static, Queue>) -> MutexGuard<'static, Queue> {
    q.waiting += 1;
    let mut q = SHARED.gone.wait(q).unwrap_or_else(|p| p.into_inner());
    q.waiting -= 1;
    q
}

fn tell_gone(q: &Queue) {
    if q.waiting > 0 {
        SHARED.gone.notify_all();
    }
}

fn queue_lock() -> MutexGuard<'static, Queue> {
    SHARED.queue.lock().unwrap_or_else(|p| p.into_inner())
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("could not remove the overlay file {}: {e}", path.display()),
    }
}

/// Removes `path` soon, on the worker thread.
pub fn queue(path: PathBuf) {
    let mut q = queue_lock();
    if q.state.insert(path.clone(), State::Queued).is_none() {
        q.order.push_back(path);
    }
    if !q.worker {
        let started = std::thread::Builder::new()
            .name("sessionfs-rm".into())
            .spawn(work);
        match started {
            Ok(_) => q.worker = true,
            Err(e) => {
                // No thread to hand it to: removed here, as before.
                tracing::warn!("cannot start the overlay removal thread: {e}");
                let queued: Vec<PathBuf> = q.order.drain(..).collect();
                q.state.clear();
                drop(q);
                queued.iter().for_each(|p| remove(p));
                return;
            }
        }
    }
    if q.idle {
        q.idle = false;
        SHARED.work.notify_one();
    }
}

fn work() {
    let mut q = queue_lock();
    loop {
        let Some(path) = q.order.pop_front() else {
            q.idle = true;
            q = SHARED.work.wait(q).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        // Settled meanwhile (removed by whoever named it).
        if q.state.get(&path) != Some(&State::Queued) {
            continue;
        }
        q.state.insert(path.clone(), State::Removing);
        drop(q);
        remove(&path);
        q = queue_lock();
        q.state.remove(&path);
        tell_gone(&q);
    }
}

/// Makes sure `path` is not a queued file: one still queued is removed
/// now, one being removed is waited for.
pub fn settle(path: &Path) {
    let mut q = queue_lock();
    if q.state.is_empty() {
        return;
    }
    loop {
        match q.state.get(path) {
            None => return,
            Some(State::Queued) => {
                let path = path.to_path_buf();
                q.state.insert(path.clone(), State::Removing);
                drop(q);
                remove(&path);
                let mut q = queue_lock();
                q.state.remove(&path);
                tell_gone(&q);
                return;
            }
            Some(State::Removing) => q = wait_gone(q),
        }
    }
}

/// Waits until every queued file is removed; whether any was.
pub fn drain() -> bool {
    let mut q = queue_lock();
    let any = !q.state.is_empty();
    while !q.state.is_empty() {
        q = wait_gone(q);
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_files_go_and_a_settled_one_goes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..50).map(|i| dir.path().join(i.to_string())).collect();
        for f in &files {
            std::fs::write(f, b"bytes").unwrap();
        }
        for f in &files {
            queue(f.clone());
        }
        // Settled: gone when it returns, whoever removed it.
        settle(&files[49]);
        assert!(!files[49].exists());
        // A new file at a settled path stays.
        std::fs::write(&files[49], b"new").unwrap();
        drain();
        for f in &files[..49] {
            assert!(!f.exists(), "{} is still there", f.display());
        }
        assert_eq!(std::fs::read(&files[49]).unwrap(), b"new");
        // Nothing queued: drain says so at once.
        assert!(!drain());
    }
}
