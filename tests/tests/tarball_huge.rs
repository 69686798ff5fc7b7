//! Entries of 8 GiB and more: past what the ustar size field holds, so the
//! writer switches to a PAX `size` record plus a base-256 size. The file is
//! sparse on disk (its holes compress about 1000:1), so the test stays cheap
//! while every layer sees a real 8 GiB entry: the packer, the TOC, the
//! lazy reader, and Python's streaming `tarfile`, which reads the whole entry.

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use sessionfs_core::store::local::LocalStore;
use sessionfs_core::store::{ObjectStore, PutOptions};
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::writer::{pack_dir, PackOptions};

const SIZE: u64 = (8 << 30) + 4113;
const MARKS: [(u64, &[u8]); 3] = [
    (0, b"first bytes"),
    (4 << 30, b"in the middle, past 4 GiB"),
    (SIZE - 17, b"the last 17 bytes"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_over_8_gib_packs_reads_and_extracts() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    let mut f = std::fs::File::create(src.join("workspace/huge.bin")).unwrap();
    for (at, mark) in MARKS {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(mark).unwrap();
    }
    f.set_len(SIZE).unwrap();
    drop(f);
    std::fs::write(
        src.join("workspace/after.txt"),
        b"an entry after the huge one\n",
    )
    .unwrap();

    let object = dir.path().join("session.tar.gz");
    let out = std::io::BufWriter::new(std::fs::File::create(&object).unwrap());
    let stats = pack_dir(&src, out, &PackOptions::default(), &|_| {}).unwrap();
    assert!(stats.tar_size > SIZE);

    // The lazy reader: size from the TOC, marks read without inflating the rest.
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(dir.path().join("store"), "sessions").unwrap());
    let key = "huge/session.tar.gz";
    store
        .put(
            key,
            Bytes::from(std::fs::read(&object).unwrap()),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let r = SessionReader::open(store, key, None).await.unwrap();
    assert_eq!(r.stat("workspace/huge.bin").unwrap().s, SIZE);
    for (at, mark) in MARKS {
        let got = r
            .read("workspace/huge.bin", at, mark.len() as u64)
            .await
            .unwrap();
        assert_eq!(&got[..], mark, "at {at}");
    }
    let zeros = r
        .read("workspace/huge.bin", (6 << 30) - 3, 1 << 20)
        .await
        .unwrap();
    assert!(zeros.len() == 1 << 20 && zeros.iter().all(|&b| b == 0));
    assert_eq!(
        &r.read_all("workspace/after.txt").await.unwrap()[..],
        b"an entry after the huge one\n"
    );

    // A streaming reader of the whole object agrees on the size and the bytes.
    let marks = format!(
        "[{}]",
        MARKS
            .iter()
            .map(|(at, m)| format!("({at}, b{:?})", std::str::from_utf8(m).unwrap()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let script = format!(
        r#"
import sys, tarfile
marks = {marks}
with tarfile.open(sys.argv[1], "r|gz") as t:
    seen = []
    for m in t:
        seen.append(m.name)
        if m.name.endswith("huge.bin"):
            assert m.size == {SIZE}, m.size
            f = t.extractfile(m)
            pos = 0
            while True:
                block = f.read(8 << 20)
                if not block:
                    break
                for at, mark in marks:
                    if pos <= at < pos + len(block):
                        assert block[at - pos:at - pos + len(mark)] == mark, (at, mark)
                pos += len(block)
            assert pos == {SIZE}, pos
        if m.name.endswith("after.txt"):
            assert t.extractfile(m).read() == b"an entry after the huge one\n"
assert any(n.endswith("after.txt") for n in seen), seen
print("ok")
"#
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(&object)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python tarfile: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
