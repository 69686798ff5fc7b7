//! The systemd units, run as written: each unit's `Environment=`,
//! `ExecStartPre=`, `ExecStart=` and `ExecStopPost=` lines, with only the
//! binary's path and the directories systemd would make
//! (`CacheDirectory=`, `StateDirectory=`, the mount root) pointed into a
//! temporary directory, and a `NOTIFY_SOCKET` this test listens on.
//! `READY=1` must come only once the mount answers `stat` and the API
//! answers `/health`; `WATCHDOG=1` while it runs; on SIGTERM `STOPPING=1`,
//! then pending changes are written back and the process exits 0.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sessionfs_tests::api::raw_request;
use sessionfs_tests::mount::{is_mounted, Site};
use sessionfs_tests::sessionfs_bin;

/// The `[Service]` lines this test runs.
struct Unit {
    env: Vec<(String, String)>,
    pre: Vec<String>,
    start: String,
    stop_post: Vec<String>,
    reload: Option<String>,
}

fn load(name: &str) -> Unit {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut unit = Unit {
        env: Vec::new(),
        pre: Vec::new(),
        start: String::new(),
        stop_post: Vec::new(),
        reload: None,
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "Environment" => {
                let (k, v) = value.split_once('=').unwrap();
                unit.env.push((k.to_owned(), v.to_owned()));
            }
            "ExecStartPre" => unit.pre.push(value.to_owned()),
            "ExecStart" => unit.start = value.to_owned(),
            "ExecStopPost" => unit.stop_post.push(value.to_owned()),
            "ExecReload" => unit.reload = Some(value.to_owned()),
            _ => {}
        }
    }
    assert!(!unit.start.is_empty(), "{name} has no ExecStart");
    unit
}

/// A command line as systemd runs it: `-` (ignore failure) dropped,
/// `%I`/`%i` and `${VAR}` expanded, split on spaces; the binary's installed
/// path becomes this build's.
fn expand(line: &str, instance: &str, vars: &BTreeMap<String, String>) -> Vec<String> {
    let mut line = line
        .trim_start_matches('-')
        .replace("%I", instance)
        .replace("%i", instance);
    for (k, v) in vars {
        line = line.replace(&format!("${{{k}}}"), v);
    }
    assert!(!line.contains("${"), "an unset variable in {line}");
    line.split_whitespace()
        .map(|w| {
            if w == "/usr/local/bin/sessionfs" {
                sessionfs_bin().display().to_string()
            } else {
                w.to_owned()
            }
        })
        .collect()
}

struct Started {
    child: Child,
    notify: UnixDatagram,
    log: PathBuf,
    vars: BTreeMap<String, String>,
}

/// Runs the unit's start lines; returns once the process is started (not
/// ready: the caller waits for `READY=1`).
fn start(site: &Site, name: &str, instance: &str) -> (Unit, Started) {
    start_with(site, name, instance, |_| {})
}

/// [`start`], with `tweak` changing the environment the unit gets.
fn start_with(
    site: &Site,
    name: &str,
    instance: &str,
    tweak: impl FnOnce(&mut BTreeMap<String, String>),
) -> (Unit, Started) {
    let unit = load(name);
    let dir = site.dir.path();
    // What EnvironmentFile=/etc/sessionfs/env holds on a host: the store,
    // and an API port of the kernel's choosing.
    let mut vars: BTreeMap<String, String> = unit.env.iter().cloned().collect();
    vars.extend(site.env.iter().cloned());
    vars.insert("PORT".into(), "0".into());
    vars.insert("SESSIONFS_LOG".into(), "info".into());
    vars.insert("AWS_EC2_METADATA_DISABLED".into(), "true".into());
    // The directories systemd makes for CacheDirectory=/StateDirectory=,
    // and the mount root, here.
    let redirect = |v: &str| -> String {
        v.replace(
            "/var/cache/sessionfs",
            &dir.join("cache").display().to_string(),
        )
        .replace(
            "/var/lib/sessionfs",
            &dir.join("state").display().to_string(),
        )
        .replace("/srv/sessions", &dir.join("srv").display().to_string())
    };
    for v in vars.values_mut() {
        *v = redirect(v);
    }
    let socket = dir.join(format!("notify-{name}"));
    let notify = UnixDatagram::bind(&socket).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    vars.insert("NOTIFY_SOCKET".into(), socket.display().to_string());
    vars.insert("WATCHDOG_USEC".into(), "400000".into());
    tweak(&mut vars);
    for pre in &unit.pre {
        let argv = expand(pre, instance, &vars);
        let status = Command::new(&argv[0]).args(&argv[1..]).status().unwrap();
        assert!(status.success(), "{argv:?}");
    }
    let argv = expand(&unit.start, instance, &vars);
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&vars)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    (
        unit,
        Started {
            child,
            notify,
            log,
            vars,
        },
    )
}

impl Started {
    /// The next notification holding `what`, with every one before it.
    fn wait_for(&mut self, what: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            assert!(
                Instant::now() < deadline,
                "no {what:?} after {seen:?}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "exited ({status}) before {what:?}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l == what);
                seen.push(msg);
                if hit {
                    return seen;
                }
            }
        }
    }

    /// SIGTERM, `STOPPING=1`, then the exit status.
    fn stop(mut self, unit: &Unit, instance: &str) -> std::process::ExitStatus {
        // SAFETY: kill(2) with a pid this test started and still holds.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let said = self.wait_for("STOPPING=1");
        assert!(said.last().unwrap().contains("STATUS="), "{said:?}");
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the unit's process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        for post in &unit.stop_post {
            let argv = expand(post, instance, &self.vars);
            // `-`: its failure is ignored, as systemd does (nothing left to unmount).
            let _ = Command::new(&argv[0]).args(&argv[1..]).status();
        }
        status
    }

    /// `host:port` of the API, from the line it logs when it listens.
    fn api_addr(&self) -> String {
        sessionfs_tests::api::wait_for_url(&self.log, || false)
            .trim_start_matches("http://")
            .to_owned()
    }
}

fn pushed_session(site: &Site, name: &str) {
    let src = site.dir.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/a.txt"), "pushed\n").unwrap();
    site.push(&src, name);
}

fn stored(site: &Site, session: &str, path: &str) -> String {
    String::from_utf8(site.run(&["cat", session, path])).unwrap()
}

#[test]
fn the_mount_unit_is_ready_only_when_mounted_and_writes_back_at_its_stop() {
    let site = Site::s3();
    // A session path with a `-`, as `systemd-escape` writes it in the instance.
    let session = format!("tests__unit-{:08x}__main", rand::random::<u32>());
    pushed_session(&site, &session);
    let (unit, mut run) = start(&site, "sessionfs-mount@.service", &session);
    let said = run.wait_for("READY=1");
    let mnt = site.dir.path().join("srv").join(&session);
    // Ready means answered: stat and a read, at once.
    assert!(is_mounted(&mnt), "READY=1 before the mount: {said:?}");
    assert_eq!(
        std::fs::read_to_string(mnt.join("workspace/a.txt")).unwrap(),
        "pushed\n"
    );
    assert!(
        said.last().unwrap().contains("STATUS=mounted at"),
        "{said:?}"
    );
    run.wait_for("WATCHDOG=1");
    std::fs::write(mnt.join("workspace/b.txt"), "written before the stop\n").unwrap();
    let status = run.stop(&unit, &session);
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mnt));
    assert_eq!(
        stored(&site, &session, "workspace/b.txt"),
        "written before the stop\n"
    );
}

#[test]
fn the_root_unit_is_ready_once_the_api_answers_and_the_root_is_mounted() {
    let site = Site::s3();
    let session = format!("tests__unitroot{:08x}__main", rand::random::<u32>());
    pushed_session(&site, &session);
    let (unit, mut run) = start(&site, "sessionfs-root.service", "");
    run.wait_for("READY=1");
    let root = site.dir.path().join("srv");
    assert!(is_mounted(&root));
    assert_eq!(
        std::fs::read_to_string(root.join(&session).join("workspace/a.txt")).unwrap(),
        "pushed\n"
    );
    let addr = run.api_addr();
    assert_eq!(raw_request(&addr, "GET", "/health", b"").0, 200);
    let file = format!("/api/storage-worker/sessions/{session}/files/workspace/c.txt");
    assert_eq!(
        raw_request(&addr, "PUT", &file, b"through the API\n").0,
        200
    );
    let status = run.stop(&unit, "");
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&root));
    assert_eq!(
        stored(&site, &session, "workspace/c.txt"),
        "through the API\n"
    );
}

#[test]
fn the_api_unit_is_ready_once_it_answers_and_writes_back_at_its_stop() {
    let site = Site::s3();
    let session = format!("tests__unitapi{:08x}__main", rand::random::<u32>());
    let (unit, mut run) = start(&site, "sessionfs-api.service", "");
    run.wait_for("READY=1");
    let addr = run.api_addr();
    assert_eq!(raw_request(&addr, "GET", "/health", b"").0, 200);
    let file = format!("/api/storage-worker/sessions/{session}/files/workspace/d.txt");
    assert_eq!(
        raw_request(&addr, "PUT", &file, b"pending at the stop\n").0,
        200
    );
    let status = run.stop(&unit, "");
    assert!(status.success(), "{status}");
    assert_eq!(
        stored(&site, &session, "workspace/d.txt"),
        "pending at the stop\n"
    );
}

/// `systemctl reload` (ExecReload sends SIGHUP): `RELOADING=1`, the
/// configuration file read again, `READY=1`; a shorter quiet period from the
/// file takes effect at once, a key that needs a restart is said so.
#[test]
fn a_reload_reads_the_configuration_file_again() {
    let site = Site::s3();
    let session = format!("tests__reload{:08x}__main", rand::random::<u32>());
    pushed_session(&site, &session);
    let config = site.dir.path().join("config.toml");
    std::fs::write(&config, "writeback_quiet_ms = 600000\nlog = \"warn\"\n").unwrap();
    let (unit, mut run) = start_with(&site, "sessionfs-mount@.service", &session, |vars| {
        vars.remove("SESSIONFS_LOG");
        vars.insert("SESSIONFS_CONFIG".into(), config.display().to_string());
    });
    run.wait_for("READY=1");
    let mnt = site.dir.path().join("srv").join(&session);
    std::fs::write(mnt.join("workspace/r.txt"), "after the reload\n").unwrap();
    std::fs::write(
        &config,
        "writeback_quiet_ms = 200\nlog = \"info\"\ncache_size = 64\n",
    )
    .unwrap();
    // What ExecReload= runs.
    let reload = unit.reload.clone().expect("the unit has ExecReload=");
    let argv: Vec<String> = reload
        .replace("$MAINPID", &run.child.id().to_string())
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let status = Command::new(&argv[0]).args(&argv[1..]).status().unwrap();
    assert!(status.success());
    run.wait_for("RELOADING=1");
    let said = run.wait_for("READY=1");
    assert!(
        said.last().unwrap().contains("writeback_quiet_ms 200"),
        "{said:?}"
    );
    // Written back well before the old ten minutes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = site
            .command()
            .args(["cat", &session, "workspace/r.txt"])
            .output()
            .unwrap();
        if out.status.success() {
            assert_eq!(out.stdout, b"after the reload\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not written back after the reload"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(&run.log).unwrap();
    assert!(
        log.contains("SESSIONFS_CACHE_SIZE changed in") && log.contains("next start"),
        "{log}"
    );
    // The new filter is in force: the write-back's info line is there.
    assert!(log.contains("INFO"), "{log}");
    let status = run.stop(&unit, &session);
    assert!(status.success(), "{status}");
}
