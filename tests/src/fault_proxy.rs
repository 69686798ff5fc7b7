//! A TCP proxy in front of the real S3 server that injects faults, so retry
//! and timeout behaviour is tested against real connections, not mocks.
//!
//! Each accepted connection consumes one entry of the fault plan (then the
//! plan's default applies): forward it, answer one request with an HTTP error
//! and close, drop it after reading the request, hold it open silently, or
//! forward one request and lose the server's answer to it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Pass the connection through to the server.
    Forward,
    /// Answer `503 Service Unavailable`, as an overloaded server does.
    ServiceUnavailable,
    /// Answer S3's throttling error, `503 SlowDown`.
    SlowDown,
    /// Read the request, then close the connection without a word.
    Drop,
    /// Read the request and never answer.
    Hang,
    /// Forward the request and let the server carry it out, then close the
    /// connection instead of passing its answer on: the client cannot
    /// tell a request done from one never made.
    LoseAnswer,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    plan: Arc<Mutex<(VecDeque<Fault>, Fault)>>,
    /// Bumped to cut every forwarded connection (clients keep connections
    /// alive; a fault plan only meets new ones).
    cut: tokio::sync::watch::Sender<u64>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let plan = Arc::new(Mutex::new((VecDeque::new(), Fault::Forward)));
        let connections = Arc::new(AtomicUsize::new(0));
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let (p, c) = (plan.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let fault = {
                    let mut plan = p.lock().expect("plan lock");
                    let default = plan.1;
                    plan.0.pop_front().unwrap_or(default)
                };
                tokio::spawn(handle(client, upstream, fault, cut_rx.clone()));
            }
        });
        FaultProxy {
            addr,
            plan,
            cut,
            connections,
            task,
        }
    }

    /// The next connections get these faults, in order; later ones get `default`.
    pub fn plan(&self, faults: &[Fault], default: Fault) {
        let mut plan = self.plan.lock().expect("plan lock");
        plan.0 = faults.iter().copied().collect();
        plan.1 = default;
    }

    /// Closes every connection forwarded so far, so that clients holding
    /// them open meet the fault plan on their next connection.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Faults of the plan not met yet.
    pub fn planned(&self) -> usize {
        self.plan.lock().expect("plan lock").0.len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    mut cut: tokio::sync::watch::Receiver<u64>,
) {
    if fault == Fault::Forward {
        if let Ok(mut server) = TcpStream::connect(upstream).await {
            cut.mark_unchanged();
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.changed() => {}
            }
        }
        return;
    }
    if fault == Fault::LoseAnswer {
        if let Ok(server) = TcpStream::connect(upstream).await {
            lose_answer(client, server).await;
        }
        return;
    }
    read_request_head(&mut client).await;
    let answer = match fault {
        Fault::ServiceUnavailable => error_response("503 Service Unavailable", ""),
        Fault::SlowDown => error_response(
            "503 Slow Down",
            "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Reduce your request rate</Message></Error>",
        ),
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        Fault::Drop | Fault::Forward | Fault::LoseAnswer => return,
    };
    let _ = client.write_all(answer.as_bytes()).await;
    let _ = client.shutdown().await;
}

/// Passes the client's bytes to the server until the server answers with a
/// final status (not `100 Continue`), then closes both sides once the
/// answer had time to arrive whole, without a byte of it reaching the
/// client.
async fn lose_answer(client: TcpStream, server: TcpStream) {
    let (mut from_client, _to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let forward = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match from_server.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&seen);
        let final_status = text
            .split("\r\n\r\n")
            .any(|head| head.starts_with("HTTP/1.1 ") && !head.starts_with("HTTP/1.1 100"));
        if final_status {
            tokio::time::sleep(Duration::from_millis(100)).await;
            break;
        }
    }
    forward.abort();
}

fn error_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Reads until the end of the request headers (the body, if any, is left unread).
async fn read_request_head(client: &mut TcpStream) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 1 << 20 {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}
