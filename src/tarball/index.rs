//! The local index of session TOCs, in SQLite: keyed by store, key and ETag,
//! so opening a session whose object has not changed costs one HEAD and no
//! read of the object (and one never opened here costs no HEAD: see
//! [`TocIndex::knows`]). WAL mode and a busy timeout let several processes share
//! one database.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use super::deflate::{zlib_compress, zlib_decompress_exact};
use super::foreign::{ForeignIndex, Format};
use super::zran::AccessPoint;
use super::TarballError;

#[derive(Clone, Debug)]
pub struct TocIndex {
    conn: Arc<Mutex<Connection>>,
}

/// What is kept per object version: the raw locator and the compressed TOC.
pub struct IndexedToc {
    pub locator: Vec<u8>,
    pub toc: Vec<u8>,
}

impl TocIndex {
    pub fn open(path: &Path) -> Result<TocIndex, TarballError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TarballError::io(dir, e))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // Several processes may create the database at once; switching to WAL
        // can report "busy" without waiting on the timeout, so retry the setup.
        let mut attempt = 0;
        loop {
            match setup(&conn) {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if attempt < 50
                        && matches!(
                            e.code,
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        ) =>
                {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(TocIndex {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, TarballError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| TarballError::Corrupt(format!("index worker failed: {e}")))?
        .map_err(TarballError::from)
    }

    pub async fn get(
        &self,
        store: &str,
        key: &str,
        etag: &str,
    ) -> Result<Option<IndexedToc>, TarballError> {
        let (store, key, etag) = (store.to_owned(), key.to_owned(), etag.to_owned());
        self.with_conn(move |c| {
            c.query_row(
                "SELECT locator, toc FROM tocs WHERE store = ?1 AND key = ?2 AND etag = ?3",
                params![store, key, etag],
                |row| {
                    Ok(IndexedToc {
                        locator: row.get(0)?,
                        toc: row.get(1)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    /// Records the TOC of one version and forgets the key's older versions.
    pub async fn put(
        &self,
        store: &str,
        key: &str,
        etag: &str,
        entry: IndexedToc,
    ) -> Result<(), TarballError> {
        let (store, key, etag) = (store.to_owned(), key.to_owned(), etag.to_owned());
        self.with_conn(move |c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "DELETE FROM tocs WHERE store = ?1 AND key = ?2 AND etag <> ?3",
                params![store, key, etag],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO tocs (store, key, etag, locator, toc) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![store, key, etag, entry.locator, entry.toc],
            )?;
            tx.commit()
        })
        .await
    }

    /// The version of `key` whose TOC is kept here (the one last opened;
    /// [`TocIndex::put`] keeps one per key): what an offline mount serves
    /// when the store cannot be reached.
    pub async fn latest(&self, store: &str, key: &str) -> Result<Option<String>, TarballError> {
        let (store, key) = (store.to_owned(), key.to_owned());
        self.with_conn(move |c| {
            c.query_row(
                "SELECT etag FROM tocs WHERE store = ?1 AND key = ?2 LIMIT 1",
                params![store, key],
                |row| row.get(0),
            )
            .optional()
        })
        .await
    }

    /// Whether any version of `key` is indexed here, native or foreign: an
    /// open then asks the store which version is current (one HEAD) before
    /// reading anything; else it reads the object's tail straight away.
    pub async fn knows(&self, store: &str, key: &str) -> Result<bool, TarballError> {
        let (store, key) = (store.to_owned(), key.to_owned());
        self.with_conn(move |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM tocs WHERE store = ?1 AND key = ?2)
                     OR EXISTS (SELECT 1 FROM foreign_tocs WHERE store = ?1 AND key = ?2)",
                params![store, key],
                |row| row.get(0),
            )
        })
        .await
    }

    /// The index of a foreign object's version, if one was built.
    pub async fn get_foreign(
        &self,
        store: &str,
        key: &str,
        etag: &str,
    ) -> Result<Option<ForeignIndex>, TarballError> {
        let (store, key, etag) = (store.to_owned(), key.to_owned(), etag.to_owned());
        let found = self
            .with_conn(move |c| {
                let head = c
                    .query_row(
                        "SELECT format, tar_size, entries FROM foreign_tocs WHERE store = ?1 AND key = ?2 AND etag = ?3",
                        params![store, key, etag],
                        |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, Vec<u8>>(2)?)),
                    )
                    .optional()?;
                let Some(head) = head else { return Ok(None) };
                let mut stmt = c.prepare(
                    "SELECT co, bits, uo, window, window_len FROM access_points
                     WHERE store = ?1 AND key = ?2 AND etag = ?3 ORDER BY idx",
                )?;
                let points = stmt
                    .query_map(params![store, key, etag], |row| {
                        Ok(AccessPoint {
                            co: row.get::<_, i64>(0)? as u64,
                            bits: row.get::<_, i64>(1)? as u8,
                            uo: row.get::<_, i64>(2)? as u64,
                            window: row.get(3)?,
                            window_len: row.get::<_, i64>(4)? as u32,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(Some((head, points)))
            })
            .await?;
        let Some(((format, tar_size, packed), points)) = found else {
            return Ok(None);
        };
        // Stored as (inflated length, zlib bytes).
        if packed.len() < 8 {
            return Err(TarballError::Corrupt(
                "cached foreign index is truncated".into(),
            ));
        }
        let raw_len = u64::from_le_bytes(packed[..8].try_into().unwrap_or_default());
        let raw = zlib_decompress_exact(&packed[8..], raw_len as usize)
            .map_err(|e| TarballError::Corrupt(format!("cached foreign index: {e:?}")))?;
        let entries = serde_json::from_slice(&raw)
            .map_err(|e| TarballError::Corrupt(format!("cached foreign index: {e}")))?;
        Ok(Some(ForeignIndex {
            format: if format == 0 {
                Format::Plain
            } else {
                Format::Gzip
            },
            points,
            entries,
            tar_size: tar_size as u64,
            skipped: Vec::new(),
        }))
    }

    /// Records the index of a foreign object's version, forgetting older versions.
    pub async fn put_foreign(
        &self,
        store: &str,
        key: &str,
        etag: &str,
        index: &ForeignIndex,
    ) -> Result<(), TarballError> {
        let raw =
            serde_json::to_vec(&index.entries).map_err(|e| TarballError::Corrupt(e.to_string()))?;
        let mut packed = (raw.len() as u64).to_le_bytes().to_vec();
        packed.extend_from_slice(&zlib_compress(&raw));
        let (store, key, etag) = (store.to_owned(), key.to_owned(), etag.to_owned());
        let format = i64::from(index.format == Format::Gzip);
        let tar_size = index.tar_size as i64;
        let points = index.points.clone();
        self.with_conn(move |c| {
            let tx = c.unchecked_transaction()?;
            for table in ["foreign_tocs", "access_points"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE store = ?1 AND key = ?2"),
                    params![store, key],
                )?;
            }
            tx.execute(
                "INSERT INTO foreign_tocs (store, key, etag, format, tar_size, entries) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![store, key, etag, format, tar_size, packed],
            )?;
            {
                let mut stmt = tx.prepare(
                    "INSERT INTO access_points (store, key, etag, idx, co, bits, uo, window, window_len)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for (i, p) in points.iter().enumerate() {
                    stmt.execute(params![
                        store,
                        key,
                        etag,
                        i as i64,
                        p.co as i64,
                        i64::from(p.bits),
                        p.uo as i64,
                        p.window,
                        i64::from(p.window_len)
                    ])?;
                }
            }
            tx.commit()
        })
        .await
    }
}

fn setup(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS tocs (
                store   TEXT NOT NULL,
                key     TEXT NOT NULL,
                etag    TEXT NOT NULL,
                locator BLOB NOT NULL,
                toc     BLOB NOT NULL,
                PRIMARY KEY (store, key, etag)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS foreign_tocs (
                store    TEXT NOT NULL,
                key      TEXT NOT NULL,
                etag     TEXT NOT NULL,
                format   INTEGER NOT NULL,
                tar_size INTEGER NOT NULL,
                entries  BLOB NOT NULL,
                PRIMARY KEY (store, key, etag)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS access_points (
                store      TEXT NOT NULL,
                key        TEXT NOT NULL,
                etag       TEXT NOT NULL,
                idx        INTEGER NOT NULL,
                co         INTEGER NOT NULL,
                bits       INTEGER NOT NULL,
                uo         INTEGER NOT NULL,
                window     BLOB NOT NULL,
                window_len INTEGER NOT NULL,
                PRIMARY KEY (store, key, etag, idx)
            ) WITHOUT ROWID;",
    )
}
