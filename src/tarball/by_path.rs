//! Finding a TOC entry by its path without a second copy of every path.
//!
//! A `HashMap<String, usize>` beside the entries would hold each path twice
//! (about 50 bytes more per entry: 10 MB for a 200,000-entry session). This
//! table holds only entry numbers and hashes the paths where they already
//! are, in the entries. When two entries share a path, the later one is
//! found, as when extracting.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use super::toc::Entry;

pub struct ByPath {
    table: HashTable<u32>,
    hasher: RandomState,
    /// Some path names more than one entry.
    repeated: bool,
}

impl ByPath {
    pub fn new(entries: &[Entry]) -> ByPath {
        let hasher = RandomState::new();
        let mut table = HashTable::with_capacity(entries.len());
        let hash = |i: &u32| hasher.hash_one(path_of(entries, *i));
        let mut repeated = false;
        for (i, e) in entries.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { break };
            let h = hasher.hash_one(&*e.p);
            match table.find_mut(h, |&j| path_of(entries, j) == &*e.p) {
                Some(slot) => {
                    *slot = i;
                    repeated = true;
                }
                None => {
                    table.insert_unique(h, i, hash);
                }
            }
        }
        ByPath {
            table,
            hasher,
            repeated,
        }
    }

    pub fn repeated(&self) -> bool {
        self.repeated
    }

    /// The number of the entry at `path` in `entries` (the same slice this
    /// index was made from).
    pub fn get(&self, entries: &[Entry], path: &str) -> Option<usize> {
        let h = self.hasher.hash_one(path);
        self.table
            .find(h, |&i| path_of(entries, i) == path)
            .map(|&i| i as usize)
    }
}

fn path_of(entries: &[Entry], i: u32) -> &str {
    entries.get(i as usize).map_or("", |e| &*e.p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tarball::toc::Kind;

    fn entry(p: &str, s: u64) -> Entry {
        Entry {
            p: p.into(),
            t: Kind::File,
            s,
            m: 0o644,
            u: 0,
            g: 0,
            mt: 0,
            mn: 0,
            ho: 0,
            data_offset: 0,
            rare: None,
            sd: crate::tarball::toc::Sd::NONE,
        }
    }

    #[test]
    fn finds_every_path_and_the_last_of_a_repeated_one() {
        let mut entries: Vec<Entry> = (0..5000).map(|i| entry(&format!("d/f{i}"), i)).collect();
        entries.push(entry("d/f7", 99));
        let index = ByPath::new(&entries);
        for i in 0..5000u64 {
            let at = index.get(&entries, &format!("d/f{i}")).unwrap();
            assert_eq!(entries[at].s, if i == 7 { 99 } else { i });
        }
        assert!(index.repeated());
        assert!(!ByPath::new(&entries[..5000]).repeated());
        assert_eq!(index.get(&entries, "d/f5000"), None);
        assert_eq!(index.get(&entries, "d"), None);
        assert_eq!(index.get(&[], "d/f1"), None);
    }
}
