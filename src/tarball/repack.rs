//! Planning an incremental repack: which parts of an old session object a
//! new version of the tree can keep as they are.
//!
//! A segment is raw deflate ended by a full flush, so its compressed bytes
//! are valid anywhere in a new deflate stream, and tar headers hold no
//! absolute offsets: a segment whose every entry is unchanged is valid
//! verbatim in the new object. The plan keeps such segments, in their old
//! order, and packs everything else afresh after them:
//!
//! `[gzip header][kept run][kept run]…[moved runs][fresh segments][TOC][trailer]`
//!
//! - An entry is *kept* when the new tree has the same path with the same
//!   header fields and the same bytes, and every segment it touches is
//!   clean. A segment is clean when every entry touching it is kept. Both
//!   are settled together (an entry spanning a dirty segment is re-emitted,
//!   which dirties its other segments) until nothing moves.
//! - Runs of consecutive clean segments of at least [`MIN_PART_SIZE`] are
//!   copied server-side; shorter runs are *moved*: their compressed bytes
//!   are re-sent after the long runs, without recompressing.
//! - Tar rules hold: each path once (kept and fresh are disjoint), a hard
//!   link after its target (a kept link whose target would end up after it
//!   is re-emitted).
//!
//! The CRC and size of the trailer are combined from the segments', so no
//! kept byte is read. What the plan leaves to its caller is moving bytes.

use std::collections::HashMap;
use std::ops::Range;

use super::toc::{Entry, Kind, Segment, Toc};
use super::writer::Prefix;
use crate::store::MIN_PART_SIZE;

/// How a new tree maps onto an old object.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Old object byte ranges copied server-side, in new-object order,
    /// right after the gzip header (the first starts at 0, header included,
    /// when it begins with the old object's first segment).
    pub copies: Vec<Range<u64>>,
    /// Old object byte ranges re-sent as they are, after the copies.
    pub moved: Vec<Range<u64>>,
    /// The kept segments and entries, at their new offsets.
    pub prefix: Prefix,
    /// Indices of the new entries to pack afresh, in order.
    pub fresh: Vec<usize>,
}

impl Plan {
    pub fn copied_bytes(&self) -> u64 {
        self.copies.iter().map(|r| r.end - r.start).sum()
    }

    pub fn moved_bytes(&self) -> u64 {
        self.moved.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether the gzip header is inside the first copy.
    pub fn header_copied(&self) -> bool {
        self.copies.first().is_some_and(|r| r.start == 0)
    }
}

/// Whether two entries would have the same header (offsets aside).
fn same_header(a: &Entry, b: &Entry) -> bool {
    a.p == b.p
        && a.t == b.t
        && a.s == b.s
        && a.m == b.m
        && a.u == b.u
        && a.g == b.g
        && a.mt == b.mt
        && a.mn == b.mn
        && a.lt() == b.lt()
        && a.dv() == b.dv()
        && a.x() == b.x()
}

/// End of an entry's bytes (headers, data, padding) in the tar stream.
fn entry_end(e: &Entry) -> u64 {
    let data = if e.t == Kind::File {
        e.s.div_ceil(512) * 512
    } else {
        0
    };
    e.data_offset + data
}

/// Plans the new object for `new` (the tree in the writer's order) over the
/// native object `old`. `same_bytes[i]` says that new entry `i` has no data
/// or exactly the data of the old entry at its path. Returns `None` when
/// nothing worth copying survives (the caller packs in full).
pub fn plan<E: AsRef<Entry>>(old: &Toc, new: &[E], same_bytes: &[bool]) -> Option<Plan> {
    let segs = &old.segments;
    if segs.is_empty() {
        return None;
    }
    let old_by_path: HashMap<&str, usize> = old
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (&*e.p, i))
        .collect();
    // For each old entry, the new entry that may keep it.
    let mut keeper: Vec<Option<usize>> = vec![None; old.entries.len()];
    for (j, e) in new.iter().map(AsRef::as_ref).enumerate() {
        if let Some(&i) = old_by_path.get(&*e.p) {
            if same_bytes[j] && same_header(&old.entries[i], e) {
                keeper[i] = Some(j);
            }
        }
    }
    let seg_of = |x: u64| segs.partition_point(|s| s.uo + s.ul <= x);
    let spans: Vec<Range<usize>> = old
        .entries
        .iter()
        .map(|e| seg_of(e.ho)..seg_of(entry_end(e).max(e.ho + 1) - 1) + 1)
        .collect();
    let mut dirty = vec![false; segs.len()];
    let mut runs: Vec<(Range<usize>, bool)>;
    loop {
        let mut moved_any = false;
        for (i, span) in spans.iter().enumerate() {
            let span = span.start.min(segs.len())..span.end.min(segs.len());
            if keeper[i].is_some() && dirty[span.clone()].iter().any(|d| *d) {
                keeper[i] = None;
            }
            if keeper[i].is_none() {
                for d in &mut dirty[span] {
                    moved_any |= !*d;
                    *d = true;
                }
            }
        }
        // Runs of clean segments; long ones copied, short ones moved.
        runs = Vec::new();
        let mut k = 0;
        while k < segs.len() {
            if dirty[k] {
                k += 1;
                continue;
            }
            let start = k;
            while k < segs.len() && !dirty[k] {
                k += 1;
            }
            let bytes = segs[k - 1].co + segs[k - 1].cl - segs[start].co;
            runs.push((start..k, bytes >= MIN_PART_SIZE));
        }
        // New position of each kept segment: copied runs first, then moved.
        let mut position = vec![usize::MAX; segs.len()];
        let mut next = 0;
        for copied in [true, false] {
            for (r, c) in &runs {
                if *c == copied {
                    for s in r.clone() {
                        position[s] = next;
                        next += 1;
                    }
                }
            }
        }
        // A kept hard link needs its target kept, and before it.
        for (i, e) in old.entries.iter().enumerate() {
            if e.t != Kind::HardLink || keeper[i].is_none() {
                continue;
            }
            let target = e.lt().and_then(|t| old_by_path.get(t)).copied();
            let fine = target.is_some_and(|t| {
                keeper[t].is_some()
                    && position[spans[t].start.min(segs.len() - 1)]
                        <= position[spans[i].start.min(segs.len() - 1)]
            });
            if !fine {
                keeper[i] = None;
                moved_any = true;
            }
        }
        if !moved_any {
            break;
        }
    }
    if !runs.iter().any(|(_, copied)| *copied) {
        return None;
    }

    let mut out = Plan::default();
    let mut new_segments: Vec<Segment> = Vec::new();
    let mut shift: HashMap<usize, (i128, i128)> = HashMap::new();
    let mut co = super::deflate::GZIP_HEADER.len() as u64;
    let mut uo = 0u64;
    for copied in [true, false] {
        for (r, c) in &runs {
            if *c != copied {
                continue;
            }
            let first = &segs[r.start];
            let last = &segs[r.end - 1];
            let mut range = first.co..last.co + last.cl;
            if copied && out.copies.is_empty() && r.start == 0 {
                range.start = 0;
            }
            if copied {
                out.copies.push(range);
            } else {
                out.moved.push(range);
            }
            for s in r.clone() {
                let old_s = &segs[s];
                shift.insert(
                    s,
                    (
                        i128::from(co) - i128::from(old_s.co),
                        i128::from(uo) - i128::from(old_s.uo),
                    ),
                );
                new_segments.push(Segment {
                    co,
                    uo,
                    ..old_s.clone()
                });
                co += old_s.cl;
                uo += old_s.ul;
            }
        }
    }
    let mut kept_entries: Vec<Entry> = Vec::new();
    let mut kept_new = vec![false; new.len()];
    for (i, e) in old.entries.iter().enumerate() {
        let Some(j) = keeper[i] else { continue };
        let Some(&(_, du)) = shift.get(&spans[i].start) else {
            continue;
        };
        kept_new[j] = true;
        let mut moved = e.clone();
        moved.ho = (i128::from(e.ho) + du) as u64;
        moved.data_offset = (i128::from(e.data_offset) + du) as u64;
        kept_entries.push(moved);
    }
    kept_entries.sort_by_key(|e| e.ho);
    out.prefix = Prefix {
        segments: new_segments,
        entries: kept_entries,
    };
    out.fresh = (0..new.len()).filter(|j| !kept_new[*j]).collect();
    Some(out)
}

/// How much of an object sits in short segments (the tails of earlier
/// write-backs): past a share of them, the next write-back packs in full.
/// The last segment of a file spanning several is short by design and does
/// not count.
pub fn fragmentation(toc: &Toc, segment_min: usize) -> f64 {
    let segs = &toc.segments;
    let total: u64 = segs.iter().map(|s| s.cl).sum();
    if total == 0 || segs.len() < 8 {
        return 0.0;
    }
    let seg_of = |x: u64| segs.partition_point(|s| s.uo + s.ul <= x);
    let mut ends_a_large_file = vec![false; segs.len()];
    for e in &toc.entries {
        let last = seg_of(entry_end(e).max(e.ho + 1) - 1);
        if last > seg_of(e.ho) && last < segs.len() {
            ends_a_large_file[last] = true;
        }
    }
    let short: u64 = segs
        .iter()
        .zip(&ends_a_large_file)
        .filter(|(s, tail)| (s.ul as usize) < segment_min / 4 && !**tail)
        .map(|(s, _)| s.cl)
        .sum();
    short as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tarball::toc::{Kind, Toc};

    fn entry(p: &str, t: Kind, s: u64, ho: u64) -> Entry {
        Entry {
            p: p.into(),
            t,
            s,
            m: 0o644,
            u: 0,
            g: 0,
            mt: 1,
            mn: 0,
            ho,
            data_offset: ho + 512,
            rare: None,
            sd: crate::tarball::toc::Sd::NONE,
        }
    }

    /// Ten files of 6 MiB of data, one per segment (segments 3 MiB of
    /// compressed bytes each, two per file).
    fn old_toc() -> Toc {
        let mut entries = Vec::new();
        let mut segments = Vec::new();
        let size = 6u64 << 20;
        let (mut co, mut uo) = (10u64, 0u64);
        for i in 0..10 {
            entries.push(entry(&format!("f{i}"), Kind::File, size, uo));
            let total = 512 + size;
            for half in 0..2 {
                let ul = if half == 0 {
                    total / 2
                } else {
                    total - total / 2
                };
                segments.push(Segment {
                    co,
                    cl: 3 << 20,
                    uo,
                    ul,
                    crc: 0,
                    d: "0".repeat(32),
                });
                co += 3 << 20;
                uo += ul;
            }
        }
        Toc {
            v: 1,
            segments,
            entries,
        }
    }

    #[test]
    fn one_changed_file_in_the_middle_splits_the_copy() {
        let old = old_toc();
        let mut new: Vec<Entry> = old.entries.clone();
        new[4].mt = 2;
        let same: Vec<bool> = (0..10).map(|i| i != 4).collect();
        let p = plan(&old, &new, &same).unwrap();
        assert_eq!(p.fresh, vec![4]);
        assert_eq!(p.copies.len(), 2);
        assert_eq!(
            p.copies[0].start, 0,
            "the first copy carries the gzip header"
        );
        assert!(p.moved.is_empty());
        assert_eq!(p.prefix.entries.len(), 9);
        // Contiguous and re-based: f5 now starts where f4 did.
        assert_eq!(&*p.prefix.entries[4].p, "f5");
        assert_eq!(p.prefix.entries[4].ho, old.entries[4].ho);
        let mut uo = 0;
        for s in &p.prefix.segments {
            assert_eq!(s.uo, uo);
            uo += s.ul;
        }
    }

    #[test]
    fn a_short_run_is_moved_and_nothing_left_means_no_plan() {
        let old = old_toc();
        let new = old.entries.clone();
        // Every other file changed: each clean run is one file (6 MiB).
        let same: Vec<bool> = (0..10).map(|i| i % 2 == 0).collect();
        let p = plan(&old, &new, &same).unwrap();
        assert_eq!(p.copies.len(), 5);
        assert_eq!(p.fresh, vec![1, 3, 5, 7, 9]);
        let none = vec![false; 10];
        assert!(plan(&old, &new, &none).is_none());
    }

    #[test]
    fn deleted_entries_leave_and_links_follow_their_targets() {
        let mut old = old_toc();
        let mut link = entry("l", Kind::HardLink, 0, old.entries[9].ho);
        link.set_lt(Some("f0".into()));
        // Squeeze the link into the last segment's space for the test.
        old.entries.push(link.clone());
        let mut new: Vec<Entry> = old.entries.clone();
        new.remove(0);
        let same = vec![true; new.len()];
        let p = plan(&old, &new, &same).unwrap();
        assert!(p
            .prefix
            .entries
            .iter()
            .all(|e| &*e.p != "f0" && &*e.p != "l"));
        assert!(p.fresh.contains(&(new.len() - 1)), "the link is re-emitted");
    }
}
