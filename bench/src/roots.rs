//! The root-listing benchmark of issue "Speed": a bucket of 100,000 sessions
//! (at scale 1.0) listed by `ls` of a `serve --mount-root` mount, with the
//! first `ls` of a fresh server, beside a plain ListObjectsV2 walk of the
//! same bucket one page after another (how the root was listed before it
//! was listed by common prefix) and beside `ls` of a local directory
//! holding as many directories.
//!
//! Session names are lopsided, as in a real bucket: a few owners hold most
//! sessions, repositories share long prefixes, branches are numbered or
//! named. Every object is a small valid session.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use sessionfs_core::store::config::{minio_endpoint, S3Config};
use sessionfs_core::store::s3::S3Store;
use sessionfs_core::store::{ListRequest, ObjectStore, PutOptions};
use sessionfs_core::tarball::writer::{pack_dir, PackOptions};

use crate::{s, Rng};

pub async fn bench(scale: f64) -> Result<()> {
    let count = ((100_000.0 * scale).round() as usize).max(1000);
    let work = tempfile::tempdir()?;
    // A bucket of its own, new each run, so the listing holds only these sessions.
    let bucket_name = format!("roots-{}", std::process::id());
    let store = bucket(&bucket_name).await?;
    let body = small_session(work.path())?;
    let names = names(count);
    let t = Instant::now();
    futures::stream::iter(names.iter())
        .map(|n| {
            let (store, body) = (store.clone(), body.clone());
            async move {
                store
                    .put(&format!("{n}/session.tar.gz"), body, PutOptions::default())
                    .await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    eprintln!("stored {count} sessions in {}", s(t.elapsed()));

    println!(
        "\n# sessionfs root listing: {count} sessions in one bucket, store {}\n",
        store.describe()
    );
    println!("| measure | sessionfs | reference | ratio (sessionfs / reference) | requests |");
    println!("| --- | --- | --- | --- | --- |");

    // Reference: the listing one page after another.
    let t = Instant::now();
    let mut pages = 0;
    let mut listed = 0;
    let mut key_bytes = 0;
    let mut continuation = None;
    loop {
        let page = store
            .list(ListRequest {
                continuation,
                ..ListRequest::default()
            })
            .await?;
        pages += 1;
        listed += page.objects.len();
        key_bytes += page.objects.iter().map(|o| o.key.len()).sum::<usize>();
        match page.next {
            Some(n) => continuation = Some(n),
            None => break,
        }
    }
    let sequential = t.elapsed();
    if listed != count {
        bail!("the bucket holds {listed} keys, not {count}");
    }

    // Reference: a local directory of as many directories.
    let local = work.path().join("local");
    for n in &names {
        std::fs::create_dir_all(local.join(n))?;
    }
    let local_ls = ls(&local)?.1;

    // sessionfs: the first `ls` of a fresh mount root, then a second.
    let root = work.path().join("root");
    std::fs::create_dir_all(&root)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = serve(work.path(), &root, &bucket_name, port)?;
    let first = ls(&root);
    let requests = store_requests(port);
    let second = ls(&root);
    stop(&mut server, &root);
    let requests = requests?;
    let ((first_n, first_t), (second_n, second_t)) = (first?, second?);
    if first_n != count || second_n != count {
        bail!("ls of the mount root showed {first_n} and {second_n} sessions, not {count}");
    }
    let line = |what: &str, t: Duration, reference: Duration, label: &str, requests: String| {
        println!(
            "| {what} | {} | {} ({label}) | {:.2} | {requests} |",
            s(t),
            s(reference),
            t.as_secs_f64() / reference.as_secs_f64()
        )
    };
    // Listing bodies are not metered; the names they carry are.
    let prefix_bytes: usize = names.iter().map(|n| n.len() + 1).sum();
    line(
        "first `ls` of the mount root",
        first_t,
        sequential,
        "ListObjectsV2 page after page",
        format!(
            "sessionfs {requests} store requests (its metrics), {:.1} MiB of names; reference {pages} pages, {:.1} MiB of keys",
            prefix_bytes as f64 / (1024.0 * 1024.0),
            key_bytes as f64 / (1024.0 * 1024.0)
        ),
    );
    line(
        "`ls` of the mount root again",
        second_t,
        local_ls,
        "ls of a local directory",
        "–".to_owned(),
    );
    line(
        "first `ls` of the mount root",
        first_t,
        local_ls,
        "ls of a local directory",
        "–".to_owned(),
    );
    Ok(())
}

async fn bucket(name: &str) -> Result<Arc<dyn ObjectStore>> {
    let host = std::env::var("MINIO_ENDPOINT")
        .context("the root benchmark needs the S3 server (MINIO_*)")?;
    let port = std::env::var("MINIO_PORT")
        .ok()
        .and_then(|p| p.parse().ok());
    let endpoint = minio_endpoint(&host, port, false)?;
    let (user, secret) = (
        std::env::var("MINIO_ROOT_USER")?,
        std::env::var("MINIO_ROOT_PASSWORD")?,
    );
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned());
    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{region}:s3"))
        .arg("--user")
        .arg(format!("{user}:{secret}"))
        .arg(format!("{endpoint}/{name}"))
        .output()?;
    let code = String::from_utf8_lossy(&status.stdout).to_string();
    if code != "200" && code != "409" {
        bail!("creating bucket {name}: HTTP {code}");
    }
    let cfg = S3Config {
        endpoint: Some(endpoint),
        access_key: Some(user),
        secret_key: Some(secret),
        ..S3Config::default()
    };
    Ok(Arc::new(S3Store::connect(&cfg, name).await?))
}

fn small_session(dir: &Path) -> Result<Bytes> {
    let tree = dir.join("small");
    std::fs::create_dir_all(tree.join("workspace"))?;
    std::fs::write(tree.join("workspace/README.md"), "hello\n")?;
    let mut out = Vec::new();
    pack_dir(&tree, &mut out, &PackOptions::default(), &|_| {})?;
    Ok(Bytes::from(out))
}

/// `count` distinct session names, lopsided: owner 0 holds half of them.
fn names(count: usize) -> Vec<String> {
    let mut rng = Rng(0x5e55_10f5);
    let mut names = std::collections::BTreeSet::new();
    while names.len() < count {
        let owner = match rng.below(4) {
            0 | 1 => 0,
            _ => rng.below(300),
        };
        let repo = rng.below(40);
        let branch = match rng.below(3) {
            0 => "main".to_owned(),
            1 => format!("feature-{}", rng.below(1_000_000)),
            _ => format!("agent-{:016x}", rng.next()),
        };
        names.insert(format!("org{owner:03}__service-{repo}__{branch}"));
    }
    names.into_iter().collect()
}

/// Names listed by `ls` of `dir`, and how long it took.
fn ls(dir: &Path) -> Result<(usize, Duration)> {
    let t = Instant::now();
    let out = Command::new("ls").arg(dir).output()?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "ls {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((
        out.stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        took,
    ))
}

/// Requests the server has made to the store, as its `/metrics` count them.
fn store_requests(port: u16) -> Result<u64> {
    let out = Command::new("curl")
        .args(["-fsS", &format!("http://127.0.0.1:{port}/metrics")])
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("sessionfs_store_requests_total ")?
                .trim()
                .parse()
                .ok()
        })
        .context("sessionfs_store_requests_total not in the server's metrics")
}

/// `sessionfs serve --mount-root` on this bucket, once mounted.
fn serve(work: &Path, root: &Path, bucket: &str, port: u16) -> Result<Child> {
    let bin = std::env::current_exe()?
        .parent()
        .context("bench binary has no directory")?
        .join("sessionfs");
    let log = std::fs::File::create(work.join("serve.log"))?;
    let child = Command::new(bin)
        .env("MINIO_BUCKET", bucket)
        .env("SESSIONFS_CACHE_DIR", work.join("cache"))
        .env("SESSIONFS_OVERLAY_DIR", work.join("overlays"))
        .env("SESSIONFS_LOG", "warn")
        .args([
            "--quiet",
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--mount-root",
        ])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let t = Instant::now();
    let mounted = format!(" {} ", root.display());
    while t.elapsed() < Duration::from_secs(30) {
        if std::fs::read_to_string("/proc/self/mountinfo")?.contains(&mounted) {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the mount root did not appear in 30 s; see {}",
        work.join("serve.log").display()
    )
}

fn stop(child: &mut Child, root: &Path) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    // Normally unmounted by the server as it stops; this only tidies up after a failure.
    let _ = Command::new("umount")
        .arg("-l")
        .arg(root)
        .stderr(Stdio::null())
        .status();
}
