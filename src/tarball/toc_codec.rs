//! The TOC as it is stored: JSON (zlib-compressed by the writer), in the
//! form its version says.
//!
//! Version 1 wrote each entry's fields as they are. Most of its bytes were
//! numbers zlib cannot predict although the entry before says them: header
//! and data offsets, inode numbers, ctimes equal to mtimes. Version 2 (what
//! the writer writes now) codes each entry against the one before it:
//! - `p` without the bytes it shares with the previous path; `k` says how
//!   many (always a character boundary);
//! - `mt`, `mn`: the difference from the previous entry's;
//! - `ho`: the difference from where the previous entry's data ended,
//!   padded to a block (0 for entries packed back to back);
//! - `do`: data offset minus header offset minus one block (0 unless a long
//!   name or PAX header comes first);
//! - `sd.i`: the difference from the previous entry's inode number (or from
//!   0); `sd.cs`, `sd.cn`: the difference from this entry's `mt`, `mn`.
//!
//! Differences are wrapping, so every value round-trips; zeros are left
//! out. On 3,330 source files this takes the compressed TOC from 25.8 to
//! about 8 bytes an entry. The coding lives only here: everything else sees
//! plain [`Entry`] values, and a version-1 TOC still reads.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::sparse::SparseMap;
use super::toc::{Entry, Kind, Rare, Segment, StatData, Toc};

/// The oldest TOC version read.
pub const OLDEST_VERSION: u32 = 1;
/// The newest version, written unless [`set_written_version`] says otherwise.
pub const VERSION: u32 = 2;

static WRITTEN: AtomicU32 = AtomicU32::new(VERSION);

/// Makes the process write objects of `version` (`--format-version`):
/// version 1 while hosts whose sessionfs reads only version 1 share the
/// sessions.
pub fn set_written_version(version: u32) -> Result<(), String> {
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(format!(
            "format version {version}: this sessionfs writes {OLDEST_VERSION} to {VERSION}"
        ));
    }
    WRITTEN.store(version, Ordering::Relaxed);
    Ok(())
}

/// The version objects are written in.
pub fn written_version() -> u32 {
    WRITTEN.load(Ordering::Relaxed)
}

/// Writes `toc` as JSON of its version (`toc.v`, 1 or 2).
pub fn write(w: impl std::io::Write, toc: &Toc) -> serde_json::Result<()> {
    match toc.v {
        1 => serde_json::to_writer(w, toc),
        _ => serde_json::to_writer(
            w,
            &TocOut {
                v: VERSION,
                segments: &toc.segments,
                entries: EntriesOut(&toc.entries),
            },
        ),
    }
}

/// Reads a TOC of `version` (as its locator says) from JSON.
pub fn read(raw: &[u8], version: u32) -> Result<Toc, String> {
    match version {
        1 => serde_json::from_slice(raw).map_err(|e| e.to_string()),
        2 => {
            let t: TocIn = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
            Ok(Toc {
                v: t.v,
                segments: t.segments,
                entries: t.entries.0,
            })
        }
        v => Err(format!("version {v}")),
    }
}

#[derive(Serialize)]
struct TocOut<'a> {
    v: u32,
    segments: &'a [Segment],
    entries: EntriesOut<'a>,
}

#[derive(Deserialize)]
struct TocIn {
    v: u32,
    segments: Vec<Segment>,
    entries: EntriesIn,
}

/// One entry as version 2 stores it.
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    p: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    k: usize,
    t: Kind,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    s: u64,
    m: u32,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    u: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    g: u64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    mt: i64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    mn: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lt: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dv: Option<(u32, u32)>,
    #[serde(default, skip_serializing_if = "is_empty_map")]
    x: Cow<'a, BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    ho: i64,
    #[serde(rename = "do", default, skip_serializing_if = "is_zero_i64")]
    data_offset: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sp: Option<Cow<'a, SparseMap>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sd: Option<WireStat>,
}

#[derive(Serialize, Deserialize)]
struct WireStat {
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    i: i64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    cs: i64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    cn: i64,
}

fn is_zero_usize(n: &usize) -> bool {
    *n == 0
}
fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}
fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}
fn is_empty_map(m: &BTreeMap<String, String>) -> bool {
    m.is_empty()
}

/// What the previous entry says of the next.
#[derive(Default)]
struct Before {
    mt: i64,
    mn: u32,
    /// Where the previous entry's data ended, padded to a block.
    end: u64,
    ino: u64,
}

impl Before {
    fn step(&mut self, e: &Entry) {
        self.mt = e.mt;
        self.mn = e.mn;
        let stored = if e.t == Kind::File { e.s } else { 0 };
        self.end = e.data_offset.wrapping_add(stored.wrapping_add(511) & !511);
        if let Some(sd) = e.sd.get() {
            self.ino = sd.i;
        }
    }

    fn encode<'a>(&mut self, e: &'a Entry, prev_path: &str) -> Wire<'a> {
        let mut k =
            e.p.bytes()
                .zip(prev_path.bytes())
                .take_while(|(a, b)| a == b)
                .count();
        while !e.p.is_char_boundary(k) {
            k -= 1;
        }
        let w = Wire {
            p: Cow::Borrowed(&e.p[k..]),
            k,
            t: e.t,
            s: e.s,
            m: e.m,
            u: e.u,
            g: e.g,
            mt: e.mt.wrapping_sub(self.mt),
            mn: i64::from(e.mn) - i64::from(self.mn),
            lt: e.lt().map(Cow::Borrowed),
            dv: e.dv(),
            x: Cow::Borrowed(e.x()),
            ho: e.ho.wrapping_sub(self.end) as i64,
            data_offset: e.data_offset.wrapping_sub(e.ho).wrapping_sub(512) as i64,
            sp: e.sp().map(Cow::Borrowed),
            sd: e.sd.get().map(|sd| WireStat {
                i: sd.i.wrapping_sub(self.ino) as i64,
                cs: sd.cs.wrapping_sub(e.mt),
                cn: i64::from(sd.cn) - i64::from(e.mn),
            }),
        };
        self.step(e);
        w
    }

    fn decode(&mut self, w: Wire<'_>, prev_path: &str) -> Result<Entry, String> {
        let shared = prev_path
            .get(..w.k)
            .ok_or_else(|| format!("entry shares {} bytes of a shorter path", w.k))?;
        let mut p = String::with_capacity(w.k + w.p.len());
        p.push_str(shared);
        p.push_str(&w.p);
        let nanos = |base: u32, d: i64| {
            i64::from(base)
                .checked_add(d)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("{p:?}: nanoseconds out of range"))
        };
        let mt = self.mt.wrapping_add(w.mt);
        let mn = nanos(self.mn, w.mn)?;
        let ho = self.end.wrapping_add(w.ho as u64);
        let sd = match w.sd {
            Some(sd) => Some(StatData {
                i: self.ino.wrapping_add(sd.i as u64),
                cs: mt.wrapping_add(sd.cs),
                cn: nanos(mn, sd.cn)?,
            }),
            None => None,
        };
        let e = Entry {
            t: w.t,
            s: w.s,
            m: w.m,
            u: w.u,
            g: w.g,
            mt,
            mn,

            ho,
            data_offset: ho.wrapping_add(512).wrapping_add(w.data_offset as u64),
            rare: Rare {
                lt: w.lt.map(Cow::into_owned),
                dv: w.dv,
                x: w.x.into_owned(),
                sp: w.sp.map(Cow::into_owned),
            }
            .boxed(),
            sd: sd.into(),
            p: p.into(),
        };
        self.step(&e);
        Ok(e)
    }
}

struct EntriesOut<'a>(&'a [Entry]);

impl Serialize for EntriesOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut before = Before::default();
        let mut prev_path = "";
        s.collect_seq(self.0.iter().map(|e| {
            let w = before.encode(e, prev_path);
            prev_path = &e.p;
            w
        }))
    }
}

/// Entries decoded one by one as the JSON is parsed: no second list of
/// coded entries is ever held.
struct EntriesIn(Vec<Entry>);

impl<'de> Deserialize<'de> for EntriesIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Seq;
        impl<'de> Visitor<'de> for Seq {
            type Value = EntriesIn;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of entries")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EntriesIn, A::Error> {
                // A hostile length hint must not reserve memory the input does not back.
                let mut out: Vec<Entry> =
                    Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                let mut before = Before::default();
                while let Some(w) = seq.next_element::<Wire>()? {
                    let prev_path = out.last().map_or("", |e| &*e.p);
                    let e = before.decode(w, prev_path).map_err(de::Error::custom)?;
                    out.push(e);
                }
                out.shrink_to_fit();
                Ok(EntriesIn(out))
            }
        }
        d.deserialize_seq(Seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(p: &str, t: Kind, s: u64, ho: u64, data_offset: u64) -> Entry {
        Entry {
            p: p.into(),
            t,
            s,
            m: 0o644,
            u: 1000,
            g: 1000,
            mt: 1_796_178_454,
            mn: 429_380_658,
            ho,
            data_offset,
            rare: None,
            sd: StatData {
                i: 11_722_806,
                cs: 1_796_178_454,
                cn: 429_380_658,
            }
            .into(),
        }
    }

    fn sample() -> Toc {
        let mut odd = entry("dir/ünïcode/ß", Kind::File, 5, 4096, 5120);
        odd.mt = -3;
        odd.mn = 999_999_999;
        odd.sd = StatData {
            i: u64::MAX,
            cs: i64::MIN,
            cn: 0,
        }
        .into();
        odd.set_x([("user.k".into(), "00ff".into())].into());
        odd.set_sp(Some(vec![(0, 1), (10, 4)]));
        let mut link = entry("dir/ünïcode/ß2", Kind::HardLink, 0, 8192, 8704);
        link.set_lt(Some("dir/ünïcode/ß".into()));
        link.sd = crate::tarball::toc::Sd::NONE;
        let mut dev = entry("dev", Kind::CharDevice, 0, 0, 512);
        dev.set_dv(Some((1, 3)));
        Toc {
            v: VERSION,
            segments: vec![Segment {
                co: 10,
                cl: 100,
                uo: 0,
                ul: 10240,
                crc: 7,
                d: "00".repeat(16),
            }],
            entries: vec![
                entry("dir", Kind::Dir, 0, 0, 512),
                entry("dir/a.rs", Kind::File, 1000, 512, 1024),
                entry("dir/b.rs", Kind::File, 3, 2048, 2560),
                odd,
                link,
                dev,
                entry("z", Kind::File, u64::MAX, u64::MAX - 511, 3),
            ],
        }
    }

    #[test]
    fn every_value_round_trips() {
        let toc = sample();
        let mut raw = Vec::new();
        write(&mut raw, &toc).unwrap();
        assert_eq!(read(&raw, VERSION).unwrap(), toc);
    }

    #[test]
    fn entries_packed_back_to_back_store_no_offsets() {
        let toc = sample();
        let mut raw = Vec::new();
        write(&mut raw, &toc).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        let b = &json["entries"][2];
        assert_eq!(b["p"], "b.rs");
        assert_eq!(b["k"], 4);
        for coded_away in ["ho", "do", "mt", "mn"] {
            assert!(b.get(coded_away).is_none(), "{coded_away} in {b}");
        }
        assert!(b["sd"].as_object().unwrap().is_empty(), "{b}");
    }

    #[test]
    fn version_one_still_reads_and_writes() {
        let toc = Toc { v: 1, ..sample() };
        let mut raw = Vec::new();
        write(&mut raw, &toc).unwrap();
        assert_eq!(raw, serde_json::to_vec(&toc).unwrap(), "fields as they are");
        assert_eq!(read(&raw, 1).unwrap(), toc);
        assert!(read(&raw, 3).is_err());
        assert!(set_written_version(0).is_err());
        assert!(set_written_version(VERSION + 1).is_err());
    }

    #[test]
    fn damaged_coding_is_refused() {
        for bad in [
            // shares more bytes than the previous path has
            r#"{"v":2,"segments":[],"entries":[{"p":"a","t":"f","m":420},{"p":"b","k":9,"t":"f","m":420}]}"#,
            // splits a character
            r#"{"v":2,"segments":[],"entries":[{"p":"ß","t":"f","m":420},{"p":"x","k":1,"t":"f","m":420}]}"#,
            // nanoseconds out of range
            r#"{"v":2,"segments":[],"entries":[{"p":"a","t":"f","m":420,"mn":-1}]}"#,
            r#"{"v":2,"segments":[],"entries":[{"p":"a","t":"f","m":420,"mn":9223372036854775807,"sd":{"cn":9223372036854775807}}]}"#,
        ] {
            assert!(read(bad.as_bytes(), 2).is_err(), "{bad}");
        }
    }
}
