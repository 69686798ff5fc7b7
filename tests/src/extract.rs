//! Every reader other services use, run on one session object: GNU tar,
//! bsdtar, Python `tarfile` in streaming mode (`'r|gz'`) and Node's npm
//! `tar` package, from a file and from a stream. Each extracts into a
//! directory of its own and the trees are returned for comparison.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::trees::{snapshot, Node};

fn run(cmd: &mut Command, who: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{who}: {e}"));
    assert!(
        out.status.success(),
        "{who} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tree each reader extracts from `object`, by reader.
pub fn every_reader(object: &Path, scratch: &Path) -> Vec<(&'static str, BTreeMap<String, Node>)> {
    let node_script = node_tar_script();
    let mut out = Vec::new();
    let command = |who: &str, dest: &Path| {
        let mut c;
        match who {
            "GNU tar" | "bsdtar" => {
                c = Command::new(if who == "bsdtar" { "bsdtar" } else { "tar" });
                c.arg("-xzf").arg(object).arg("-C").arg(dest);
            }
            "python tarfile r|gz" => {
                c = Command::new("python3");
                c.arg("-c")
                    .arg(
                        "import sys, tarfile\n\
                         with tarfile.open(sys.argv[1], 'r|gz') as t:\n    \
                         t.extractall(sys.argv[2], filter='tar')",
                    )
                    .arg(object)
                    .arg(dest);
            }
            "node tar" | "node tar stream" => {
                c = Command::new("node");
                c.arg(&node_script)
                    .arg(if who == "node tar" {
                        "extract"
                    } else {
                        "extract-stream"
                    })
                    .arg(object)
                    .arg(dest);
            }
            _ => unreachable!("{who}"),
        }
        c
    };
    let readers = [
        "GNU tar",
        "bsdtar",
        "python tarfile r|gz",
        "node tar",
        "node tar stream",
    ];
    for who in readers {
        let dest = scratch.join(who.replace([' ', '|'], "-"));
        std::fs::create_dir_all(&dest).expect("extraction directory");
        run(&mut command(who, &dest), who);
        out.push((who, snapshot(&dest)));
    }
    run(Command::new("gzip").arg("-t").arg(object), "gzip -t");
    out
}

/// tests/scripts/node-tar.js: the npm `tar` package, both ways.
pub fn node_tar_script() -> std::path::PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/node-tar.js");
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/node/node_modules/tar");
    assert!(
        package.exists(),
        "the npm tar package is missing: scripts/test.sh installs it into .tools/node"
    );
    script
}
