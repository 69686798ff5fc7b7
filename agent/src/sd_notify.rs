//! systemd's notification protocol (`sd_notify(3)`): `READY=1` once the
//! mounts are live and the API listens, `STATUS=` lines, `STOPPING=1`,
//! `WATCHDOG=1` pings when the unit sets `WatchdogSec`. A datagram to
//! `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); without
//! that variable (not run by systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one notification; failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), std::path::Path::new(&path)),
        }
    })();
    if let Err(e) = sent {
        tracing::warn!("notifying systemd ({state:?}): {e}");
    }
}

pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

pub fn status(status: &str) {
    notify(&format!("STATUS={status}"));
}

pub fn stopping(status: &str) {
    notify(&format!("STOPPING=1\nSTATUS={status}"));
}

/// With `WatchdogSec=` set, pings at half the interval from the async
/// runtime: a runtime that stops making progress stops the pings, and
/// systemd restarts the service.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    // For this process only (not a child started with the same environment).
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    }))
}

/// `STATUS=` of a process holding `sessions`: how many, how many with
/// changes pending, when the last write-back finished.
pub fn sessions_status(
    sessions: &[std::sync::Arc<sessionfs_core::overlay::live::LiveSession>],
) -> String {
    let pending = sessions
        .iter()
        .filter(|s| s.has_pending_changes().unwrap_or(false))
        .count();
    let last = sessions
        .iter()
        .filter_map(|s| s.writeback.lock().last.as_ref().map(|r| r.at))
        .max();
    let last = last.map_or("none yet".to_owned(), |t| {
        humantime::format_rfc3339_seconds(t).to_string()
    });
    format!(
        "{} session(s) open, {pending} with changes pending; last write-back: {last}",
        sessions.len()
    )
}

/// Sends `STATUS=` from `line` every 10 s while systemd listens.
pub fn spawn_status(
    line: impl Fn() -> String + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let line = line();
            status(&line);
        }
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_notification_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // The only test here that sets the variable.
        std::env::set_var("NOTIFY_SOCKET", &path);
        super::ready("1 session");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=1 session");
    }
}
