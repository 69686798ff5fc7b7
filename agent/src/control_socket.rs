//! The control socket of a held session: how `sessionfs flush SESSION` and
//! `sessionfs status SESSION` reach the process that holds the session's
//! overlay (a `serve` without mounts has no mount point to ask through).
//!
//! The process holding an overlay (its journal lock is exclusive) listens
//! on an abstract Unix socket named after the session and the overlay
//! directory's canonical path, so the name needs no file, cannot be left
//! behind by kill -9, and has no path-length limit. The session part lets a
//! process see, in `/proc/net/unix`, that another overlay of the same
//! session is held on this host (two mounts with two overlay directories),
//! and warn: both write back, and the conflict policy keeps both versions
//! of a file changed in both. Only the same user (or root) is answered:
//! abstract sockets have no file permissions, so the peer's credentials are
//! checked, both ways. One request per connection: a line (`flush` or `status`), then
//! the answer: `ok` or `err` on the first line, the text after it.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sessionfs_core::overlay::live::LiveSession;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Longest request line read.
const MAX_REQUEST: u64 = 64;
/// Largest answer read back.
const MAX_ANSWER: u64 = 1 << 20;

/// Where names of control sockets start; then the session's key, then
/// the overlay's.
const PREFIX: &str = "sessionfs/control/";

fn short_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(bytes)[..12])
}

/// The socket's name for the overlay at `overlay`: the session's key
/// (overlays live at `ROOT/BUCKET/SESSION`, so its last two components),
/// then the overlay directory's canonical path, each hashed.
fn name(overlay: &Path) -> std::io::Result<String> {
    let canonical = overlay.canonicalize()?;
    let session: Vec<_> = canonical.iter().rev().take(2).collect();
    let session = session
        .iter()
        .map(|c| c.as_encoded_bytes())
        .collect::<Vec<_>>()
        .join(&b'/');
    Ok(format!(
        "{PREFIX}{}/{}",
        short_hash(&session),
        short_hash(canonical.as_os_str().as_encoded_bytes())
    ))
}

fn address(overlay: &Path) -> std::io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(name(overlay)?.as_bytes())
}

/// How many other overlays of the same session processes on this host
/// hold now (their control sockets are listed in `/proc/net/unix`).
fn other_holders(mine: &str) -> usize {
    let Some((session, _)) = mine.rsplit_once('/') else {
        return 0;
    };
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return 0;
    };
    let mut seen: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter_map(|p| p.strip_prefix('@'))
        .filter(|p| p.starts_with(session) && *p != mine)
        .collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// Stops the listener when the session's control hook (and so the session)
/// is dropped.
pub struct Listening(tokio::task::AbortHandle);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts answering on `s`'s socket. A failure to listen is logged: the
/// session still works, only `flush SESSION` cannot reach it.
pub fn listen(s: &Arc<LiveSession>) -> Listening {
    let weak = Arc::downgrade(s);
    let overlay = s.overlay_dir().to_path_buf();
    let task = tokio::spawn(async move {
        if let Err(e) = accept_loop(&overlay, weak).await {
            tracing::warn!(
                overlay = %overlay.display(),
                "the control socket is not listening (`sessionfs flush SESSION` cannot reach this process; its mount point can): {e}"
            );
        }
    });
    Listening(task.abort_handle())
}

async fn accept_loop(overlay: &Path, session: Weak<LiveSession>) -> std::io::Result<()> {
    let name = name(overlay)?;
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    // The name is free unless this process held the session a moment ago
    // and that listener has not stopped yet.
    let mut tries = 0;
    let listener = loop {
        match std::os::unix::net::UnixListener::bind_addr(&addr) {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let others = other_holders(&name);
    if others > 0 {
        if let Some(s) = session.upgrade() {
            tracing::warn!(
                session = %s.name,
                "{others} other process(es) on this host hold this session with another overlay directory: \
                 each writes its changes back on its own, and a file changed in both is kept \
                 twice (the later write-back's copy as NAME.conflict-<etag>)"
            );
        }
    }
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    loop {
        let (conn, _) = listener.accept().await?;
        let Some(s) = session.upgrade() else {
            return Ok(());
        };
        tokio::spawn(async move {
            if let Err(e) = answer(conn, s).await {
                tracing::debug!("control socket: {e}");
            }
        });
    }
}

async fn answer(conn: tokio::net::UnixStream, s: Arc<LiveSession>) -> std::io::Result<()> {
    let peer = conn.peer_cred()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if peer.uid() != me && peer.uid() != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("refused a request from uid {}", peer.uid()),
        ));
    }
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let what = line.trim().to_owned();
    // The hook blocks (a flush waits for the store): off the runtime.
    let answer = tokio::task::spawn_blocking(move || s.control(&what))
        .await
        .map_err(std::io::Error::other)?;
    let text = match answer {
        Some(Ok(text)) => format!("ok\n{text}"),
        Some(Err(e)) => format!("err\n{e}"),
        None => "err\nno write-back runs for this session".to_owned(),
    };
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// Asks the process holding the overlay at `overlay`; `None` when no
/// process listens for it.
pub fn ask(overlay: &Path, what: &str) -> Result<Option<String>> {
    let Ok(addr) = address(overlay) else {
        return Ok(None);
    };
    let mut conn = match UnixStream::connect_addr(&addr) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(e).context("connecting to the process holding the session"),
    };
    // Abstract names have no owner: only a process of this user (or root)
    // is taken for the one holding the session.
    let server = peer_uid(&conn).context("the credentials of the process holding the session")?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if server != me && server != 0 {
        bail!("the control socket of this session belongs to uid {server}, not to this user: not asking it");
    }
    conn.write_all(format!("{what}\n").as_bytes())?;
    let mut text = String::new();
    conn.take(MAX_ANSWER)
        .read_to_string(&mut text)
        .context("reading the answer of the process holding the session")?;
    match text.split_once('\n') {
        Some(("ok", rest)) => Ok(Some(rest.to_owned())),
        Some(("err", rest)) => bail!("the process holding the session could not {what}: {rest}"),
        _ => bail!("the process holding the session answered nothing (it may have stopped)"),
    }
}

/// The uid of the process at the other end of `conn`.
fn peer_uid(conn: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the call; `cred` and `len` are
    // valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}
