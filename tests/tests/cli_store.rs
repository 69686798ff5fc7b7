//! The `sessionfs` binary's store tools and command line, run for real:
//! `store check` against the real S3 server and a local store, wrong and
//! missing credentials, bad flags, and the subcommands still to come.

use std::process::{Command, Output};

use sessionfs_tests::{s3_env, sessionfs_bin};

/// The binary with a clean environment plus `vars`, so the host's own
/// settings never leak into what is tested.
fn sessionfs(args: &[&str], vars: &[(String, String)]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(sessionfs_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        // Never wait on a cloud metadata service that does not exist here.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn with(vars: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut v: Vec<_> = vars.iter().filter(|(k, _)| k != name).cloned().collect();
    v.push((name.to_owned(), value.to_owned()));
    v
}

fn without(vars: &[(String, String)], name: &str) -> Vec<(String, String)> {
    vars.iter().filter(|(k, _)| k != name).cloned().collect()
}

#[test]
fn store_check_passes_against_the_s3_server() {
    let out = sessionfs(&["store", "check"], &s3_env());
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("s3://"), "{said}");
    assert!(said.contains("store check passed"), "{said}");
}

#[test]
fn store_check_with_a_wrong_secret_says_the_credentials_were_rejected() {
    let vars = with(&s3_env(), "MINIO_ROOT_PASSWORD", "not-the-secret");
    let out = sessionfs(&["store", "check"], &vars);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("rejected the credentials"), "{said}");
    assert!(
        !said.contains("not-the-secret"),
        "the secret is never printed: {said}"
    );
}

/// A HEAD answers 403 without a reason: `ls` with a wrong secret says what
/// it may mean and which command tells.
#[test]
fn ls_with_a_wrong_secret_points_to_store_check() {
    let vars = with(&s3_env(), "MINIO_ROOT_PASSWORD", "not-the-secret");
    let out = sessionfs(&["ls", "any__session__main"], &vars);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        // A GET names the cause (a HEAD answers no error code).
        (said.contains("rejected the credentials") || said.contains("credentials may be wrong"))
            && said.contains("sessionfs store check"),
        "{said}"
    );
    assert!(!said.contains("not-the-secret"), "{said}");
}

#[test]
fn store_check_with_an_unknown_access_key_says_the_credentials_were_rejected() {
    let vars = with(&s3_env(), "MINIO_ROOT_USER", "nobody");
    let out = sessionfs(&["store", "check"], &vars);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("rejected the credentials"),
        "{}",
        text(&out)
    );
}

#[test]
fn store_check_of_a_missing_bucket_says_so() {
    let vars = with(&s3_env(), "MINIO_BUCKET", "no-such-bucket-here");
    let out = sessionfs(&["store", "check"], &vars);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("no-such-bucket-here") && said.contains("does not exist"),
        "{said}"
    );
    // A HEAD cannot tell a missing bucket from a missing object: ls says
    // which, as the mount does.
    let out = sessionfs(&["ls", "any__session__main"], &vars);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("bucket \"no-such-bucket-here\" does not exist"),
        "{said}"
    );
}

#[test]
fn a_missing_credential_names_the_variable_to_set() {
    let out = sessionfs(
        &["store", "check"],
        &without(&s3_env(), "MINIO_ROOT_PASSWORD"),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("MINIO_ROOT_PASSWORD"), "{}", text(&out));

    let none = without(
        &without(&s3_env(), "MINIO_ROOT_PASSWORD"),
        "MINIO_ROOT_USER",
    );
    let out = sessionfs(&["store", "check"], &none);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("no S3 credentials") && said.contains("MINIO_ROOT_USER"),
        "{said}"
    );
}

#[test]
fn an_unreachable_endpoint_is_reported_as_unavailable() {
    let vars = with(
        &with(&s3_env(), "MINIO_PORT", "1"),
        "SESSIONFS_S3_MAX_ATTEMPTS",
        "2",
    );
    let out = sessionfs(&["store", "check"], &vars);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("unavailable after retries") && said.contains("MINIO_ENDPOINT"),
        "{said}"
    );
}

#[test]
fn store_check_passes_on_the_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let vars = vec![(
        "SESSIONFS_STORE_DIR".to_owned(),
        dir.path().display().to_string(),
    )];
    let out = sessionfs(&["store", "check"], &vars);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("local:"), "{}", text(&out));
    // The check cleans up after itself.
    let bucket = dir.path().join("sessions");
    assert_eq!(std::fs::read_dir(bucket).unwrap().count(), 0);
}

#[test]
fn the_local_store_is_the_default_without_s3_settings_and_says_so_once() {
    let note = "no S3 endpoint set";
    let out = sessionfs(&["store", "check"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("local:"), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(said.matches(note).count(), 1, "{said}");
    assert!(said.contains("using the local store in"), "{said}");
    // Chosen on purpose, or asked to be quiet: no note.
    for args in [
        &["store", "check", "--store", "local"][..],
        &["-q", "store", "check"],
    ] {
        let out = sessionfs(args, &[]);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(!text(&out).contains(note), "{args:?}: {}", text(&out));
    }
    // A missing session under the default names the store it looked in.
    let out = sessionfs(&["ls", "acme__web__main"], &[]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(said.matches(note).count(), 1, "{said}");
}

#[test]
fn bad_arguments_are_refused_with_a_clear_error() {
    let out = sessionfs(&["store", "check", "--minio-port", "not-a-port"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not-a-port"), "{}", text(&out));

    let out = sessionfs(&["store", "check", "--store", "ftp"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let out = sessionfs(&["store", "check", "--bucket", "Bad_Bucket"], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("invalid bucket name"), "{}", text(&out));

    let out = sessionfs(&["store", "check", "--s3-max-attempts", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let out = sessionfs(&["no-such-command"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn session_paths_are_checked_before_anything_is_read() {
    for bad in ["a/b", "..", "", "x\u{1}y"] {
        let out = sessionfs(&["ls", bad], &[]);
        assert!(!out.status.success(), "{bad:?}");
        assert!(
            text(&out).contains("invalid session path"),
            "{bad:?}: {}",
            text(&out)
        );
    }
    let out = sessionfs(&["cat", "no__such__session", "x"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("session no__such__session not found in local:"),
        "{}",
        text(&out)
    );
    // A cause is said once, and a wrong log filter is refused in words.
    let out = sessionfs(&["--log", "info,x=loud", "ls", "a"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("is not a log filter"), "{}", text(&out));
}

#[test]
fn help_lists_every_subcommand_and_the_pending_ones_say_so() {
    let out = sessionfs(&["--help"], &[]);
    assert!(out.status.success());
    let help = text(&out);
    let pending = ["sync", "versions", "restore"];
    let built = [
        "store", "pack", "push", "pull", "ls", "cat", "sessions", "mount", "umount", "serve",
        "flush", "status",
    ];
    for name in pending.iter().chain(&built) {
        assert!(
            help.contains(&format!("\n  {name} ")),
            "{name} missing from:\n{help}"
        );
    }
    // The unbuilt ones say so in the list; store flags have their heading.
    for name in pending {
        let line = help
            .lines()
            .find(|l| l.starts_with(&format!("  {name} ")))
            .unwrap();
        assert!(line.contains("(not built yet)"), "{line}");
    }
    // Every built subcommand's long help ends with examples.
    for cmd in [
        &["store", "check"][..],
        &["pack"],
        &["push"],
        &["pull"],
        &["ls"],
        &["cat"],
        &["sessions"],
        &["mount"],
        &["umount"],
        &["serve"],
        &["flush"],
        &["status"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = text(&sessionfs(&args, &[]));
        assert!(help.contains("\nExample"), "{cmd:?}:\n{help}");
        assert!(
            help.contains(&format!("  sessionfs {}", cmd.join(" "))),
            "{cmd:?}:\n{help}"
        );
    }
    // Store flags only where a command uses the store, under their heading.
    assert!(!help.contains("--bucket"), "{help}");
    for (cmd, uses_store) in [
        (&["ls", "--help"][..], true),
        (&["mount", "--help"], true),
        (&["store", "check", "--help"], true),
        (&["pack", "--help"], false),
        (&["umount", "--help"], false),
    ] {
        let help = text(&sessionfs(cmd, &[]));
        assert_eq!(
            help.contains("\nObject store (flags or environment):\n") && help.contains("--bucket"),
            uses_store,
            "{cmd:?}:\n{help}"
        );
    }
    // --version names the commit it was built from.
    let version = text(&sessionfs(&["--version"], &[]));
    let commit = version
        .split(['(', ','])
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{version}"
    );
    for name in pending {
        let out = sessionfs(&[name, "some-session", "--flag"], &[]);
        assert!(!out.status.success(), "{name} must fail until it is built");
        assert!(
            text(&out).contains("not implemented yet"),
            "{name}: {}",
            text(&out)
        );
    }
    // `serve` refuses a port that is no port, and says so when the port is taken.
    let out = sessionfs(&["serve", "--port", "70000"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("70000"), "{}", text(&out));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = sessionfs(&["serve", "--bind", "127.0.0.1", "--port", &port], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("listening on 127.0.0.1:{port}")),
        "{}",
        text(&out)
    );
}

/// Completions and the manual page come from the same definitions as
/// `--help`: every subcommand is in them, and the shells and man(1) read
/// them without a complaint.
#[test]
fn completions_and_the_manual_page_cover_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let bash = sessionfs(&["completions", "bash"], &[]);
    assert!(bash.status.success(), "{}", text(&bash));
    let script = dir.path().join("sessionfs.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let script = String::from_utf8_lossy(&bash.stdout);
    for word in [
        "mount",
        "sessions",
        "--allow-non-empty",
        "--time-style",
        "--offline",
    ] {
        assert!(
            script.contains(word),
            "{word} missing from the bash completions"
        );
    }
    for shell in ["zsh", "fish"] {
        let out = sessionfs(&["completions", shell], &[]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("sessionfs"));
    }
    let out = sessionfs(&["completions", "tcsh"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let page = sessionfs(&["manpage"], &[]);
    assert!(page.status.success(), "{}", text(&page));
    let file = dir.path().join("sessionfs.1");
    std::fs::write(&file, &page.stdout).unwrap();
    let shown = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&file)
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", text(&shown));
    assert!(
        shown.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let shown = String::from_utf8_lossy(&shown.stdout);
    for word in ["SYNOPSIS", "mount", "serve", "sessions", "completions"] {
        assert!(
            shown.contains(word),
            "{word} missing from the page:\n{shown}"
        );
    }
}

/// Log lines: `RUST_LOG` is honoured when `--log` is not given; with stderr
/// being the journal's stream, each line carries its level as a syslog
/// priority and no timestamp; never colour codes.
#[test]
fn logs_honour_rust_log_and_speak_journald_priorities() {
    let dir = tempfile::tempdir().unwrap();
    let run = |vars: &[(&str, &str)], journal: bool| -> String {
        let log = dir.path().join(format!("log-{}", rand::random::<u32>()));
        let file = std::fs::File::create(&log).unwrap();
        let stream = {
            use std::os::unix::fs::MetadataExt;
            let md = file.metadata().unwrap();
            format!("{}:{}", md.dev(), md.ino())
        };
        let home = tempfile::tempdir().unwrap();
        let mut child = Command::new(sessionfs_bin())
            .args([
                "serve", "--port", "0", "--bind", "0.0.0.0", "--store", "local",
            ])
            .arg("--store-dir")
            .arg(dir.path().join("store"))
            .env_clear()
            .env("HOME", home.path())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(vars.iter().copied())
            .envs(journal.then_some(("JOURNAL_STREAM", stream.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        // The token warning is logged before the listening line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("storage-worker API of") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = sessionfs_tests::terminate(&mut child, std::time::Duration::from_secs(30));
        std::fs::read_to_string(&log).unwrap()
    };
    // Default (warn): the warning, not the info line.
    let text = run(&[], false);
    assert!(
        text.contains(" WARN ") && !text.contains(" INFO "),
        "{text}"
    );
    // RUST_LOG=info, no --log: the info line too.
    let text = run(&[("RUST_LOG", "info")], false);
    assert!(
        text.contains(" INFO ") && text.contains("listening on"),
        "{text}"
    );
    // SESSIONFS_LOG wins over RUST_LOG.
    let text = run(&[("RUST_LOG", "info"), ("SESSIONFS_LOG", "warn")], false);
    assert!(!text.contains("listening on"), "{text}");
    // Into the journal: priorities, no timestamps.
    let text = run(&[("RUST_LOG", "info")], true);
    let warn = text
        .lines()
        .find(|l| l.contains("without SESSIONFS_API_TOKEN"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(warn.starts_with("<4>sessionfs::serve_cmd: "), "{warn}");
    let info = text
        .lines()
        .find(|l| l.contains("listening on"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(info.starts_with("<6>"), "{info}");
    assert!(!text.contains('\u{1b}'), "colour codes: {text:?}");
}
