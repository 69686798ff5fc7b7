//! The sessions of one bucket that this process works on, each opened once
//! and shared: `serve` runs the mount root and the HTTP API over one
//! registry, so both see the same tree, journal and cache.
//!
//! A session exists when its object does, or when it has an overlay here
//! (created, not yet written back). Opening one reads its TOC and loads or
//! starts its journal; two requests for the same session never open it
//! twice (the journal is locked exclusively, so the second would fail).
//! Replacing or deleting a session (upload, DELETE, rmdir in the mount
//! root) drops the open copy and its overlay; a session a mount is watching
//! cannot be replaced from outside it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;

use super::live::LiveSession;
use super::open::{self, OpenError, OpenSpec, JOURNAL};
use super::OverlayError;
use crate::session::{SessionPath, OBJECT_NAME};
use crate::store::{ObjectStore, StoreError, MAX_LIST_KEYS};
use crate::tarball::index::TocIndex;
use crate::tarball::reader::SessionReader;
use crate::tarball::TarballError;

/// How long a listing of the bucket is reused.
const LIST_TTL: std::time::Duration = std::time::Duration::from_secs(5);

pub struct RegistrySpec {
    pub store: Arc<dyn ObjectStore>,
    pub index: Option<TocIndex>,
    /// Overlays of this bucket's sessions: `{overlays}/{session}/`.
    pub overlays: PathBuf,
    pub read_only: bool,
    /// How often an open session checks that its object was not replaced.
    pub recheck: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("session {0} does not exist")]
    NotFound(String),
    #[error(
        "session {0} is mounted here; it cannot be replaced or deleted from outside the mount"
    )]
    Mounted(String),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
}

impl RegistryError {
    /// The object store did not answer; the same request may work later.
    pub fn store_unavailable(&self) -> bool {
        match self {
            RegistryError::Store(e) => e.is_unavailable(),
            RegistryError::Overlay(e) | RegistryError::Open(OpenError::Overlay(e)) => {
                e.store_unavailable()
            }
            _ => false,
        }
    }
}

/// Most sessions kept open as object views at once (each holds its TOC).
const MAX_VIEWS: usize = 8;

/// A session read straight from its object.
struct View {
    reader: Arc<SessionReader>,
    /// When the store last said this is still the session's object.
    checked: Instant,
    used: Instant,
}

/// What the API reports of a session.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionInfo {
    pub name: String,
    /// Size of the stored object (0 for a session that has none yet).
    pub size: u64,
    pub last_modified: Option<SystemTime>,
    /// When the overlay was started, else the object's time.
    pub created: Option<SystemTime>,
    pub etag: Option<String>,
    /// The session has changes here not yet written back.
    pub pending_changes: bool,
    /// What the write-backs of the session did (while it is open here).
    pub writeback: Option<super::live::WriteBackStatus>,
}

pub struct Registry {
    spec: RegistrySpec,
    rt: tokio::runtime::Handle,
    open: Mutex<BTreeMap<String, Arc<LiveSession>>>,
    /// Sessions read as their objects are (see [`Registry::object_view`]).
    views: Mutex<HashMap<String, View>>,
    /// Counts discards and deletions: a view opened across one is not kept.
    discards: std::sync::atomic::AtomicU64,
    /// One lock per session being opened, so it is opened once.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    listed: Mutex<Option<(Instant, BTreeSet<String>)>>,
    on_open: Mutex<Option<OnOpen>>,
    /// Sessions taken out of `open` by [`Registry::close_idle`] whose
    /// journals are not closed yet (a sync under way).
    closing: std::sync::atomic::AtomicUsize,
}

/// Told of each session as it opens (the write-back loop attaches itself,
/// so a session can be flushed from its first moment).
pub type OnOpen = Arc<dyn Fn(&Arc<LiveSession>) + Send + Sync>;

impl Registry {
    pub fn new(spec: RegistrySpec, rt: tokio::runtime::Handle) -> Registry {
        Registry {
            spec,
            rt,
            open: Mutex::new(BTreeMap::new()),
            views: Mutex::new(HashMap::new()),
            discards: Default::default(),
            opening: Mutex::new(HashMap::new()),
            listed: Mutex::new(None),
            on_open: Mutex::new(None),
            closing: Default::default(),
        }
    }

    /// Calls `f` with every session opened from now on.
    pub fn set_on_open(&self, f: OnOpen) {
        *self.on_open.lock() = Some(f);
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.spec.store
    }

    pub fn read_only(&self) -> bool {
        self.spec.read_only
    }

    fn overlay(&self, name: &SessionPath) -> PathBuf {
        self.spec.overlays.join(name.as_str())
    }

    /// Whether this host holds the session open or an overlay of it.
    pub fn is_local(&self, name: &SessionPath) -> bool {
        self.get(name).is_some() || self.has_overlay(name)
    }

    fn has_overlay(&self, name: &SessionPath) -> bool {
        self.overlay(name).join(JOURNAL).exists()
    }

    /// The session if it is open already.
    pub fn get(&self, name: &SessionPath) -> Option<Arc<LiveSession>> {
        self.open.lock().get(name.as_str()).cloned()
    }

    /// The session if it is open and [`Registry::open`] would hand it out
    /// without asking the store first (not retired, not due for a check).
    pub fn get_fresh(&self, name: &SessionPath) -> Option<Arc<LiveSession>> {
        let s = self.get(name)?;
        if s.is_retired() || !(s.is_watched() || s.checked_within(self.spec.recheck)) {
            return None;
        }
        s.touch();
        Some(s)
    }

    /// Every open session.
    pub fn open_sessions(&self) -> Vec<Arc<LiveSession>> {
        self.open.lock().values().cloned().collect()
    }

    /// How many sessions hold their journals here: those open, and those
    /// [`Registry::close_idle`] is closing. None of them can be mounted by
    /// another process yet.
    pub fn holding(&self) -> usize {
        let open = self.open.lock();
        open.len() + self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Session names: objects in the store, overlays here, sessions open.
    pub async fn names(&self) -> Result<BTreeSet<String>, StoreError> {
        if let Some((at, names)) = &*self.listed.lock() {
            if at.elapsed() < LIST_TTL {
                return Ok(names.clone());
            }
        }
        let mut names = self.stored_names().await?;
        names.extend(self.overlay_names());
        names.extend(self.open.lock().keys().cloned());
        *self.listed.lock() = Some((Instant::now(), names.clone()));
        Ok(names)
    }

    /// Every session with its object's size and time (none for sessions
    /// that live only here so far), in name order.
    pub async fn list(&self) -> Result<Vec<SessionInfo>, StoreError> {
        let mut out: BTreeMap<String, SessionInfo> = BTreeMap::new();
        for (name, o) in self.objects().await? {
            out.insert(
                name.clone(),
                SessionInfo {
                    name,
                    size: o.size,
                    last_modified: Some(o.last_modified),
                    created: Some(o.last_modified),
                    etag: Some(o.etag),
                    pending_changes: false,
                    writeback: None,
                },
            );
        }
        let mut local: BTreeSet<String> = self.overlay_names().into_iter().collect();
        local.extend(self.open.lock().keys().cloned());
        for name in local {
            let Ok(path) = SessionPath::parse(&name) else {
                continue;
            };
            let started = self.overlay_started(&path);
            let info = out.entry(name.clone()).or_insert_with(|| SessionInfo {
                name,
                size: 0,
                last_modified: started,
                created: started,
                etag: None,
                pending_changes: false,
                writeback: None,
            });
            info.pending_changes = self.pending(&path);
            if started.is_some() && info.created.is_none_or(|c| started.is_some_and(|s| s < c)) {
                info.created = started;
            }
        }
        Ok(out.into_values().collect())
    }

    /// One session's description, or `None` when it does not exist.
    pub async fn info(&self, name: &SessionPath) -> Result<Option<SessionInfo>, StoreError> {
        let object = match self.spec.store.head(&name.object_key()).await {
            Ok(m) => Some(m),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let here = self.is_local(name);
        if object.is_none() && !here {
            return Ok(None);
        }
        let started = self.overlay_started(name);
        Ok(Some(SessionInfo {
            name: name.as_str().to_owned(),
            size: object.as_ref().map_or(0, |o| o.size),
            last_modified: object.as_ref().map(|o| o.last_modified).or(started),
            created: started.or(object.as_ref().map(|o| o.last_modified)),
            etag: object.map(|o| o.etag),
            pending_changes: self.pending(name),
            writeback: self.get(name).map(|s| s.writeback.lock().clone()),
        }))
    }

    /// Whether the session exists (as an object or here).
    pub async fn exists(&self, name: &SessionPath) -> Result<bool, StoreError> {
        if self.get(name).is_some() || self.has_overlay(name) {
            return Ok(true);
        }
        match self.spec.store.head(&name.object_key()).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn pending(&self, name: &SessionPath) -> bool {
        match self.get(name) {
            Some(s) => s.has_pending_changes().unwrap_or(true),
            // Not open: an overlay here holds changes until written back.
            None => self.has_overlay(name),
        }
    }

    fn overlay_started(&self, name: &SessionPath) -> Option<SystemTime> {
        std::fs::metadata(self.overlay(name).join(JOURNAL))
            .and_then(|m| m.created().or_else(|_| m.modified()))
            .ok()
    }

    /// The names of the sessions in the store, from one listing with a
    /// delimiter: each session is one common prefix, which servers that keep
    /// keys as files (SeaweedFS, MinIO) answer from one directory instead of
    /// walking every session's directory (100,000 sessions on SeaweedFS here:
    /// about 1 s against 15 s). Such servers may keep a directory after its
    /// last object is deleted, so where the prefixes fit in one page the
    /// keys are listed too (one more request) and only sessions with an
    /// object are named; in a larger bucket a stale prefix stays listed, and
    /// looking it up finds no session.
    async fn stored_names(&self) -> Result<BTreeSet<String>, StoreError> {
        let page = self.spec.store.list_all("", Some("/")).await?;
        if page.common_prefixes.len() <= MAX_LIST_KEYS {
            return Ok(self.objects().await?.into_iter().map(|(n, _)| n).collect());
        }
        Ok(page
            .common_prefixes
            .iter()
            .filter_map(|p| p.strip_suffix('/'))
            .filter(|n| SessionPath::parse(n).is_ok())
            .map(str::to_owned)
            .collect())
    }

    async fn objects(&self) -> Result<Vec<(String, crate::store::ObjectSummary)>, StoreError> {
        // Keys, not common prefixes: some servers keep a "directory" after
        // its last object is deleted.
        let page = self.spec.store.list_all("", None).await?;
        let suffix = format!("/{OBJECT_NAME}");
        Ok(page
            .objects
            .into_iter()
            .filter_map(|o| {
                let name = o.key.strip_suffix(&suffix)?.to_owned();
                SessionPath::parse(&name).ok()?;
                Some((name, o))
            })
            .collect())
    }

    fn overlay_names(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.spec.overlays) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.to_owned();
                (SessionPath::parse(&n).is_ok() && e.path().join(JOURNAL).exists()).then_some(n)
            })
            .collect()
    }

    /// Whether an open session's object was replaced in the store since it
    /// was opened (another server, a `push`), so that the session must be
    /// opened again. Asked at most every `recheck` per session; sessions a
    /// mount is watching, or holding changes not yet written back, are kept
    /// as they are (the write-back meets the new version, not a read).
    fn replaced_underneath(&self, s: &LiveSession) -> bool {
        if s.is_watched() || !s.due_for_check(self.spec.recheck) {
            return false;
        }
        let stored = match self.rt.block_on(self.spec.store.head(&s.name.object_key())) {
            Ok(m) => Some(m.etag),
            Err(StoreError::NotFound { .. }) => None,
            // The store is unreachable: keep serving what is open.
            Err(_) => return false,
        };
        let opened = s.reader().map(|r| r.meta().etag.clone());
        stored != opened && !s.has_pending_changes().unwrap_or(true)
    }

    /// The session's object, to read as it is, when this host holds no
    /// overlay of the session and the object is a plain tree (what a mount
    /// would show, entry for entry: [`SessionReader::is_plain_tree`]).
    /// Reads then need no journal and no tree in memory, and leave nothing
    /// on disk. `None`: open the session ([`Registry::open`]) instead.
    ///
    /// A view is kept for the next requests, checked against the store (one
    /// HEAD) at most every `recheck`, and dropped when the session is
    /// opened here, replaced or deleted. A session written to here opens
    /// then, and every later read goes through it.
    pub async fn object_view(
        &self,
        name: &SessionPath,
    ) -> Result<Option<Arc<SessionReader>>, RegistryError> {
        if self.is_local(name) {
            return Ok(None);
        }
        let cached = self
            .views
            .lock()
            .get(name.as_str())
            .map(|v| (v.reader.clone(), v.checked.elapsed() < self.spec.recheck));
        let key = name.object_key();
        if let Some((reader, fresh)) = cached {
            // A store that cannot answer keeps the view served, as an open
            // session goes on being served through an outage.
            let (current, confirmed) = if fresh {
                (true, false)
            } else {
                match self.spec.store.head(&key).await {
                    Ok(m) => (m.etag == reader.meta().etag, true),
                    Err(StoreError::NotFound { .. }) => (false, true),
                    Err(e) if e.is_unavailable() => (true, false),
                    Err(e) => return Err(e.into()),
                }
            };
            if current {
                if let Some(v) = self.views.lock().get_mut(name.as_str()) {
                    v.used = Instant::now();
                    if confirmed {
                        v.checked = v.used;
                    }
                }
                return Ok(Some(reader));
            }
            self.views.lock().remove(name.as_str());
        }
        let discards = self.discards.load(std::sync::atomic::Ordering::SeqCst);
        let reader = match SessionReader::open(
            self.spec.store.clone(),
            &key,
            self.spec.index.as_ref(),
        )
        .await
        {
            Ok(r) => Arc::new(r),
            Err(TarballError::Store(StoreError::NotFound { .. })) => {
                return Err(RegistryError::NotFound(name.as_str().to_owned()))
            }
            Err(e) => return Err(OverlayError::from(e).into()),
        };
        if !reader.is_plain_tree() {
            return Ok(None);
        }
        let mut views = self.views.lock();
        // Kept only if nothing opened, replaced or deleted the session
        // meanwhile; this request may still read it (it overlapped that).
        if discards == self.discards.load(std::sync::atomic::Ordering::SeqCst)
            && !self.is_local(name)
        {
            if views.len() >= MAX_VIEWS {
                let oldest = views
                    .iter()
                    .min_by_key(|(_, v)| v.used)
                    .map(|(n, _)| n.clone());
                if let Some(n) = oldest {
                    views.remove(&n);
                }
            }
            let now = Instant::now();
            views.insert(
                name.as_str().to_owned(),
                View {
                    reader: reader.clone(),
                    checked: now,
                    used: now,
                },
            );
        }
        Ok(Some(reader))
    }

    /// The session's object view, to open the session on: when it was
    /// checked against the store lately, or the store cannot say (down),
    /// and this host holds no overlay of the session. `None` when the store
    /// holds another version, or none.
    fn view_for_open(&self, name: &SessionPath) -> Option<Arc<SessionReader>> {
        if self.has_overlay(name) {
            return None;
        }
        let (reader, fresh) = {
            let views = self.views.lock();
            let v = views.get(name.as_str())?;
            (v.reader.clone(), v.checked.elapsed() < self.spec.recheck)
        };
        let usable = fresh
            || match self.rt.block_on(self.spec.store.head(&name.object_key())) {
                Ok(m) => m.etag == reader.meta().etag,
                Err(e) => e.is_unavailable(),
            };
        usable.then_some(reader)
    }

    /// Drops the session's object view: it is opened, replaced or deleted.
    fn drop_view(&self, name: &SessionPath) {
        self.discards
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.views.lock().remove(name.as_str());
    }

    /// The lock that orders opening and discarding one session.
    fn gate(&self, name: &str) -> Arc<Mutex<()>> {
        self.opening
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Opens (once) the session `name`; `create` allows one that does not
    /// exist yet. Blocks: call it off the runtime's threads.
    pub fn open(
        &self,
        name: &SessionPath,
        create: bool,
    ) -> Result<Arc<LiveSession>, RegistryError> {
        // A retired session is being deleted or replaced: wait for that at
        // the gate, then open what is left.
        if let Some(s) = self.get(name).filter(|s| !s.is_retired()) {
            s.touch();
            if !self.replaced_underneath(&s) {
                return Ok(s);
            }
            tracing::info!("session {name}: the object was replaced in the store; reopening");
            self.discard(name)?;
        }
        let gate = self.gate(name.as_str());
        let _opening = gate.lock();
        if let Some(s) = self.get(name) {
            if !s.is_retired() {
                return Ok(s);
            }
            self.open.lock().remove(name.as_str());
        }
        // A session read as its object until now opens on that object
        // without asking the store again when the store cannot answer: a
        // first write then works while the store is down, as it would have
        // had a read opened the session. (A version replaced meanwhile is
        // caught up with by the write-back, as for any open session.)
        let view = self.view_for_open(name);
        if !create && view.is_none() && !self.rt.block_on(self.exists(name))? {
            return Err(RegistryError::NotFound(name.as_str().to_owned()));
        }
        let spec = OpenSpec {
            store: self.spec.store.clone(),
            index: self.spec.index.clone(),
            session: name.clone(),
            overlay: self.overlay(name),
            read_only: self.spec.read_only,
            offline: crate::overlay::open::Offline::Never,
        };
        self.drop_view(name);
        let live = Arc::new(open::open_with(&spec, &self.rt, view)?);
        self.open
            .lock()
            .insert(name.as_str().to_owned(), live.clone());
        if let Some((_, names)) = &mut *self.listed.lock() {
            names.insert(name.as_str().to_owned());
        }
        let on_open = self.on_open.lock().clone();
        if let Some(f) = on_open {
            f(&live);
        }
        Ok(live)
    }

    /// Closes the session and throws its overlay away, so that the next
    /// open starts from the object as stored: before an upload replaces
    /// it, or when it is deleted. Refused while a mount watches it.
    pub fn discard(&self, name: &SessionPath) -> Result<(), RegistryError> {
        let gate = self.gate(name.as_str());
        let _opening = gate.lock();
        self.discard_locked(name)
    }

    /// [`Registry::discard`], the gate held: operations in flight on the
    /// open session finish first, later ones find it retired.
    fn discard_locked(&self, name: &SessionPath) -> Result<(), RegistryError> {
        self.drop_view(name);
        let live = self.get(name);
        if let Some(s) = &live {
            if s.is_watched() {
                return Err(RegistryError::Mounted(name.as_str().to_owned()));
            }
            s.retire();
        }
        self.open.lock().remove(name.as_str());
        let overlay = self.overlay(name);
        match std::fs::remove_dir_all(&overlay) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(OverlayError::from(e).into()),
        }
        *self.listed.lock() = None;
        Ok(())
    }

    /// Closes the sessions no mount watches, no request holds and nothing
    /// asked for since `idle`: their journals are synced and unlocked (so a
    /// `sessionfs mount` elsewhere on the host may take the overlay), and
    /// their trees leave memory. Their overlays stay. With `keep_pending`,
    /// sessions whose changes still wait for a write-back stay open (the
    /// write-back works on open sessions). Returns how many.
    pub fn close_idle(&self, idle: std::time::Duration, keep_pending: bool) -> usize {
        self.views.lock().retain(|_, v| v.used.elapsed() < idle);
        // The registry's own reference is the only one left.
        let closable = |s: &Arc<LiveSession>| {
            !s.is_watched()
                && Arc::strong_count(s) == 1
                && s.idle() >= idle
                && !(keep_pending && s.has_pending_changes().unwrap_or(true))
        };
        let names: Vec<String> = self
            .open
            .lock()
            .iter()
            .filter(|(_, s)| closable(s))
            .map(|(n, _)| n.clone())
            .collect();
        let mut closed = 0;
        for name in names {
            // Held until the journal is closed: a request for the session
            // meanwhile waits at the gate and then opens it again, instead
            // of meeting the journal's lock and answering 409.
            let gate = self.gate(&name);
            let _opening = gate.lock();
            let session = {
                let mut open = self.open.lock();
                match open.get(&name) {
                    Some(s) if closable(s) => open.remove(&name),
                    _ => None,
                }
            };
            let Some(s) = session else { continue };
            self.closing
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = s.sync() {
                tracing::error!("syncing the overlay of {} before closing it: {e}", s.name);
            }
            // The journal closes (and its lock goes) here.
            drop(s);
            self.closing
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            closed += 1;
        }
        closed
    }

    /// Deletes the session: its object and its overlay. `Ok(false)` when
    /// there was nothing to delete. Operations on the session in flight
    /// finish first; those that come later see no session (or, writing,
    /// create a new one). Blocks: call it off the runtime's threads.
    pub fn delete(&self, name: &SessionPath) -> Result<bool, RegistryError> {
        let gate = self.gate(name.as_str());
        let _opening = gate.lock();
        if !self.rt.block_on(self.exists(name))? {
            return Ok(false);
        }
        let live = self.get(name);
        if let Some(s) = &live {
            if s.is_watched() {
                return Err(RegistryError::Mounted(name.as_str().to_owned()));
            }
            s.retire();
        }
        self.drop_view(name);
        if let Err(e) = self.rt.block_on(self.spec.store.delete(&name.object_key())) {
            if let Some(s) = &live {
                s.unretire();
            }
            return Err(e.into());
        }
        self.discard_locked(name)?;
        Ok(true)
    }

    /// Replaces the session by what `upload` stores: operations in flight
    /// finish first, the open session and its overlay are dropped once the
    /// upload succeeded (and kept, as they were, if it failed). Blocks.
    pub fn replace<T, E>(
        &self,
        name: &SessionPath,
        upload: impl FnOnce() -> Result<T, E>,
    ) -> Result<Result<T, E>, RegistryError> {
        let gate = self.gate(name.as_str());
        let _opening = gate.lock();
        let live = self.get(name);
        if let Some(s) = &live {
            if s.is_watched() {
                return Err(RegistryError::Mounted(name.as_str().to_owned()));
            }
            s.retire();
        }
        let stored = upload();
        match &stored {
            Ok(_) => self.discard_locked(name)?,
            Err(_) => {
                if let Some(s) = &live {
                    s.unretire();
                }
            }
        }
        Ok(stored)
    }

    /// Forgets a session a mount removed itself (`rmdir` in the mount root).
    pub async fn delete_mounted(&self, name: &SessionPath) -> Result<(), RegistryError> {
        if let Some(s) = self.get(name) {
            s.set_watcher(None);
        }
        self.spec.store.delete(&name.object_key()).await?;
        self.discard(name)
    }
}
