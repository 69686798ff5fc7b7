//! The write-back loop every process that holds sessions runs (`mount`,
//! `serve`, `serve --mount-root`): it watches each open session's change
//! feed and writes the session back once it has been quiet for a while, or
//! once changes have waited too long while they keep coming; failures are
//! retried with backoff, conflicts reported. At a stop, everything pending
//! is written back before the process exits.
//!
//! The work of one write-back is the core's (`overlay::writeback`); it
//! blocks on the store, so it runs on a thread of its own, never on the
//! runtime's, and at background priority ([`crate::background`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sessionfs_core::overlay::follow::{self, Followed};
use sessionfs_core::overlay::live::LiveSession;
use sessionfs_core::overlay::writeback::{self, Report, WriteBackError, WriteBackOptions};
use sessionfs_core::store::{ObjectStore, StoreError};

/// When to write back.
#[derive(Clone, Debug, clap::Args)]
pub struct Policy {
    /// Write a session back once its changes have been quiet this long (ms).
    #[arg(
        long = "writeback-quiet-ms",
        env = "SESSIONFS_WRITEBACK_QUIET_MS",
        default_value_t = 2000,
        value_name = "MS"
    )]
    pub quiet_ms: u64,
    /// ... or once changes have waited this long while more keep coming (ms).
    #[arg(
        long = "writeback-max-lag-ms",
        env = "SESSIONFS_WRITEBACK_MAX_LAG_MS",
        default_value_t = 30_000,
        value_name = "MS"
    )]
    pub max_lag_ms: u64,
    /// Keep changes in the local overlay only (never write them back).
    #[arg(long, env = "SESSIONFS_NO_WRITEBACK")]
    pub no_writeback: bool,
    /// How often an open session asks the store whether another writer
    /// stored a newer object, which it then moves onto, merging (ms; 0:
    /// never).
    #[arg(
        long = "follow-ms",
        env = "SESSIONFS_FOLLOW_MS",
        default_value_t = 2000,
        value_name = "MS"
    )]
    pub follow_ms: u64,
}

/// Where the sessions come from: the registry of `serve`, or one mount.
pub type Sessions = Arc<dyn Fn() -> Vec<Arc<LiveSession>> + Send + Sync>;

/// What to do with a session whose object another server deleted and that
/// has nothing pending here.
pub type OnGone = Arc<dyn Fn(&LiveSession) + Send + Sync>;

#[derive(Clone)]
pub struct WriteBack {
    sessions: Sessions,
    store: Arc<dyn ObjectStore>,
    /// Shared with every clone: a reload changes the timings of the loop.
    policy: Arc<std::sync::RwLock<Policy>>,
    opts: WriteBackOptions,
    on_gone: OnGone,
    rt: tokio::runtime::Handle,
}

/// How often the change feeds are looked at.
const POLL: Duration = Duration::from_millis(250);

/// How a failed follow begins in the status's last error.
const FOLLOW_FAILED: &str = "moving onto the newer stored object";

#[derive(Default)]
struct Track {
    seq: i64,
    changed_at: Option<Instant>,
    waiting_since: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
    checked_at: Option<Instant>,
    /// Follows of a newer object that failed in a row: the next check
    /// waits [`writeback::backoff`] of them, not the follow interval.
    follow_failures: u32,
}

impl WriteBack {
    pub fn new(
        sessions: Sessions,
        store: Arc<dyn ObjectStore>,
        policy: Policy,
        on_gone: OnGone,
    ) -> WriteBack {
        WriteBack {
            sessions,
            store,
            policy: Arc::new(std::sync::RwLock::new(policy)),
            opts: WriteBackOptions::default(),
            on_gone,
            rt: tokio::runtime::Handle::current(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// New timings (a configuration reload), used from the next round on.
    pub fn set_timings(&self, quiet_ms: u64, max_lag_ms: u64, follow_ms: u64) {
        let mut p = self.policy.write().unwrap_or_else(|p| p.into_inner());
        p.quiet_ms = quiet_ms;
        p.max_lag_ms = max_lag_ms;
        p.follow_ms = follow_ms;
    }

    pub fn enabled(&self) -> bool {
        !self.policy().no_writeback
    }

    /// Runs until the task is aborted: follows newer objects, writes back.
    pub async fn run(self) {
        let mut tracks: HashMap<String, Track> = HashMap::new();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let policy = self.policy();
            let quiet = Duration::from_millis(policy.quiet_ms);
            let max_lag = Duration::from_millis(policy.max_lag_ms);
            let follow = (policy.follow_ms > 0).then(|| Duration::from_millis(policy.follow_ms));
            let sessions = (self.sessions)();
            tracks.retain(|name, _| sessions.iter().any(|s| s.name.as_str() == name));
            for s in sessions {
                self.register_control(&s);
                let probe = s.clone();
                let seq = tokio::task::spawn_blocking(move || {
                    probe.ns.lock().journal().last_seq().unwrap_or(0)
                })
                .await
                .unwrap_or(0);
                let now = Instant::now();
                let t = tracks.entry(s.name.as_str().to_owned()).or_default();
                let follow_due = follow.is_some_and(|every| {
                    let every = match t.follow_failures {
                        0 => every,
                        n => every.max(writeback::backoff(n)),
                    };
                    t.checked_at.is_none_or(|c| now - c >= every)
                });
                if follow_due {
                    t.checked_at = Some(now);
                    match self.check_remote(&s, seq != 0).await {
                        true => t.follow_failures = 0,
                        false => t.follow_failures += 1,
                    }
                }
                // Read-only sessions and --no-writeback only follow.
                if seq == 0 || s.read_only() || !self.enabled() {
                    t.seq = 0;
                    t.changed_at = None;
                    t.waiting_since = None;
                    t.failures = 0;
                    t.retry_at = None;
                    continue;
                }
                if seq != t.seq {
                    t.seq = seq;
                    t.changed_at = Some(now);
                    t.waiting_since.get_or_insert(now);
                }
                let quiet_enough = t.changed_at.is_some_and(|c| now - c >= quiet);
                let waited_enough = t.waiting_since.is_some_and(|w| now - w >= max_lag);
                let may_retry = t.retry_at.is_none_or(|r| now >= r);
                if !(quiet_enough || waited_enough) || !may_retry {
                    continue;
                }
                match self.once(&s).await {
                    Ok(_) => {
                        t.failures = 0;
                        t.retry_at = None;
                        t.waiting_since = None;
                        // Changes made during the write-back start a new wait.
                        t.seq = 0;
                    }
                    Err(_) => {
                        t.failures += 1;
                        t.retry_at = Some(Instant::now() + writeback::backoff(t.failures));
                    }
                }
            }
        }
    }

    /// Lets `sessionfs flush` and `sessionfs status` (and an API download)
    /// reach this loop through the session (a mount answers them on its
    /// root). Any thread may call it.
    pub fn register_control(&self, s: &Arc<LiveSession>) {
        // No list of sessions inside: the session would hold itself.
        let me = WriteBack {
            sessions: Arc::new(Vec::new),
            ..self.clone()
        };
        let weak = Arc::downgrade(s);
        let rt = self.rt.clone();
        // The socket's task is spawned on the loop's runtime whatever the
        // calling thread (a FUSE thread opening a session under a mount root).
        let _on_runtime = self.rt.enter();
        s.set_control_once(move || {
            // Dropped with the hook, and so with the session.
            let listening = crate::control_socket::listen(s);
            Arc::new(move |what: &str| {
                let _ = &listening;
                let s = weak.upgrade().ok_or("the session is closed")?;
                match what {
                    "flush" if !me.enabled() => {
                        Err("write-back is off (--no-writeback)".to_owned())
                    }
                    // Before an unmount: nothing to do when write-back is off.
                    "drain" if !me.enabled() => Ok("write-back is off".to_owned()),
                    "flush" | "drain" => match rt.block_on(me.once(&s)) {
                        Ok(Some(r)) => Ok(describe(&r)),
                        Ok(None) => Ok("nothing to write back".to_owned()),
                        Err(e) => Err(e.to_string()),
                    },
                    "status" => Ok(status_json(&s).to_string()),
                    "follow" => rt
                        .block_on(me.follow(&s))
                        .map(|f| format!("{f:?}"))
                        .map_err(|e| e.to_string()),
                    other => Err(format!("unknown request {other:?}")),
                }
            })
        });
    }

    /// Asks the store whether another writer replaced `s`'s object, and
    /// moves onto it if so. Returns false when moving onto it failed.
    async fn check_remote(&self, s: &Arc<LiveSession>, pending: bool) -> bool {
        let Some(base) = s.reader().map(|r| r.meta().etag.clone()) else {
            return true;
        };
        let key = s.name.object_key();
        match self.store.head(&key).await {
            Ok(m) if m.etag == base => {}
            Ok(_) => match self.follow(s).await {
                Ok(_) => {
                    let mut status = s.writeback.lock();
                    if status
                        .last_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with(FOLLOW_FAILED))
                    {
                        status.last_error = None;
                    }
                }
                Err(e) => {
                    let msg = format!("{FOLLOW_FAILED}: {e}");
                    tracing::warn!(session = %s.name, "{msg}");
                    s.writeback.lock().last_error = Some(msg);
                    return false;
                }
            },
            Err(StoreError::NotFound { .. }) if !pending => (self.on_gone)(s),
            Err(StoreError::NotFound { .. }) => {
                let msg = "the object was deleted from the store by another writer; the changes here stay pending in the overlay".to_owned();
                tracing::warn!(session = %s.name, "{msg}");
                s.writeback.lock().last_error = Some(msg);
            }
            // The store is unreachable: the write-back reports it.
            Err(_) => {}
        }
        true
    }

    /// Moves `s` onto the stored object (after a conflict, or when another
    /// writer stored a newer one).
    pub async fn follow(&self, s: &Arc<LiveSession>) -> Result<Followed, WriteBackError> {
        let (live, store) = (s.clone(), self.store.clone());
        let followed = tokio::task::spawn_blocking(move || follow::follow(&live, &store))
            .await
            .unwrap_or_else(|e| {
                Err(WriteBackError::Spool(std::io::Error::other(format!(
                    "the rebase task failed: {e}"
                ))))
            })?;
        match &followed {
            Followed::Rebased { etag, rebased } => tracing::info!(
                session = %s.name,
                "moved onto the stored object {etag}: {} path(s) taken from it, {} conflict(s)",
                rebased.taken.len(),
                rebased.conflicts.len()
            ),
            Followed::Gone | Followed::Unchanged => {}
        }
        Ok(followed)
    }

    /// One write-back of `s`; when another writer got there first, the
    /// session moves onto their object (merging) and tries once more.
    pub async fn once(&self, s: &Arc<LiveSession>) -> Result<Option<Report>, WriteBackError> {
        match self.attempt(s).await {
            Err(e) if e.is_conflict() => {
                match self.follow(s).await {
                    Ok(Followed::Gone) => return Err(e),
                    Ok(_) => {}
                    Err(f) => {
                        s.writeback.lock().last_error = Some(format!("{FOLLOW_FAILED}: {f}"));
                        return Err(f);
                    }
                }
                self.attempt(s).await
            }
            other => other,
        }
    }

    /// One write-back of `s`, logged and recorded in its status.
    async fn attempt(&self, s: &Arc<LiveSession>) -> Result<Option<Report>, WriteBackError> {
        let live = s.clone();
        let store = self.store.clone();
        let opts = self.opts.clone();
        // At background priority: the mount and the API go on answering,
        // and whoever made the changes goes on working (`background`).
        let result = crate::background::run(&self.rt, "sessionfs-writeback", move || {
            writeback::write_back(&live, &store, &opts)
        })
        .await
        .unwrap_or_else(|| {
            Err(WriteBackError::Spool(std::io::Error::other(
                "the write-back thread failed",
            )))
        });
        let mut status = s.writeback.lock();
        match &result {
            Ok(Some(r)) => {
                tracing::info!(session = %s.name, "{}", describe(r));
                status.last = Some(r.clone());
                status.last_error = None;
            }
            Ok(None) => {}
            Err(e) => {
                if e.is_conflict() {
                    status.conflicts += 1;
                }
                tracing::warn!(session = %s.name, "write-back failed: {e}");
                status.last_error = Some(e.to_string());
            }
        }
        result
    }

    /// Writes back every session with pending changes, retrying failures
    /// until `deadline`. Returns whether nothing is left pending.
    pub async fn flush_all(&self, within: Duration) -> bool {
        if !self.enabled() {
            return true;
        }
        let deadline = Instant::now() + within;
        let mut failures = 0;
        loop {
            let mut left = false;
            for s in (self.sessions)() {
                if s.read_only() || !s.has_pending_changes().unwrap_or(true) {
                    continue;
                }
                if self.once(&s).await.is_err() {
                    left = true;
                }
            }
            if !left {
                return true;
            }
            failures += 1;
            let wait = writeback::backoff(failures).min(Duration::from_secs(5));
            if Instant::now() + wait >= deadline {
                tracing::error!("changes are still pending at the stop; they stay in the overlay and are written back at the next start");
                return false;
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// One line of figures for a write-back.
pub fn describe(r: &Report) -> String {
    format!(
        "wrote back {} change(s): {} object of {} bytes, {} uploaded, {} copied server-side, {} requests, {:.3} s, etag {}",
        r.changes,
        if r.full { "full" } else { "incremental" },
        r.object_size,
        r.uploaded,
        r.copied,
        r.requests,
        r.seconds,
        r.etag
    )
}

/// What `sessionfs status` shows of a session.
pub fn status_json(s: &LiveSession) -> serde_json::Value {
    let pending = s.ns.lock().journal().pending_count().unwrap_or(0);
    let base = s.reader().map(|r| r.meta().etag.clone());
    let status = s.writeback.lock().clone();
    serde_json::json!({
        "session": s.name.as_str(),
        "baseEtag": base,
        "pendingChanges": pending,
        "lastWriteBack": status.last.as_ref().map(Report::to_json),
        "lastError": status.last_error,
        "conflicts": status.conflicts,
    })
}
