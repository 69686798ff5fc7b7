//! A mounted session behaves like a local disk for what tools do: each
//! POSIX behaviour is checked on a real FUSE mount of a real session
//! (local store; `fuse_workloads` uses the S3 server), and what must
//! survive a remount does.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use sessionfs_tests::mount::Site;
use sessionfs_tests::trees::make_fixture;

const SESSION: &str = "tests__posix__main";

fn site_with_fixture() -> Site {
    let site = Site::local();
    let src = site.dir.path().join("src");
    make_fixture(&src);
    site.push(&src, SESSION);
    site
}

/// The requests the kernel sent a mount, by kind (`user.sessionfs.requests`).
fn requests(mount: &Path) -> serde_json::Value {
    let raw = xattr::get(mount, "user.sessionfs.requests")
        .unwrap()
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

fn errno(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn renameat2(a: &Path, b: &Path, flags: u32) -> i32 {
    let (a, b) = (cpath(a), cpath(b));
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

#[test]
fn the_object_is_listed_and_read_through_the_mount() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &[]);
    let src = site.dir.path().join("src");
    let a = sessionfs_tests::trees::snapshot(&src);
    let b = sessionfs_tests::trees::snapshot(&m.path);
    sessionfs_tests::trees::assert_same_tree(&a, &b, "mount");
    // The kernel lists it as what it is (`findmnt -t fuse.sessionfs`, `df -T`).
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*m.path.to_string_lossy()))
        .expect("the mount in mountinfo");
    let after = line.split(" - ").nth(1).unwrap_or_default();
    assert!(
        after.starts_with(&format!("fuse.sessionfs sessionfs:{SESSION} ")),
        "{line}"
    );
}

#[test]
fn opens_creates_and_writes_behave_like_a_local_disk() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &["--subdir", "workspace"]);
    let f = m.join("new.txt");
    // O_CREAT|O_EXCL twice: the second fails.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&f)
        .unwrap();
    assert_eq!(
        errno(OpenOptions::new().write(true).create_new(true).open(&f)),
        libc::EEXIST
    );
    // O_TRUNC on a file from the object, then O_APPEND.
    let big = m.join("big.bin");
    assert!(fs::metadata(&big).unwrap().len() > 1 << 20);
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&big)
        .unwrap();
    assert_eq!(fs::metadata(&big).unwrap().len(), 0);
    fs::write(&f, b"one\n").unwrap();
    let mut app = OpenOptions::new().append(true).open(&f).unwrap();
    app.write_all(b"two\n").unwrap();
    drop(app);
    assert_eq!(fs::read(&f).unwrap(), b"one\ntwo\n");
    // Random writes into a file from the object keep the bytes around them.
    let hello = m.join("README.md");
    let before = fs::read(&hello).unwrap();
    let w = OpenOptions::new().write(true).open(&hello).unwrap();
    w.write_all_at(b"J", 0).unwrap();
    w.write_all_at(b"!", before.len() as u64 + 3).unwrap();
    drop(w);
    let after = fs::read(&hello).unwrap();
    assert_eq!(after[0], b'J');
    assert_eq!(&after[1..before.len()], &before[1..]);
    assert_eq!(&after[before.len()..], b"\0\0\0!");
    // truncate up and down.
    let t = OpenOptions::new().write(true).open(&f).unwrap();
    t.set_len(2).unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"on");
    t.set_len(10).unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"on\0\0\0\0\0\0\0\0");
    drop(t);
    // Unlink while open: the open file still reads and writes.
    let mut open = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    fs::remove_file(&f).unwrap();
    assert_eq!(errno(fs::metadata(&f)), libc::ENOENT);
    open.write_all(b"still here").unwrap();
    open.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    open.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still here");
    assert_eq!(open.metadata().unwrap().nlink(), 0);
    let held = site
        .overlay(SESSION, "sessions")
        .join("data")
        .join(open.metadata().unwrap().ino().to_string());
    assert!(held.exists());
    drop(open);
    // Closed, the kernel forgets the inode, and its bytes go with it.
    let t = std::time::Instant::now();
    while held.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!held.exists(), "{held:?} outlived its last reference");
    // Names over 255 bytes.
    let long = m.join("x".repeat(256));
    assert_eq!(errno(File::create(&long)), libc::ENAMETOOLONG);
    assert_eq!(errno(fs::create_dir(&long)), libc::ENAMETOOLONG);
    File::create(m.join("y".repeat(255))).unwrap();
}

#[test]
fn renames_links_and_directories_follow_posix() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &["--subdir", "workspace"]);
    let (a, b) = (m.join("a"), m.join("b"));
    fs::write(&a, b"A").unwrap();
    fs::write(&b, b"B").unwrap();
    // RENAME_NOREPLACE refuses, RENAME_EXCHANGE swaps, a plain rename replaces.
    assert_eq!(renameat2(&a, &b, libc::RENAME_NOREPLACE), libc::EEXIST);
    assert_eq!(renameat2(&a, &b, libc::RENAME_EXCHANGE), 0);
    assert_eq!(fs::read(&a).unwrap(), b"B");
    assert_eq!(fs::read(&b).unwrap(), b"A");
    fs::rename(&a, &b).unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"B");
    assert_eq!(errno(fs::metadata(&a)), libc::ENOENT);
    // Directories: rename with contents, over an empty one, not over a full one.
    let d = m.join("d");
    fs::create_dir_all(d.join("inner")).unwrap();
    fs::write(d.join("inner/f"), b"f").unwrap();
    let e = m.join("e");
    fs::create_dir(&e).unwrap();
    fs::rename(&d, &e).unwrap();
    assert_eq!(fs::read(e.join("inner/f")).unwrap(), b"f");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("x"), b"x").unwrap();
    assert_eq!(errno(fs::rename(&e, &d)), libc::ENOTEMPTY);
    assert_eq!(errno(fs::rename(&e, e.join("inner/below"))), libc::EINVAL);
    assert_eq!(errno(fs::remove_dir(&d)), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_file(&d)), libc::EISDIR);
    // A directory from the object moves too, and its files still read.
    fs::rename(m.join("many"), m.join("deeper")).unwrap();
    assert!(fs::read_dir(m.join("deeper")).unwrap().count() > 0);
    // Link counts: directories count their subdirectories.
    let nlink = fs::metadata(&e).unwrap().nlink();
    fs::create_dir(e.join("sub2")).unwrap();
    assert_eq!(fs::metadata(&e).unwrap().nlink(), nlink + 1);
    // Hard links share the inode and count.
    fs::hard_link(&b, m.join("b2")).unwrap();
    let (mb, mb2) = (
        fs::metadata(&b).unwrap(),
        fs::metadata(m.join("b2")).unwrap(),
    );
    assert_eq!((mb.ino(), mb.nlink()), (mb2.ino(), 2));
    fs::write(m.join("b2"), b"through the link").unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"through the link");
    assert_eq!(errno(fs::hard_link(&e, m.join("dirlink"))), libc::EPERM);
    // Symlinks anywhere are stored as given.
    for target in ["/etc/passwd", "../../../../outside", "dangling/nowhere"] {
        let l = m.join(format!("l{}", target.len()));
        std::os::unix::fs::symlink(target, &l).unwrap();
        assert_eq!(fs::read_link(&l).unwrap().to_str(), Some(target));
        assert!(fs::symlink_metadata(&l).unwrap().file_type().is_symlink());
    }
}

/// Directories are not opened (the mount has no opendir) and names keep
/// their readdir offsets: a listing that goes on while entries are removed
/// and added returns every entry that stayed exactly once, and seekdir
/// back to a telldir position resumes there.
#[test]
fn a_listing_changed_while_it_is_read_repeats_and_skips_nothing() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &["--subdir", "workspace"]);
    let d = m.join("big");
    fs::create_dir(&d).unwrap();
    let names: Vec<String> = (0..3000).map(|i| format!("entry-{i:05}")).collect();
    for n in &names {
        File::create(d.join(n)).unwrap();
    }
    // Warm: the kernel keeps this listing; the removals below drop it.
    assert_eq!(fs::read_dir(&d).unwrap().count(), names.len());
    let dir = cpath(&d);
    // SAFETY: `dir` is a valid C string; the stream is closed below.
    let stream = unsafe { libc::opendir(dir.as_ptr()) };
    assert!(!stream.is_null());
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    let read_one = || -> Option<(String, i64)> {
        // SAFETY: `stream` is open; the entry is read before the next call.
        let e = unsafe { libc::readdir(stream) };
        if e.is_null() {
            return None;
        }
        // SAFETY: readdir returned an entry with a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        // SAFETY: as above.
        let pos = unsafe { libc::telldir(stream) };
        Some((name.to_string_lossy().into_owned(), pos))
    };
    let mut mark = None;
    for i in 0..200 {
        let (name, pos) = read_one().unwrap();
        if i == 100 {
            mark = Some((name.clone(), pos));
        }
        *seen.entry(name).or_default() += 1;
    }
    // Remove 1,000 names, some already read, most not; add 100 new ones.
    let removed: std::collections::BTreeSet<String> = names.iter().step_by(3).cloned().collect();
    for n in &removed {
        fs::remove_file(d.join(n)).unwrap();
    }
    for i in 0..100 {
        File::create(d.join(format!("added-{i:03}"))).unwrap();
    }
    // Another listing from the start meanwhile, of the changed directory.
    assert_eq!(
        fs::read_dir(&d).unwrap().count(),
        names.len() - removed.len() + 100
    );
    while let Some((name, _)) = read_one() {
        *seen.entry(name).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "listed twice: {twice:?}");
    let missed: Vec<_> = names
        .iter()
        .filter(|n| !removed.contains(*n) && !seen.contains_key(*n))
        .collect();
    assert!(
        missed.is_empty(),
        "{} entries that stayed were skipped: {:?}",
        missed.len(),
        &missed[..missed.len().min(5)]
    );
    // seekdir to a telldir position: the listing goes on after that name.
    let (name, pos) = mark.unwrap();
    // SAFETY: `stream` is open and `pos` came from telldir on it.
    unsafe { libc::seekdir(stream, pos) };
    let after: Vec<String> = std::iter::from_fn(|| read_one().map(|(n, _)| n)).collect();
    assert!(!after.contains(&name), "{name} again after seekdir past it");
    assert!(
        after.len() > 100,
        "only {} entries after seekdir",
        after.len()
    );
    // SAFETY: `stream` came from opendir and is closed once.
    unsafe { libc::closedir(stream) };
    m.stop();
}

/// Listings come in name order (as far as a name's first five bytes go):
/// a walk of the tree (`find`, `grep -r`, `cp -r`) reads the files in the
/// session object's order, segment after segment.
#[test]
fn a_listing_comes_in_name_order() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &["--subdir", "workspace"]);
    let d = m.join("ordered");
    fs::create_dir(&d).unwrap();
    let mut names = vec![
        "mod10",
        "b",
        "Zed",
        "mod02",
        "x.rs",
        "a",
        "x-y",
        "mod1",
        "README.md",
        "x_z",
        ".hidden",
        "0",
        "node_modules",
        "Makefile",
    ];
    for n in &names {
        File::create(d.join(n)).unwrap();
    }
    names.sort_unstable();
    // Twice: from the mount, then from the kernel's copy of the listing.
    for _ in 0..2 {
        let listed: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(listed, names);
    }
    m.stop();
}

#[test]
fn attributes_xattrs_sync_and_locks_work() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &["--subdir", "workspace"]);
    let f = m.join("attrs");
    fs::write(&f, b"1234567").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(when)
        .unwrap();
    assert_eq!(fs::metadata(&f).unwrap().modified().unwrap(), when);
    assert_eq!(fs::metadata(&f).unwrap().blocks(), 8);
    // xattrs.
    xattr::set(&f, "user.color", b"blue").unwrap();
    assert_eq!(xattr::get(&f, "user.color").unwrap().unwrap(), b"blue");
    let names: Vec<_> = xattr::list(&f).unwrap().collect();
    assert_eq!(names, vec![std::ffi::OsString::from("user.color")]);
    xattr::remove(&f, "user.color").unwrap();
    assert_eq!(xattr::get(&f, "user.color").unwrap(), None);
    // fsync, fdatasync, statfs.
    let h = OpenOptions::new().write(true).open(&f).unwrap();
    h.write_all_at(b"x", 0).unwrap();
    h.sync_all().unwrap();
    h.sync_data().unwrap();
    let c = cpath(&m.path);
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is NUL-terminated; `st` is writable memory of the right type.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) }, 0);
    // SAFETY: statvfs returned 0 and filled it.
    let st = unsafe { st.assume_init() };
    assert!(st.f_blocks > 0 && st.f_namemax == 255);
    // flock and fcntl locks: a second open file description conflicts.
    let other = File::open(&f).unwrap();
    // SAFETY: plain fd arguments of files open for the whole block.
    unsafe {
        assert_eq!(libc::flock(h.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB), 0);
        assert_eq!(
            libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
        assert_eq!(libc::flock(h.as_raw_fd(), libc::LOCK_UN), 0);
    }
    // fallocate extends; mmap writes land in the file.
    // SAFETY: a plain fd of a file open for the call.
    assert_eq!(unsafe { libc::fallocate(h.as_raw_fd(), 0, 0, 1 << 16) }, 0);
    assert_eq!(fs::metadata(&f).unwrap().len(), 1 << 16);
    drop((h, other));
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import mmap,os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\nm=mmap.mmap(fd,4096)\n\
             m[10:15]=b'mmap!'\nm.flush()\nm.close()\nos.close(fd)",
        )
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&fs::read(&f).unwrap()[10..15], b"mmap!");
}

#[test]
fn changes_and_inode_numbers_survive_a_remount() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &[]);
    fs::write(m.join("workspace/kept.txt"), b"kept").unwrap();
    fs::remove_file(m.join("workspace/README.md")).unwrap();
    fs::rename(m.join("workspace/many"), m.join("workspace/moved")).unwrap();
    let ino = fs::metadata(m.join("workspace/kept.txt")).unwrap().ino();
    let ino_old = fs::metadata(m.join("workspace/big.bin")).unwrap().ino();
    m.stop();
    let m = site.mount(SESSION, &[]);
    assert_eq!(fs::read(m.join("workspace/kept.txt")).unwrap(), b"kept");
    assert_eq!(
        errno(fs::metadata(m.join("workspace/README.md"))),
        libc::ENOENT
    );
    assert!(m.join("workspace/moved").is_dir());
    assert_eq!(
        fs::metadata(m.join("workspace/kept.txt")).unwrap().ino(),
        ino
    );
    assert_eq!(
        fs::metadata(m.join("workspace/big.bin")).unwrap().ino(),
        ino_old
    );
}

#[test]
fn removed_files_leave_no_overlay_file_behind_even_after_a_kill_9() {
    let site = site_with_fixture();
    let data = site.overlay(SESSION, "sessions").join("data");
    let in_overlay = || fs::read_dir(&data).unwrap().count();
    let m = site.mount(SESSION, &[]);
    fs::write(m.join("workspace/kept.txt"), b"kept").unwrap();
    let before = in_overlay();
    let written = |round: u64| {
        let dir = m.join(format!("workspace/written{round}"));
        fs::create_dir(&dir).unwrap();
        for i in 0..300u64 {
            let bytes = sessionfs_tests::pattern(1 + i as usize * 37, round * 1000 + i);
            fs::write(dir.join(format!("f{i:03}")), bytes).unwrap();
        }
        assert_eq!(in_overlay(), before + 300);
        dir
    };
    // The files of an `rm -rf` go on the mount's removal thread, after
    // the answers: gone soon, all of them.
    fs::remove_dir_all(written(1)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while in_overlay() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        in_overlay(),
        before,
        "overlay files of removed inodes stayed"
    );
    // A kill -9 right after the answers may leave some queued; so may a
    // crash of any kind: the next open removes files no inode names.
    fs::remove_dir_all(written(2)).unwrap();
    m.kill9();
    fs::write(data.join("987654321"), b"a freed inode's bytes").unwrap();
    let m = site.mount(SESSION, &[]);
    assert_eq!(fs::read(m.join("workspace/kept.txt")).unwrap(), b"kept");
    assert_eq!(
        errno(fs::metadata(m.join("workspace/written2"))),
        libc::ENOENT
    );
    assert_eq!(
        in_overlay(),
        before,
        "the open left overlay files of freed inodes"
    );
    m.stop();
}

#[test]
fn a_read_only_mount_refuses_changes() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &["--read-only"]);
    assert!(m.join("workspace/README.md").exists());
    assert_eq!(errno(File::create(m.join("workspace/no"))), libc::EROFS);
    assert_eq!(
        errno(
            OpenOptions::new()
                .write(true)
                .open(m.join("workspace/README.md"))
        ),
        libc::EROFS
    );
}

#[test]
fn a_missing_mount_point_or_session_path_is_a_clear_error() {
    let site = Site::local();
    let out = site
        .command()
        .args(["mount", "a/b", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid session path"));
    let out = site
        .command()
        .args(["mount", "ok__ok__main", "/nonexistent/mnt"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("/nonexistent/mnt"), "{said}");
}

/// Safe defaults: a mistyped session name is an error naming the session
/// and the store (not an empty mount), `--create` starts a new session; a
/// mount point holding files is refused (they would be hidden) unless
/// `--allow-non-empty`.
#[test]
fn unknown_sessions_and_non_empty_mount_points_are_refused_unless_asked_for() {
    let site = site_with_fixture();
    let mnt = site.dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mount = |args: &[&str]| {
        site.command()
            .arg("mount")
            .args(args)
            .arg(&mnt)
            .arg("--daemon")
            .output()
            .unwrap()
    };
    let out = mount(&["tests__typo__main"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("session tests__typo__main not found in local:") && said.contains("--create"),
        "{said}"
    );
    assert!(!sessionfs_tests::mount::is_mounted(&mnt));

    let out = mount(&["tests__new__main", "--create"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(mnt.join("first.txt"), b"a new session").unwrap();
    site.run(&["umount", &mnt.display().to_string()]);
    // Now known here (its overlay holds the change): no --create needed.
    let out = mount(&["tests__new__main"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(mnt.join("first.txt")).unwrap(), b"a new session");
    site.run(&["umount", &mnt.display().to_string()]);

    fs::write(mnt.join("hidden.txt"), b"would be hidden").unwrap();
    let out = mount(&[SESSION]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("is not empty") && said.contains("--allow-non-empty"),
        "{said}"
    );
    let out = mount(&[SESSION, "--allow-non-empty"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!mnt.join("hidden.txt").exists());
    site.run(&["umount", &mnt.display().to_string()]);
    assert_eq!(
        fs::read(mnt.join("hidden.txt")).unwrap(),
        b"would be hidden"
    );
}

#[test]
fn a_host_without_dev_fuse_gets_a_message_saying_so() {
    // A private mount namespace whose /dev lacks fuse: what a container
    // started without --device /dev/fuse sees.
    let site = Site::local();
    let mnt = site.dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let cmd = format!(
        "mount -t tmpfs none /dev && exec {} mount ok__ok__main {}",
        sessionfs_tests::sessionfs_bin().display(),
        mnt.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &cmd])
        .envs(site.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("/dev/fuse does not exist"), "{said}");
}

#[test]
fn daemon_mode_returns_once_mounted_and_umount_ends_it() {
    let site = site_with_fixture();
    let mnt = site.dir.path().join("daemon-mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = site
        .command()
        .args(["mount", SESSION])
        .arg(&mnt)
        .arg("--daemon")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Live as soon as the command returned.
    assert!(mnt.join("workspace/README.md").exists());
    fs::write(mnt.join("workspace/after-daemon.txt"), b"kept").unwrap();
    // Mounting again on a mount point in use is refused.
    let again = site
        .command()
        .args(["mount", SESSION])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("is already a mount point"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let out = site.command().arg("umount").arg(&mnt).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sessionfs_tests::mount::is_mounted(&mnt));
    // The change survived the clean stop.
    let m = site.mount(SESSION, &["--read-only"]);
    assert_eq!(
        fs::read(m.join("workspace/after-daemon.txt")).unwrap(),
        b"kept"
    );
    // A background mount that fails (the overlay is held) says why, with
    // this run's lines only, not those the earlier run left in the log.
    let other = site.dir.path().join("daemon-mnt-2");
    fs::create_dir_all(&other).unwrap();
    let log = site.overlay(SESSION, "sessions").join("mount.log");
    let mut earlier = OpenOptions::new().append(true).open(&log).unwrap();
    earlier.write_all(b"a line of an earlier run\n").unwrap();
    drop(earlier);
    let out = site
        .command()
        .args(["mount", SESSION])
        .arg(&other)
        .arg("--daemon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("in use"), "{said}");
    assert!(
        !said.contains("an earlier run"),
        "an earlier run's lines: {said}"
    );
    m.stop();
}

#[test]
fn pending_changes_against_a_replaced_object_are_merged_onto_it() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &["--no-writeback"]);
    fs::write(m.join("workspace/pending.txt"), b"not written back").unwrap();
    m.stop();
    // Someone else replaces the object meanwhile.
    let other = site.dir.path().join("other");
    fs::create_dir_all(other.join("workspace")).unwrap();
    fs::write(other.join("workspace/theirs.txt"), b"theirs").unwrap();
    site.run(&["push", "--force", &other.display().to_string(), SESSION]);
    // The next mount opens on the version the change was made against and
    // moves onto the stored one: both sides, nothing stranded.
    let m = site.mount(SESSION, &["--follow-ms", "200"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while m.join("workspace/many").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "never moved onto the stored object"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(fs::read(m.join("workspace/theirs.txt")).unwrap(), b"theirs");
    assert_eq!(
        fs::read(m.join("workspace/pending.txt")).unwrap(),
        b"not written back"
    );
    site.run(&["flush", &m.path.display().to_string()]);
    m.stop();
    let got = site.run(&["cat", SESSION, "workspace/pending.txt"]);
    assert_eq!(got, b"not written back");
}

/// Mounts SESSION at a fresh directory, expecting a refusal; returns what was said.
fn refused_mount(site: &Site, dir: &str) -> String {
    let mnt = site.dir.path().join(dir);
    fs::create_dir_all(&mnt).unwrap();
    let out = site
        .command()
        .args(["mount", SESSION])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!sessionfs_tests::mount::is_mounted(&mnt));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_second_mount_of_the_same_overlay_is_refused() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &[]);
    fs::write(m.join("workspace/pending"), b"kept in the overlay").unwrap();
    let said = refused_mount(&site, "second");
    assert!(said.contains("in use by another process"), "{said}");
    // Also when the first mount opened an existing overlay and has written
    // nothing to it yet.
    let path = m.path.clone();
    m.stop();
    let m = site.mount_at(SESSION, &path, &["--no-writeback"]);
    let said = refused_mount(&site, "second");
    assert!(
        said.contains("in use by another process"),
        "after a remount: {said}"
    );
    assert_eq!(
        fs::read(m.join("workspace/pending")).unwrap(),
        b"kept in the overlay"
    );
}

/// Names that are not UTF-8 are refused with EILSEQ (a session's tarball
/// names are UTF-8 for every reader); POSIX ACLs are not supported
/// (EOPNOTSUPP, so `cp -a` and `rsync -A` fall back to modes); byte-range
/// locks hold between two processes.
#[test]
fn non_utf8_names_acls_and_byte_range_locks() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &[]);
    let w = m.join("workspace");
    let bad = w.join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt"));
    assert_eq!(errno(File::create(&bad)), libc::EILSEQ);
    assert_eq!(errno(fs::create_dir(&bad)), libc::EILSEQ);
    fs::write(w.join("plain.txt"), b"0123456789abcdef").unwrap();
    assert_eq!(errno(fs::rename(w.join("plain.txt"), &bad)), libc::EILSEQ);
    assert!(w.join("plain.txt").exists());

    let path = CString::new(w.join("plain.txt").as_os_str().as_bytes()).unwrap();
    // A valid ACL (version 2): user::rw-, group::r--, other::r--. (One
    // without entries would mean "remove the ACL".)
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x20, 4)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    let dir = CString::new(w.as_os_str().as_bytes()).unwrap();
    // (A default ACL belongs on a directory.)
    for (path, name) in [
        (&path, "system.posix_acl_access"),
        (&dir, "system.posix_acl_access"),
        (&dir, "system.posix_acl_default"),
    ] {
        let name = CString::new(name).unwrap();
        // SAFETY: both strings are NUL-terminated; the value is valid for its length.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                acl.as_ptr().cast(),
                acl.len(),
                0,
            )
        };
        assert_eq!(rc, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EOPNOTSUPP),
            "{name:?}"
        );
    }

    // Another process holds bytes 0..10 of the file.
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import fcntl, sys\n\
             f = open(sys.argv[1], 'r+')\n\
             fcntl.lockf(f, fcntl.LOCK_EX, 10, 0)\n\
             print('locked', flush=True)\n\
             sys.stdin.read()\n",
        )
        .arg(w.join("plain.txt"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(w.join("plain.txt"))
        .unwrap();
    let try_lock = |start: i64, len: i64| -> i32 {
        // SAFETY: an all-zero flock is valid; the fields are set below.
        let mut l: libc::flock = unsafe { std::mem::zeroed() };
        l.l_type = libc::F_WRLCK as i16;
        l.l_whence = libc::SEEK_SET as i16;
        l.l_start = start;
        l.l_len = len;
        // SAFETY: `f` is open for the call; `l` is a valid flock.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &l) };
        if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    };
    let held = try_lock(0, 10);
    assert!(
        held == libc::EAGAIN || held == libc::EACCES,
        "a range another process holds: errno {held}"
    );
    assert_eq!(try_lock(100, 10), 0, "a range nobody holds");
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    assert_eq!(try_lock(0, 10), 0, "the range once its holder exited");
    drop(f);
    m.stop();
}

/// `sessionfs sessions`: what the store holds, and what overlays here hold
/// that is not written back yet (also of a session only here so far, and of
/// one a running mount holds).
#[test]
fn sessions_lists_the_store_and_the_changes_pending_here() {
    let site = site_with_fixture();
    let m = site.mount("tests__local__only", &["--no-writeback"]);
    fs::write(m.join("pending.txt"), b"not written back").unwrap();
    let list: serde_json::Value =
        serde_json::from_slice(&site.run(&["sessions", "--json"])).unwrap();
    let rows = list.as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["sessionPath"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {list}"))
    };
    let pushed = row(SESSION);
    assert_eq!(pushed["inStore"], true);
    assert!(pushed["size"].as_u64().unwrap() > 0);
    assert!(pushed["lastModified"].as_str().unwrap().ends_with('Z'));
    let local = row("tests__local__only");
    assert_eq!(local["inStore"], false);
    assert_eq!(local["heldHere"], true);
    assert!(local["pendingChanges"].as_u64().unwrap() >= 1, "{local}");
    // A prefix narrows it; the table names both.
    let only: serde_json::Value =
        serde_json::from_slice(&site.run(&["sessions", "tests__local", "--json"])).unwrap();
    assert_eq!(only.as_array().unwrap().len(), 1, "{only}");
    let table = String::from_utf8(site.run(&["sessions"])).unwrap();
    assert!(
        table.contains(SESSION) && table.contains("(not in the store yet)"),
        "{table}"
    );
    m.stop();
}

/// A container's user (uid 1000) edits a session packed by root: refused
/// on the stored owners, allowed with `--uid 1000 --gid 1000`; the
/// write-back keeps the stored owners (root's), also for what it created.
#[test]
fn a_mount_shows_owners_as_asked_and_writes_back_the_stored_ones() {
    let site = Site::local();
    let src = site.dir.path().join("src");
    fs::create_dir_all(src.join("workspace")).unwrap();
    fs::write(src.join("workspace/a.txt"), b"root's\n").unwrap();
    site.push(&src, "tests__owners__main");
    // uid 1000 must reach the mount points inside the test's directory.
    fs::set_permissions(site.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let as_1000 = |script: &str| {
        Command::new("setpriv")
            .args(["--reuid", "1000", "--regid", "1000", "--clear-groups"])
            .args(["sh", "-c", script])
            .output()
            .unwrap()
    };
    // On the stored owners, uid 1000 may only read.
    let m = site.mount("tests__owners__main", &["--allow-other"]);
    let a = m.join("workspace/a.txt").display().to_string();
    let out = as_1000(&format!("echo more >> {a}"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.stop();

    let m = site.mount(
        "tests__owners__main",
        &[
            "--allow-other",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--umask",
            "002",
        ],
    );
    let w = m.join("workspace");
    let md = fs::metadata(w.join("a.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1000));
    let script = format!(
        "set -e; cd {}; echo more >> a.txt; echo new > new.txt; mkdir d; echo in > d/f; \
         chmod 600 new.txt; chown 1000:1000 a.txt; ! chown 0 a.txt 2>/dev/null",
        w.display()
    );
    let out = as_1000(&script);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(w.join("a.txt")).unwrap(), b"root's\nmore\n");
    site.run(&["flush", &m.path.display().to_string()]);
    m.stop();

    // The object: root's owners everywhere, the new modes, the new bytes.
    let listed: serde_json::Value =
        serde_json::from_slice(&site.run(&["ls", "--json", "tests__owners__main", "workspace"]))
            .unwrap();
    let by_path = |p: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == p)
            .unwrap_or_else(|| panic!("{p} not in {listed:#}"))
            .clone()
    };
    for p in ["workspace/a.txt", "workspace/new.txt", "workspace/d"] {
        let e = by_path(p);
        assert_eq!(
            (e["uid"].as_u64(), e["gid"].as_u64()),
            (Some(0), Some(0)),
            "{e}"
        );
    }
    assert_eq!(by_path("workspace/new.txt")["mode"], "0600");
    assert_eq!(
        site.run(&["cat", "tests__owners__main", "workspace/d/f"]),
        b"in\n"
    );
}

#[test]
fn a_warm_read_of_an_unchanged_file_sends_the_mount_no_request() {
    let site = site_with_fixture();
    let m = site.mount(SESSION, &[]);
    let file = first_file(&m.join("workspace")).expect("a file in the fixture");
    let counts = || requests(&m.path);
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let before = counts();
    let bytes = fs::read(&file).unwrap();
    let cold = counts();
    assert!(n(&cold, "read") > n(&before, "read"), "{before} → {cold}");
    let again = || {
        assert_eq!(fs::read(&file).unwrap(), bytes);
        fs::metadata(&file).unwrap();
        fs::read_dir(file.parent().unwrap()).unwrap().for_each(drop);
    };
    // Having read the file and listed its directory, the kernel holds
    // their atimes stale: the next full stat of each asks once; after
    // that nothing does.
    again();
    let warm = counts();
    for _ in 0..3 {
        again();
    }
    let after = counts();
    // Only the getxattr that asked for the counts.
    assert_eq!(
        n(&after, "total") - n(&warm, "total"),
        1,
        "{warm} → {after}"
    );
    assert_eq!(n(&after, "getxattr") - n(&warm, "getxattr"), 1);
}

/// The first non-empty regular file under `dir`, depth first.
fn first_file(dir: &Path) -> Option<std::path::PathBuf> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let meta = fs::symlink_metadata(&p).unwrap();
        if meta.is_file() && meta.len() > 0 {
            return Some(p);
        }
        if let Some(found) = meta.is_dir().then(|| first_file(&p)).flatten() {
            return Some(found);
        }
    }
    None
}

/// A file written in many pieces costs the mount one request per piece:
/// the kernel asks whether a file has capabilities at its first write only
/// (`FUSE_HANDLE_KILLPRIV_V2`), where it asked before every write, and a
/// file created is made by `MKNOD`, so its close sends no `RELEASE`. With
/// that, taking set-user-ID and set-group-ID away is the mount's: they go
/// as on a local disk, at a write or truncate by a user without
/// `CAP_FSETID` and at any change of owner; a write by root keeps them.
#[test]
fn writes_ask_once_for_capabilities_and_set_id_bits_go_as_on_a_local_disk() {
    let site = site_with_fixture();
    // uid 1000 must reach the mount point inside the test's directory.
    fs::set_permissions(site.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = site.mount(SESSION, &["--allow-other"]);
    let w = m.join("workspace");
    let counts = || requests(&m.path);
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    // Files created in a fresh mount before anything was opened: made by
    // MKNOD, closed without a request (a CREATE's handle sent a RELEASE).
    for name in ["first", "second", "third"] {
        fs::write(w.join(name), name).unwrap();
    }
    let made = counts();
    assert_eq!((n(&made, "mknod"), n(&made, "release")), (3, 0), "{made}");
    let before = counts();
    {
        let mut f = File::create(w.join("pieces")).unwrap();
        for i in 0..256u32 {
            f.write_all(&[i as u8; 4096]).unwrap();
        }
    }
    let after = counts();
    let delta = |k: &str| n(&after, k) - n(&before, k);
    assert_eq!(delta("write"), 256, "{before} → {after}");
    assert!(delta("getxattr") <= 2, "{before} → {after}");
    assert_eq!(delta("release"), 0, "{before} → {after}");
    assert_eq!(delta("mknod"), 1, "{before} → {after}");
    let data = fs::read(w.join("pieces")).unwrap();
    assert_eq!(data.len(), 256 * 4096);
    assert!(data
        .chunks(4096)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == i as u8)));

    let as_1000 = |script: &str| {
        let out = Command::new("setpriv")
            .args(["--reuid", "1000", "--regid", "1000", "--clear-groups"])
            .args(["sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mode = |name: &str| fs::metadata(w.join(name)).unwrap().mode() & 0o7777;
    let set = |name: &str, perm: u32| {
        fs::write(w.join(name), b"x").unwrap();
        fs::set_permissions(w.join(name), fs::Permissions::from_mode(perm)).unwrap();
        assert_eq!(mode(name), perm);
    };
    let at = |name: &str| w.join(name).display().to_string();
    // A write by uid 1000: both bits go; set-group-ID without group
    // execute stays (it marks locking, not a privilege).
    set("w1", 0o6777);
    set("w2", 0o2766);
    as_1000(&format!(
        "echo more >> {}; echo more >> {}",
        at("w1"),
        at("w2")
    ));
    assert_eq!((mode("w1"), mode("w2")), (0o777, 0o2766));
    // A truncate by uid 1000.
    set("t1", 0o6777);
    as_1000(&format!("truncate -s 0 {}", at("t1")));
    assert_eq!(mode("t1"), 0o777);
    // Root has CAP_FSETID: its writes and truncates keep them.
    set("r1", 0o6777);
    OpenOptions::new()
        .append(true)
        .open(w.join("r1"))
        .unwrap()
        .write_all(b"y")
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(w.join("r1"))
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(mode("r1"), 0o6777);
    // A change of owner takes them, even root's, as `chown(-1, -1)` does.
    set("c1", 0o6755);
    std::os::unix::fs::chown(w.join("c1"), Some(0), Some(0)).unwrap();
    assert_eq!(mode("c1"), 0o755);
    set("c2", 0o4755);
    std::os::unix::fs::chown(w.join("c2"), None, None).unwrap();
    assert_eq!(mode("c2"), 0o755);
    // What the mount shows is what it journaled: the same after a remount.
    m.stop();
    let m = site.mount(SESSION, &[]);
    let w = m.join("workspace");
    let mode = |name: &str| fs::metadata(w.join(name)).unwrap().mode() & 0o7777;
    assert_eq!(
        ["w1", "w2", "t1", "r1", "c1", "c2"].map(mode),
        [0o777, 0o2766, 0o777, 0o6777, 0o755, 0o755]
    );
    m.stop();
}
