//! A mount whose overlay disk fills up: data and namespace writes fail with
//! ENOSPC (never EIO), deleting through the mount still works and frees
//! space, the unmount syncs and a remount works, even on a disk still full,
//! and nothing fsynced is lost. And the journal's WAL stays bounded however
//! many operations a mount runs.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sessionfs_tests::mount::{Mount, Site};
use sessionfs_tests::pattern;
use sessionfs_tests::trees::make_fixture;

/// A tmpfs of `mib` MiB at `at`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Writes 1 MiB files, each fsynced, until the disk is full; returns the
/// names of those that were written whole.
fn fill(dir: &Path, prefix: &str) -> Vec<(String, u64)> {
    let mut kept = Vec::new();
    for i in 0..10_000u64 {
        let name = format!("{prefix}_{i:05}.bin");
        let written = (|| -> std::io::Result<()> {
            let mut f = File::create(dir.join(&name))?;
            f.write_all(&pattern(1 << 20, i))?;
            f.sync_all()
        })();
        match written {
            Ok(()) => kept.push((name, i)),
            Err(e) => {
                assert_eq!(errno(&e), libc::ENOSPC, "a full disk answers ENOSPC: {e}");
                return kept;
            }
        }
    }
    panic!("the disk never filled up");
}

fn check(dir: &Path, kept: &[(String, u64)]) {
    for (name, seed) in kept {
        let got = fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == pattern(1 << 20, *seed), "{name} holds other bytes");
    }
}

#[test]
fn a_full_overlay_disk_answers_enospc_and_deleting_through_the_mount_frees_it() {
    let site = Site::local();
    let session = "tests__fulldisk__main";
    let src = site.dir.path().join("src");
    make_fixture(&src);
    site.push(&src, session);
    let _disk = Tmpfs::mount(&site.dir.path().join("overlays"), 48);

    let m = site.mount(session, &["--no-writeback"]);
    let w = m.path.join("workspace");
    let kept = fill(&w, "a");
    assert!(kept.len() > 8, "only {} MiB fit", kept.len());

    // Namespace operations on the full disk: ENOSPC or success, never EIO.
    let mut refused = 0;
    for i in 0..20_000 {
        let name = w.join(format!("t_{i:05}"));
        let r = if i % 3 == 0 {
            fs::create_dir(&name)
        } else {
            File::create(&name).map(drop)
        };
        if let Err(e) = r {
            assert_eq!(errno(&e), libc::ENOSPC, "creating {}: {e}", name.display());
            refused += 1;
            if refused > 20 {
                break;
            }
        }
    }
    assert!(refused > 0, "20,000 creates on a full disk all succeeded");
    if let Err(e) = fs::rename(w.join(&kept[0].0), w.join("renamed.bin")) {
        assert_eq!(errno(&e), libc::ENOSPC, "rename: {e}");
    }
    let kept: Vec<_> = kept
        .into_iter()
        .filter(|(n, _)| w.join(n).exists())
        .collect();

    // Deleting works, and the space comes back to the mount.
    let (gone, kept) = kept.split_at(4);
    for (name, _) in gone {
        fs::remove_file(w.join(name)).unwrap_or_else(|e| panic!("rm {name}: {e}"));
    }
    let mut f = File::create(w.join("after.bin")).unwrap();
    f.write_all(&pattern(1 << 20, 99_999)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut kept = kept.to_vec();
    kept.push(("after.bin".to_owned(), 99_999));

    // The unmount syncs; a remount finds everything fsynced.
    m.stop();
    let m = site.mount(session, &["--no-writeback"]);
    let w = m.path.join("workspace");
    check(&w, &kept);
    assert!(w.join("main.rs").exists() || fs::read_dir(&w).unwrap().count() > kept.len());

    // Full again, stopped and mounted again: the remount still works.
    let more = fill(&w, "b");
    m.stop();
    let m = site.mount(session, &["--no-writeback"]);
    let w = m.path.join("workspace");
    check(&w, &kept);
    check(&w, &more);
    fs::remove_file(w.join(&more[0].0)).unwrap();
    m.stop();
}

/// Size of the journal's WAL now (0 when there is none).
fn wal_size(overlay: &Path) -> u64 {
    fs::metadata(overlay.join("journal.db-wal")).map_or(0, |m| m.len())
}

#[test]
fn the_journal_wal_stays_bounded_over_a_hundred_thousand_creates() {
    // The bound: a checkpoint every 16 MiB of WAL, cut back to 16 MiB
    // after, plus the transactions committed while a checkpoint runs.
    const BOUND: u64 = 18 << 20;
    let files: usize = std::env::var("SESSIONFS_WAL_TEST_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let site = Site::local();
    let session = "tests__wal__main";
    let m: Mount = site.mount(session, &["--no-writeback"]);
    let overlay = site.overlay(session, "sessions");
    let threads = 4;
    let max = std::sync::Mutex::new(0u64);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let dir = m.path.join(format!("d{t}"));
            let (max, overlay) = (&max, &overlay);
            scope.spawn(move || {
                fs::create_dir(&dir).unwrap();
                for i in 0..files / threads {
                    let f = File::create(dir.join(format!("f{i:06}"))).unwrap();
                    if i % 100 == 0 {
                        f.sync_all().unwrap();
                        let mut m = max.lock().unwrap();
                        *m = (*m).max(wal_size(overlay));
                    }
                }
            });
        }
    });
    let max = *max.lock().unwrap();
    eprintln!("{files} creates: the WAL peaked at {max} bytes");
    assert!(max <= BOUND, "the WAL grew to {max} bytes (bound {BOUND})");
    assert_eq!(
        fs::read_dir(m.path.join("d0")).unwrap().count(),
        files / threads
    );
    m.stop();
}

/// Through the API: a PUT that finds the disk full answers 507
/// `insufficient_storage` (not a 500), a DELETE still works and frees the
/// room for the next PUT, and what was answered before is still there.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_on_a_full_disk_answers_507_and_deletes_still_work() {
    const API: &str = "/api/storage-worker/sessions";
    let site = Site::local();
    let _disk = Tmpfs::mount(&site.dir.path().join("overlays"), 40);
    let server = site.serve_api(&["--no-writeback"], &[]);
    let http = reqwest::Client::new();
    let url = |i: u64| {
        format!(
            "{}{API}/tests__apifull__main/files/workspace/f{i:04}.bin",
            server.url
        )
    };
    let mut answered = Vec::new();
    let refused = loop {
        let i = answered.len() as u64;
        assert!(i < 1000, "the disk never filled up");
        let r = http
            .put(url(i))
            .body(pattern(1 << 20, i))
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            break r;
        }
        answered.push(i);
    };
    assert_eq!(refused.status(), 507);
    let v: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(v["error"], "insufficient_storage", "{v}");

    for i in answered.drain(..4) {
        let r = http.delete(url(i)).send().await.unwrap();
        assert_eq!(r.status(), 200, "DELETE on a full disk");
    }
    let r = http
        .put(url(9999))
        .body(pattern(1 << 20, 9999))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a PUT after the DELETEs freed room");
    answered.push(9999);
    for i in answered {
        let got = http
            .get(url(i))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(got == pattern(1 << 20, i), "file {i} holds other bytes");
    }
    assert_eq!(server.stop().code(), Some(0));
}
