//! What the CLI prints for people and for scripts: `ls -l` as GNU `ls -l`
//! prints the same tree (mode column for every file type, times in the
//! local zone in each `--time-style`), and every `--json` output fits its
//! documented schema (`docs/cli-json-schema.json`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use sessionfs_tests::json_schema::{check, cli_schema};
use sessionfs_tests::mount::Site;

const TZ: &str = "America/New_York";

/// A tree with one of every file type `ls -l` tells apart, and the mode
/// bits it prints specially.
fn every_kind(root: &Path) {
    let w = root.join("workspace");
    std::fs::create_dir_all(w.join("dir")).unwrap();
    std::fs::create_dir_all(w.join("sticky")).unwrap();
    let file = |name: &str, mode: u32| {
        std::fs::write(w.join(name), name).unwrap();
        std::fs::set_permissions(w.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    file("plain.txt", 0o644);
    file("run.sh", 0o755);
    file("setuid", 0o4755);
    file("setuid-no-x", 0o4644);
    file("setgid", 0o2755);
    file("setgid-no-x", 0o2644);
    file("private", 0o600);
    file("odd", 0o1741);
    std::fs::set_permissions(w.join("sticky"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::set_permissions(w.join("dir"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("plain.txt", w.join("link")).unwrap();
    std::fs::hard_link(w.join("plain.txt"), w.join("hard")).unwrap();
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated paths that outlive the calls.
    unsafe {
        assert_eq!(libc::mkfifo(c(&w.join("fifo")).as_ptr(), 0o640), 0);
        // Root makes device nodes (the suite runs as root for its mounts).
        assert_eq!(
            libc::mknod(
                c(&w.join("null")).as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3)
            ),
            0
        );
    }
    // Times in the past, some older than six months (ls prints the year).
    let set_time = |name: &str, secs: i64| {
        let times = [
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
        ];
        // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c(&w.join(name)).as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(rc, 0);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    set_time("private", 1_500_000_000);
    set_time("odd", now - 86_400 * 3);
    set_time("run.sh", now - 86_400 * 300);
    set_time("link", 1_600_000_000);
}

/// name -> (mode column, time text) of `ls -l` lines whose time is the
/// `width` characters before the name (every style pads to a fixed width).
fn columns(out: &str, width: usize) -> BTreeMap<String, (String, String)> {
    out.lines()
        .filter(|l| !l.starts_with("total"))
        .map(|l| {
            let l = l.split(" -> ").next().unwrap_or(l);
            let l = l.split(" (hard link to ").next().unwrap_or(l);
            let (head, path) = l.rsplit_once(' ').unwrap();
            let name = path.rsplit('/').next().unwrap_or_default().to_owned();
            let time = head[head.len() - width..].to_owned();
            let mode = l.split(' ').next().unwrap_or_default().to_owned();
            (name, (mode, time))
        })
        .collect()
}

#[test]
fn ls_l_prints_modes_and_local_times_as_gnu_ls() {
    let site = Site::local();
    let src = site.dir.path().join("src");
    every_kind(&src);
    site.push(&src, "tests__kinds__main");
    for (style, width) in [
        ("long-iso", 16),
        ("iso", 11),
        ("locale", 12),
        ("full-iso", 35),
    ] {
        let gnu = Command::new("ls")
            .env("TZ", TZ)
            .env("LC_ALL", "C")
            .args(["-l", &format!("--time-style={style}")])
            .arg(src.join("workspace"))
            .output()
            .unwrap();
        assert!(gnu.status.success());
        let gnu = String::from_utf8(gnu.stdout).unwrap();
        let ours = site
            .command()
            .env("TZ", TZ)
            .args([
                "ls",
                "-l",
                &format!("--time-style={style}"),
                "tests__kinds__main",
                "workspace",
            ])
            .output()
            .unwrap();
        assert!(
            ours.status.success(),
            "{}",
            String::from_utf8_lossy(&ours.stderr)
        );
        let ours = String::from_utf8(ours.stdout).unwrap();
        let (gnu_cols, our_cols) = (columns(&gnu, width), columns(&ours, width));
        assert_eq!(
            our_cols.keys().collect::<Vec<_>>(),
            gnu_cols.keys().collect::<Vec<_>>(),
            "{style}:\n{ours}\n{gnu}"
        );
        for (name, (mode, time)) in &gnu_cols {
            let (our_mode, our_time) = &our_cols[name];
            assert_eq!(our_mode, mode, "{style} {name}: mode\n{ours}\n{gnu}");
            assert_eq!(our_time, time, "{style} {name}: time\n{ours}\n{gnu}");
        }
    }

    // The same entries as JSON, fitting the documented schema.
    let (doc, schema) = cli_schema("ls");
    let v: Value =
        serde_json::from_slice(&site.run(&["ls", "--json", "tests__kinds__main"])).unwrap();
    check(&doc, &schema, &v, "ls");
    let types: std::collections::BTreeSet<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    for t in ["file", "dir", "symlink", "hardlink", "fifo", "char"] {
        assert!(types.contains(t), "no {t} in {v:#}");
    }
}

#[test]
fn every_json_output_fits_its_documented_schema() {
    let site = Site::local();
    let src = site.dir.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/a.txt"), "a").unwrap();
    let session = "tests__json__main";

    let (doc, schema) = cli_schema("push");
    let v: Value =
        serde_json::from_slice(&site.run(&["push", &src.display().to_string(), session, "--json"]))
            .unwrap();
    check(&doc, &schema, &v, "push");

    let (doc, schema) = cli_schema("pull");
    let dest = site.dir.path().join("dest").display().to_string();
    let v: Value = serde_json::from_slice(&site.run(&["pull", session, &dest, "--json"])).unwrap();
    check(&doc, &schema, &v, "pull");

    // status: from an overlay no process holds, then from a mount.
    let (doc, schema) = cli_schema("status");
    let v: Value = serde_json::from_slice(&site.run(&["status", session, "--json"])).unwrap();
    check(&doc, &schema, &v, "status");
    let m = site.mount(session, &["--writeback-quiet-ms", "600000"]);
    std::fs::write(m.join("workspace/b.txt"), "b").unwrap();
    let v: Value =
        serde_json::from_slice(&site.run(&["status", "--json", &m.path.display().to_string()]))
            .unwrap();
    check(&doc, &schema, &v, "status");
    assert!(v["pendingChanges"].as_u64().unwrap() > 0, "{v}");
    // The write above was a create and a write at least, each counted.
    let asked = &v["kernelRequests"];
    assert!(asked["create"].as_u64().unwrap_or(0) >= 1, "{v}");
    assert!(asked["write"].as_u64().unwrap_or(0) >= 1, "{v}");
    let kinds: u64 = asked
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "total")
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert_eq!(asked["total"].as_u64(), Some(kinds), "{v}");
    site.run(&["flush", &m.path.display().to_string()]);
    let v: Value = serde_json::from_slice(&site.run(&["status", session, "--json"])).unwrap();
    check(&doc, &schema, &v, "status");
    assert!(v["lastWriteBack"].is_object(), "{v}");

    let (doc, schema) = cli_schema("sessions");
    let v: Value = serde_json::from_slice(&site.run(&["sessions", "--json"])).unwrap();
    check(&doc, &schema, &v, "sessions");
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|s| s["sessionPath"] == session && s["heldHere"] == true),
        "{v:#}"
    );
    m.stop();
}
