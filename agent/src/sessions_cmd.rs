//! `sessionfs sessions [PREFIX]`: the sessions of the bucket, and those
//! with an overlay on this host that the store does not have yet.
//!
//! One listing of the store (keys ending in `/session.tar.gz`), then a look
//! at each overlay directory here: its pending changes are counted from its
//! journal, or asked of the process holding it (through its control
//! socket), so "pending here" is what would still be written back.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Result;
use serde_json::{json, Value};
use sessionfs_core::overlay::journal::Journal;
use sessionfs_core::overlay::open::JOURNAL;
use sessionfs_core::overlay::OverlayError;
use sessionfs_core::session::{SessionPath, OBJECT_NAME};
use sessionfs_core::store::ObjectStore;

/// One row.
#[derive(Default)]
struct Row {
    size: Option<u64>,
    modified: Option<SystemTime>,
    /// Changes not yet written back in an overlay here.
    pending: Option<u64>,
    /// A process on this host holds the overlay.
    held: bool,
}

/// What the overlay of a session here holds: pending changes, and whether
/// a process holds it.
fn overlay_state(dir: &Path) -> Option<(u64, bool)> {
    if !dir.join(JOURNAL).exists() {
        return None;
    }
    match Journal::open(&dir.join(JOURNAL)) {
        Ok(j) => Some((j.pending_count().unwrap_or(0), false)),
        Err(OverlayError::InUse(_)) => {
            let status = crate::control_socket::ask(dir, "status").ok().flatten();
            let pending = status
                .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                .and_then(|v| v["pendingChanges"].as_u64())
                .unwrap_or(0);
            Some((pending, true))
        }
        Err(_) => None,
    }
}

pub async fn run(
    store: Arc<dyn ObjectStore>,
    overlays: &Path,
    prefix: Option<&str>,
    json: bool,
) -> Result<()> {
    let prefix = prefix.unwrap_or("");
    let suffix = format!("/{OBJECT_NAME}");
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for o in store.list_all(prefix, None).await?.objects {
        let Some(name) = o.key.strip_suffix(&suffix) else {
            continue;
        };
        if SessionPath::parse(name).is_err() {
            continue;
        }
        let row = rows.entry(name.to_owned()).or_default();
        row.size = Some(o.size);
        row.modified = Some(o.last_modified);
    }
    let dirs = tokio::task::spawn_blocking({
        let overlays = overlays.to_path_buf();
        let prefix = prefix.to_owned();
        move || {
            let mut found = Vec::new();
            for e in std::fs::read_dir(&overlays).into_iter().flatten().flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if !name.starts_with(&prefix) || SessionPath::parse(&name).is_err() {
                    continue;
                }
                if let Some(state) = overlay_state(&e.path()) {
                    found.push((name, state));
                }
            }
            found
        }
    })
    .await?;
    for (name, (pending, held)) in dirs {
        let row = rows.entry(name).or_default();
        row.pending = Some(pending);
        row.held = held;
    }
    if json {
        let list: Vec<Value> = rows
            .iter()
            .map(|(name, r)| {
                json!({
                    "sessionPath": name,
                    "size": r.size,
                    "lastModified": r.modified.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "inStore": r.size.is_some(),
                    "pendingChanges": r.pending,
                    "heldHere": r.held,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if rows.is_empty() {
        eprintln!(
            "no sessions{} in {}",
            if prefix.is_empty() {
                String::new()
            } else {
                format!(" starting with {prefix:?}")
            },
            store.describe()
        );
        return Ok(());
    }
    let width = rows
        .keys()
        .map(|k| k.chars().count())
        .max()
        .unwrap_or(7)
        .max(7);
    println!(
        "{:width$}  {:>10}  {:20}  PENDING HERE",
        "SESSION", "SIZE", "MODIFIED"
    );
    for (name, r) in &rows {
        let size = r
            .size
            .map_or_else(|| "-".to_owned(), crate::units::human_bytes);
        let modified = r.modified.map_or_else(
            || "(not in the store yet)".to_owned(),
            |t| humantime::format_rfc3339_seconds(t).to_string(),
        );
        let pending = match (r.pending, r.held) {
            (None, _) => "-".to_owned(),
            (Some(n), true) => format!("{n} (open in a process here)"),
            (Some(n), false) => n.to_string(),
        };
        println!(
            "{:width$}  {size:>10}  {modified:20}  {pending}",
            sessionfs_core::text::escape_controls(name)
        );
    }
    Ok(())
}
