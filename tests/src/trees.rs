//! Fixture trees and their comparison: what a session holds, built on disk,
//! and a snapshot (names, types, modes, link targets, contents) that two
//! extractions of it must share.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use crate::pattern;

/// One node of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File { mode: u32, content: Vec<u8> },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// Builds a tree with what sessions hold and what trips tar implementations
/// up: nested and empty directories, empty files, modes, UTF-8 and long names,
/// long link targets, symlinks to files and directories, hard links, a file
/// spanning several segments and enough small files for several segments.
pub fn make_fixture(root: &Path) {
    let w = root.join("workspace");
    let mkdir = |p: &Path| fs::create_dir_all(p).unwrap();
    let write = |p: &Path, data: &[u8]| {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    };
    let chmod =
        |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();

    write(
        &root.join(".session-metadata.json"),
        br#"{"sessionPath":"o__r__main"}"#,
    );
    write(
        &root.join(".stream-events.jsonl"),
        b"{\"e\":1}\n{\"e\":2}\n",
    );
    write(&w.join("src/main.rs"), b"fn main() { println!(\"hi\"); }\n");
    write(&w.join("README.md"), b"# fixture\n");
    write(&w.join("empty.txt"), b"");
    mkdir(&w.join("emptydir"));
    write(&w.join("run.sh"), b"#!/bin/sh\necho run\n");
    chmod(&w.join("run.sh"), 0o755);
    write(&w.join("secret.key"), b"private");
    chmod(&w.join("secret.key"), 0o600);
    write(
        &w.join("ünïcødé dir/日本語 ファイル.txt"),
        "こんにちは".as_bytes(),
    );
    let deep = w
        .join("a".repeat(60))
        .join("b".repeat(60))
        .join("c".repeat(60));
    write(&deep.join(format!("{}.txt", "n".repeat(200))), b"long path");
    symlink("src/main.rs", w.join("link-to-file")).unwrap();
    symlink("src", w.join("link-to-dir")).unwrap();
    let long_target = format!("{}main.rs", "src/../".repeat(20) + "src/");
    symlink(&long_target, w.join("long-link")).unwrap();
    write(&w.join("hard-a.txt"), b"shared by two names");
    fs::hard_link(w.join("hard-a.txt"), w.join("hard-b.txt")).unwrap();
    write(&w.join("big.bin"), &pattern(3 * 1024 * 1024 + 123, 42));
    for i in 0..300 {
        let text = format!("// file {i}\n{}", "let x = 1;\n".repeat(i % 50 + 1));
        write(&w.join(format!("many/mod_{i:03}.rs")), text.as_bytes());
    }
}

/// The tree under `root`, leaving out sessionfs's own `.sessionfs/`.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel == ".sessionfs" {
            continue;
        }
        let md = fs::symlink_metadata(&path).unwrap();
        let mode = md.permissions().mode() & 0o7777;
        if md.file_type().is_symlink() {
            let target = fs::read_link(&path).unwrap().to_string_lossy().into_owned();
            out.insert(rel, Node::Symlink { target });
        } else if md.is_dir() {
            out.insert(rel, Node::Dir { mode });
            walk(root, &path, out);
        } else {
            out.insert(
                rel,
                Node::File {
                    mode,
                    content: fs::read(&path).unwrap(),
                },
            );
        }
    }
}

/// Asserts two snapshots are equal, naming the first difference.
pub fn assert_same_tree(
    expected: &BTreeMap<String, Node>,
    got: &BTreeMap<String, Node>,
    who: &str,
) {
    for (path, node) in expected {
        match got.get(path) {
            None => panic!("{who}: {path} is missing"),
            Some(other) if other != node => {
                let describe = |n: &Node| match n {
                    Node::File { mode, content } => {
                        format!("file {mode:o}, {} bytes", content.len())
                    }
                    other => format!("{other:?}"),
                };
                panic!(
                    "{who}: {path} differs: expected {}, got {}",
                    describe(node),
                    describe(other)
                )
            }
            _ => {}
        }
    }
    for path in got.keys() {
        assert!(expected.contains_key(path), "{who}: unexpected {path}");
    }
}
