//! Tar headers as the writer emits them: ustar, plus a PAX extended header
//! only where ustar cannot say it (long names or link targets, sizes of 8 GiB
//! and more, large ids, mtimes before 1970, xattrs). That keeps the stream as small as `tar czf`'s
//! while GNU tar, bsdtar, Python and Node read every field back. Nanosecond
//! mtimes live in the TOC, not in PAX records, for the same reason.

use tar::{EntryType, Header};

use super::toc::{Entry, Kind};
use super::TarballError;

const USTAR_MAX_NUMERIC: u64 = 0o7777777; // 7 octal digits: uid, gid
const USTAR_MAX_SIZE: u64 = 0o77777777777; // 11 octal digits

/// The header blocks (PAX header, if any, then the ustar header) of `entry`.
pub fn encode(entry: &Entry) -> Result<Vec<u8>, TarballError> {
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut h = Header::new_ustar();
    let name = match entry.t {
        Kind::Dir => format!("{}/", entry.p),
        _ => entry.p.to_string(),
    };
    if h.set_path(&name).is_err() || name.len() > 255 {
        pax.push(("path".into(), name.clone().into_bytes()));
        // A readable stand-in for readers that ignore PAX; the record wins elsewhere.
        let short: String = name
            .chars()
            .rev()
            .take(90)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        h.set_path(short.trim_start_matches('/'))
            .map_err(|e| TarballError::Unsupported(format!("{:?}: {e}", entry.p)))?;
    }
    h.set_mode(entry.m & 0o7777);
    for (key, value, set) in [
        ("uid", entry.u, Header::set_uid as fn(&mut Header, u64)),
        ("gid", entry.g, Header::set_gid as fn(&mut Header, u64)),
    ] {
        if value > USTAR_MAX_NUMERIC {
            pax.push((key.into(), value.to_string().into_bytes()));
            set(&mut h, 0);
        } else {
            set(&mut h, value);
        }
    }
    match u64::try_from(entry.mt) {
        Ok(mt) => h.set_mtime(mt),
        Err(_) => {
            // Before 1970 ustar has no field for it (GNU tar's base-256 is
            // not read by every reader); PAX says it, seconds with a sign.
            pax.push(("mtime".into(), entry.mt.to_string().into_bytes()));
            h.set_mtime(0);
        }
    }
    let size = if entry.t == Kind::File { entry.s } else { 0 };
    if size > USTAR_MAX_SIZE {
        pax.push(("size".into(), size.to_string().into_bytes()));
    }
    // Base-256 beyond 8 GiB (GNU's extension) for readers that skip PAX.
    h.set_size(size);
    h.set_entry_type(match entry.t {
        Kind::File => EntryType::Regular,
        Kind::Dir => EntryType::Directory,
        Kind::Symlink => EntryType::Symlink,
        Kind::HardLink => EntryType::Link,
        Kind::Fifo => EntryType::Fifo,
        Kind::CharDevice => EntryType::Char,
        Kind::BlockDevice => EntryType::Block,
    });
    if let Some(target) = entry.lt() {
        if target.len() > 100 || h.set_link_name(target).is_err() {
            pax.push(("linkpath".into(), target.as_bytes().to_vec()));
            // The PAX record carries the target; the ustar field holds its
            // first 100 bytes, as GNU tar writes it: readers that ignore PAX
            // get a stand-in, and npm's tar refuses a link whose ustar field
            // is empty (and then applies the record to the next entry).
            let mut cut = target.len().min(100);
            while !target.is_char_boundary(cut) {
                cut -= 1;
            }
            let field = &mut h.as_mut_bytes()[157..257];
            field.fill(0);
            field[..cut].copy_from_slice(&target.as_bytes()[..cut]);
        }
    }
    if let Some((major, minor)) = entry.dv() {
        h.set_device_major(major)
            .and_then(|()| h.set_device_minor(minor))
            .map_err(|e| {
                TarballError::Unsupported(format!("{:?}: device numbers: {e}", entry.p))
            })?;
    }
    for (name, value) in entry.x() {
        let value = hex_decode(value).ok_or_else(|| {
            TarballError::Corrupt(format!("{:?}: xattr {name} is not hex", entry.p))
        })?;
        pax.push((format!("SCHILY.xattr.{name}"), value));
    }
    h.set_cksum();

    let mut out = Vec::with_capacity(1024);
    if !pax.is_empty() {
        let records = pax_records(&pax);
        let mut x = Header::new_ustar();
        let base = entry.p.rsplit('/').next().unwrap_or("entry");
        let short: String = base.chars().take(80).collect();
        x.set_path(format!("PaxHeader/{short}"))
            .map_err(|e| TarballError::Unsupported(format!("{:?}: {e}", entry.p)))?;
        x.set_mode(0o644);
        x.set_mtime(0);
        x.set_size(records.len() as u64);
        x.set_entry_type(EntryType::XHeader);
        x.set_cksum();
        out.extend_from_slice(x.as_bytes());
        out.extend_from_slice(&records);
        pad_to_block(&mut out);
    }
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

/// PAX records: `"{len} {key}={value}\n"`, where len counts itself.
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

pub fn pad_to_block(buf: &mut Vec<u8>) {
    let rem = buf.len() % 512;
    if rem != 0 {
        buf.resize(buf.len() + 512 - rem, 0);
    }
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str) -> Entry {
        Entry {
            p: p.into(),
            t: Kind::File,
            s: 5,
            m: 0o644,
            u: 1000,
            g: 1000,
            mt: 1_700_000_000,
            mn: 0,
            ho: 0,
            data_offset: 512,
            rare: None,
            sd: crate::tarball::toc::Sd::NONE,
        }
    }

    #[test]
    fn short_entries_are_one_ustar_block() {
        assert_eq!(encode(&file("workspace/a.txt")).unwrap().len(), 512);
    }

    #[test]
    fn long_names_get_a_pax_header() {
        let long = format!("workspace/{}", "d/".repeat(150) + "file.txt");
        let blocks = encode(&file(&long)).unwrap();
        assert!(blocks.len() >= 1536);
        let text = String::from_utf8_lossy(&blocks);
        assert!(text.contains(&format!(" path={long}\n")));
    }

    #[test]
    fn long_link_targets_keep_a_stand_in_in_the_ustar_field() {
        // 99 ASCII bytes then a 2-byte character: the cut falls before it.
        let target = format!("{}é{}", "t".repeat(99), "u".repeat(60));
        let mut e = file("workspace/link");
        e.t = Kind::Symlink;
        e.s = 0;
        e.set_lt(Some(target.clone()));
        let blocks = encode(&e).unwrap();
        let text = String::from_utf8_lossy(&blocks);
        assert!(text.contains(&format!(" linkpath={target}\n")));
        let ustar = &blocks[blocks.len() - 512..];
        assert_eq!(&ustar[157..256], "t".repeat(99).as_bytes());
        assert_eq!(ustar[256], 0);
    }

    #[test]
    fn mtimes_before_1970_go_in_a_pax_record() {
        let mut e = file("workspace/old");
        e.mt = -2_147_472_000;
        let blocks = encode(&e).unwrap();
        assert!(String::from_utf8_lossy(&blocks).contains(" mtime=-2147472000\n"));
        let ustar = Header::from_byte_slice(&blocks[blocks.len() - 512..]);
        assert_eq!(ustar.mtime().unwrap(), 0);
        assert_eq!(encode(&file("workspace/new")).unwrap().len(), 512);
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        let r = pax_records(&[("path".into(), b"x".repeat(93))]);
        let s = String::from_utf8(r).unwrap();
        let (len, _) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), s.len());
    }
}
