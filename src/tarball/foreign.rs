//! Indexing a tarball sessionfs did not write: plain `tar czf`, pigz,
//! Python's `tarfile`, multi-member gzip, or an uncompressed tar.
//!
//! One streaming pass inflates the object (memory stays bounded: a 32 KiB
//! window and one input buffer), records [`AccessPoint`]s about every
//! [`zran::SPAN`] bytes of output and at every gzip member start, checks each
//! member's CRC and length, and lets the `tar` crate walk the headers (GNU
//! long names, PAX records, sparse files) so each entry's header and data
//! offsets are known. Entries are then what `tar x` would leave: names
//! without a leading `/` or `./`, members naming `..` skipped (GNU tar refuses
//! them too), the later of two equal names winning, and missing parent
//! directories supplied.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};

use super::path::check_entry_path;
use super::sparse::{self, Tail, TapReader};
use super::tar_header::hex_encode;
use super::toc::{Entry, Kind, Rare, Sd, RESERVED_DIR};
use super::zran::{AccessPoint, RawInflater, SPAN, WINDOW};
use super::TarballError;

/// The layout of a foreign object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Uncompressed tar: tar offsets are object offsets.
    Plain,
    /// gzip, one member or several.
    Gzip,
}

/// What the index pass learned.
#[derive(Clone, Debug)]
pub struct ForeignIndex {
    pub format: Format,
    pub points: Vec<AccessPoint>,
    pub entries: Vec<Entry>,
    pub tar_size: u64,
    /// Entries left out, and why (unsafe names, unsupported types).
    pub skipped: Vec<String>,
}

/// Bounds on what an index pass accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest inflated size accepted; more is treated as a decompression bomb.
    pub max_tar_size: u64,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tar_size: 256 << 30,
            max_entries: 10_000_000,
        }
    }
}

/// Indexes the object read from `src` (the whole object, from its first byte).
pub fn index<R: Read>(src: R, limits: Limits) -> Result<ForeignIndex, TarballError> {
    let decoder = Decoder::new(src, limits.max_tar_size)?;
    // Sparse maps continue in blocks the tar parser hides: keep the recent stream.
    let (tap, tail) = TapReader::new(decoder);
    // The tar parser reads headers 512 bytes at a time: buffer in front of inflation.
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(256 * 1024, tap));
    let mut entries: Vec<Option<Entry>> = Vec::new();
    let mut by_path: HashMap<String, usize> = HashMap::new();
    let mut skipped = Vec::new();
    {
        let iter = archive.entries().map_err(|e| tar_error(e, None))?;
        for entry in iter {
            let mut entry = entry.map_err(|e| {
                if entries.is_empty() && skipped.is_empty() && !is_truncation(&e) {
                    TarballError::Corrupt(
                        "no tar header at its start: the object is neither a tar.gz nor a tar"
                            .into(),
                    )
                } else {
                    tar_error(e, None)
                }
            })?;
            if entries.len() >= limits.max_entries {
                return Err(TarballError::Corrupt(format!(
                    "more than {} entries",
                    limits.max_entries
                )));
            }
            match describe(&mut entry, &tail) {
                Ok(Some(e)) => {
                    if let Some(old) = by_path.insert(e.p.to_string(), entries.len()) {
                        entries[old] = None;
                    }
                    entries.push(Some(e));
                }
                Ok(None) => {}
                Err(reason) => skipped.push(reason),
            }
        }
    }
    let mut buffered = archive.into_inner();
    // Read to the end: verifies the last member's CRC and length, and catches
    // truncation after the end-of-archive blocks.
    io::copy(&mut buffered, &mut io::sink()).map_err(|e| tar_error(e, None))?;
    let decoder = buffered.into_inner().inner;
    if decoder.offset == 0 {
        return Err(TarballError::Corrupt(
            "the object is empty: not a tar archive".into(),
        ));
    }
    let mut entries: Vec<Entry> = entries.into_iter().flatten().collect();
    add_missing_parents(&mut entries);
    if !skipped.is_empty() {
        tracing::warn!(
            "{} tar entries skipped: {}",
            skipped.len(),
            skipped.join("; ")
        );
    }
    Ok(ForeignIndex {
        format: decoder.format.unwrap_or(Format::Plain),
        points: decoder.points,
        entries,
        tar_size: decoder.out_total,
        skipped,
    })
}

fn tar_error(e: io::Error, path: Option<&str>) -> TarballError {
    let at = path.map(|p| format!(" at {p:?}")).unwrap_or_default();
    let said = printable(&e.to_string());
    if is_truncation(&e) {
        TarballError::Corrupt(format!("the archive is truncated{at}: {said}"))
    } else {
        TarballError::Corrupt(format!("not a readable tar archive{at}: {said}"))
    }
}

/// The tar crate reports running out of data mid-entry as `Other`.
fn is_truncation(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("unexpected EOF")
}

/// The tar crate quotes the header bytes it could not parse: from outside,
/// they are anything. The message ends where they begin.
fn printable(message: &str) -> String {
    let cut = message
        .find(|c: char| c.is_control() || c == char::REPLACEMENT_CHARACTER)
        .map_or(message.len(), |bad| {
            message[..bad].rfind(": ").unwrap_or(bad)
        });
    let mut out: String = message[..cut].chars().take(200).collect();
    if out.len() < message.len() {
        out.push('…');
    }
    out
}

/// The entry as the index keeps it, `Ok(None)` for entries that are not
/// files (global headers), `Err(reason)` for entries left out.
fn describe<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    tail: &std::cell::RefCell<Tail>,
) -> Result<Option<Entry>, String> {
    let raw = entry.path().map_err(|e| format!("unreadable name: {e}"))?;
    let header_name = raw
        .to_str()
        .ok_or_else(|| format!("{}: name is not UTF-8", raw.display()))?
        .to_owned();
    let is_file = matches!(
        entry.header().entry_type(),
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
    );
    let sparse = if is_file {
        sparse::describe(entry, tail).map_err(|e| format!("{header_name}: {e}"))?
    } else {
        None
    };
    let name = sparse
        .as_ref()
        .and_then(|s| s.name.as_deref())
        .unwrap_or(&header_name);
    let Some(p) = normalise(name) else {
        return Ok(None);
    };
    check_entry_path(&p).map_err(|e| e.to_string())?;
    if p == RESERVED_DIR || p.starts_with(".sessionfs/") {
        return Ok(None);
    }
    let header = entry.header();
    let kind = header.entry_type();
    let t = match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            Kind::File
        }
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Symlink => Kind::Symlink,
        tar::EntryType::Link => Kind::HardLink,
        tar::EntryType::Fifo => Kind::Fifo,
        tar::EntryType::Char => Kind::CharDevice,
        tar::EntryType::Block => Kind::BlockDevice,
        tar::EntryType::XGlobalHeader => return Ok(None),
        other => {
            return Err(format!(
                "{p}: unsupported entry type {:?}",
                other.as_byte() as char
            ))
        }
    };
    let lt = match t {
        Kind::Symlink => Some(
            entry
                .link_name()
                .ok()
                .flatten()
                .and_then(|l| l.to_str().map(str::to_owned))
                .ok_or_else(|| format!("{p}: unreadable link target"))?,
        ),
        Kind::HardLink => {
            let target = entry
                .link_name()
                .ok()
                .flatten()
                .and_then(|l| l.to_str().and_then(normalise))
                .ok_or_else(|| format!("{p}: unreadable hard link target"))?;
            check_entry_path(&target).map_err(|e| e.to_string())?;
            Some(target)
        }
        _ => None,
    };
    let dv = match t {
        Kind::CharDevice | Kind::BlockDevice => Some((
            header.device_major().ok().flatten().unwrap_or(0),
            header.device_minor().ok().flatten().unwrap_or(0),
        )),
        _ => None,
    };
    let mut x = BTreeMap::new();
    let mut pax_mtime = None;
    if let Ok(Some(pax)) = entry.pax_extensions() {
        for ext in pax.flatten() {
            if let (Ok(key), value) = (ext.key(), ext.value_bytes()) {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    x.insert(name.to_owned(), hex_encode(value));
                } else if key == "mtime" {
                    pax_mtime = std::str::from_utf8(value).ok().and_then(pax_time);
                }
            }
        }
    }
    let header = entry.header();
    let (mt, mn) = pax_mtime.unwrap_or_else(|| {
        let secs = header
            .mtime()
            .map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX));
        (secs, 0)
    });
    let (s, data_offset, sp) = match sparse {
        Some(sp) => (sp.real_size, sp.data_offset, Some(sp.map)),
        None if t == Kind::File => (entry.size(), entry.raw_file_position(), None),
        None => (0, entry.raw_file_position(), None),
    };
    Ok(Some(Entry {
        t,
        s,
        m: header.mode().unwrap_or(0o644) & 0o7777,
        u: header.uid().unwrap_or(0),
        g: header.gid().unwrap_or(0),
        mt,
        mn,
        ho: entry.raw_header_position(),
        data_offset,
        rare: Rare { lt, dv, x, sp }.boxed(),
        sd: Sd::NONE,
        p: p.into(),
    }))
}

/// A PAX time (`1700000000.25`, `-1.5`: seconds with a sign and a
/// fraction, as Python's `tarfile` and GNU tar write them) as whole seconds
/// and nanoseconds, floored as `stat` gives them: -1.5 is (-2, 500000000).
fn pax_time(value: &str) -> Option<(i64, u32)> {
    let (negative, digits) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let nanos: u32 = format!("{:0<9}", &fraction[..fraction.len().min(9)])
        .parse()
        .ok()?;
    Some(match (negative, nanos) {
        (false, n) => (secs, n),
        (true, 0) => (-secs, 0),
        (true, n) => (-secs - 1, 1_000_000_000 - n),
    })
}

/// `./a/b/` → `a/b`; `/abs` → `abs` (as `tar x` strips a leading `/`);
/// `.` or `./` → `None` (the root itself).
fn normalise(name: &str) -> Option<String> {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Tarballs made from a file list may lack directory entries; a tree needs them.
fn add_missing_parents(entries: &mut Vec<Entry>) {
    let known: std::collections::HashSet<&str> = entries.iter().map(|e| &*e.p).collect();
    let mut added = std::collections::BTreeSet::new();
    for e in entries.iter() {
        let mut parent = &*e.p;
        while let Some((dir, _)) = parent.rsplit_once('/') {
            if !known.contains(dir) {
                added.insert(dir.to_owned());
            }
            parent = dir;
        }
    }
    for dir in added {
        entries.push(Entry {
            p: dir.into(),
            t: Kind::Dir,
            s: 0,
            m: 0o755,
            u: 0,
            g: 0,
            mt: 0,
            mn: 0,
            ho: 0,
            data_offset: 0,
            rare: None,
            sd: Sd::NONE,
        });
    }
}

enum Mode {
    Detect,
    Plain,
    Header,
    Deflate,
    Trailer,
    Done,
}

/// Inflates the object for the tar parser, recording access points.
struct Decoder<R> {
    src: R,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// Object offset of `buf[pos]`.
    offset: u64,
    mode: Mode,
    format: Option<Format>,
    inflater: RawInflater,
    out_total: u64,
    max_out: u64,
    last_point: u64,
    window: Vec<u8>,
    points: Vec<AccessPoint>,
    member_crc: crc32fast::Hasher,
    member_len: u64,
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl<R: Read> Decoder<R> {
    fn new(src: R, max_out: u64) -> Result<Self, TarballError> {
        Ok(Decoder {
            src,
            buf: vec![0; 256 * 1024],
            pos: 0,
            len: 0,
            offset: 0,
            mode: Mode::Detect,
            format: None,
            inflater: RawInflater::new()?,
            out_total: 0,
            max_out,
            last_point: 0,
            window: Vec::with_capacity(2 * WINDOW),
            points: Vec::new(),
            member_crc: crc32fast::Hasher::new(),
            member_len: 0,
        })
    }

    /// Makes input available; false at the end of the object.
    fn fill(&mut self) -> io::Result<bool> {
        if self.pos < self.len {
            return Ok(true);
        }
        self.pos = 0;
        self.len = 0;
        loop {
            match self.src.read(&mut self.buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.len = n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn take_byte(&mut self) -> io::Result<u8> {
        if !self.fill()? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        self.offset += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        (0..n).map(|_| self.take_byte()).collect()
    }

    fn peek_is_gzip(&mut self) -> io::Result<Option<bool>> {
        if !self.fill()? {
            return Ok(None);
        }
        if self.len - self.pos >= 2 {
            return Ok(Some(
                self.buf[self.pos] == 0x1f && self.buf[self.pos + 1] == 0x8b,
            ));
        }
        Ok(Some(self.buf[self.pos] == 0x1f))
    }

    fn gzip_header(&mut self) -> io::Result<()> {
        let h = self.take(10)?;
        if h[0] != 0x1f || h[1] != 0x8b || h[2] != 8 {
            return Err(corrupt("bad gzip header"));
        }
        let flags = h[3];
        if flags & 0x04 != 0 {
            let xlen = self.take(2)?;
            self.take(usize::from(u16::from_le_bytes([xlen[0], xlen[1]])))?;
        }
        for flag in [0x08, 0x10] {
            if flags & flag != 0 {
                while self.take_byte()? != 0 {}
            }
        }
        if flags & 0x02 != 0 {
            self.take(2)?;
        }
        self.inflater.reset().map_err(|e| corrupt(e.to_string()))?;
        self.member_crc = crc32fast::Hasher::new();
        self.member_len = 0;
        // A member starts a fresh deflate stream: no window needed.
        self.points
            .push(AccessPoint::new(self.offset, 0, self.out_total, &[]));
        self.last_point = self.out_total;
        Ok(())
    }

    fn gzip_trailer(&mut self) -> io::Result<()> {
        let t = self.take(8)?;
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        let expected = std::mem::replace(&mut self.member_crc, crc32fast::Hasher::new()).finalize();
        if crc != expected || isize != self.member_len as u32 {
            return Err(corrupt("gzip member CRC or length mismatch"));
        }
        Ok(())
    }

    fn remember(&mut self, out: &[u8]) {
        self.member_crc.update(out);
        self.member_len += out.len() as u64;
        self.out_total += out.len() as u64;
        if out.len() >= WINDOW {
            self.window.clear();
            self.window.extend_from_slice(&out[out.len() - WINDOW..]);
        } else {
            self.window.extend_from_slice(out);
            if self.window.len() > WINDOW {
                let excess = self.window.len() - WINDOW;
                self.window.drain(..excess);
            }
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.mode {
                Mode::Detect => match self.peek_is_gzip()? {
                    None => self.mode = Mode::Done,
                    Some(true) => {
                        self.format = Some(Format::Gzip);
                        self.mode = Mode::Header;
                    }
                    Some(false) => {
                        self.format = Some(Format::Plain);
                        self.mode = Mode::Plain;
                    }
                },
                Mode::Plain => {
                    if !self.fill()? {
                        self.mode = Mode::Done;
                        continue;
                    }
                    let n = (self.len - self.pos).min(out.len());
                    out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                    self.pos += n;
                    self.offset += n as u64;
                    self.out_total += n as u64;
                    return Ok(n);
                }
                Mode::Header => {
                    self.gzip_header()?;
                    self.mode = Mode::Deflate;
                }
                Mode::Deflate => {
                    if !self.fill()? {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let step = self
                        .inflater
                        .inflate(&self.buf[self.pos..self.len], out, true)
                        .map_err(|e| corrupt(e.to_string()))?;
                    self.pos += step.consumed;
                    self.offset += step.consumed as u64;
                    self.remember(&out[..step.produced]);
                    if self.out_total > self.max_out {
                        return Err(corrupt(format!(
                            "inflates to more than {} bytes: refused as a decompression bomb",
                            self.max_out
                        )));
                    }
                    if step.at_block_boundary && self.out_total - self.last_point >= SPAN {
                        self.points.push(AccessPoint::new(
                            self.offset,
                            step.bits,
                            self.out_total,
                            &self.window,
                        ));
                        self.last_point = self.out_total;
                    }
                    if step.stream_end {
                        self.mode = Mode::Trailer;
                    }
                    if step.produced > 0 {
                        return Ok(step.produced);
                    }
                    if step.consumed == 0 && !step.stream_end {
                        return Err(corrupt("the deflate stream makes no progress"));
                    }
                }
                Mode::Trailer => {
                    self.gzip_trailer()?;
                    // Another member, or the end (trailing zeros are ignored, as by gzip).
                    self.mode = match self.peek_is_gzip()? {
                        Some(true) => Mode::Header,
                        _ => Mode::Done,
                    };
                }
                Mode::Done => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_stop_before_quoted_garbage() {
        assert_eq!(printable("unexpected EOF"), "unexpected EOF");
        assert_eq!(
            printable("numeric field did not have utf-8 text: \u{fffd}\u{1}x when getting cksum"),
            "numeric field did not have utf-8 text…"
        );
        assert_eq!(printable(&"a".repeat(300)).chars().count(), 201);
    }

    #[test]
    fn garbage_is_named_for_what_it_is_not() {
        let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let err = index(&noise[..], Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither a tar.gz nor a tar"), "{err}");
    }

    #[test]
    fn pax_times_are_floored_to_seconds_and_nanoseconds() {
        assert_eq!(pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            pax_time("1700000000.25"),
            Some((1_700_000_000, 250_000_000))
        );
        assert_eq!(pax_time("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(pax_time("-2147472000"), Some((-2_147_472_000, 0)));
        assert_eq!(pax_time("-1.5"), Some((-2, 500_000_000)));
        for bad in ["", "-", ".5", "1e9", "1.-5", "99999999999999999999", " 1"] {
            assert_eq!(pax_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_are_normalised_like_tar_x() {
        assert_eq!(normalise("./a/b/"), Some("a/b".to_owned()));
        assert_eq!(normalise("/etc/passwd"), Some("etc/passwd".to_owned()));
        assert_eq!(normalise("./"), None);
        assert_eq!(normalise("a/../b"), Some("a/../b".to_owned()));
    }
}
