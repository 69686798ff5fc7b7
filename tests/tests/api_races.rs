//! The API under concurrency, against the real binary and the real S3
//! server: every answer must be one a request alone could have had.
//! - GET racing PUT of one file: the length announced is the length sent,
//!   and the body is one whole version;
//! - PUT racing DELETE of one file: a PUT never answers 404;
//! - session DELETE racing PUTs: nobody answers 500;
//! - a kill -9 after PUTs: the last answered bytes stay, and the replaced
//!   ones still queued for removal are gone after the next open.
//!
//! The race suites run 10,000 operations from many tasks at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sessionfs_tests::api::Server;
use sessionfs_tests::mount::Site;

const API: &str = "/api/storage-worker/sessions";
const OPS: usize = 10_000;
const TASKS: usize = 16;

fn session_name(test: &str) -> String {
    format!("race-{test}-{:08x}", rand::random::<u32>())
}

/// Version `k` of the raced file: its number, then a byte pattern of a
/// length of its own; every tenth version is over 1 MiB (streamed in
/// chunks), the others a few KiB to a few hundred.
fn version(k: usize) -> Vec<u8> {
    let len = if k.is_multiple_of(10) {
        (1 << 20) + 4096 * (k % 7) + 1
    } else {
        2000 + (k % 50) * 5000
    };
    let mut v = format!("v{k:07}|").into_bytes();
    v.resize(len, (k % 251) as u8);
    v
}

/// Whether `body` is exactly one version.
fn is_a_version(body: &[u8]) -> Result<(), String> {
    let k: usize = std::str::from_utf8(body.get(1..8).ok_or("too short")?)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no version number in {:?}", &body[..body.len().min(9)]))?;
    let want = version(k);
    if body.len() != want.len() {
        return Err(format!(
            "version {k}: {} bytes, that version has {}",
            body.len(),
            want.len()
        ));
    }
    if body != want.as_slice() {
        return Err(format!("version {k}: the bytes mix versions"));
    }
    Ok(())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(TASKS * 2)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_get_racing_puts_answers_one_whole_version_with_its_length() {
    let site = Site::s3();
    let server = site.serve_api(&[], &[]);
    let session = session_name("get-put");
    let url = Arc::new(format!(
        "{}{API}/{session}/files/workspace/raced.bin",
        server.url
    ));
    let http = client();
    let r = http
        .put(url.as_str())
        .body(version(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let next = Arc::new(AtomicUsize::new(2));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (http, url, next, failures) =
            (http.clone(), url.clone(), next.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= OPS {
                    return;
                }
                // A quarter of the tasks write, the rest read.
                if t % 4 == 0 {
                    let r = http.put(url.as_str()).body(version(k)).send().await;
                    match r {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => failures.lock().unwrap().push(format!("PUT {}", r.status())),
                        Err(e) => failures.lock().unwrap().push(format!("PUT: {e}")),
                    }
                    continue;
                }
                let r = match http.get(url.as_str()).send().await {
                    Ok(r) => r,
                    Err(e) => {
                        failures.lock().unwrap().push(format!("GET: {e}"));
                        continue;
                    }
                };
                let status = r.status();
                let announced = r.content_length();
                // A body shorter than announced is an error here (the
                // connection ends early), never a silent short read.
                match r.bytes().await {
                    Ok(body) => {
                        let why = if status != 200 {
                            Err(format!("status {status}"))
                        } else if announced != Some(body.len() as u64) {
                            Err(format!("Content-Length {announced:?}, body {}", body.len()))
                        } else {
                            is_a_version(&body)
                        };
                        if let Err(why) = why {
                            failures.lock().unwrap().push(format!("GET: {why}"));
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(format!("GET body: {e}")),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {OPS} operations failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(server.stop().code(), Some(0));
    // Each PUT's replaced file went to the removal thread; a stopped
    // server has removed them all, leaving at most the file's own (none
    // once a write-back adopted it into the object).
    let data = site
        .overlay(&session, &sessionfs_tests::s3_bucket())
        .join("data");
    let left: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.len() <= 1 && left.iter().all(|n| n.parse::<u64>().is_ok()),
        "overlay files left in {}: {left:?}",
        data.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_put_racing_deletes_of_its_file_never_answers_404() {
    let site = Site::s3();
    let server = site.serve_api(&[], &[]);
    let session = session_name("put-delete");
    let url = Arc::new(format!(
        "{}{API}/{session}/files/workspace/dir/raced.txt",
        server.url
    ));
    let http = client();
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (http, url, next, failures) =
            (http.clone(), url.clone(), next.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < OPS {
                if t % 2 == 0 {
                    match http.put(url.as_str()).body("x".repeat(100)).send().await {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => {
                            let s = r.status();
                            let body = r.text().await.unwrap_or_default();
                            failures.lock().unwrap().push(format!("PUT {s}: {body}"));
                        }
                        Err(e) => failures.lock().unwrap().push(format!("PUT: {e}")),
                    }
                } else {
                    match http.delete(url.as_str()).send().await {
                        // Already gone (or the session not there yet): fine.
                        Ok(r) if r.status() == 200 || r.status() == 404 => {}
                        Ok(r) => {
                            let s = r.status();
                            let body = r.text().await.unwrap_or_default();
                            failures.lock().unwrap().push(format!("DELETE {s}: {body}"));
                        }
                        Err(e) => failures.lock().unwrap().push(format!("DELETE: {e}")),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(server.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_delete_racing_puts_answers_as_if_each_came_alone() {
    let site = Site::s3();
    let server = site.serve_api(&[], &[]);
    let session = session_name("session-delete");
    let base = Arc::new(format!("{}{API}/{session}", server.url));
    let http = client();
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (http, base, next, failures) =
            (http.clone(), base.clone(), next.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= OPS {
                    return;
                }
                // One task in four deletes the session, the others write files.
                let (what, r) = if t % 4 == 0 {
                    ("DELETE", http.delete(base.as_str()).send().await)
                } else {
                    let url = format!("{base}/files/workspace/f{}.txt", k % 37);
                    ("PUT", http.put(url).body(format!("file {k}")).send().await)
                };
                match r {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) if what == "DELETE" && r.status() == 404 => {}
                    Ok(r) => {
                        let s = r.status();
                        let body = r.text().await.unwrap_or_default();
                        failures.lock().unwrap().push(format!("{what} {s}: {body}"));
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{what}: {e}")),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(server.stop().code(), Some(0));
}

/// PUTs put their bytes in place by exchanging files; the replaced bytes
/// wait for a removal thread under a staged name. A kill -9 right after
/// the last answer loses that queue, never an answered PUT: the restarted
/// server answers the last bytes, and the session's next open removes the
/// staged names left behind (one planted too, whatever the kill's timing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaced_bytes_a_kill_9_left_queued_are_removed_at_the_next_open() {
    let site = Site::s3();
    let session = session_name("put-kill");
    let server = site.serve_api(&[], &[]);
    let url = |s: &Server| format!("{}{API}/{session}/files/workspace/raced.bin", s.url);
    let http = client();
    for k in 1..=200 {
        let r = http
            .put(url(&server))
            .body(version(k))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "PUT {k}");
    }
    server.kill9();
    let data = site
        .overlay(&session, &sessionfs_tests::s3_bucket())
        .join("data");
    std::fs::write(data.join("put.999999.1"), b"left by a crash").unwrap();

    let server = site.serve_api(&[], &[]);
    let body = http
        .get(url(&server))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        body[..] == version(200)[..],
        "the last answered PUT's bytes"
    );
    // A write opens the session here (its overlay, and the clean-up).
    let other = format!("{}{API}/{session}/files/workspace/other.txt", server.url);
    let r = http.put(&other).body("x").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let staged: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("put."))
        .collect();
    assert!(staged.is_empty(), "staged names left: {staged:?}");
    assert_eq!(server.stop().code(), Some(0));
}
