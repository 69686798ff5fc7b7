//! The table of contents of a session object and the locator that finds it.
//!
//! The TOC lists the deflate segments (where each sits in the object and in
//! the tar stream, its CRC32 and a BLAKE3 digest of its compressed bytes) and
//! the entries (name, type, size, mode, owner, nanosecond mtime, link target,
//! device numbers, xattrs, header and data offsets in the tar stream). It is
//! zlib-compressed JSON stored as the data of the tar entry [`TOC_PATH`], in
//! the form [`super::toc_codec`] writes and reads.
//!
//! The locator is the last [`LOCATOR_LEN`] bytes of that entry's data, which
//! is padded so the locator ends on a tar block boundary. Together with the
//! 1024-byte end-of-archive it forms the final stored deflate block, so it sits
//! at a fixed distance from the end of every object: one suffix GET finds it.
//!
//! Everything read back is validated before use: a TOC that points outside
//! the object, overlaps itself, promises absurd inflation ratios or names
//! unsafe paths is rejected as corrupt.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::deflate::{GZIP_HEADER, GZIP_TRAILER_LEN, MAX_INFLATE_RATIO, STORED_HEADER_LEN};
use super::path::check_entry_path;
use super::TarballError;

/// Name of the tar entry holding the TOC; hidden from listings.
pub const TOC_PATH: &str = ".sessionfs/toc";
/// The top-level name reserved for sessionfs's own entries.
pub const RESERVED_DIR: &str = ".sessionfs";
pub const LOCATOR_LEN: usize = 72;
pub const LOCATOR_MAGIC: &[u8; 8] = b"SFSLOC\x00\x01";
/// The format version written (see [`super::toc_codec`] for what each
/// version stores); readers take any from
/// [`super::toc_codec::OLDEST_VERSION`] on.
pub const FORMAT_VERSION: u32 = super::toc_codec::VERSION;
/// End-of-archive: two zero blocks.
pub const EOA_LEN: usize = 1024;
/// Bytes from the start of the locator to the end of the object.
pub const LOCATOR_FROM_END: usize = LOCATOR_LEN + EOA_LEN + GZIP_TRAILER_LEN;
/// Largest inflated TOC accepted: far beyond any real session, well below harm.
pub const MAX_TOC_RAW: u64 = 1 << 30;
/// Largest segment accepted (the writer cuts at 1 MiB).
pub const MAX_SEGMENT_LEN: u64 = 64 << 20;

/// User metadata key of the object digest sessionfs writes with its objects.
pub const DIGEST_KEY: &str = "sessionfs-digest";

/// The digest of a whole session object, without reading its segments:
/// SHA-256 over each segment's BLAKE3 digest (as the TOC has it, in object
/// order) and then every byte from the TOC region to the end (TOC, locator,
/// end of archive, gzip trailer). Each segment's bytes are bound to its
/// digest (readers verify them), so this binds every byte of the object;
/// and a write-back that copies segments server-side can compute it.
/// `tail` is the object from the TOC region's start to its end. Hex.
pub fn object_digest(segments: &[Segment], tail: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for s in segments {
        h.update(s.d.as_bytes());
    }
    h.update(tail);
    hex::encode(h.finalize())
}

/// One deflate segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Offset of the compressed bytes in the object.
    pub co: u64,
    /// Length of the compressed bytes.
    pub cl: u64,
    /// Offset of the inflated bytes in the tar stream.
    pub uo: u64,
    /// Length of the inflated bytes.
    pub ul: u64,
    /// CRC32 of the inflated bytes (also needed to rebuild the gzip trailer).
    pub crc: u32,
    /// BLAKE3 of the compressed bytes, first 16 bytes, hex.
    pub d: String,
}

/// The type of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    #[serde(rename = "f")]
    File,
    #[serde(rename = "d")]
    Dir,
    #[serde(rename = "l")]
    Symlink,
    #[serde(rename = "h")]
    HardLink,
    #[serde(rename = "p")]
    Fifo,
    #[serde(rename = "c")]
    CharDevice,
    #[serde(rename = "b")]
    BlockDevice,
}

/// One entry of the session tree.
///
/// What few entries have (link target, device numbers, xattrs, sparse map)
/// sits behind one box, [`Rare`]: every reader holds its object's entries
/// in memory (200,000 of them for a large session), and those four fields
/// took 84 of an entry's 200 bytes. Read them with [`Entry::lt`] and the
/// like; set them with [`Entry::set_lt`] and the like, which keep `rare`
/// `None` while they are all empty. The stored form is the same as before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "EntryFields", into = "EntryFields")]
pub struct Entry {
    /// Path relative to the session root, no trailing `/`. Shared: a
    /// mount's unchanged files name their bytes by it (`Data::Base`), and a
    /// second copy of every path was 5 MB for 100,000 files.
    pub p: Arc<str>,
    pub t: Kind,
    /// Size of the data (0 but for files).
    pub s: u64,
    /// Permission bits (`0o7777`).
    pub m: u32,
    pub u: u64,
    pub g: u64,
    /// mtime, seconds since the epoch.
    pub mt: i64,
    /// mtime, nanoseconds.
    pub mn: u32,
    /// Offset of the entry's first header block in the tar stream.
    pub ho: u64,
    /// Offset of the entry's data in the tar stream.
    pub data_offset: u64,
    /// The inode number and ctime the entry had where it was packed (a
    /// pushed directory, a mount's write-back). A mount shows them again,
    /// so that what tools recorded of the tree there (git's index) still
    /// matches `lstat` here. Not in the tar headers; no effect on bytes.
    pub sd: Sd,
    /// `None` unless one of [`Rare`]'s fields is set.
    pub rare: Option<Box<Rare>>,
}

/// The fields of an [`Entry`] that most entries leave empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rare {
    /// Symlink target, or the path a hard link points at.
    pub lt: Option<String>,
    /// Device numbers (major, minor).
    pub dv: Option<(u32, u32)>,
    /// Extended attributes, values hex.
    pub x: BTreeMap<String, String>,
    /// Sparse files (foreign objects only): the (offset, length) chunks
    /// stored back to back from `data_offset`; the rest reads as zeros.
    pub sp: Option<super::sparse::SparseMap>,
}

impl Rare {
    /// `None` when every field is empty, as [`Entry::rare`] wants it.
    pub fn boxed(self) -> Option<Box<Rare>> {
        let empty =
            self.lt.is_none() && self.dv.is_none() && self.x.is_empty() && self.sp.is_none();
        (!empty).then(|| Box::new(self))
    }
}

static NO_XATTRS: BTreeMap<String, String> = BTreeMap::new();

impl Entry {
    /// Symlink target, or the path a hard link points at.
    pub fn lt(&self) -> Option<&str> {
        self.rare.as_ref()?.lt.as_deref()
    }

    /// Device numbers (major, minor).
    pub fn dv(&self) -> Option<(u32, u32)> {
        self.rare.as_ref()?.dv
    }

    /// Extended attributes, values hex.
    pub fn x(&self) -> &BTreeMap<String, String> {
        self.rare.as_ref().map_or(&NO_XATTRS, |r| &r.x)
    }

    /// The sparse map of a sparse file.
    pub fn sp(&self) -> Option<&super::sparse::SparseMap> {
        self.rare.as_ref()?.sp.as_ref()
    }

    pub fn set_lt(&mut self, lt: Option<String>) {
        self.edit(|r| r.lt = lt);
    }

    pub fn set_dv(&mut self, dv: Option<(u32, u32)>) {
        self.edit(|r| r.dv = dv);
    }

    pub fn set_x(&mut self, x: BTreeMap<String, String>) {
        self.edit(|r| r.x = x);
    }

    pub fn set_sp(&mut self, sp: Option<super::sparse::SparseMap>) {
        self.edit(|r| r.sp = sp);
    }

    fn edit(&mut self, f: impl FnOnce(&mut Rare)) {
        let mut rare = self.rare.take().map(|b| *b).unwrap_or_default();
        f(&mut rare);
        self.rare = rare.boxed();
    }
}

/// An [`Entry`] as it is stored (TOC version 1, and the index cache):
/// every field in the open.
#[derive(Clone, Serialize, Deserialize)]
struct EntryFields {
    p: String,
    t: Kind,
    #[serde(default)]
    s: u64,
    m: u32,
    #[serde(default)]
    u: u64,
    #[serde(default)]
    g: u64,
    mt: i64,
    #[serde(default)]
    mn: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dv: Option<(u32, u32)>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    x: BTreeMap<String, String>,
    ho: u64,
    #[serde(rename = "do")]
    data_offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sp: Option<super::sparse::SparseMap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sd: Option<StatData>,
}

impl From<EntryFields> for Entry {
    fn from(f: EntryFields) -> Entry {
        Entry {
            p: f.p.into(),
            t: f.t,
            s: f.s,
            m: f.m,
            u: f.u,
            g: f.g,
            mt: f.mt,
            mn: f.mn,
            ho: f.ho,
            data_offset: f.data_offset,
            sd: f.sd.into(),
            rare: Rare {
                lt: f.lt,
                dv: f.dv,
                x: f.x,
                sp: f.sp,
            }
            .boxed(),
        }
    }
}

impl From<Entry> for EntryFields {
    fn from(e: Entry) -> EntryFields {
        let Rare { lt, dv, x, sp } = e.rare.map(|b| *b).unwrap_or_default();
        EntryFields {
            p: e.p.to_string(),
            t: e.t,
            s: e.s,
            m: e.m,
            u: e.u,
            g: e.g,
            mt: e.mt,
            mn: e.mn,
            lt,
            dv,
            x,
            ho: e.ho,
            data_offset: e.data_offset,
            sp,
            sd: e.sd.get(),
        }
    }
}

impl AsRef<Entry> for Entry {
    fn as_ref(&self) -> &Entry {
        self
    }
}

/// What `lstat` said of an entry where it was packed, beyond its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatData {
    /// Inode number.
    pub i: u64,
    /// ctime, seconds since the epoch.
    pub cs: i64,
    /// ctime, nanoseconds.
    pub cn: u32,
}

/// An entry's [`StatData`], if it has one, in 20 bytes aligned to 4: an
/// `Option<StatData>` took 32 bytes of every entry (its `u64`s align it to
/// 8, and the option's tag adds 8 more), here the entry's 4-byte fields
/// fill the gaps, and a nanosecond count no ctime has marks "none".
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(4))]
pub struct Sd {
    i: u64,
    cs: i64,
    cn: u32,
}

impl Sd {
    pub const NONE: Sd = Sd {
        i: 0,
        cs: 0,
        cn: u32::MAX,
    };

    pub fn get(self) -> Option<StatData> {
        (self.cn != u32::MAX).then_some(StatData {
            i: self.i,
            cs: self.cs,
            cn: self.cn,
        })
    }
}

impl From<Option<StatData>> for Sd {
    fn from(sd: Option<StatData>) -> Sd {
        match sd {
            // A ctime's nanoseconds are below 10^9; one read from outside
            // that is not is clamped, not taken for "none".
            Some(StatData { i, cs, cn }) => Sd {
                i,
                cs,
                cn: cn.min(999_999_999),
            },
            None => Sd::NONE,
        }
    }
}

impl From<StatData> for Sd {
    fn from(sd: StatData) -> Sd {
        Some(sd).into()
    }
}

impl std::fmt::Debug for Sd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// The table of contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    pub v: u32,
    pub segments: Vec<Segment>,
    pub entries: Vec<Entry>,
}

/// Where the TOC is, and what the tail of the object must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Locator {
    /// The format version of the TOC it points at.
    pub version: u32,
    /// Object offset where the TOC region (stored blocks) starts.
    pub toc_offset: u64,
    /// Tar offset of the TOC entry's header.
    pub toc_tar_offset: u64,
    /// Length of the zlib-compressed TOC.
    pub toc_len: u64,
    /// Length of the TOC once inflated.
    pub toc_raw_len: u64,
    /// Total length of the tar stream, end-of-archive included.
    pub tar_size: u64,
    /// Object size the locator was written for.
    pub object_size: u64,
    /// CRC32 of the zlib-compressed TOC.
    pub toc_crc: u32,
}

impl Locator {
    pub fn encode(&self) -> [u8; LOCATOR_LEN] {
        let mut b = [0u8; LOCATOR_LEN];
        b[..8].copy_from_slice(LOCATOR_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        // 12..16: flags, none defined.
        let fields = [
            self.toc_offset,
            self.toc_tar_offset,
            self.toc_len,
            self.toc_raw_len,
            self.tar_size,
            self.object_size,
        ];
        for (i, f) in fields.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&f.to_le_bytes());
        }
        b[64..68].copy_from_slice(&self.toc_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..68]);
        b[68..72].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a locator read from an object of `object_size` bytes.
    pub fn decode(b: &[u8], object_size: u64) -> Result<Locator, TarballError> {
        let corrupt = |what: &str| TarballError::Corrupt(format!("locator: {what}"));
        if b.len() != LOCATOR_LEN {
            return Err(corrupt("wrong length"));
        }
        if &b[..8] != LOCATOR_MAGIC {
            return Err(TarballError::NotSeekable);
        }
        let crc = u32::from_le_bytes([b[68], b[69], b[70], b[71]]);
        if crc32fast::hash(&b[..68]) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if !(super::toc_codec::OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(TarballError::Unsupported(format!(
                "session format version {version} (this sessionfs reads {} to {FORMAT_VERSION})",
                super::toc_codec::OLDEST_VERSION
            )));
        }
        let field = |i: usize| {
            let mut f = [0u8; 8];
            f.copy_from_slice(&b[16 + 8 * i..24 + 8 * i]);
            u64::from_le_bytes(f)
        };
        let loc = Locator {
            version,
            toc_offset: field(0),
            toc_tar_offset: field(1),
            toc_len: field(2),
            toc_raw_len: field(3),
            tar_size: field(4),
            object_size: field(5),
            toc_crc: u32::from_le_bytes([b[64], b[65], b[66], b[67]]),
        };
        if loc.object_size != object_size {
            return Err(corrupt(
                "written for an object of another size (truncated or appended to?)",
            ));
        }
        let tail_start = object_size
            .checked_sub((LOCATOR_FROM_END + STORED_HEADER_LEN) as u64)
            .ok_or_else(|| corrupt("object too small"))?;
        if loc.toc_offset < GZIP_HEADER.len() as u64
            || loc.toc_offset > tail_start
            || loc.toc_len > loc.toc_raw_len.saturating_mul(2).saturating_add(1024)
            || loc.toc_raw_len > MAX_TOC_RAW
            || loc.toc_raw_len > loc.toc_len.saturating_mul(MAX_INFLATE_RATIO)
            || !loc.toc_tar_offset.is_multiple_of(512)
            || loc.tar_size
                < loc
                    .toc_tar_offset
                    .saturating_add(512 + (LOCATOR_LEN + EOA_LEN) as u64)
                    .saturating_add(loc.toc_len)
        {
            return Err(corrupt("fields out of range"));
        }
        Ok(loc)
    }

    /// Length of the TOC entry's data: compressed TOC, zero padding, locator,
    /// ending on a block boundary.
    pub fn toc_entry_len(toc_len: u64) -> u64 {
        (toc_len + LOCATOR_LEN as u64).div_ceil(512) * 512
    }
}

impl Toc {
    /// Checks the TOC against its locator: segments contiguous from the gzip
    /// header to the TOC region, sane ratios, entries inside the data segments,
    /// safe and unique paths, hard links to earlier files.
    pub fn validate(&self, loc: &Locator) -> Result<(), TarballError> {
        let corrupt = |what: String| TarballError::Corrupt(format!("table of contents: {what}"));
        if self.v != loc.version {
            return Err(corrupt(format!(
                "version {}, its locator says {}",
                self.v, loc.version
            )));
        }
        let mut co = GZIP_HEADER.len() as u64;
        let mut uo = 0u64;
        for (i, s) in self.segments.iter().enumerate() {
            if s.co != co || s.uo != uo {
                return Err(corrupt(format!("segment {i} is not contiguous")));
            }
            if s.cl == 0
                || s.ul == 0
                || s.ul > MAX_SEGMENT_LEN
                || s.ul > s.cl.saturating_mul(MAX_INFLATE_RATIO)
            {
                return Err(corrupt(format!("segment {i} has impossible lengths")));
            }
            if s.d.len() != 32 || !s.d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(corrupt(format!("segment {i} has a malformed digest")));
            }
            co = co
                .checked_add(s.cl)
                .ok_or_else(|| corrupt("offsets overflow".into()))?;
            uo = uo
                .checked_add(s.ul)
                .ok_or_else(|| corrupt("offsets overflow".into()))?;
        }
        if co != loc.toc_offset || uo != loc.toc_tar_offset {
            return Err(corrupt("segments do not end where the TOC begins".into()));
        }
        let mut seen = HashSet::with_capacity(self.entries.len());
        for e in &self.entries {
            check_entry_path(&e.p)?;
            if !seen.insert(&*e.p) {
                return Err(corrupt(format!("{:?} listed twice", e.p)));
            }
            let data_end = e
                .data_offset
                .checked_add(if e.t == Kind::File { e.s } else { 0 });
            if e.ho > e.data_offset
                || data_end.is_none_or(|end| end > uo)
                || !e.ho.is_multiple_of(512)
            {
                return Err(corrupt(format!("{:?} lies outside the data", e.p)));
            }
            if e.sp().is_some() {
                return Err(corrupt(format!(
                    "{:?} is sparse: not written by sessionfs",
                    e.p
                )));
            }
            match e.t {
                Kind::HardLink => {
                    let target = e.lt().unwrap_or_default();
                    if !seen.contains(target) || target == &*e.p {
                        return Err(corrupt(format!("hard link {:?} to an unknown entry", e.p)));
                    }
                }
                Kind::Symlink if e.lt().is_none() => {
                    return Err(corrupt(format!("symlink {:?} without a target", e.p)))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_stays_small_and_its_rare_fields_leave_no_empty_box() {
        // Every reader holds one per entry of its object.
        assert!(std::mem::size_of::<Entry>() <= 104);
        let mut e: Entry =
            serde_json::from_str(r#"{"p":"a","t":"l","m":420,"mt":0,"lt":"b","ho":0,"do":512}"#)
                .unwrap();
        assert_eq!(e.lt(), Some("b"));
        assert!(e.rare.is_some());
        e.set_lt(None);
        assert!(e.rare.is_none(), "an emptied box is dropped");
        let plain: Entry =
            serde_json::from_str(r#"{"p":"a","t":"f","m":420,"mt":0,"ho":0,"do":512}"#).unwrap();
        assert_eq!(
            Entry {
                t: Kind::Symlink,
                ..plain.clone()
            },
            e,
            "equal to one that never had the field"
        );
        assert!(plain.rare.is_none() && plain.x().is_empty() && plain.sp().is_none());
    }

    #[test]
    fn stat_data_is_kept_as_given_in_its_packed_form() {
        assert_eq!(std::mem::size_of::<Sd>(), 20);
        assert_eq!(Sd::NONE.get(), None);
        assert_eq!(Sd::from(None), Sd::NONE);
        for sd in [
            StatData { i: 0, cs: 0, cn: 0 },
            StatData {
                i: u64::MAX,
                cs: i64::MIN,
                cn: 999_999_999,
            },
        ] {
            assert_eq!(Sd::from(sd).get(), Some(sd));
        }
        // Out of range from outside: still there, clamped, never "none".
        let odd = StatData {
            i: 7,
            cs: 1,
            cn: u32::MAX,
        };
        assert_eq!(Sd::from(odd).get().map(|s| s.cn), Some(999_999_999));
        // Stored as before: absent, or the three fields.
        let e: Entry = serde_json::from_str(
            r#"{"p":"a","t":"f","m":420,"mt":0,"ho":0,"do":512,"sd":{"i":9,"cs":-4,"cn":5}}"#,
        )
        .unwrap();
        assert_eq!(
            e.sd.get(),
            Some(StatData {
                i: 9,
                cs: -4,
                cn: 5
            })
        );
        let back = serde_json::to_value(&e).unwrap();
        assert_eq!(back["sd"], serde_json::json!({"i": 9, "cs": -4, "cn": 5}));
    }

    fn locator(object_size: u64) -> Locator {
        Locator {
            version: FORMAT_VERSION,
            toc_offset: 1000,
            toc_tar_offset: 4096,
            toc_len: 300,
            toc_raw_len: 2000,
            tar_size: 4096 + 512 + 512 + 1024,
            object_size,
            toc_crc: 7,
        }
    }

    #[test]
    fn locator_round_trips_and_detects_damage() {
        let loc = locator(5000);
        let b = loc.encode();
        assert_eq!(Locator::decode(&b, 5000).unwrap(), loc);
        let mut bad = b;
        bad[20] ^= 1;
        assert!(matches!(
            Locator::decode(&bad, 5000),
            Err(TarballError::Corrupt(_))
        ));
        assert!(matches!(
            Locator::decode(&b, 4000),
            Err(TarballError::Corrupt(_))
        ));
        let mut not_ours = b;
        not_ours[0] = b'X';
        assert!(matches!(
            Locator::decode(&not_ours, 5000),
            Err(TarballError::NotSeekable)
        ));
    }

    #[test]
    fn locator_refuses_absurd_fields() {
        let mut loc = locator(5000);
        loc.toc_raw_len = MAX_TOC_RAW + 1;
        assert!(Locator::decode(&loc.encode(), 5000).is_err());
        let mut loc = locator(5000);
        loc.toc_offset = 4990;
        assert!(Locator::decode(&loc.encode(), 5000).is_err());
    }

    #[test]
    fn huge_fields_are_refused_without_overflow() {
        // Found by fuzzing: sums of near-u64::MAX fields once overflowed.
        let mut loc = locator(5000);
        loc.toc_raw_len = u64::MAX;
        loc.toc_len = u64::MAX - 10;
        loc.toc_tar_offset = !511;
        assert!(Locator::decode(&loc.encode(), 5000).is_err());
    }

    #[test]
    fn toc_entry_len_ends_on_a_block() {
        assert_eq!(Locator::toc_entry_len(1), 512);
        assert_eq!(Locator::toc_entry_len(512 - 72), 512);
        assert_eq!(Locator::toc_entry_len(512 - 71), 1024);
    }
}
