//! A newcomer's mistakes, made for real against the binary, the S3 server
//! and real mounts: each is refused (exit code not 0) with a message that
//! names the thing, says what to do and says each cause once, and a refused
//! command creates nothing (no overlay, no object, no mount). The store down
//! at `mount` with a warm cache mounts read-only from the cache instead.

use std::path::Path;
use std::process::{Command, Output};

use sessionfs_tests::fault_proxy::{Fault, FaultProxy};
use sessionfs_tests::mount::{is_mounted, Site};
use sessionfs_tests::{pattern, s3_env, sessionfs_bin};

fn session(name: &str) -> String {
    format!("mistake__{name}__{:08x}", rand::random::<u32>())
}

/// The binary with a clean environment (the host's settings never leak
/// in), a home of its own, and `vars`.
fn sessionfs(home: &Path, args: &[&str], vars: &[(String, String)]) -> Output {
    Command::new(sessionfs_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("SESSIONFS_S3_MAX_ATTEMPTS", "2")
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap()
}

fn with(vars: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut v: Vec<_> = vars.iter().filter(|(k, _)| k != name).cloned().collect();
    v.push((name.to_owned(), value.to_owned()));
    v
}

/// A refusal: exit `code`, one line per cause, each cause said once, and
/// every piece of `must` in it. Returns what it said.
fn refused(out: &Output, code: i32, must: &[&str]) -> String {
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{said}");
    for m in must {
        assert!(said.contains(m), "{m:?} missing from: {said}");
    }
    // "…(os error 2): No such file or directory (os error 2)" and the like.
    let parts: Vec<&str> = said
        .split([':', '(', ')', ';'])
        .map(str::trim)
        .filter(|p| p.len() > 12)
        .collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(p),
            "{p:?} is said twice in: {said}"
        );
    }
    said
}

fn endpoint() -> String {
    let vars = s3_env();
    let get = |n: &str| {
        vars.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    format!("http://{}:{}", get("MINIO_ENDPOINT"), get("MINIO_PORT"))
}

#[test]
fn store_mistakes_name_the_store_and_say_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let vars = s3_env();
    let s = session("absent");

    // Wrong endpoint: where it looked, and how to check.
    let out = sessionfs(home.path(), &["ls", &s], &with(&vars, "MINIO_PORT", "1"));
    refused(
        &out,
        1,
        &[
            "cannot connect to the store",
            "http://127.0.0.1:1",
            "sessionfs store check",
        ],
    );

    // Wrong secret: the credentials, and how to check them.
    let out = sessionfs(
        home.path(),
        &["ls", &s],
        &with(&vars, "MINIO_ROOT_PASSWORD", "not-the-secret"),
    );
    let said = refused(&out, 1, &["sessionfs store check"]);
    assert!(!said.contains("not-the-secret"), "{said}");

    // A bucket that does not exist: says so, and which variable names it.
    let out = sessionfs(
        home.path(),
        &["ls", &s],
        &with(&vars, "MINIO_BUCKET", "no-such-bucket-here"),
    );
    refused(
        &out,
        1,
        &[
            "bucket \"no-such-bucket-here\" does not exist",
            "MINIO_BUCKET",
        ],
    );

    // An unknown session: its name, the bucket, the store, and what to run.
    let out = sessionfs(home.path(), &["cat", &s, "workspace/a"], &vars);
    refused(
        &out,
        1,
        &[
            &format!("session {s} not found in s3://"),
            &endpoint(),
            "sessionfs sessions",
        ],
    );
    // The same for pull, which creates no destination.
    let dest = home.path().join("dest");
    let out = sessionfs(
        home.path(),
        &["pull", &s, &dest.display().to_string()],
        &vars,
    );
    refused(
        &out,
        1,
        &[
            &format!("session {s} not found in s3://"),
            "sessionfs sessions",
        ],
    );
    assert!(!dest.exists(), "a refused pull made its destination");
    assert!(
        !home.path().join(".local/state/sessionfs/overlays").exists(),
        "a refused command made overlays"
    );
}

#[test]
fn mount_mistakes_are_refused_and_create_nothing() {
    let site = Site::s3();
    let home = tempfile::tempdir().unwrap();
    let mnt = site.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let overlays = site.dir.path().join("overlays");
    let mut vars = s3_env();
    vars.push((
        "SESSIONFS_OVERLAY_DIR".into(),
        overlays.display().to_string(),
    ));
    let m = mnt.display().to_string();
    let s = session("typo");

    // A mistyped session: no empty mount, no overlay, no object.
    let out = sessionfs(home.path(), &["mount", &s, &m], &vars);
    refused(
        &out,
        1,
        &[&format!("session {s} not found in s3://"), "--create"],
    );
    assert!(!is_mounted(&mnt));
    assert!(!overlays.join("sessions").join(&s).exists());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(sessionfs_tests::s3_store());
    let head = rt.block_on(store.head(&format!("{s}/session.tar.gz")));
    assert!(head.unwrap_err().is_not_found());

    // A mount point that holds files.
    std::fs::write(mnt.join("mine.txt"), b"mine").unwrap();
    let out = sessionfs(home.path(), &["mount", &s, &m, "--create"], &vars);
    refused(&out, 1, &["is not empty", "--allow-non-empty"]);
    assert!(!is_mounted(&mnt));
    assert!(!overlays.join("sessions").join(&s).exists());
    std::fs::remove_file(mnt.join("mine.txt")).unwrap();

    // A mount point that does not exist.
    let missing = site.dir.path().join("nowhere").display().to_string();
    let out = sessionfs(home.path(), &["mount", &s, &missing, "--create"], &vars);
    refused(&out, 1, &["mount point", "nowhere"]);

    // Missing and odd arguments: clap's exit code 2, in plain words.
    let out = sessionfs(home.path(), &["mount", &s], &vars);
    refused(&out, 2, &["<MOUNTPOINT>"]);
    let out = sessionfs(home.path(), &["--cache-size", "3", "ls", &s], &vars);
    refused(&out, 2, &["must be at least 16 MiB (got 3)"]);
    let out = sessionfs(home.path(), &["mount", &s, &m, "--threads", "0"], &vars);
    refused(&out, 2, &["between 1 and 64"]);
    let out = sessionfs(home.path(), &["--log", "a=b=c", "ls", &s], &vars);
    refused(&out, 2, &["is not a log filter", "examples"]);
    // mount(8)'s -o: each option is a flag; unknown ones are named.
    let out = sessionfs(home.path(), &["mount", &s, &m, "-o", "ro,bogus"], &vars);
    refused(&out, 2, &["unknown mount option \"bogus\"", "subdir="]);
    let out = sessionfs(home.path(), &["mount", &s, &m, "-o", "suid"], &vars);
    refused(&out, 2, &["\"suid\" is not supported", "nosuid"]);
    let out = sessionfs(home.path(), &["mount", &s, &m, "-o", "umask=999"], &vars);
    refused(&out, 2, &["not an octal mode"]);
    let out = sessionfs(home.path(), &["mount", &s, &m, "-o", "cache_size=3"], &vars);
    refused(&out, 2, &["at least 16 MiB"]);
    assert!(!is_mounted(&mnt));
    assert!(!overlays.join("sessions").join(&s).exists());
}

/// The store unreachable at `mount`: with the session's index and blocks in
/// the cache, it mounts read-only from them, and says so; `--offline` does
/// the same without asking the store; without a cached version, it is
/// refused, naming the store and what to check.
#[tokio::test(flavor = "multi_thread")]
async fn store_down_at_mount_serves_the_cached_version_read_only() {
    let s = session("offline");
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("workspace")).unwrap();
    let data = pattern(3 << 20, 11);
    std::fs::write(src.path().join("workspace/data.bin"), &data).unwrap();
    std::fs::write(src.path().join("workspace/note.txt"), b"cached").unwrap();
    Site::s3().push(src.path(), &s);

    let upstream: std::net::SocketAddr = endpoint().trim_start_matches("http://").parse().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let mut site = Site::s3();
    for (k, v) in site.env.iter_mut() {
        if k == "MINIO_PORT" {
            *v = proxy.addr.port().to_string();
        }
    }
    site.env
        .push(("SESSIONFS_S3_MAX_ATTEMPTS".into(), "2".into()));

    // Warm: mounted once, every file read.
    let m = site.mount(&s, &[]);
    assert!(std::fs::read(m.join("workspace/data.bin")).unwrap() == data);
    assert_eq!(
        std::fs::read(m.join("workspace/note.txt")).unwrap(),
        b"cached"
    );
    m.stop();

    // The store goes away.
    proxy.plan(&[], Fault::Drop);
    proxy.cut_all();
    let m = site.mount(&s, &[]);
    let log = m.log_text();
    assert!(
        log.contains("the store cannot be reached") && log.contains("read-only"),
        "{log}"
    );
    assert!(std::fs::read(m.join("workspace/data.bin")).unwrap() == data);
    let err = std::fs::write(m.join("workspace/new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    m.stop();

    // --offline: the store is not asked at all, even when it is there.
    proxy.plan(&[], Fault::Forward);
    let before = proxy.connections();
    let m = site.mount(&s, &["--offline"]);
    assert_eq!(
        std::fs::read(m.join("workspace/note.txt")).unwrap(),
        b"cached"
    );
    assert_eq!(proxy.connections(), before, "--offline asked the store");
    m.stop();

    // Nothing cached (another cache directory): refused, saying why.
    proxy.plan(&[], Fault::Drop);
    proxy.cut_all();
    let mnt = site.dir.path().join("cold");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = site
        .command()
        .env("SESSIONFS_CACHE_DIR", site.dir.path().join("cold-cache"))
        .args(["mount", &s])
        .arg(&mnt)
        .output()
        .unwrap();
    refused(
        &out,
        1,
        &["no cached version of session", "sessionfs store check"],
    );
    assert!(!is_mounted(&mnt));
}

/// `pull` into a directory that holds files would replace any the session
/// has too: it is refused before anything is downloaded, and changes
/// nothing, unless `--allow-non-empty` asks for it.
#[test]
fn pull_into_a_directory_holding_files_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let vars = vec![
        ("SESSIONFS_STORE".to_owned(), "local".to_owned()),
        (
            "SESSIONFS_STORE_DIR".to_owned(),
            home.path().join("store").display().to_string(),
        ),
    ];
    let src = home.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/a.txt"), b"stored\n").unwrap();
    let s = session("pull");
    let out = sessionfs(
        home.path(),
        &["-q", "push", &src.display().to_string(), &s],
        &vars,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dest = home.path().join("dest");
    std::fs::create_dir_all(dest.join("workspace")).unwrap();
    std::fs::write(dest.join("workspace/a.txt"), b"mine\n").unwrap();
    let d = dest.display().to_string();
    let out = sessionfs(home.path(), &["pull", &s, &d], &vars);
    refused(&out, 1, &[&d, "is not empty", "--allow-non-empty"]);
    assert_eq!(
        std::fs::read(dest.join("workspace/a.txt")).unwrap(),
        b"mine\n"
    );
    let out = sessionfs(
        home.path(),
        &["-q", "pull", &s, &d, "--allow-non-empty"],
        &vars,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dest.join("workspace/a.txt")).unwrap(),
        b"stored\n"
    );
    // An empty directory, or none, needs no flag.
    let empty = home.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for to in [empty, home.path().join("new")] {
        let out = sessionfs(
            home.path(),
            &["-q", "pull", &s, &to.display().to_string()],
            &vars,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
