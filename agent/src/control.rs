//! `sessionfs flush` and `sessionfs status`.
//!
//! For a mount, both ask the mount process through an xattr of the mount's
//! root (`user.sessionfs.flush`, `user.sessionfs.status`), which its FUSE
//! layer hands to the write-back loop. For a session name, they ask the
//! process holding the session's overlay on this host through its control
//! socket (`control_socket`: a `serve`, a mount); when no process holds it
//! (a mount that stopped without writing back, a server that was killed),
//! `flush` opens the overlay and writes it back from this process. `flush`
//! returns once the pending changes are in the store.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sessionfs_core::overlay::journal::Journal;
use sessionfs_core::overlay::open::{open, OpenError, OpenSpec, JOURNAL};
use sessionfs_core::overlay::OverlayError;
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::ObjectStore;
use sessionfs_core::tarball::index::TocIndex;
use sessionfs_fuse::fs::CONTROL_XATTR;

use crate::writeback_loop::{describe, Policy, WriteBack};

/// Largest answer read back.
const MAX_ANSWER: usize = 1 << 20;

fn ask(mountpoint: &Path, what: &str) -> Result<String> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .context("the mount point contains a NUL byte")?;
    let name = CString::new(format!("{CONTROL_XATTR}{what}"))?;
    let mut buf = vec![0u8; MAX_ANSWER];
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // buffer is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) | Some(libc::ENODATA) => bail!(
                "{} is not the root of a sessionfs mount with write-back (see `mount`; a read-only mount or one with --no-writeback has none)",
                mountpoint.display()
            ),
            Some(libc::EIO) => bail!(
                "the mount at {} could not {what}: {}",
                mountpoint.display(),
                last_error(mountpoint, what).unwrap_or_else(|| "see its log".into())
            ),
            _ => return Err(e).with_context(|| format!("asking {}", mountpoint.display())),
        }
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Why the mount's last write-back (or follow) failed, as its status says:
/// an xattr carries only an errno back.
fn last_error(mountpoint: &Path, what: &str) -> Option<String> {
    if what == "status" {
        return None;
    }
    let status: serde_json::Value = serde_json::from_str(&ask(mountpoint, "status").ok()?).ok()?;
    status["lastError"].as_str().map(str::to_owned)
}

pub fn flush(mountpoint: &Path, quiet: bool) -> Result<()> {
    let answer = ask(mountpoint, "flush")?;
    if !quiet {
        println!("{answer}");
    }
    Ok(())
}

/// Before an unmount: writes back what is pending, when the mount point is
/// a sessionfs mount with write-back. A failure is reported, not fatal: the
/// mount process tries again as it exits.
pub fn flush_before_unmount(mountpoint: &Path) {
    if let Err(e) = ask(mountpoint, "drain") {
        let text = e.to_string();
        if !text.contains("is not the root of a sessionfs mount") {
            eprintln!("sessionfs: writing back before the unmount: {e:#}");
        }
    }
}

pub fn status(mountpoint: &Path, json: bool) -> Result<()> {
    let mut v: serde_json::Value =
        serde_json::from_str(&ask(mountpoint, "status")?).context("the status answered")?;
    // Only a mount counts the kernel's requests (a mount of an older
    // sessionfs does not answer; the rest of the status stands).
    let requests = ask(mountpoint, "requests")
        .ok()
        .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok());
    if let (Some(obj), Some(r)) = (v.as_object_mut(), requests) {
        obj.insert("kernelRequests".into(), r);
    }
    print_status(&v.to_string(), json)
}

fn print_status(answer: &str, json: bool) -> Result<()> {
    if json {
        println!("{answer}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(answer).context("the status answered")?;
    let field = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "session:         {}",
        field("session").as_str().unwrap_or("?")
    );
    println!(
        "object version:  {}",
        field("baseEtag").as_str().unwrap_or("(none yet)")
    );
    println!("pending changes: {}", field("pendingChanges"));
    match v.get("lastWriteBack").filter(|l| !l.is_null()) {
        Some(l) => println!(
            "last write-back: {} ({} change(s), {} bytes uploaded, {} copied server-side, {:.3} s)",
            l["at"].as_str().unwrap_or("?"),
            l["changes"],
            l["uploadedBytes"],
            l["copiedBytes"],
            l["seconds"].as_f64().unwrap_or(0.0)
        ),
        None => println!("last write-back: none since the mount started"),
    }
    if let Some(e) = v.get("lastError").and_then(|e| e.as_str()) {
        println!("last error:      {e}");
    }
    println!("conflicts:       {}", field("conflicts"));
    if let Some(r) = v.get("kernelRequests").and_then(|r| r.as_object()) {
        let mut kinds: Vec<(&String, u64)> = r
            .iter()
            .filter(|(k, _)| *k != "total")
            .map(|(k, n)| (k, n.as_u64().unwrap_or(0)))
            .collect();
        kinds.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "kernel requests: {} since the mount ({})",
            r.get("total").and_then(|t| t.as_u64()).unwrap_or(0),
            kinds.join(", ")
        );
    }
    Ok(())
}

/// Where a session's overlay lives on this host.
pub fn overlay_of(
    root: Option<std::path::PathBuf>,
    bucket: &str,
    session: &SessionPath,
) -> Result<std::path::PathBuf> {
    Ok(crate::mount_cmd::overlay_root(root)?
        .join(bucket)
        .join(session.as_str()))
}

/// Asks the process that holds the overlay (its lock says one does). A
/// process that has just opened the session starts answering within one
/// round of its write-back loop, so it is given a moment.
fn ask_holder(overlay: &Path, what: &str, session: &SessionPath) -> Result<String> {
    for _ in 0..30 {
        if let Some(answer) = crate::control_socket::ask(overlay, what)? {
            return Ok(answer);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!(
        "the overlay of {session} is held by a process that does not write it back \
         (a read-only mount, or one started with --no-writeback)"
    )
}

/// `flush SESSION`: asks the process holding the overlay to write it back,
/// or writes back an overlay no process holds.
pub async fn flush_session(
    session: SessionPath,
    overlay: std::path::PathBuf,
    store: Arc<dyn ObjectStore>,
    index: TocIndex,
    quiet: bool,
) -> Result<()> {
    let asked = {
        let overlay = overlay.clone();
        tokio::task::spawn_blocking(move || crate::control_socket::ask(&overlay, "flush")).await?
    };
    if let Some(answer) = asked? {
        if !quiet {
            println!("{answer}");
        }
        return Ok(());
    }
    if !overlay.join(JOURNAL).exists() {
        bail!(
            "no overlay of {session} on this host (looked in {}): nothing to write back",
            overlay.display()
        );
    }
    let spec_overlay = overlay.clone();
    let spec = OpenSpec {
        store: store.clone(),
        index: Some(index),
        session: session.clone(),
        overlay,
        read_only: false,
        offline: sessionfs_core::overlay::open::Offline::Never,
    };
    let rt = tokio::runtime::Handle::current();
    let live = match tokio::task::spawn_blocking(move || open(&spec, &rt)).await? {
        Ok(live) => Arc::new(live),
        Err(OpenError::Overlay(OverlayError::InUse(_))) => {
            let overlay = spec_overlay;
            let answer =
                tokio::task::spawn_blocking(move || ask_holder(&overlay, "flush", &session))
                    .await??;
            if !quiet {
                println!("{answer}");
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let policy = Policy {
        quiet_ms: 0,
        max_lag_ms: 0,
        no_writeback: false,
        follow_ms: 0,
    };
    let wb = WriteBack::new(Arc::new(Vec::new), store, policy, Arc::new(|_| {}));
    let report = wb.once(&live).await;
    let synced = live.sync();
    match report? {
        Some(r) if !quiet => println!("{}", describe(&r)),
        None if !quiet => println!("nothing to write back"),
        _ => {}
    }
    Ok(synced?)
}

/// `status SESSION`: the status of the process holding the overlay, or
/// what the overlay on this host holds.
pub fn status_session(session: &SessionPath, overlay: &Path, json: bool) -> Result<()> {
    if let Some(answer) = crate::control_socket::ask(overlay, "status")? {
        return print_status(&answer, json);
    }
    let journal = overlay.join(JOURNAL);
    let (pending, base) = if journal.exists() {
        let j = match Journal::open(&journal) {
            Ok(j) => j,
            Err(OverlayError::InUse(_)) => {
                return print_status(&ask_holder(overlay, "status", session)?, json)
            }
            Err(e) => return Err(e.into()),
        };
        (
            j.pending_count()?,
            j.meta("base_etag")?.filter(|e| !e.is_empty()),
        )
    } else {
        (0, None)
    };
    let v = serde_json::json!({
        "session": session.as_str(),
        "overlay": journal.exists().then(|| overlay.display().to_string()),
        "baseEtag": base,
        "pendingChanges": pending,
    });
    if json {
        println!("{v}");
    } else {
        println!("session:         {session}");
        println!(
            "overlay:         {}",
            if journal.exists() {
                overlay.display().to_string()
            } else {
                "none on this host".into()
            }
        );
        println!("object version:  {}", base.as_deref().unwrap_or("(none)"));
        println!("pending changes: {pending}");
    }
    Ok(())
}
