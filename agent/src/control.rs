//! `sessionfs flush` and `sessionfs status` for a mount: both ask the
//! mount process through an xattr of the mount's root
//! (`user.sessionfs.flush`, `user.sessionfs.status`), which its FUSE layer
//! hands to the write-back loop. `flush` returns once the pending changes
//! are in the store.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sessionfs_fuse::fs::CONTROL_XATTR;

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
                "the mount at {} could not {what}: see its log",
                mountpoint.display()
            ),
            _ => return Err(e).with_context(|| format!("asking {}", mountpoint.display())),
        }
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
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
    if let Err(e) = ask(mountpoint, "flush") {
        let text = e.to_string();
        if !text.contains("is not the root of a sessionfs mount") {
            eprintln!("sessionfs: writing back before the unmount: {e:#}");
        }
    }
}

pub fn status(mountpoint: &Path, json: bool) -> Result<()> {
    let answer = ask(mountpoint, "status")?;
    if json {
        println!("{answer}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&answer).context("the mount's status")?;
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
    Ok(())
}
