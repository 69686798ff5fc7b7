//! The overlay's journal: the mounted tree's inodes, directory entries and
//! xattrs, and the feed of changes not yet written back, in one SQLite
//! database beside the overlay's data files.
//!
//! Every namespace operation is one transaction, durable against a killed
//! process before the reply goes to the kernel. A small one (a create, an
//! unlink, the size a close records) is one record appended to the redo log
//! ([`redo`]); the log's records reach SQLite in batches, and always before
//! anything reads the journal, so readers see every committed transaction.
//! A large one (a tree loaded from a TOC, a write-back's bookkeeping) goes
//! straight to SQLite. `fsync` on any file of the mount additionally makes
//! the journal durable against power loss: the log's records are applied
//! and a full checkpoint syncs the database (`synchronous=NORMAL` keeps the
//! batches cheap), after which the log is cut back.
//!
//! The database holds the whole tree, not only what changed: a remount loads
//! it as is (stable inode numbers, nothing re-derived from the object), and
//! the write-back agent packs the tree straight from it.
//!
//! A full disk must not lock the user in: a sync that finds no room gives
//! up the overlays' reserve ([`super::reserve`]) and runs again, as deletes
//! do in the namespace, and opening a journal on a disk that full gives it
//! up first, so a remount works. The WAL is checkpointed every
//! [`CHECKPOINT_PAGES`] pages and cut back to [`WAL_LIMIT`] after, so it
//! stays within about 16 MiB however many operations a mount runs; the redo
//! log is folded in and cut back once it passes [`LOG_LIMIT`].

mod redo;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::node::{Data, Node, NodeKind, Time};
use super::reserve;
use super::OverlayError;
pub use redo::Op;
use redo::{Record, RedoLog};

pub struct Journal {
    conn: Connection,
    redo: RefCell<Redo>,
    writes: Arc<Writes>,
}

/// Counts what reached each of the journal's files, so that a sync of
/// their descriptors elsewhere ([`super::live::LiveSession::durable`]) can
/// skip a file nothing was written to since its last sync.
#[derive(Debug, Default)]
pub struct Writes {
    /// SQLite commits (into the WAL).
    pub wal: AtomicU64,
    /// Records appended to the redo log.
    pub redo: AtomicU64,
}

/// The redo log and its records not yet in SQLite.
struct Redo {
    log: RedoLog,
    pending: Vec<Record>,
    /// Inodes whose xattrs the pending records change: the kernel asks for
    /// `security.capability` before every write, and for an inode not
    /// among these SQLite answers without applying the log first.
    xattr_inos: std::collections::HashSet<u64>,
}

impl Redo {
    fn note(&mut self, ops: &[Op]) {
        for op in ops {
            if let Op::SetXattr(ino, ..) | Op::RemoveXattr(ino, _) | Op::DeleteNode(ino) = op {
                self.xattr_inos.insert(*ino);
            }
        }
    }
}

/// WAL pages between automatic checkpoints (16 MiB of 4 KiB pages). Each
/// checkpoint syncs; small commits rewrite the same few pages, which a
/// longer interval folds into one write.
const CHECKPOINT_PAGES: u32 = 4096;
/// Size the WAL file is cut back to after a checkpoint.
const WAL_LIMIT: i64 = 16 << 20;
/// Redo log bytes after which it is folded into the database and cut back
/// (a sync; about 20,000 creates).
const LOG_LIMIT: u64 = 8 << 20;
/// Logged transactions applied to SQLite together.
const APPLY_BATCH: usize = 512;
/// A transaction of more rows than this goes straight to SQLite.
const DIRECT_OPS: usize = 256;
/// The redo log beside a journal database.
pub fn redo_path(journal: &Path) -> std::path::PathBuf {
    journal.with_extension("redo")
}

/// One row of the change feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub seq: i64,
    /// `create`, `write`, `unlink`, `rename`, `setattr`, `link`, `xattr`, …
    pub op: String,
    pub ino: u64,
    /// A path at the time of the change, for people reading the feed.
    pub detail: String,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes(
    ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL, perm INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, nlink INTEGER NOT NULL,
    rdev INTEGER NOT NULL, size INTEGER NOT NULL,
    atime_s INTEGER NOT NULL, atime_ns INTEGER NOT NULL,
    mtime_s INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_s INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    target TEXT, base TEXT, local INTEGER NOT NULL, parent INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dirents(
    parent INTEGER NOT NULL, name TEXT NOT NULL, ino INTEGER NOT NULL,
    PRIMARY KEY(parent, name));
CREATE TABLE IF NOT EXISTS xattrs(
    ino INTEGER NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(ino, name));
CREATE TABLE IF NOT EXISTS changes(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL,
    ino INTEGER NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS wb_remap(ino INTEGER PRIMARY KEY, path TEXT NOT NULL);
"#;

/// A write-back under way, recorded before its first request so that a
/// restart can tell its own completed upload from someone else's.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attempt {
    /// Also in the object's user metadata ([`WRITEBACK_ID_KEY`]).
    pub id: String,
    /// The change feed up to here is in the object once it completes.
    pub seq: i64,
    /// The ETag the upload is conditional on ("" for no object).
    pub base: String,
    /// The multipart upload, once created (to abort after a crash).
    #[serde(default)]
    pub upload: Option<String>,
    /// When the attempt began (seconds since the epoch): uploads of the
    /// key started since then and never recorded are its own too.
    #[serde(default)]
    pub started: u64,
}

/// User metadata key of the write-back id in objects sessionfs writes.
pub const WRITEBACK_ID_KEY: &str = "sessionfs-writeback";

impl Journal {
    pub fn open(path: &Path) -> Result<Journal, OverlayError> {
        Journal::open_inner(path).map_err(|e| match e {
            OverlayError::Journal(rusqlite::Error::SqliteFailure(f, _))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                OverlayError::InUse(path.display().to_string())
            }
            other => other,
        })
    }

    fn open_inner(path: &Path) -> Result<Journal, OverlayError> {
        // A disk too full to take the reserve back: opening (recovery,
        // the first commits) may need the room.
        let room = reserve::available().unwrap_or(u64::MAX);
        if room < reserve::RESERVE {
            reserve::release();
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        // One mount owns an overlay: an exclusive lock keeps a second mount of
        // the same overlay out, and spares every transaction its file locks.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints sync, so not after every commit; fsync forces one anyway.
        conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
        conn.pragma_update(None, "journal_size_limit", WAL_LIMIT)?;
        conn.execute_batch(SCHEMA)?;
        // In WAL mode with EXCLUSIVE locking SQLite keeps its index in this
        // process's memory and holds the file lock from the first read on:
        // a second process (another mount of the overlay) gets SQLITE_BUSY,
        // that is `InUse`, here, before it reads the redo log.
        let applied: Option<String> = conn
            .query_row("SELECT v FROM meta WHERE k = 'log_applied'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let applied = match applied {
            None => 0,
            Some(v) => v
                .parse()
                .map_err(|_| OverlayError::Corrupt(format!("journal: log_applied is {v:?}")))?,
        };
        let (log, pending) = RedoLog::open(&redo_path(path), applied)?;
        let journal = Journal {
            conn,
            redo: RefCell::new(Redo {
                log,
                pending,
                xattr_inos: Default::default(),
            }),
            writes: Arc::default(),
        };
        // What a crash left in the log is applied now, while the reserve is
        // still given up if the disk is that full.
        journal.caught_up()?;
        // On a nearly full disk the opening's own writes come first; the
        // next delete or sync takes the reserve back.
        if room >= 2 * reserve::RESERVE {
            reserve::take_back();
        }
        Ok(journal)
    }

    pub fn meta(&self, k: &str) -> Result<Option<String>, OverlayError> {
        self.caught_up()?;
        Ok(self
            .conn
            .query_row("SELECT v FROM meta WHERE k = ?1", [k], |r| r.get(0))
            .optional()?)
    }

    /// Starts a transaction: its rows are collected, and written at
    /// [`Tx::commit`]. The namespace mutex serialises callers.
    pub fn begin(&self) -> Result<Tx<'_>, OverlayError> {
        Ok(Tx {
            journal: self,
            ops: RefCell::new(Vec::new()),
        })
    }

    fn commit_ops(&self, ops: Vec<Op>) -> Result<(), OverlayError> {
        if ops.is_empty() {
            return Ok(());
        }
        if ops.len() > DIRECT_OPS {
            self.caught_up()?;
            return self.apply(&[(None, ops)]);
        }
        let (batch, full) = {
            let mut redo = self.redo.borrow_mut();
            let number = match redo.log.append(&ops) {
                // Space an unlink freed may still be on its way back
                // (`removals`); a failed append leaves nothing behind.
                Err(e) if e.no_space() && super::removals::drain() => redo.log.append(&ops)?,
                r => r?,
            };
            self.writes.redo.fetch_add(1, Ordering::SeqCst);
            redo.note(&ops);
            redo.pending.push((number, ops));
            (
                redo.pending.len() >= APPLY_BATCH,
                redo.log.len() > LOG_LIMIT,
            )
        };
        // The transaction is durable in the log: a failure from here on
        // only leaves its rows to the next attempt.
        if full {
            if let Err(e) = self.sync() {
                tracing::warn!("folding the journal's redo log in: {e}");
            }
        } else if batch {
            if let Err(e) = self.caught_up() {
                tracing::warn!("applying the journal's redo log: {e}");
            }
        }
        Ok(())
    }

    /// Applies the logged transactions not yet in SQLite.
    fn caught_up(&self) -> Result<(), OverlayError> {
        let pending = {
            let mut redo = self.redo.borrow_mut();
            redo.xattr_inos.clear();
            std::mem::take(&mut redo.pending)
        };
        if pending.is_empty() {
            return Ok(());
        }
        let records: Vec<(Option<u64>, Vec<Op>)> =
            pending.into_iter().map(|(n, ops)| (Some(n), ops)).collect();
        let r = match self.apply(&records) {
            Err(e) if e.no_space() && reserve::release() => self.apply(&records),
            r => r,
        };
        if r.is_err() {
            let mut redo = self.redo.borrow_mut();
            let later = std::mem::take(&mut redo.pending);
            for (_, ops) in &records {
                redo.note(ops);
            }
            redo.pending = records
                .into_iter()
                .filter_map(|(n, ops)| Some((n?, ops)))
                .chain(later)
                .collect();
        }
        r
    }

    /// Writes many rows as one transaction straight into SQLite, each row
    /// made as it is written: a tree loaded from a TOC of 200,000 entries
    /// would otherwise sit in memory twice, as the tree and as its rows.
    pub fn bulk(&self, ops: impl IntoIterator<Item = Op>) -> Result<(), OverlayError> {
        self.caught_up()?;
        let tx = self.conn.unchecked_transaction()?;
        for op in ops {
            apply_op(&tx, &op)?;
        }
        tx.commit()?;
        self.writes.wal.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Transactions into SQLite as one, with the number of the last logged
    /// one among them (`None` for one that was never logged).
    fn apply(&self, records: &[(Option<u64>, Vec<Op>)]) -> Result<(), OverlayError> {
        let tx = self.conn.unchecked_transaction()?;
        for (_, ops) in records {
            for op in ops {
                apply_op(&tx, op)?;
            }
        }
        if let Some(last) = records.iter().rev().find_map(|(n, _)| *n) {
            tx.prepare_cached(
                "INSERT INTO meta(k, v) VALUES ('log_applied', ?1) \
                 ON CONFLICT(k) DO UPDATE SET v = ?1",
            )?
            .execute([last.to_string()])?;
        }
        tx.commit()?;
        self.writes.wal.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// What has been written to the journal's files (see [`Writes`]).
    pub fn writes(&self) -> Arc<Writes> {
        self.writes.clone()
    }

    /// Makes every committed transaction durable: the redo log applied, the
    /// WAL synced and folded into the database file; then the log is cut back.
    pub fn sync(&self) -> Result<(), OverlayError> {
        let fold = || -> Result<(), OverlayError> {
            self.caught_up()?;
            let busy: i64 = self
                .conn
                .query_row("PRAGMA wal_checkpoint(FULL)", [], |r| r.get(0))?;
            if busy == 0 {
                self.redo.borrow_mut().log.clear()?;
            }
            Ok(())
        };
        let r = match fold() {
            // An unmount on a full disk must still sync.
            Err(e) if e.no_space() && reserve::release() => fold(),
            r => r,
        };
        reserve::take_back();
        r
    }

    /// Every inode. A file's base path takes `shared`'s copy where it has
    /// one (the object's TOC holds the same path).
    pub fn load_nodes(
        &self,
        shared: impl Fn(&str) -> Option<Arc<str>>,
    ) -> Result<Vec<Node>, OverlayError> {
        self.caught_up()?;
        let mut stmt = self.conn.prepare(
            "SELECT ino, kind, perm, uid, gid, nlink, rdev, size, atime_s, atime_ns, \
             mtime_s, mtime_ns, ctime_s, ctime_ns, target, base, local, parent FROM nodes",
        )?;
        let rows = stmt.query_map([], |r| {
            let kind: i64 = r.get(1)?;
            let base: Option<Arc<str>> = r
                .get_ref(15)?
                .as_str_or_null()?
                .map(|b| shared(b).unwrap_or_else(|| b.into()));
            let local: bool = r.get(16)?;
            Ok((
                kind,
                Node {
                    ino: r.get::<_, i64>(0)? as u64,
                    kind: NodeKind::File,
                    perm: r.get(2)?,
                    uid: r.get(3)?,
                    gid: r.get(4)?,
                    nlink: r.get(5)?,
                    rdev: r.get(6)?,
                    size: r.get::<_, i64>(7)? as u64,
                    atime: Time {
                        s: r.get(8)?,
                        ns: r.get(9)?,
                    },
                    mtime: Time {
                        s: r.get(10)?,
                        ns: r.get(11)?,
                    },
                    ctime: Time {
                        s: r.get(12)?,
                        ns: r.get(13)?,
                    },
                    data: match (local, base) {
                        (true, Some(b)) => Data::Partial(b),
                        (true, None) => Data::Local,
                        (false, Some(b)) => Data::Base(b),
                        (false, None) => match r.get_ref(14)?.as_str_or_null()? {
                            Some(t) => Data::Target(t.into()),
                            None => Data::None,
                        },
                    },
                    parent: r.get::<_, i64>(17)? as u64,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, mut node) = row?;
            node.kind = NodeKind::from_code(kind).ok_or_else(|| {
                OverlayError::Corrupt(format!("inode {} has kind {kind}", node.ino))
            })?;
            out.push(node);
        }
        Ok(out)
    }

    pub fn load_dirents(&self) -> Result<Vec<(u64, String, u64)>, OverlayError> {
        self.caught_up()?;
        let mut stmt = self.conn.prepare("SELECT parent, name, ino FROM dirents")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get(1)?,
                r.get::<_, i64>(2)? as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Applies the log first only when it holds xattr changes of `ino`.
    fn xattrs_caught_up(&self, ino: u64) -> Result<(), OverlayError> {
        if self.redo.borrow().xattr_inos.contains(&ino) {
            self.caught_up()?;
        }
        Ok(())
    }

    pub fn xattr(&self, ino: u64, name: &str) -> Result<Option<Vec<u8>>, OverlayError> {
        self.xattrs_caught_up(ino)?;
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM xattrs WHERE ino = ?1 AND name = ?2")?
            .query_row(params![ino as i64, name], |r| r.get(0))
            .optional()?)
    }

    /// Every xattr of every inode, in one pass (for packing the tree).
    pub fn all_xattrs(
        &self,
    ) -> Result<HashMap<u64, std::collections::BTreeMap<String, Vec<u8>>>, OverlayError> {
        self.caught_up()?;
        let mut stmt = self.conn.prepare("SELECT ino, name, value FROM xattrs")?;
        let mut rows = stmt.query([])?;
        let mut out: HashMap<u64, std::collections::BTreeMap<String, Vec<u8>>> = HashMap::new();
        while let Some(r) = rows.next()? {
            let ino = r.get::<_, i64>(0)? as u64;
            out.entry(ino).or_default().insert(r.get(1)?, r.get(2)?);
        }
        Ok(out)
    }

    pub fn xattr_names(&self, ino: u64) -> Result<Vec<String>, OverlayError> {
        self.xattrs_caught_up(ino)?;
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM xattrs WHERE ino = ?1 ORDER BY name")?;
        let rows = stmt.query_map([ino as i64], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Changes after `seq`, oldest first.
    pub fn changes_since(&self, seq: i64) -> Result<Vec<Change>, OverlayError> {
        self.caught_up()?;
        let mut stmt = self
            .conn
            .prepare("SELECT seq, op, ino, detail FROM changes WHERE seq > ?1 ORDER BY seq")?;
        let rows = stmt.query_map([seq], |r| {
            Ok(Change {
                seq: r.get(0)?,
                op: r.get(1)?,
                ino: r.get::<_, i64>(2)? as u64,
                detail: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest change not yet written back (0 when none waits).
    pub fn last_seq(&self) -> Result<i64, OverlayError> {
        self.caught_up()?;
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
                r.get(0)
            })?)
    }

    /// How many changes wait to be written back.
    pub fn pending_count(&self) -> Result<u64, OverlayError> {
        self.caught_up()?;
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// The inodes changed after `seq`.
    pub fn changed_since(&self, seq: i64) -> Result<std::collections::HashSet<u64>, OverlayError> {
        self.caught_up()?;
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT ino FROM changes WHERE seq > ?1")?;
        let rows = stmt.query_map([seq], |r| Ok(r.get::<_, i64>(0)? as u64))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The write-back recorded as under way, if any.
    pub fn attempt(&self) -> Result<Option<Attempt>, OverlayError> {
        match self.meta("wb_attempt")? {
            None => Ok(None),
            Some(json) => serde_json::from_str(&json)
                .map(Some)
                .map_err(|e| OverlayError::Corrupt(format!("write-back record: {e}"))),
        }
    }

    /// After a crash: the recorded write-back did complete (the stored
    /// object carries its id). Adopts it as the base: files the snapshot
    /// found under another name than their base path are re-pointed, the
    /// changes it covered are confirmed. Files still in the overlay stay
    /// there (their bytes are in the object too; the next write-back
    /// adopts them); those copied up chunk by chunk read the chunks they do
    /// not hold from their path in the new object (also remapped).
    pub fn recover_completed(&self, attempt: &Attempt, etag: &str) -> Result<(), OverlayError> {
        self.caught_up()?;
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "UPDATE nodes SET base = (SELECT path FROM wb_remap WHERE wb_remap.ino = nodes.ino) \
             WHERE base IS NOT NULL AND ino IN (SELECT ino FROM wb_remap)",
            [],
        )?;
        tx.execute("DELETE FROM changes WHERE seq <= ?1", [attempt.seq])?;
        tx.execute("DELETE FROM wb_remap", [])?;
        tx.execute("DELETE FROM meta WHERE k = 'wb_attempt'", [])?;
        tx.execute(
            "INSERT INTO meta(k, v) VALUES ('base_etag', ?1) ON CONFLICT(k) DO UPDATE SET v = ?1",
            [etag],
        )?;
        tx.commit()?;
        self.writes.wal.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Whether any change waits to be written back (one index probe).
    pub fn has_changes(&self) -> Result<bool, OverlayError> {
        self.caught_up()?;
        Ok(self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM changes)", [], |r| r.get(0))?)
    }
}

/// One journal transaction: its rows, written at [`Tx::commit`]; dropped
/// without it, nothing is written.
pub struct Tx<'a> {
    journal: &'a Journal,
    ops: RefCell<Vec<Op>>,
}

impl Tx<'_> {
    /// Adds one row change (the named methods below add the common ones).
    pub fn push(&self, op: Op) {
        self.ops.borrow_mut().push(op);
    }

    pub fn commit(self) -> Result<(), OverlayError> {
        self.journal.commit_ops(self.ops.into_inner())
    }

    pub fn set_meta(&self, k: &str, v: &str) -> Result<(), OverlayError> {
        self.push(Op::SetMeta(k.to_owned(), v.to_owned()));
        Ok(())
    }

    pub fn put_node(&self, n: &Node) -> Result<(), OverlayError> {
        self.push(Op::PutNode(n.clone()));
        Ok(())
    }

    pub fn delete_node(&self, ino: u64) -> Result<(), OverlayError> {
        self.push(Op::DeleteNode(ino));
        Ok(())
    }

    pub fn put_dirent(&self, parent: u64, name: &str, ino: u64) -> Result<(), OverlayError> {
        self.push(Op::PutDirent(parent, name.to_owned(), ino));
        Ok(())
    }

    pub fn delete_dirent(&self, parent: u64, name: &str) -> Result<(), OverlayError> {
        self.push(Op::DeleteDirent(parent, name.to_owned()));
        Ok(())
    }

    pub fn set_xattr(&self, ino: u64, name: &str, value: &[u8]) -> Result<(), OverlayError> {
        self.push(Op::SetXattr(ino, name.to_owned(), value.to_vec()));
        Ok(())
    }

    pub fn remove_xattr(&self, ino: u64, name: &str) -> Result<(), OverlayError> {
        self.push(Op::RemoveXattr(ino, name.to_owned()));
        Ok(())
    }

    pub fn change(&self, op: &str, ino: u64, detail: &str) -> Result<(), OverlayError> {
        self.push(Op::Change(op.to_owned(), ino, detail.to_owned()));
        Ok(())
    }

    /// Records a write-back about to start, with the base paths it moves.
    pub fn begin_attempt(
        &self,
        attempt: &Attempt,
        remap: &[(u64, String)],
    ) -> Result<(), OverlayError> {
        self.push(Op::ClearAttempt);
        for (ino, path) in remap {
            self.push(Op::PutRemap(*ino, path.clone()));
        }
        self.set_attempt(Some(attempt))
    }

    /// Replaces (or, with `None`, clears) the write-back record.
    pub fn set_attempt(&self, attempt: Option<&Attempt>) -> Result<(), OverlayError> {
        match attempt {
            Some(a) => {
                let json = serde_json::to_string(a)
                    .map_err(|e| OverlayError::Corrupt(format!("write-back record: {e}")))?;
                self.set_meta("wb_attempt", &json)
            }
            None => {
                self.push(Op::ClearAttempt);
                Ok(())
            }
        }
    }

    /// The write-back of everything up to `seq` is confirmed: drop those rows.
    pub fn confirm(&self, seq: i64) -> Result<(), OverlayError> {
        self.push(Op::Confirm(seq));
        Ok(())
    }
}

fn apply_op(c: &Connection, op: &Op) -> Result<(), OverlayError> {
    match op {
        Op::SetMeta(k, v) => {
            c.prepare_cached(
                "INSERT INTO meta(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = ?2",
            )?
            .execute(params![k, v])?;
        }
        Op::PutNode(n) => {
            let (base, local) = match &n.data {
                Data::None | Data::Target(_) => (None, false),
                Data::Base(b) => (Some(&**b), false),
                Data::Local => (None, true),
                // Local with a base: the chunks the overlay file does not
                // hold are still that object file's.
                Data::Partial(b) => (Some(&**b), true),
            };
            c.prepare_cached(
                "INSERT OR REPLACE INTO nodes(ino, kind, perm, uid, gid, nlink, rdev, size, \
                 atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, target, base, local, parent) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            )?
            .execute(params![
                n.ino as i64,
                n.kind.code(),
                n.perm,
                n.uid,
                n.gid,
                n.nlink,
                n.rdev,
                n.size as i64,
                { n.atime.s },
                { n.atime.ns },
                { n.mtime.s },
                { n.mtime.ns },
                { n.ctime.s },
                { n.ctime.ns },
                n.target(),
                base,
                local,
                n.parent as i64
            ])?;
        }
        Op::DeleteNode(ino) => {
            c.prepare_cached("DELETE FROM nodes WHERE ino = ?1")?
                .execute([*ino as i64])?;
            c.prepare_cached("DELETE FROM xattrs WHERE ino = ?1")?
                .execute([*ino as i64])?;
        }
        Op::PutDirent(parent, name, ino) => {
            c.prepare_cached(
                "INSERT OR REPLACE INTO dirents(parent, name, ino) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![*parent as i64, name, *ino as i64])?;
        }
        Op::DeleteDirent(parent, name) => {
            c.prepare_cached("DELETE FROM dirents WHERE parent = ?1 AND name = ?2")?
                .execute(params![*parent as i64, name])?;
        }
        Op::SetXattr(ino, name, value) => {
            c.prepare_cached(
                "INSERT OR REPLACE INTO xattrs(ino, name, value) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![*ino as i64, name, value])?;
        }
        Op::RemoveXattr(ino, name) => {
            c.prepare_cached("DELETE FROM xattrs WHERE ino = ?1 AND name = ?2")?
                .execute(params![*ino as i64, name])?;
        }
        Op::Change(op, ino, detail) => {
            c.prepare_cached("INSERT INTO changes(op, ino, detail) VALUES (?1, ?2, ?3)")?
                .execute(params![op, *ino as i64, detail])?;
        }
        Op::ClearAttempt => {
            c.prepare_cached("DELETE FROM meta WHERE k = 'wb_attempt'")?
                .execute([])?;
            c.prepare_cached("DELETE FROM wb_remap")?.execute([])?;
        }
        Op::PutRemap(ino, path) => {
            c.prepare_cached("INSERT OR REPLACE INTO wb_remap(ino, path) VALUES (?1, ?2)")?
                .execute(params![*ino as i64, path])?;
        }
        Op::Confirm(seq) => {
            c.prepare_cached("DELETE FROM changes WHERE seq <= ?1")?
                .execute([*seq])?;
        }
    }
    Ok(())
}
