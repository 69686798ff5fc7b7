//! `sessionfs serve --mount-root`: every session of the bucket (the S3
//! server) under one directory. Sessions are listed and opened on demand, a
//! new directory is a new session, and a session goes only when removal was
//! allowed at start.

use std::fs;

use sessionfs_tests::mount::Site;

fn session(name: &str) -> String {
    format!("tests__{name}{:08x}__main", rand::random::<u32>())
}

#[test]
fn every_session_of_the_bucket_is_a_directory_of_the_root() {
    let site = Site::s3();
    let src = site.dir.path().join("src");
    fs::create_dir_all(src.join("workspace")).unwrap();
    fs::write(src.join("workspace/a.txt"), b"from the object").unwrap();
    let (one, two) = (session("rootone"), session("roottwo"));
    site.push(&src, &one);
    site.push(&src, &two);

    let m = site.serve_root(&[]);
    let listed: Vec<String> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(listed.contains(&one) && listed.contains(&two), "{listed:?}");
    assert_eq!(
        fs::read(m.join(&one).join("workspace/a.txt")).unwrap(),
        b"from the object"
    );
    // Sessions are separate: a write in one is not in the other; no rename across.
    fs::write(m.join(&two).join("workspace/a.txt"), b"changed in two").unwrap();
    assert_eq!(
        fs::read(m.join(&one).join("workspace/a.txt")).unwrap(),
        b"from the object"
    );
    let cross = fs::rename(
        m.join(&two).join("workspace/a.txt"),
        m.join(&one).join("workspace/moved.txt"),
    );
    assert_eq!(cross.unwrap_err().raw_os_error(), Some(libc::EXDEV));
    // Distinct inode numbers per session.
    use std::os::unix::fs::MetadataExt;
    let (i1, i2) = (
        fs::metadata(m.join(&one)).unwrap().ino(),
        fs::metadata(m.join(&two)).unwrap().ino(),
    );
    assert_ne!(i1, i2);

    // A new directory is a new session; files go in at once.
    let fresh = session("rootnew");
    fs::create_dir(m.join(&fresh)).unwrap();
    fs::create_dir(m.join(&fresh).join("workspace")).unwrap();
    fs::write(m.join(&fresh).join("workspace/new.txt"), b"new session").unwrap();
    assert!(fs::read_dir(&m.path)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_str() == Some(fresh.as_str())));
    // Invalid session names and plain files are refused in the root.
    // (A name in the root itself: `not a/valid` would fail in any
    // filesystem, for its missing parent.)
    use std::os::unix::ffi::OsStrExt;
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
    for bad in [
        std::ffi::OsStr::new("back\\slash"),
        std::ffi::OsStr::new("tab\there"),
        latin1,
    ] {
        assert_eq!(
            fs::create_dir(m.path.join(bad)).unwrap_err().raw_os_error(),
            Some(libc::EINVAL),
            "mkdir {bad:?} in the root"
        );
    }
    assert_eq!(
        fs::write(m.join("file-in-root"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    // Removing a session needs the flag.
    assert_eq!(
        fs::remove_dir(m.join(&one)).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    m.stop();

    // Restarted: the new session's overlay is still there; with the flag a session goes.
    let m = site.serve_root(&["--allow-delete-sessions"]);
    assert_eq!(
        fs::read(m.join(&fresh).join("workspace/new.txt")).unwrap(),
        b"new session"
    );
    assert_eq!(
        fs::read(m.join(&two).join("workspace/a.txt")).unwrap(),
        b"changed in two"
    );
    fs::remove_dir(m.join(&one)).unwrap();
    assert!(!m.join(&one).exists());
    let out = site.command().args(["ls", &one]).output().unwrap();
    assert!(
        !out.status.success(),
        "the object of a removed session is gone"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("session {one} not found in")),
        "ls of a removed session says why: {said}"
    );
}

#[test]
fn a_root_of_more_sessions_than_one_listing_page_lists_each_once() {
    // More sessions than one page of a listing (1,000): the root is listed
    // by common prefix and read by the kernel in many readdir calls.
    let site = sessionfs_tests::mount::Site::local();
    let src = site.dir.path().join("src");
    fs::create_dir_all(src.join("workspace")).unwrap();
    fs::write(src.join("workspace/a.txt"), b"one of many").unwrap();
    site.push(&src, "many__s0000__main");
    let bucket = site.dir.path().join("store/sessions");
    let object = bucket.join("many__s0000__main/session.tar.gz");
    let mut expected = vec!["many__s0000__main".to_owned()];
    for i in 1..1200 {
        let name = format!("many__s{i:04}__main");
        fs::create_dir_all(bucket.join(&name)).unwrap();
        fs::copy(&object, bucket.join(&name).join("session.tar.gz")).unwrap();
        expected.push(name);
    }
    // A directory holding no object is no session.
    fs::create_dir_all(bucket.join("empty__left__behind")).unwrap();

    let m = site.serve_root(&[]);
    let mut listed: Vec<String> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed.len(), expected.len());
    assert_eq!(listed, expected);
    assert_eq!(
        fs::read(m.join("many__s1150__main").join("workspace/a.txt")).unwrap(),
        b"one of many"
    );
    assert!(!m.join("empty__left__behind").exists());
}
