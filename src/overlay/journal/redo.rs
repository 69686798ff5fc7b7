//! The journal's redo log: small transactions become durable with one
//! `write` to an append-only file, and reach SQLite later, many at a time.
//!
//! A namespace operation (a create, an unlink, the size a close records)
//! changes a few rows. Committing that as its own SQLite transaction writes
//! every B-tree page it touched to the WAL, about 20 KiB for a create; a
//! create storm spent a third of the mount's time there. Here the rows go
//! into one record of a few hundred bytes appended to `journal.redo`; once
//! `write` returns the kernel has it, so a killed process loses nothing
//! that was answered. The journal applies the records in batches, in one
//! SQLite transaction each, and before anything reads it.
//!
//! Each record is `len u32 | crc32 u32 | number u64 | ops`, the CRC over
//! the number and the ops. Numbers follow each other; SQLite records the
//! last one applied in the same transaction as its rows, so a crash between
//! that commit and the log's truncation replays nothing twice. Opening reads
//! records while they are whole, consecutive and newer than the applied
//! number: a torn tail (power lost mid-append) ends the log, and nothing
//! after it was ever synced. The log is cut back to nothing only after a
//! checkpoint has put everything applied into the database file and synced
//! it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::super::node::{perm_bits, Data, Node, NodeKind, Time};
use super::super::OverlayError;

/// One row-level change, as the journal's tables receive it.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    SetMeta(String, String),
    PutNode(Node),
    DeleteNode(u64),
    PutDirent(u64, String, u64),
    DeleteDirent(u64, String),
    SetXattr(u64, String, Vec<u8>),
    RemoveXattr(u64, String),
    Change(String, u64, String),
    /// A write-back attempt's record and its base-path remapping replaced.
    ClearAttempt,
    PutRemap(u64, String),
    /// Changes up to this sequence number are in the object.
    Confirm(i64),
}

/// A logged transaction: its record number and its rows.
pub type Record = (u64, Vec<Op>);

/// Header bytes before a record's ops.
const HEADER: usize = 16;
/// A record longer than this is not one this code wrote.
const MAX_RECORD: u32 = 64 << 20;

pub struct RedoLog {
    file: File,
    /// Where the next record goes: the end of the whole records.
    len: u64,
    /// The number the next record gets.
    next: u64,
    buf: Vec<u8>,
}

impl RedoLog {
    /// Opens (or creates) the log and returns the records newer than
    /// `applied`, oldest first. What follows the last whole record is cut.
    pub fn open(path: &Path, applied: u64) -> Result<(RedoLog, Vec<Record>), OverlayError> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut records = Vec::new();
        let mut at = 0usize;
        let mut expect = applied + 1;
        let mut whole = 0usize;
        while let Some((number, ops, end)) = parse_record(&bytes, at) {
            at = end;
            if number < expect {
                // Applied before the crash; the log was not yet cut back.
                whole = end;
                continue;
            }
            if number != expect {
                break;
            }
            records.push((number, ops));
            expect += 1;
            whole = end;
        }
        if (whole as u64) < bytes.len() as u64 {
            tracing::warn!(
                "journal redo log {}: {} bytes after the last whole record dropped",
                path.display(),
                bytes.len() - whole
            );
            file.set_len(whole as u64)?;
        }
        Ok((
            RedoLog {
                file,
                len: whole as u64,
                next: expect,
                buf: Vec::new(),
            },
            records,
        ))
    }

    /// Appends one record; its number is returned. On failure (a full disk)
    /// the log is as before: a partial record would hide every later one.
    pub fn append(&mut self, ops: &[Op]) -> Result<u64, OverlayError> {
        let number = self.next;
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; HEADER]);
        for op in ops {
            encode_op(&mut self.buf, op);
        }
        let body_len = (self.buf.len() - HEADER) as u32;
        self.buf[8..16].copy_from_slice(&number.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[8..]);
        self.buf[0..4].copy_from_slice(&body_len.to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        if let Err(e) = self.file.write_all_at(&self.buf, self.len) {
            let _ = self.file.set_len(self.len);
            return Err(e.into());
        }
        self.len += self.buf.len() as u64;
        self.next += 1;
        // A huge record (a write-back's remapping) is not kept around.
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
        Ok(number)
    }

    /// Bytes in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Forgets every record: they are all in the synced database file.
    pub fn clear(&mut self) -> Result<(), OverlayError> {
        if self.len > 0 {
            self.file.set_len(0)?;
            self.len = 0;
        }
        Ok(())
    }
}

fn parse_record(bytes: &[u8], at: usize) -> Option<(u64, Vec<Op>, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let end = at + HEADER + len as usize;
    let covered = bytes.get(at + 8..end)?;
    if crc32fast::hash(covered) != crc {
        return None;
    }
    let number = u64::from_le_bytes(covered[0..8].try_into().ok()?);
    let mut r = Reader {
        bytes: &covered[8..],
    };
    let mut ops = Vec::new();
    while !r.bytes.is_empty() {
        ops.push(decode_op(&mut r)?);
    }
    Some((number, ops, end))
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
}

fn put_time(b: &mut Vec<u8>, t: Time) {
    put_u64(b, t.s as u64);
    put_u32(b, t.ns);
}

fn encode_op(b: &mut Vec<u8>, op: &Op) {
    match op {
        Op::SetMeta(k, v) => {
            b.push(1);
            put_bytes(b, k.as_bytes());
            put_bytes(b, v.as_bytes());
        }
        Op::PutNode(n) => {
            b.push(2);
            put_u64(b, n.ino);
            b.push(n.kind.code() as u8);
            for v in [u32::from(n.perm), n.uid, n.gid, n.nlink, n.rdev] {
                put_u32(b, v);
            }
            put_u64(b, n.size);
            for t in [n.atime, n.mtime, n.ctime] {
                put_time(b, t);
            }
            match n.target() {
                None => b.push(0),
                Some(t) => {
                    b.push(1);
                    put_bytes(b, t.as_bytes());
                }
            }
            match &n.data {
                Data::None | Data::Target(_) => b.push(0),
                Data::Base(p) => {
                    b.push(1);
                    put_bytes(b, p.as_bytes());
                }
                Data::Local => b.push(2),
                Data::Partial(p) => {
                    b.push(3);
                    put_bytes(b, p.as_bytes());
                }
            }
            put_u64(b, n.parent);
        }
        Op::DeleteNode(ino) => {
            b.push(3);
            put_u64(b, *ino);
        }
        Op::PutDirent(parent, name, ino) => {
            b.push(4);
            put_u64(b, *parent);
            put_bytes(b, name.as_bytes());
            put_u64(b, *ino);
        }
        Op::DeleteDirent(parent, name) => {
            b.push(5);
            put_u64(b, *parent);
            put_bytes(b, name.as_bytes());
        }
        Op::SetXattr(ino, name, value) => {
            b.push(6);
            put_u64(b, *ino);
            put_bytes(b, name.as_bytes());
            put_bytes(b, value);
        }
        Op::RemoveXattr(ino, name) => {
            b.push(7);
            put_u64(b, *ino);
            put_bytes(b, name.as_bytes());
        }
        Op::Change(op, ino, detail) => {
            b.push(8);
            put_bytes(b, op.as_bytes());
            put_u64(b, *ino);
            put_bytes(b, detail.as_bytes());
        }
        Op::ClearAttempt => b.push(9),
        Op::PutRemap(ino, path) => {
            b.push(10);
            put_u64(b, *ino);
            put_bytes(b, path.as_bytes());
        }
        Op::Confirm(seq) => {
            b.push(11);
            put_u64(b, *seq as u64);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        Some(self.take(n)?.to_vec())
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }

    fn time(&mut self) -> Option<Time> {
        Some(Time {
            s: self.u64()? as i64,
            ns: self.u32()?,
        })
    }
}

fn decode_op(r: &mut Reader) -> Option<Op> {
    Some(match r.u8()? {
        1 => Op::SetMeta(r.string()?, r.string()?),
        2 => {
            let ino = r.u64()?;
            let kind = NodeKind::from_code(i64::from(r.u8()?))?;
            let (perm, uid, gid, nlink, rdev) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
            let size = r.u64()?;
            let (atime, mtime, ctime) = (r.time()?, r.time()?, r.time()?);
            let target = match r.u8()? {
                0 => None,
                1 => Some(r.string()?),
                _ => return None,
            };
            let data = match r.u8()? {
                0 => target.map_or(Data::None, |t| Data::Target(t.into())),
                1 => Data::Base(r.string()?.into()),
                2 => Data::Local,
                3 => Data::Partial(r.string()?.into()),
                _ => return None,
            };
            Op::PutNode(Node {
                ino,
                kind,
                perm: perm_bits(perm),
                uid,
                gid,
                nlink,
                rdev,
                size,
                atime,
                mtime,
                ctime,
                data,
                parent: r.u64()?,
            })
        }
        3 => Op::DeleteNode(r.u64()?),
        4 => Op::PutDirent(r.u64()?, r.string()?, r.u64()?),
        5 => Op::DeleteDirent(r.u64()?, r.string()?),
        6 => Op::SetXattr(r.u64()?, r.string()?, r.bytes()?),
        7 => Op::RemoveXattr(r.u64()?, r.string()?),
        8 => Op::Change(r.string()?, r.u64()?, r.string()?),
        9 => Op::ClearAttempt,
        10 => Op::PutRemap(r.u64()?, r.string()?),
        11 => Op::Confirm(r.u64()? as i64),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ino: u64) -> Node {
        Node {
            ino,
            kind: NodeKind::Symlink,
            perm: 0o644,
            uid: 1,
            gid: 2,
            nlink: 1,
            rdev: 0,
            size: 12,
            atime: Time { s: -5, ns: 7 },
            mtime: Time { s: 1, ns: 2 },
            ctime: Time { s: 3, ns: 4 },
            data: Data::Base("workspace/a".into()),
            parent: 1,
        }
    }

    fn all_ops() -> Vec<Op> {
        vec![
            Op::SetMeta("k".into(), "v".into()),
            Op::PutNode(node(9)),
            Op::DeleteNode(3),
            Op::PutDirent(1, "a b".into(), 9),
            Op::DeleteDirent(1, "x".into()),
            Op::SetXattr(9, "user.a".into(), vec![0, 255, 1]),
            Op::RemoveXattr(9, "user.b".into()),
            Op::Change("create".into(), 9, "a b".into()),
            Op::ClearAttempt,
            Op::PutRemap(9, "workspace/z".into()),
            Op::Confirm(77),
        ]
    }

    #[test]
    fn records_come_back_after_a_reopen_and_applied_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redo");
        let (mut log, old) = RedoLog::open(&path, 0).unwrap();
        assert!(old.is_empty());
        assert_eq!(log.append(&all_ops()).unwrap(), 1);
        assert_eq!(log.append(&[Op::DeleteNode(4)]).unwrap(), 2);
        drop(log);
        let (log, records) = RedoLog::open(&path, 0).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], (1, all_ops()));
        assert_eq!(records[1], (2, vec![Op::DeleteNode(4)]));
        drop(log);
        let (mut log, records) = RedoLog::open(&path, 1).unwrap();
        assert_eq!(records, vec![(2, vec![Op::DeleteNode(4)])]);
        assert_eq!(log.append(&[Op::Confirm(1)]).unwrap(), 3);
    }

    #[test]
    fn a_torn_tail_ends_the_log_and_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redo");
        let (mut log, _) = RedoLog::open(&path, 0).unwrap();
        log.append(&[Op::DeleteNode(1)]).unwrap();
        log.append(&[Op::DeleteNode(2)]).unwrap();
        let whole = log.len();
        drop(log);
        // A half-written third record, then a flipped byte in the second.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        std::fs::write(&path, &bytes).unwrap();
        let (log, records) = RedoLog::open(&path, 0).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(log.len(), whole);
        drop(log);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (mut log, records) = RedoLog::open(&path, 0).unwrap();
        assert_eq!(records, vec![(1, vec![Op::DeleteNode(1)])]);
        // The next record takes the cut one's number and place.
        assert_eq!(log.append(&[Op::DeleteNode(5)]).unwrap(), 2);
    }

    #[test]
    fn records_after_a_gap_in_the_numbers_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redo");
        let (mut log, _) = RedoLog::open(&path, 0).unwrap();
        log.append(&[Op::DeleteNode(1)]).unwrap();
        log.append(&[Op::DeleteNode(2)]).unwrap();
        drop(log);
        // The database applied up to 5 (a later log, cut back): 1 and 2 are old.
        let (log, records) = RedoLog::open(&path, 5).unwrap();
        assert!(records.is_empty());
        assert_eq!(log.next, 6);
    }
}
