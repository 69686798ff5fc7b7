//! The storage-worker HTTP API, end to end: the real `sessionfs serve`
//! against the real S3 server, over real HTTP. Every endpoint and every
//! error code is asserted with the contract's exact JSON shapes, statuses and
//! headers; bad input is refused with nothing written; the API and a mount
//! of the same process see each other's writes at once.

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sessionfs_tests::api::{raw_request, Server};
use sessionfs_tests::fault_proxy::{Fault, FaultProxy};
use sessionfs_tests::mount::Site;
use sessionfs_tests::{format_version, pattern, s3_store};

const API: &str = "/api/storage-worker/sessions";
const CONTAINER: &str = "api-test-container";

fn session(name: &str) -> String {
    format!("tests__{name}{:08x}__main", rand::random::<u32>())
}

fn serve(site: &Site, extra: &[&str]) -> Server {
    site.serve_api(extra, &[("CONTAINER_ID", CONTAINER)])
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// The keys of the shared bucket (other tests write there too: callers
/// compare only what concerns their own sessions).
async fn keys() -> BTreeSet<String> {
    s3_store()
        .await
        .list_all("", None)
        .await
        .expect("list the bucket")
        .objects
        .into_iter()
        .map(|o| o.key)
        .collect()
}

async fn json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    assert_eq!(
        r.headers()
            .get("x-container-id")
            .and_then(|v| v.to_str().ok()),
        Some(CONTAINER),
        "X-Container-ID on every response"
    );
    let body = r.bytes().await.expect("body");
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, v)
}

/// GETs a URL; the body as text.
async fn text(url: impl reqwest::IntoUrl) -> String {
    http()
        .get(url)
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body")
}

/// GETs a URL; the body.
async fn bytes_of(url: impl reqwest::IntoUrl) -> bytes::Bytes {
    http()
        .get(url)
        .send()
        .await
        .expect("send")
        .bytes()
        .await
        .expect("body")
}

/// Sends a request; its status and JSON body.
async fn call(r: reqwest::RequestBuilder) -> (u16, Value) {
    json(r.send().await.expect("send")).await
}

/// Asserts the error shape: exactly `error`, `message`, `containerId`.
fn assert_error(status: u16, v: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(v["containerId"], CONTAINER);
    let mut fields: Vec<&String> = v.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(fields, ["containerId", "error", "message"], "{v}");
}

/// A tar.gz as other services make it (GNU tar).
fn tar_czf(site: &Site, files: &[(&str, &[u8])]) -> Vec<u8> {
    let src = site
        .dir
        .path()
        .join(format!("tree-{:08x}", rand::random::<u32>()));
    for (path, bytes) in files {
        let p = src.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
    let out = src.with_extension("tgz");
    let ok = Command::new("tar")
        .arg("czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    fs::read(out).unwrap()
}

/// The object stored for session `s`, as the store has it.
async fn stored_object(s: &str) -> bytes::Bytes {
    s3_store()
        .await
        .get(&format!("{s}/session.tar.gz"), Default::default())
        .await
        .unwrap()
        .body
}

/// What Python's streaming `tarfile` (`r|gz`) extracts: `path size` lines.
fn python_stream_listing(tgz: &[u8], dir: &std::path::Path) -> String {
    let file = dir.join(format!("dl-{:08x}.tgz", rand::random::<u32>()));
    fs::write(&file, tgz).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, tarfile\n\
             with tarfile.open(sys.argv[1], 'r|gz') as t:\n\
             \x20   for m in t:\n\
             \x20       if m.isfile() and not m.name.startswith('.sessionfs'):\n\
             \x20           data = t.extractfile(m).read()\n\
             \x20           print(m.name.lstrip('./'), len(data), data[:40])\n",
        )
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn health_openapi_and_metrics() {
    let site = Site::s3();
    let server = serve(&site, &[]);
    let (status, v) = call(http().get(format!("{}/health", server.url))).await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["containerId"], CONTAINER);
    assert!(v["version"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(v["build"]["commitSha"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(v["build"]["timestamp"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(v["timestamp"].as_str().is_some_and(|s| s.ends_with('Z')));

    let (status, doc) = call(http().get(format!("{}/openapi.json", server.url))).await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3.1"),
        "{}",
        doc["openapi"]
    );

    // Some traffic, then the counters say so.
    let s = session("metrics");
    let url = format!("{}{API}/{s}/files/a.txt", server.url);
    http().put(&url).body("x").send().await.unwrap();
    http().get(&url).send().await.unwrap();
    let text = http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "sessionfs_http_requests_total{route=\"/api/storage-worker/sessions/{sessionPath}/files/{filePath}\",method=\"PUT\",status=\"200\"} 1",
        "sessionfs_http_request_duration_seconds_bucket{route=\"/api/storage-worker/sessions/{sessionPath}/files/{filePath}\",le=\"+Inf\"} 2",
        "sessionfs_cache_hits_total",
        "sessionfs_store_requests_total",
        "sessionfs_open_sessions 1",
        "sessionfs_sessions_with_pending_changes 1",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[tokio::test]
async fn files_are_written_read_listed_and_deleted() {
    let site = Site::s3();
    let server = serve(&site, &[]);
    let c = http();
    let s = session("files");
    let base = format!("{}{API}/{s}", server.url);

    // Not there yet.
    let r = c.head(&base).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let (st, v) = call(c.get(format!("{base}/files"))).await;
    assert_error(st, &v, 404, "session_not_found");

    // The first PUT creates the session (and the directories).
    let body = "console.log(\"Hello World\");\n";
    let (st, v) = call(
        c.put(format!("{base}/files/workspace/src/index.ts"))
            .header("content-type", "text/plain")
            .body(body),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        v,
        serde_json::json!({
            "success": true,
            "sessionPath": s,
            "filePath": "workspace/src/index.ts",
            "size": body.len(),
            "containerId": CONTAINER,
        })
    );
    assert_eq!(c.head(&base).send().await.unwrap().status(), 200);
    c.put(format!("{base}/files/workspace/package.json"))
        .body("{}")
        .send()
        .await
        .unwrap();

    let (st, v) = call(c.get(format!("{base}/files"))).await;
    assert_eq!(st, 200);
    assert_eq!(
        v,
        serde_json::json!({
            "sessionPath": s,
            "count": 2,
            "files": [
                {"path": "workspace/package.json", "size": 2},
                {"path": "workspace/src/index.ts", "size": body.len()},
            ],
            "containerId": CONTAINER,
        })
    );

    // Raw bytes with a type from the name; HEAD; ranges; validators.
    let url = format!("{base}/files/workspace/src/index.ts");
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/typescript; charset=utf-8"
    );
    assert_eq!(
        r.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(r.headers()["x-container-id"], CONTAINER);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(r.text().await.unwrap(), body);
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        body.len().to_string().as_str()
    );
    let r = c
        .get(&url)
        .header("range", "bytes=0-6")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 0-6/{}", body.len()).as_str()
    );
    assert_eq!(r.text().await.unwrap(), "console");
    let r = c
        .get(&url)
        .header("range", "bytes=-3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.text().await.unwrap(), ");\n");
    let r = c
        .get(&url)
        .header("range", "bytes=999-")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", body.len()).as_str()
    );
    let (st, v) = json(r).await;
    assert_error(st, &v, 416, "range_not_satisfiable");
    let r = c
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // A large file streams back whole.
    let big = pattern(5 << 20, 7);
    c.put(format!("{base}/files/workspace/big.bin"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let got = bytes_of(format!("{base}/files/workspace/big.bin")).await;
    assert_eq!(got, big);

    // Overwrite, then delete.
    c.put(&url).body("v2").send().await.unwrap();
    assert_eq!(text(&url).await, "v2");
    let (st, v) = call(c.delete(&url)).await;
    assert_eq!(st, 200);
    assert_eq!(
        v,
        serde_json::json!({
            "success": true,
            "sessionPath": s,
            "filePath": "workspace/src/index.ts",
            "containerId": CONTAINER,
        })
    );
    let (st, v) = call(c.get(&url)).await;
    assert_error(st, &v, 404, "file_not_found");
    assert_eq!(c.head(&url).send().await.unwrap().status(), 404);
    let (st, v) = call(c.delete(&url)).await;
    assert_error(st, &v, 404, "file_not_found");
    // A directory in the way of a file, a file in the way of a directory.
    let (st, v) = call(c.put(format!("{base}/files/workspace")).body("x")).await;
    assert_error(st, &v, 409, "conflict");
    let (st, v) = call(
        c.put(format!("{base}/files/workspace/package.json/x"))
            .body("x"),
    )
    .await;
    assert_error(st, &v, 409, "conflict");
}

#[tokio::test]
async fn sessions_upload_download_list_and_delete() {
    let site = Site::s3();
    let server = serve(&site, &["--recheck-ms", "0"]);
    let c = http();

    // Upload of a foreign tar.gz (raw body), then its files.
    let s = session("upload");
    let tgz = tar_czf(
        &site,
        &[
            ("workspace/src/main.rs", b"fn main() {}\n"),
            (".session-metadata.json", b"{\"id\":1}"),
        ],
    );
    let (st, v) = call(
        c.post(format!("{}{API}/{s}/upload", server.url))
            .header("content-type", "application/gzip")
            .body(tgz.clone()),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["sessionPath"], s);
    assert_eq!(v["uploaded"], true);
    assert_eq!(v["size"], tgz.len());
    assert_eq!(v["format"], "foreign");
    assert_eq!(v["containerId"], CONTAINER);
    let stored = stored_object(&s).await;
    assert_eq!(stored, tgz, "the upload is stored as sent");
    let got = text(format!(
        "{}{API}/{s}/files/workspace/src/main.rs",
        server.url
    ))
    .await;
    assert_eq!(got, "fn main() {}\n");

    // Multipart form (field `tarball`) replaces it.
    let tgz2 = tar_czf(&site, &[("workspace/b.txt", b"bee")]);
    let form = reqwest::multipart::Form::new().part(
        "tarball",
        reqwest::multipart::Part::bytes(tgz2.clone()).file_name("session.tar.gz"),
    );
    let (st, v) = call(
        c.post(format!("{}{API}/{s}/upload", server.url))
            .multipart(form),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = call(c.get(format!("{}{API}/{s}/files", server.url))).await;
    assert_eq!(
        v["files"],
        serde_json::json!([{"path": "workspace/b.txt", "size": 3}])
    );

    // Metadata, existence, the list.
    let (st, v) = call(c.get(format!("{}{API}/{s}", server.url))).await;
    assert_eq!(st, 200);
    assert_eq!(v["sessionPath"], s);
    assert_eq!(v["size"], tgz2.len());
    assert_eq!(v["pendingChanges"], false);
    assert!(v["createdAt"].as_str().is_some() && v["lastModified"].as_str().is_some());
    assert_eq!(v["containerId"], CONTAINER);
    let (st, v) = call(c.get(format!("{}{API}", server.url))).await;
    assert_eq!(st, 200);
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(v["count"], sessions.len());
    assert!(sessions.iter().any(|x| x["sessionPath"] == s), "{v}");

    // Download: the object as stored, with its headers; streaming tarfile reads it.
    let r = c
        .get(format!("{}{API}/{s}/download", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/gzip");
    assert_eq!(
        r.headers()["content-length"],
        tgz2.len().to_string().as_str()
    );
    assert!(r.headers()["etag"].to_str().unwrap().starts_with('"'));
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with(&format!("attachment; filename=\"{s}.tar.gz\"")));
    assert_eq!(r.bytes().await.unwrap(), tgz2);

    // A change not yet written back is in the download: written back
    // first, the download is the stored object.
    c.put(format!("{}{API}/{s}/files/workspace/new.txt", server.url))
        .body("pending change")
        .send()
        .await
        .unwrap();
    let r = c
        .get(format!("{}{API}/{s}/download", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let len: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), len);
    let listing = python_stream_listing(&body, site.dir.path());
    assert!(
        listing.contains("workspace/new.txt 14 b'pending change'"),
        "{listing}"
    );
    assert!(listing.contains("workspace/b.txt 3 b'bee'"), "{listing}");
    let (_, v) = call(c.get(format!("{}{API}/{s}", server.url))).await;
    assert_eq!(v["pendingChanges"], false);
    let stored = stored_object(&s).await;
    assert!(stored == body, "the download is the object written back");

    // The object replaced in the store by someone else (another server, a
    // push): without changes pending here, the next request reads the new one.
    let other = session("replaced");
    c.put(format!("{}{API}/{other}/files/workspace/v.txt", server.url))
        .body("first")
        .send()
        .await
        .unwrap();
    let (st, _) = call(
        c.post(format!("{}{API}/{other}/upload", server.url))
            .body(tar_czf(&site, &[("workspace/v.txt", b"uploaded")])),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        text(format!("{}{API}/{other}/files/workspace/v.txt", server.url)).await,
        "uploaded"
    );
    s3_store()
        .await
        .put(
            &format!("{other}/session.tar.gz"),
            bytes::Bytes::from(tar_czf(
                &site,
                &[("workspace/v.txt", b"replaced elsewhere")],
            )),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        text(format!("{}{API}/{other}/files/workspace/v.txt", server.url)).await,
        "replaced elsewhere"
    );

    // Delete: gone from the store and from the API.
    let (st, v) = call(c.delete(format!("{}{API}/{s}", server.url))).await;
    assert_eq!(st, 200);
    assert_eq!(
        v,
        serde_json::json!({"sessionPath": s, "deleted": true, "containerId": CONTAINER})
    );
    assert!(!keys().await.contains(&format!("{s}/session.tar.gz")));
    assert_eq!(
        c.head(format!("{}{API}/{s}", server.url))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let (st, v) = call(c.get(format!("{}{API}/{s}", server.url))).await;
    assert_error(st, &v, 404, "session_not_found");
    let (st, v) = call(c.delete(format!("{}{API}/{s}", server.url))).await;
    assert_error(st, &v, 404, "session_not_found");
    let (st, v) = call(c.get(format!("{}{API}/{s}/download", server.url))).await;
    assert_error(st, &v, 404, "session_not_found");

    // Bulk delete: one result per path, in order.
    let (a, b) = (session("bulka"), session("bulkb"));
    for x in [&a, &b] {
        c.put(format!("{}{API}/{x}/files/f", server.url))
            .body("x")
            .send()
            .await
            .unwrap();
    }
    let missing = session("bulkmissing");
    let (st, v) = call(
        c.post(format!("{}{API}/bulk-delete", server.url))
            .json(&serde_json::json!({"sessionPaths": [a, missing, "a/b", b]})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["deletedCount"], 2);
    assert_eq!(v["sessionPaths"], serde_json::json!([a, missing, "a/b", b]));
    let results = v["results"].as_array().unwrap();
    assert_eq!(
        results[0],
        serde_json::json!({"sessionPath": a, "deleted": true})
    );
    assert_eq!(results[1]["error"], "session_not_found");
    assert_eq!(results[2]["error"], "invalid_session_path");
    assert_eq!(
        results[3],
        serde_json::json!({"sessionPath": b, "deleted": true})
    );
    let (st, v) = call(
        c.post(format!("{}{API}/bulk-delete", server.url))
            .json(&serde_json::json!({"sessionPaths": "not a list"})),
    )
    .await;
    assert_error(st, &v, 400, "invalid_request");
    let (st, v) = call(
        c.post(format!("{}{API}/bulk-delete", server.url))
            .json(&serde_json::json!({"sessionPaths": []})),
    )
    .await;
    assert_eq!((st, &v["deletedCount"]), (200, &serde_json::json!(0)));
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let site = Site::s3();
    let server = serve(
        &site,
        &[
            "--max-file-bytes",
            "4096",
            "--max-upload-bytes",
            "1048576",
            "--max-inflated-bytes",
            "8388608",
        ],
    );
    let c = http();
    // One good session, whose object must not change.
    let good = session("badinput");
    let tgz = tar_czf(&site, &[("workspace/keep.txt", b"keep")]);
    let (st, _) = call(
        c.post(format!("{}{API}/{good}/upload", server.url))
            .body(tgz),
    )
    .await;
    assert_eq!(st, 200);
    let before = s3_store()
        .await
        .head(&format!("{good}/session.tar.gz"))
        .await
        .unwrap();
    let marker = format!("zz{:08x}", rand::random::<u32>());

    // Session paths, sent raw (a client library would normalise `..`).
    let long = format!("{marker}{}", "x".repeat(1000));
    for seg in [
        "..".to_owned(),
        "%2e%2e".to_owned(),
        "%2E%2E".to_owned(),
        format!("{marker}%2fx"),
        format!("{marker}%2Fx"),
        format!("{marker}%00x"),
        format!("{marker}%5cx"),
        String::new(),
        long,
    ] {
        for (method, tail) in [
            ("GET", "/files"),
            ("PUT", "/files/a.txt"),
            ("POST", "/upload"),
            ("DELETE", ""),
        ] {
            if seg.is_empty() && tail.is_empty() {
                // `DELETE .../sessions/` is the collection: a 405, not a path.
                continue;
            }
            let (status, body) = raw_request(
                &server.addr(),
                method,
                &format!("{API}/{seg}{tail}"),
                b"data",
            );
            let v: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                panic!("{method} {seg:?}{tail}: {}", String::from_utf8_lossy(&body))
            });
            assert_error(status, &v, 400, "invalid_session_path");
        }
    }
    // File paths.
    for p in [
        "../../etc/passwd",
        "workspace/../../x",
        "./x",
        "/etc/passwd",
        "workspace\\x",
        "workspace%5cx",
        "%2e%2e/x",
        "workspace/%2e%2e/%2e%2e/x",
        "a%2f..%2f..%2fx",
        "a%00b",
        "a%0ab",
        "a%1bb",
        "workspace//x",
        "workspace/",
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            let (status, body) = raw_request(
                &server.addr(),
                method,
                &format!("{API}/{good}/files/{p}"),
                b"data",
            );
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_error(status, &v, 400, "invalid_file_path");
        }
    }
    // A body over the limit, declared or streamed.
    let (st, v) = call(
        c.put(format!("{}{API}/{good}/files/big.bin", server.url))
            .body(vec![0u8; 4097]),
    )
    .await;
    assert_error(st, &v, 413, "payload_too_large");
    let chunks = futures::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; 1024]))),
    );
    let (st, v) = call(
        c.put(format!("{}{API}/{good}/files/big.bin", server.url))
            .body(reqwest::Body::wrap_stream(chunks)),
    )
    .await;
    assert_error(st, &v, 413, "payload_too_large");

    // Uploads: not a tarball, truncated, a bomb, an unsafe member, too big.
    let real = tar_czf(&site, &[("workspace/data.bin", &pattern(200_000, 3))]);
    let mut bomb = Vec::new();
    {
        let mut gz = flate2::write::GzEncoder::new(&mut bomb, flate2::Compression::best());
        let mut t = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(64 << 20);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(
            &mut h,
            "workspace/zeros",
            std::io::Read::take(std::io::repeat(0), 64 << 20),
        )
        .unwrap();
        t.finish().unwrap();
    }
    let mut evil = Vec::new();
    {
        let mut gz = flate2::write::GzEncoder::new(&mut evil, flate2::Compression::fast());
        let mut t = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        // `set_path` refuses `..`; write the name bytes as a hostile tool would.
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../escape.txt");
        h.set_cksum();
        t.append(&h, &b"evil"[..]).unwrap();
        t.finish().unwrap();
    }
    // A symlink out of the tree, then a member through it.
    let mut through = Vec::new();
    {
        let mut gz = flate2::write::GzEncoder::new(&mut through, flate2::Compression::fast());
        let mut t = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        t.append_link(&mut h, "workspace/y", "/tmp/x").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        t.append_data(&mut h, "workspace/y/f", &b"evil"[..])
            .unwrap();
        t.finish().unwrap();
    }
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("member through a symlink", through, 400, "invalid_tarball"),
        (
            "not a tarball",
            b"this is not a tarball at all".to_vec(),
            400,
            "invalid_tarball",
        ),
        (
            "truncated",
            real[..real.len() / 2].to_vec(),
            400,
            "invalid_tarball",
        ),
        ("bomb", bomb, 413, "payload_too_large"),
        ("unsafe member", evil, 400, "invalid_tarball"),
        ("empty", Vec::new(), 400, "invalid_tarball"),
        (
            "too big",
            pattern(1_100_000, 5).to_vec(),
            413,
            "payload_too_large",
        ),
    ];
    for (what, body, status, code) in cases {
        let (st, v) = call(
            c.post(format!("{}{API}/{good}/upload", server.url))
                .header("content-type", "application/gzip")
                .body(body),
        )
        .await;
        assert_error(st, &v, status, code);
        assert!(!v["message"].as_str().unwrap().is_empty(), "{what}");
    }

    // Symlinks in a session are never followed: not to read, not to write.
    let linked = session("symlink");
    let tree = site.dir.path().join("linked");
    fs::create_dir_all(tree.join("workspace")).unwrap();
    std::os::unix::fs::symlink("/etc", tree.join("workspace/etc")).unwrap();
    std::os::unix::fs::symlink("../..", tree.join("workspace/up")).unwrap();
    let tgz_path = site.dir.path().join("linked.tgz");
    assert!(Command::new("tar")
        .arg("czf")
        .arg(&tgz_path)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let (st, v) = call(
        c.post(format!("{}{API}/{linked}/upload", server.url))
            .body(fs::read(&tgz_path).unwrap()),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    for p in [
        "workspace/etc/passwd",
        "workspace/up/up/etc/hostname",
        "workspace/etc",
    ] {
        let (st, v) = call(c.get(format!("{}{API}/{linked}/files/{p}", server.url))).await;
        assert_error(st, &v, 404, "file_not_found");
    }
    let (st, v) = call(
        c.put(format!(
            "{}{API}/{linked}/files/workspace/etc/sessionfs-escape",
            server.url
        ))
        .body("x"),
    )
    .await;
    assert_error(st, &v, 409, "conflict");
    assert!(!std::path::Path::new("/etc/sessionfs-escape").exists());

    // Nothing written: the good session's object is as it was, no key names the marker.
    let after = s3_store()
        .await
        .head(&format!("{good}/session.tar.gz"))
        .await
        .unwrap();
    assert_eq!(after.etag, before.etag);
    assert!(keys().await.iter().all(|k| !k.contains(&marker)));
    let (_, v) = call(c.get(format!("{}{API}/{good}/files", server.url))).await;
    assert_eq!(
        v["files"],
        serde_json::json!([{"path": "workspace/keep.txt", "size": 4}])
    );
    assert!(!site
        .dir
        .path()
        .join("overlays")
        .join("sessions")
        .join("..")
        .join("escape.txt")
        .exists());
}

#[tokio::test]
async fn routes_methods_and_the_token() {
    let site = Site::s3();
    let server = site.serve_api(
        &[],
        &[
            ("CONTAINER_ID", CONTAINER),
            ("SESSIONFS_API_TOKEN", "s3cret-token"),
        ],
    );
    let c = http();
    // /health and /ready need no token (probes); everything else does.
    for open in ["/health", "/ready"] {
        let r = c.get(format!("{}{open}", server.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }
    // A token, or loopback only: no warning. Neither: a warning at start.
    assert!(!server.log_text().contains("without SESSIONFS_API_TOKEN"));
    let open = site.serve_api(&["--bind", "0.0.0.0"], &[]);
    let log = open.log_text();
    assert!(
        log.contains("listens on 0.0.0.0 without SESSIONFS_API_TOKEN")
            && log.contains("--bind 127.0.0.1"),
        "{log}"
    );
    assert_eq!(open.stop().code(), Some(0));
    for path in [
        API.to_owned(),
        format!("{API}/x/files"),
        "/metrics".into(),
        "/openapi.json".into(),
    ] {
        let r = c.get(format!("{}{path}", server.url)).send().await.unwrap();
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let (st, v) = json(r).await;
        assert_error(st, &v, 401, "unauthorized");
        let r = c
            .get(format!("{}{path}", server.url))
            .bearer_auth("wrong-token!")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth("s3cret-token");
    let (st, _) = call(auth(c.get(format!("{}{API}", server.url)))).await;
    assert_eq!(st, 200);
    // Unknown routes and wrong methods.
    let (st, v) = call(auth(c.get(format!("{}/nope", server.url)))).await;
    assert_error(st, &v, 404, "not_found");
    // Under a session, an unknown tail is a session path with a raw `/`.
    let (st, v) = call(auth(c.get(format!("{}{API}/x__y/elsewhere", server.url)))).await;
    assert_error(st, &v, 400, "invalid_session_path");
    let r = auth(c.put(format!("{}{API}/x__y", server.url)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "GET, HEAD, DELETE");
    let (st, v) = json(r).await;
    assert_error(st, &v, 405, "method_not_allowed");
    let (st, v) = call(auth(c.get(format!("{}{API}/x__y/upload", server.url)))).await;
    assert_error(st, &v, 405, "method_not_allowed");
    // The client module speaks the same contract.
    let client = sessionfs_api::client::Client::new(&server.url).with_token("s3cret-token");
    let s = session("client");
    assert!(!client.session_exists(&s).await.unwrap());
    assert_eq!(
        client
            .write_file(&s, "workspace/a b#c.txt", "spaced")
            .await
            .unwrap(),
        6
    );
    assert!(client.session_exists(&s).await.unwrap());
    assert_eq!(
        client
            .read_file(&s, "workspace/a b#c.txt")
            .await
            .unwrap()
            .unwrap(),
        "spaced"
    );
    let files = client.list_files(&s).await.unwrap();
    assert_eq!(files[0].path, "workspace/a b#c.txt");
    assert!(client
        .read_file(&s, "workspace/none")
        .await
        .unwrap()
        .is_none());
    assert!(client.delete_file(&s, "workspace/a b#c.txt").await.unwrap());
    assert!(client
        .list_sessions()
        .await
        .unwrap()
        .iter()
        .any(|x| x.session_path == s));
    client.delete_session(&s).await.unwrap();
    match client.delete_session(&s).await {
        Err(sessionfs_api::client::ClientError::Api {
            status: 404, code, ..
        }) => {
            assert_eq!(code, "session_not_found")
        }
        other => panic!("{other:?}"),
    }
}

/// The API and a mount of the same process see each other's writes at
/// once: the API's writes invalidate what the kernel cached. Every read
/// below comes right after the write, with no retry and no wait.
#[tokio::test]
async fn writes_through_the_api_and_the_mount_see_each_other() {
    let site = Site::s3();
    let src = site.dir.path().join("src");
    fs::create_dir_all(src.join("workspace")).unwrap();
    fs::write(src.join("workspace/shared.txt"), b"from the object").unwrap();
    let s = session("coherent");
    site.push(&src, &s);
    let m = site.serve_root(&[]);
    let url = m.api_url();
    let c = http();
    let file = m.join(&s).join("workspace/shared.txt");

    // The mount reads (and the kernel caches) the file; the API replaces it.
    assert_eq!(fs::read(&file).unwrap(), b"from the object");
    let names = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&m.join(&s).join("workspace")), ["shared.txt"]);
    // The kernel caches a name found missing too.
    let new = m.join(&s).join("workspace/new.txt");
    assert!(!new.exists());
    let r = c
        .put(format!("{url}{API}/{s}/files/workspace/shared.txt"))
        .body("from the API, longer than before")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    c.put(format!("{url}{API}/{s}/files/workspace/new.txt"))
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(
        fs::read(&file).unwrap(),
        b"from the API, longer than before"
    );
    assert_eq!(fs::metadata(&file).unwrap().len(), 32);
    assert_eq!(
        names(&m.join(&s).join("workspace")),
        ["new.txt", "shared.txt"]
    );
    assert_eq!(fs::read(&new).unwrap(), b"new");

    // A write in the mount is what GET answers.
    fs::write(
        m.join(&s).join("workspace/from-mount.txt"),
        b"written in the mount",
    )
    .unwrap();
    fs::write(&file, b"edited in the mount").unwrap();
    let got = text(format!("{url}{API}/{s}/files/workspace/from-mount.txt")).await;
    assert_eq!(got, "written in the mount");
    let got = text(format!("{url}{API}/{s}/files/workspace/shared.txt")).await;
    assert_eq!(got, "edited in the mount");

    // A delete through the API is gone from the mount.
    c.delete(format!("{url}{API}/{s}/files/workspace/new.txt"))
        .send()
        .await
        .unwrap();
    assert!(!m.join(&s).join("workspace/new.txt").exists());
    assert_eq!(
        names(&m.join(&s).join("workspace")),
        ["from-mount.txt", "shared.txt"]
    );

    // The download has both sides' changes.
    let body = bytes_of(format!("{url}{API}/{s}/download")).await;
    let listing = python_stream_listing(&body, site.dir.path());
    assert!(listing.contains("workspace/from-mount.txt 20"), "{listing}");
    assert!(
        listing.contains("workspace/shared.txt 19 b'edited in the mount'"),
        "{listing}"
    );

    // A mounted session is not replaced or deleted from outside the mount.
    let tgz = tar_czf(&site, &[("workspace/other.txt", b"other")]);
    let r = c
        .post(format!("{url}{API}/{s}/upload"))
        .body(tgz)
        .send()
        .await
        .unwrap();
    // (This server runs beside the mount, with its own container id.)
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "conflict");
    let r = c.delete(format!("{url}{API}/{s}")).send().await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "conflict");
    assert_eq!(fs::read(&file).unwrap(), b"edited in the mount");
    m.stop();
}

/// SIGTERM lets a download in flight finish.
#[tokio::test]
async fn shutdown_finishes_requests_in_flight() {
    let site = Site::s3();
    let server = serve(&site, &[]);
    let c = http();
    let s = session("shutdown");
    let big = pattern(24 << 20, 11);
    c.put(format!("{}{API}/{s}/files/workspace/big.bin", server.url))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let mut r = c
        .get(format!("{}{API}/{s}/files/workspace/big.bin", server.url))
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    let pid = server.pid();
    let addr = server.url.trim_start_matches("http://").to_owned();
    let stopper = std::thread::spawn(move || server.stop());
    // The signal has landed once the server stops accepting connections,
    // while this body is still streaming.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGTERM did not close the listener"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut got = first.to_vec();
    while let Some(chunk) = r.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.len(), big.len());
    assert!(got == big[..], "the body is intact");
    let status = stopper.join().unwrap();
    assert!(status.success(), "serve {pid} exited with {status}");
}

/// The OpenAPI document is valid (openapi-spec-validator), and every
/// operation in it answers with a documented status; JSON answers hold the
/// fields their schema requires, with the types it gives.
#[tokio::test]
async fn the_openapi_document_validates_and_every_route_answers_as_described() {
    let site = Site::s3();
    let server = serve(&site, &[]);
    let c = http();
    let doc: Value = c
        .get(format!("{}/openapi.json", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file = site.dir.path().join("openapi.json");
    fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let validator = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/py/bin/openapi-spec-validator");
    let out = Command::new(&validator)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("{} ({e}): scripts/test.sh installs it", validator.display()));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A session with a file, so every operation has something to work on.
    let s = session("openapi");
    let tgz = tar_czf(&site, &[("workspace/doc.txt", b"documented")]);
    let schema_of = |v: &Value| -> Option<Value> {
        let r = v
            .pointer("/content/application~1json/schema/$ref")?
            .as_str()?;
        doc.pointer(&r.replacen('#', "", 1)).cloned()
    };
    // JSON answers hold the fields their schema requires, with its types.
    let check_schema = |what: &str, documented: &Value, body: &[u8]| {
        let Some(schema) = schema_of(documented) else {
            return;
        };
        let v: Value =
            serde_json::from_slice(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e})"));
        for field in schema["required"].as_array().into_iter().flatten() {
            let field = field.as_str().unwrap();
            assert!(v.get(field).is_some(), "{what}: no {field} in {v}");
            let want = &schema["properties"][field]["type"];
            let got = &v[field];
            let ok = match want.as_str() {
                Some("string") => got.is_string(),
                Some("integer") => got.is_u64() || got.is_i64(),
                Some("boolean") => got.is_boolean(),
                Some("array") => got.is_array(),
                Some("object") => got.is_object(),
                _ => true,
            };
            assert!(ok, "{what}: {field} should be {want}: {v}");
        }
    };

    // First, every operation where it succeeds: its documented success
    // status (the one 2xx it lists) and schema.
    let paths = doc["paths"].as_object().unwrap();
    let f = "workspace/doc.txt";
    let other = session("openapi-bulk");
    let t_session = format!("{API}/{{sessionPath}}");
    let t_file = format!("{API}/{{sessionPath}}/files/{{filePath}}");
    let steps: Vec<(&str, String, String)> = vec![
        ("get", "/health".into(), "/health".into()),
        ("head", "/health".into(), "/health".into()),
        ("get", "/ready".into(), "/ready".into()),
        ("head", "/ready".into(), "/ready".into()),
        ("get", "/openapi.json".into(), "/openapi.json".into()),
        ("head", "/openapi.json".into(), "/openapi.json".into()),
        ("get", "/metrics".into(), "/metrics".into()),
        ("head", "/metrics".into(), "/metrics".into()),
        (
            "post",
            format!("{t_session}/upload"),
            format!("{API}/{s}/upload"),
        ),
        ("get", API.into(), API.into()),
        ("get", t_session.clone(), format!("{API}/{s}")),
        ("head", t_session.clone(), format!("{API}/{s}")),
        (
            "get",
            format!("{t_session}/files"),
            format!("{API}/{s}/files"),
        ),
        ("get", t_file.clone(), format!("{API}/{s}/files/{f}")),
        ("head", t_file.clone(), format!("{API}/{s}/files/{f}")),
        ("put", t_file.clone(), format!("{API}/{s}/files/{f}")),
        (
            "get",
            format!("{t_session}/download"),
            format!("{API}/{s}/download"),
        ),
        (
            "head",
            format!("{t_session}/download"),
            format!("{API}/{s}/download"),
        ),
        (
            "put",
            format!("{t_session}/upload"),
            format!("{API}/{s}/upload"),
        ),
        ("delete", t_file.clone(), format!("{API}/{s}/files/{f}")),
        ("delete", t_session.clone(), format!("{API}/{s}")),
        (
            "post",
            format!("{API}/bulk-delete"),
            format!("{API}/bulk-delete"),
        ),
    ];
    // The session the bulk delete removes.
    let r = c
        .put(format!("{}{API}/{other}/files/workspace/x", server.url))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut succeeded = std::collections::BTreeSet::new();
    for (method, template, path) in &steps {
        let op = &paths[template.as_str()][*method];
        assert!(op.is_object(), "{method} {template} is not documented");
        // 200 where it is listed (GET of a file also lists 206, for a range).
        let mut success: Vec<&String> = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with('2'))
            .collect();
        success.sort();
        assert!(
            !success.is_empty(),
            "{method} {template}: no success status"
        );
        let url = format!("{}{path}", server.url);
        let req = match *method {
            "get" => c.get(&url),
            "head" => c.head(&url),
            "put" if path.ends_with("/upload") => c
                .put(&url)
                .header("content-type", "application/gzip")
                .body(tgz.clone()),
            "put" => c.put(&url).body("rewritten"),
            "delete" => c.delete(&url),
            _ if path.ends_with("/upload") => c
                .post(&url)
                .header("content-type", "application/gzip")
                .body(tgz.clone()),
            _ => c
                .post(&url)
                .json(&serde_json::json!({ "sessionPaths": [other] })),
        };
        let r = req.send().await.unwrap();
        let what = format!("{method} {path}");
        assert_eq!(
            r.status().as_u16().to_string(),
            *success[0],
            "{what} answered {}",
            r.status()
        );
        let body = r.bytes().await.unwrap();
        if *method != "head" {
            check_schema(&what, &op["responses"][success[0]], &body);
        }
        succeeded.insert((method.to_string(), template.clone()));
    }
    let documented: std::collections::BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(t, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| m.as_str() != "parameters")
                .map(move |m| (m.clone(), t.clone()))
        })
        .collect();
    assert_eq!(
        succeeded, documented,
        "every documented operation succeeded once"
    );
    // The router answers no method the document does not list.
    for (template, item) in paths {
        let path = template
            .replace("{sessionPath}", &s)
            .replace("{filePath}", f);
        for method in ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH"] {
            if item.get(method.to_lowercase()).is_some() {
                continue;
            }
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let r = c
                .request(m, format!("{}{path}", server.url))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                405,
                "{method} {template} is routed but not documented"
            );
        }
    }

    // Then every operation once more, the session gone: whatever each
    // answers is documented for it.
    let mut checked = 0;
    let order = ["get", "head", "put", "post", "delete"];
    let paths = doc["paths"].as_object().unwrap();
    for method in order {
        for (template, item) in paths {
            let Some(op) = item.get(method) else { continue };
            let path = template
                .replace("{sessionPath}", &s)
                .replace("{filePath}", "workspace/doc.txt");
            let url = format!("{}{path}", server.url);
            let req = match method {
                "get" => c.get(&url),
                "head" => c.head(&url),
                "put" => c.put(&url).body("rewritten"),
                "delete" => c.delete(&url),
                _ if path.ends_with("/upload") => c
                    .post(&url)
                    .header("content-type", "application/gzip")
                    .body(tgz.clone()),
                _ => c.post(&url).json(&serde_json::json!({"sessionPaths": []})),
            };
            let r = req.send().await.unwrap();
            let status = r.status().as_u16().to_string();
            let documented = &op["responses"][&status];
            assert!(
                documented.is_object(),
                "{method} {template} answered {status}, not documented"
            );
            let is_json = r
                .headers()
                .get("content-type")
                .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/json"));
            let body = r.bytes().await.unwrap();
            if is_json && method != "head" {
                check_schema(&format!("{method} {template}"), documented, &body);
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} operations checked");
}

/// A site whose servers reach the S3 server only through a fault proxy
/// (forwarding until told otherwise), retrying a failed request once.
async fn behind_a_fault_proxy() -> (FaultProxy, Site) {
    let vars = sessionfs_tests::s3_env();
    let get = |n: &str| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let upstream: std::net::SocketAddr = format!(
        "{}:{}",
        get("MINIO_ENDPOINT").unwrap(),
        get("MINIO_PORT").unwrap()
    )
    .parse()
    .unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let mut site = Site::s3();
    site.env.retain(|(k, _)| k != "MINIO_PORT");
    site.env
        .push(("MINIO_PORT".into(), proxy.addr.port().to_string()));
    site.env
        .push(("SESSIONFS_S3_MAX_ATTEMPTS".into(), "2".into()));
    (proxy, site)
}

/// A store outage: every route that needs the store answers 503
/// `store_unavailable` with `Retry-After` (never a hang, a half answer or a
/// 500), `/ready` says 503 while `/health` says 200, and the same server
/// answers again once the store is back, without a restart. A read-only
/// server says `read_only`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_503_store_unavailable_until_it_ends() {
    let (proxy, site) = behind_a_fault_proxy().await;
    // The session is stored directly; the server sees the store only
    // through the proxy, failing from its first connection (the proxy's
    // plan applies per connection, and clients keep theirs open).
    let s = session("faults");
    let tgz = tar_czf(&site, &[("workspace/a.txt", b"a")]);
    s3_store()
        .await
        .put(
            &format!("{s}/session.tar.gz"),
            bytes::Bytes::from(tgz.clone()),
            Default::default(),
        )
        .await
        .unwrap();
    proxy.plan(&[], Fault::ServiceUnavailable);
    let server = serve(&site, &[]);
    let c = http();
    let upload = || {
        c.post(format!("{}{API}/{s}/upload", server.url))
            .body(tgz.clone())
            .send()
    };
    let r = upload().await.unwrap();
    assert_eq!(
        r.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    let (st, v) = json(r).await;
    assert_error(st, &v, 503, "store_unavailable");
    for path in [
        format!("{API}/{s}/download"),
        format!("{API}/{s}/files/workspace/a.txt"),
        format!("{API}/{s}/files"),
        format!("{API}/{s}"),
        API.to_owned(),
        "/ready".to_owned(),
    ] {
        let (st, v) = call(c.get(format!("{}{path}", server.url))).await;
        assert_error(st, &v, 503, "store_unavailable");
    }
    let (st, v) = call(c.get(format!("{}/health", server.url))).await;
    assert_eq!(st, 200, "{v}");

    // The store back: the same server is ready and the session is whole.
    proxy.plan(&[], Fault::Forward);
    let (st, v) = call(c.get(format!("{}/ready", server.url))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "ready");
    let got = text(format!("{}{API}/{s}/files/workspace/a.txt", server.url)).await;
    assert_eq!(got, "a");

    let ro = serve(&Site::s3(), &["--read-only"]);
    for r in [
        c.put(format!("{}{API}/{s}/files/workspace/b.txt", ro.url))
            .body("b"),
        c.delete(format!("{}{API}/{s}/files/workspace/a.txt", ro.url)),
        c.post(format!("{}{API}/{s}/upload", ro.url))
            .body(tgz.clone()),
        c.delete(format!("{}{API}/{s}", ro.url)),
    ] {
        let (st, v) = call(r).await;
        assert_error(st, &v, 403, "read_only");
    }
    let got = text(format!("{}{API}/{s}/files/workspace/a.txt", ro.url)).await;
    assert_eq!(got, "a");
}

/// A session no request has used for a while is closed: its journal is
/// unlocked, so a mount in another process takes the same overlay and sees
/// what the API wrote; while that mount holds it, the API answers 409.
#[tokio::test]
async fn idle_sessions_are_closed_and_their_overlay_can_be_mounted() {
    let site = Site::s3();
    let server = serve(&site, &["--idle-close-secs", "1"]);
    let c = http();
    let s = session("idle");
    let (st, _) = call(
        c.put(format!(
            "{}{API}/{s}/files/workspace/from-api.txt",
            server.url
        ))
        .body("written through the API"),
    )
    .await;
    assert_eq!(st, 200);
    // Wait (generously) for the closer to run: the gauge says when.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = text(format!("{}/metrics", server.url)).await;
        if metrics.contains("sessionfs_open_sessions 0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = site.mount(&s, &[]);
    assert_eq!(
        fs::read(m.join("workspace/from-api.txt")).unwrap(),
        b"written through the API"
    );
    let (st, v) = call(c.get(format!("{}{API}/{s}/files", server.url))).await;
    assert_error(st, &v, 409, "conflict");
    m.stop();
    // The mount gone, the API opens the session again.
    let (st, v) = call(c.get(format!("{}{API}/{s}/files", server.url))).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encoded_slash_separates_file_names_and_a_raw_one_is_no_session_path() {
    let site = Site::local();
    let server = serve(&site, &[]);
    let name = session("slashes");
    // Express decodes route parameters: the seed's clients send `%2F`.
    let (st, _) = call(
        http()
            .put(format!(
                "{}{API}/{name}/files/workspace%2Fenc.txt",
                server.url
            ))
            .body("encoded"),
    )
    .await;
    assert_eq!(st, 200);
    let got = bytes_of(format!(
        "{}{API}/{name}/files/workspace/enc.txt",
        server.url
    ))
    .await;
    assert_eq!(&got[..], b"encoded");
    // `..` is still refused once decoded.
    let (status, body) = raw_request(
        &server.addr(),
        "GET",
        &format!("{API}/{name}/files/workspace%2F..%2F..%2Fx"),
        b"",
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_error(status, &v, 400, "invalid_file_path");
    // A raw `/` in a session path is a bad session path, not a missing route.
    for (method, path) in [
        ("GET", format!("{API}/own/repo/br/files")),
        ("PUT", format!("{API}/own/repo/br/files/a.txt")),
        ("GET", format!("{API}/own/repo")),
    ] {
        let (status, body) = raw_request(&server.addr(), method, &path, b"x");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_error(status, &v, 400, "invalid_session_path");
    }
    assert_eq!(server.stop().code(), Some(0));
}

/// With write-back off, a download still holds the changes made here: the
/// merged view is packed for it, and the stored object stays as it was.
#[tokio::test]
async fn a_download_without_write_back_packs_the_changes_in() {
    let site = Site::s3();
    let s = session("dlnowb");
    let server = serve(&site, &["--no-writeback"]);
    let c = http();
    for (name, body) in [("a.txt", "first"), ("b.txt", "second")] {
        let r = c
            .put(format!("{}{API}/{s}/files/workspace/{name}", server.url))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c
        .get(format!("{}{API}/{s}/download", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    let listing = python_stream_listing(&body, site.dir.path());
    assert!(listing.contains("workspace/a.txt 5 b'first'"), "{listing}");
    assert!(listing.contains("workspace/b.txt 6 b'second'"), "{listing}");
    let (_, v) = call(c.get(format!("{}{API}/{s}", server.url))).await;
    assert_eq!(v["pendingChanges"], true);
    let stored = s3_store().await.head(&format!("{s}/session.tar.gz")).await;
    assert!(
        stored.is_err_and(|e| e.is_not_found()),
        "nothing was stored"
    );
    assert_eq!(server.stop().code(), Some(0));
}

/// "A PUT replaces a file in one step; durable when answered": every PUT
/// answered before a kill -9 of the server is there, whole, after a restart
/// (with write-back off, so the bytes come from the overlay the server left).
#[tokio::test]
async fn every_answered_put_survives_kill_9_of_the_server() {
    let site = Site::s3();
    let s = session("putkill9");
    let server = serve(&site, &["--no-writeback"]);
    let c = http();
    let url = |url: &str, i: usize| format!("{url}{API}/{s}/files/workspace/f{i:03}.bin");
    let body = |i: usize| pattern(1 + i * 4099, i as u64);
    // Each file twice: the second PUT replaces the first.
    for round in 0..2 {
        for i in 0..40 {
            let r = c
                .put(url(&server.url, i))
                .body(if round == 0 { pattern(777, 5) } else { body(i) })
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    server.kill9();
    let server = serve(&site, &["--no-writeback"]);
    for i in 0..40 {
        let r = c.get(url(&server.url, i)).send().await.unwrap();
        assert_eq!(r.status(), 200, "f{i:03} after the kill");
        assert!(
            r.bytes().await.unwrap() == body(i),
            "f{i:03} holds other bytes"
        );
    }
    assert_eq!(server.stop().code(), Some(0));
}

/// The ETag and the bytes of a file as the API reads it.
async fn etag_and_bytes(url: &str) -> (String, bytes::Bytes) {
    let r = http().get(url).send().await.expect("send");
    assert_eq!(r.status(), 200, "{url}");
    let tag = r.headers()["etag"].to_str().unwrap().to_owned();
    (tag, r.bytes().await.expect("body"))
}

/// The paths and sizes a listing answers.
async fn listed(url: &str) -> Vec<(String, u64)> {
    let (st, v) = call(http().get(url)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], v["files"].as_array().unwrap().len());
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_not_written_here_is_read_from_its_object_as_the_session_shows_it() {
    let site = Site::s3();
    let s = session("view");
    let tree = site.dir.path().join("tree");
    let w = tree.join("workspace");
    fs::create_dir_all(w.join("a")).unwrap();
    fs::create_dir_all(w.join("dir")).unwrap();
    fs::write(w.join("a/b.txt"), "b").unwrap();
    fs::write(w.join("a-c.txt"), "comes after a/b.txt").unwrap();
    let big = pattern(3 << 20, 7);
    fs::write(w.join("big.bin"), &big).unwrap();
    fs::write(w.join("empty.txt"), "").unwrap();
    fs::hard_link(w.join("a/b.txt"), w.join("link.txt")).unwrap();
    std::os::unix::fs::symlink("a/b.txt", w.join("sym")).unwrap();
    site.push(&tree, &s);
    let server = serve(&site, &[]);
    let overlay = site.overlay(&s, &sessionfs_tests::s3_bucket());
    let files_url = format!("{}{API}/{s}/files", server.url);
    let file = |p: &str| format!("{files_url}/workspace/{p}");

    // Listed in the order of a walk by name, hard links too, symlinks not.
    let before = listed(&files_url).await;
    let want: Vec<(String, u64)> = [
        ("a/b.txt", 1),
        ("a-c.txt", 19),
        ("big.bin", 3 << 20),
        ("empty.txt", 0),
        ("link.txt", 1),
    ]
    .iter()
    .map(|(p, n)| (format!("workspace/{p}"), *n))
    .collect();
    assert_eq!(before, want);
    let mut seen = Vec::new();
    for (p, _) in &want {
        seen.push(etag_and_bytes(&format!("{files_url}/{p}")).await);
    }
    assert_eq!(seen[2].1, big, "a file of three chunks streams whole");
    assert_eq!(
        seen[4], seen[0],
        "a hard link is its target: bytes and ETag"
    );
    let r = http()
        .get(file("big.bin"))
        .header("range", "bytes=1048570-1048580")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), big.slice(1048570..1048581));
    let r = http().head(file("big.bin")).send().await.unwrap();
    assert_eq!(
        r.headers()["content-length"],
        (3u64 << 20).to_string().as_str()
    );
    for missing in ["dir", "sym", "a", "a-c.txt/x", "nothing", "a/nothing"] {
        let (st, v) = call(http().get(file(missing))).await;
        assert_error(st, &v, 404, "file_not_found");
    }
    assert!(
        !overlay.exists(),
        "reads of a session not written here leave no overlay"
    );

    // A write opens the session here; every file reads and lists as before,
    // with the same validators.
    let (st, v) = call(http().put(file("new.txt")).body("new")).await;
    assert_eq!(st, 200, "{v}");
    assert!(overlay.exists());
    let mut want_after = want.clone();
    want_after.push(("workspace/new.txt".into(), 3));
    assert_eq!(listed(&files_url).await, want_after);
    for ((p, _), (tag, bytes)) in want.iter().zip(&seen) {
        let url = format!("{files_url}/{p}");
        assert_eq!(
            &etag_and_bytes(&url).await,
            &(tag.clone(), bytes.clone()),
            "{p}"
        );
        let r = http()
            .get(&url)
            .header("if-none-match", tag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{p}");
    }
    for missing in ["dir", "sym", "a", "a-c.txt/x", "nothing", "a/nothing"] {
        let (st, v) = call(http().get(file(missing))).await;
        assert_error(st, &v, 404, "file_not_found");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_read_from_its_object_follows_replacements_and_deletions() {
    let site = Site::s3();
    let s = session("viewnew");
    let tree = site.dir.path().join("tree");
    fs::create_dir_all(tree.join("workspace")).unwrap();
    fs::write(tree.join("workspace/f.txt"), "version 1").unwrap();
    site.push(&tree, &s);
    let server = serve(&site, &["--recheck-ms", "100"]);
    let url = format!("{}{API}/{s}/files/workspace/f.txt", server.url);
    assert_eq!(text(&url).await, "version 1");
    // Another writer replaces the object: seen once the recheck is due.
    fs::write(tree.join("workspace/f.txt"), "version 2, longer").unwrap();
    site.push(&tree, &s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(text(&url).await, "version 2, longer");
    // Deleted through the API: gone at once.
    let (st, _) = call(http().delete(format!("{}{API}/{s}", server.url))).await;
    assert_eq!(st, 200);
    let (st, v) = call(http().get(&url)).await;
    assert_error(st, &v, 404, "session_not_found");
    let (st, v) = call(http().get(format!("{}{API}/{s}/files", server.url))).await;
    assert_error(st, &v, 404, "session_not_found");
}

/// A session read from its object goes on being read through a store
/// outage, as an open session is; a write during it opens the session on
/// that object, and the write is written back once the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_read_from_its_object_is_served_through_a_store_outage() {
    let (proxy, site) = behind_a_fault_proxy().await;
    let s = session("viewoutage");
    let tree = site.dir.path().join("tree");
    fs::create_dir_all(tree.join("workspace")).unwrap();
    fs::write(tree.join("workspace/f.txt"), "from the object").unwrap();
    site.push(&tree, &s);
    let server = serve(
        &site,
        &["--recheck-ms", "100", "--writeback-quiet-ms", "200"],
    );
    let file = |name: &str| format!("{}{API}/{s}/files/workspace/{name}", server.url);
    assert_eq!(text(file("f.txt")).await, "from the object");
    assert!(
        !site.overlay(&s, "sessions").exists(),
        "read from its object, not opened"
    );

    proxy.plan(&[], Fault::ServiceUnavailable);
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(text(file("f.txt")).await, "from the object");
    assert_eq!(
        listed(&format!("{}{API}/{s}/files", server.url)).await,
        [("workspace/f.txt".to_owned(), 15)]
    );
    let r = http()
        .put(file("new.txt"))
        .body("written in the outage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a write while the store is down");
    assert_eq!(text(file("new.txt")).await, "written in the outage");

    proxy.plan(&[], Fault::Forward);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored = stored_object(&s).await;
        let listing = python_stream_listing(&stored, site.dir.path());
        if listing.contains("workspace/new.txt 21 b'written in the outage'") {
            assert!(
                listing.contains("workspace/f.txt 15 b'from the object'"),
                "{listing}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not written back after the outage: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(server.stop().code(), Some(0));
}

/// Objects stored before the TOC's version 2 stay readable and writable:
/// `tests/fixtures/format-v1.tar.gz` was packed by sessionfs at 3a57b41 (the
/// last version-1 writer) from `make_fixture` without `big.bin` and `many/`
/// (umask 022). Served from the store, each file reads as it was; a PUT is
/// written back into an object of version 2 that keeps every old entry and
/// that every extractor takes whole.
#[tokio::test]
async fn an_object_of_format_version_1_is_read_and_written_back_as_version_2() {
    use sessionfs_tests::trees::{assert_same_tree, make_fixture, snapshot, Node};
    let site = Site::s3();
    let s = session("formatv1");
    let key = format!("{s}/session.tar.gz");
    let v1: &[u8] = include_bytes!("../fixtures/format-v1.tar.gz");
    assert_eq!(format_version(v1), 1, "the fixture is a version-1 object");
    s3_store()
        .await
        .put(
            &key,
            bytes::Bytes::from_static(v1),
            sessionfs_core::store::PutOptions::default(),
        )
        .await
        .unwrap();
    let tree = site.dir.path().join("expected");
    // SAFETY: umask only sets this test process's file creation mask (each
    // test is a process of its own under nextest), as the fixture had it.
    unsafe { libc::umask(0o022) };
    make_fixture(&tree);
    fs::remove_file(tree.join("workspace/big.bin")).unwrap();
    fs::remove_dir_all(tree.join("workspace/many")).unwrap();
    let mut expected = snapshot(&tree);

    let server = serve(&site, &[]);
    let url = |path: &str| format!("{}{API}/{s}/files/{path}", server.url);
    let mut files = 0;
    for (path, node) in &expected {
        if let Node::File { content, .. } = node {
            assert_eq!(&bytes_of(url(path)).await[..], &content[..], "{path}");
            files += 1;
        }
    }
    assert!(files >= 10, "{files} files read");

    let r = http()
        .put(url("workspace/added.txt"))
        .body("added after v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A download writes the change back first, then streams the object.
    let downloaded = bytes_of(format!("{}{API}/{s}/download", server.url)).await;
    let stored = stored_object(&s).await;
    assert_eq!(downloaded, stored, "the download is the stored object");
    assert_eq!(format_version(&stored), 2, "written back as version 2");
    let object = site.dir.path().join("written-back.tar.gz");
    fs::write(&object, &stored).unwrap();
    expected.insert(
        "workspace/added.txt".to_owned(),
        Node::File {
            mode: 0o644,
            content: b"added after v1".to_vec(),
        },
    );
    let scratch = site.dir.path().join("extracted");
    for (who, got) in sessionfs_tests::extract::every_reader(&object, &scratch) {
        assert_same_tree(&expected, &got, who);
    }
    assert_eq!(server.stop().code(), Some(0));
}
