//! `sessionfs serve` as a child process for the end-to-end suite: the HTTP
//! API on a free loopback port (learned from its log), real requests
//! against it, and a raw HTTP/1.1 sender for request paths an HTTP client
//! library would normalise (`..`, `%2e%2e`) before sending.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::mount::Site;

/// Reads the API's address out of a serve log, waiting until it appears.
pub fn wait_for_url(log: &Path, mut exited: impl FnMut() -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(at) = text.find("listening on http://") {
            let rest = &text[at + "listening on ".len()..];
            let url: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
            return url;
        }
        assert!(!exited(), "sessionfs serve exited: {text}");
        assert!(Instant::now() < deadline, "the API did not start: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

impl Site {
    /// `sessionfs serve` (the API alone); `extra` are more flags, `env` more variables.
    pub fn serve_api(&self, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let log = self
            .dir
            .path()
            .join(format!("serve-{:08x}.log", rand::random::<u32>()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut child = self
            .command()
            .env("SESSIONFS_LOG", "info")
            .envs(env.iter().copied())
            .args(["serve", "--port", "0"])
            // Loopback unless the test binds elsewhere itself.
            .args(if extra.contains(&"--bind") {
                &[][..]
            } else {
                &["--bind", "127.0.0.1"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("start sessionfs serve");
        let url = wait_for_url(&log, || child.try_wait().ok().flatten().is_some());
        Server {
            child: Some(child),
            url,
            log,
        }
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `host:port` of the API.
    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    /// SIGTERM; returns once the process has exited (panics after 60 s).
    pub fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        crate::terminate(&mut child, Duration::from_secs(60)).expect("serve did not stop")
    }
}

impl Server {
    /// kill -9 of the server, as a crash.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A raw HTTP/1.1 exchange, the request path sent exactly as given.
/// Returns the status and the body.
pub fn raw_request(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send");
    s.write_all(body).expect("send body");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match out.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => out[at + 4..].to_vec(),
        None => Vec::new(),
    };
    (status, body)
}
