//! Work that may wait, at background CPU priority: a write-back.
//!
//! A write-back packs the changed files (deflate on every core) while the
//! mount or the API goes on answering, and the agent or editor that made the
//! changes goes on working. At the same priority it took half the cores
//! from them: a `cp -r` of 1,950 files into a mount took 0.93–1.00 s
//! beside a write-back of 80 MB of new files, against 0.47–0.65 s on a
//! quiet mount; at the priority below, 0.40–0.50 s beside it.
//!
//! So a write-back runs on a thread of its own at [`NICE`] (Linux keeps the
//! nice value per thread; the threads it spawns to compress inherit it).
//! On a thread of its own because an unprivileged process may raise its
//! nice value but not lower it again: a thread of the runtime's pool,
//! niced once, would answer later reads at that priority too. Threads are
//! cheap beside a write-back (seconds apart at most).

use tokio::runtime::Handle;

/// Background priority, not idle: under a build that keeps both cores
/// busy, a nice-10 thread still gets about a tenth of a core (weights 110
/// against 1024), so its changes reach the store in minutes, not never.
pub const NICE: i32 = 10;

/// Runs `work` on a new thread at [`NICE`], inside `rt` (for its
/// `block_on`s), and returns its result; `None` if the thread could not be
/// started or panicked.
pub async fn run<T: Send + 'static>(
    rt: &Handle,
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rt = rt.clone();
    let started = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _in = rt.enter();
            lower_priority();
            let _ = tx.send(work());
        });
    if let Err(e) = started {
        tracing::warn!("starting a {name} thread: {e}");
        return None;
    }
    rx.await.ok()
}

/// Moves the calling thread to [`NICE`] unless it is there or lower
/// already (a process started niced); a failure leaves it as it was (the
/// work still runs, only at the usual priority).
fn lower_priority() {
    if nice() >= NICE {
        return;
    }
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; who = 0 with PRIO_PROCESS is the calling thread on Linux.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
    if rc != 0 {
        tracing::debug!(
            "lowering a background thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The calling thread's nice value (0 if it cannot be read).
fn nice() -> i32 {
    // SAFETY: getpriority takes plain integers and touches no memory of
    // ours; errno is thread-local, and cleared first because -1 is also a
    // valid answer.
    let (value, errno) = unsafe {
        *libc::__errno_location() = 0;
        let value = libc::getpriority(libc::PRIO_PROCESS, 0);
        (value, *libc::__errno_location())
    };
    if errno == 0 {
        value
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_at_background_priority_and_the_caller_does_not() {
        let before = nice();
        let (seen, inherited) = run(&Handle::current(), "test-background", || {
            let spawned = std::thread::spawn(nice).join().unwrap_or(-100);
            (nice(), spawned)
        })
        .await
        .expect("the work ran");
        // Already at NICE or above (a niced test run) stays there.
        assert_eq!(seen, NICE.max(before));
        assert_eq!(inherited, seen, "threads the work spawns inherit it");
        assert_eq!(nice(), before, "the caller's own priority is unchanged");
    }

    #[tokio::test]
    async fn the_work_can_wait_on_the_runtime() {
        let got = run(&Handle::current(), "test-background", || {
            Handle::current().block_on(async { 7 })
        })
        .await;
        assert_eq!(got, Some(7));
    }
}
