//! How many requests of each kind the kernel has sent a mounted session.
//!
//! Every request is a round trip that a local disk does not make (a thread
//! woken here, one woken in the caller): what a workload costs on a mount
//! is mostly how many it needs. `sessionfs status` shows the counts, and
//! the mount benchmark prints them beside each row, so a slow row says
//! which requests it paid for (a `GETATTR` per file after the kernel marked
//! the atimes stale, a `GETXATTR` per new file) instead of leaving it to a
//! guess.
//!
//! One relaxed atomic add per request; read by the control xattr
//! `user.sessionfs.requests` of the mount's root as a JSON object of the
//! kinds seen, by name, and their `total`. `forget` is not counted: the
//! kernel waits for no answer to it.

use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of request counted, each with the name shown (the kernel's
/// opcode, lower case), in one table: the enum, [`KINDS`] and
/// [`Kind::name`] come from it.
macro_rules! kinds {
    ($($kind:ident => $name:literal,)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kind {
            $($kind,)*
        }

        /// Every kind, in the enum's order (a kind is its own index).
        const KINDS: &[Kind] = &[$(Kind::$kind,)*];

        impl Kind {
            /// The name shown: the kernel's opcode, lower case.
            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$kind => $name,)*
                }
            }
        }
    };
}

kinds! {
    Lookup => "lookup",
    Getattr => "getattr",
    Setattr => "setattr",
    Readlink => "readlink",
    Mknod => "mknod",
    Mkdir => "mkdir",
    Unlink => "unlink",
    Rmdir => "rmdir",
    Symlink => "symlink",
    Rename => "rename",
    Link => "link",
    Open => "open",
    Read => "read",
    Write => "write",
    Flush => "flush",
    Release => "release",
    Fsync => "fsync",
    Opendir => "opendir",
    Readdir => "readdir",
    Readdirplus => "readdirplus",
    Releasedir => "releasedir",
    Fsyncdir => "fsyncdir",
    Statfs => "statfs",
    Setxattr => "setxattr",
    Getxattr => "getxattr",
    Listxattr => "listxattr",
    Removexattr => "removexattr",
    Access => "access",
    Create => "create",
    Ioctl => "ioctl",
    Lseek => "lseek",
    CopyFileRange => "copy_file_range",
    Fallocate => "fallocate",
}

/// The counts of one mounted session.
pub struct Requests {
    counts: [AtomicU64; KINDS.len()],
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Requests {
    pub fn count(&self, kind: Kind) {
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `{"total": N, "getattr": n, …}`: the kinds seen so far, most first.
    pub fn to_json(&self) -> String {
        let mut seen: Vec<(Kind, u64)> = KINDS
            .iter()
            .map(|&k| (k, self.counts[k as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        seen.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        let total: u64 = seen.iter().map(|&(_, n)| n).sum();
        let mut out = format!("{{\"total\":{total}");
        for (k, n) in seen {
            out.push_str(&format!(",\"{}\":{n}", k.name()));
        }
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_at_its_own_place() {
        for (i, k) in KINDS.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
        let names: std::collections::HashSet<_> = KINDS.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), KINDS.len());
    }

    #[test]
    fn counts_show_the_kinds_seen_most_first_with_their_total() {
        let r = Requests::default();
        assert_eq!(r.to_json(), r#"{"total":0}"#);
        r.count(Kind::Read);
        for _ in 0..3 {
            r.count(Kind::Getattr);
        }
        r.count(Kind::CopyFileRange);
        let v: std::collections::BTreeMap<String, u64> =
            serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["total"], 5);
        assert_eq!(v["getattr"], 3);
        assert_eq!(v["read"], 1);
        assert_eq!(v["copy_file_range"], 1);
        assert_eq!(v.len(), 4);
        assert!(r.to_json().starts_with(r#"{"total":5,"getattr":3,"#));
    }
}
