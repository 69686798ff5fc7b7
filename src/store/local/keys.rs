//! How the local store maps object keys to paths, and back.
//!
//! A key `a/b/c` is the file `{bucket dir}/a/b/c`, so the store directory stays
//! readable by hand (`tar tzf store/sessions/x/session.tar.gz` works). What a
//! filesystem cannot hold is refused up front with [`StoreError::InvalidKey`]
//! instead of being silently rewritten (as filesystem-backed S3 servers do with
//! `a//b`): empty segments (a leading, doubled or trailing `/`), `.` and `..`
//! segments, NUL, segments over 255 bytes, keys over 1024 bytes. One more limit
//! is inherent to the layout: a key cannot be both an object and a prefix of
//! another key (`a` and `a/b`); that conflict is reported when it arises.

use std::path::{Path, PathBuf};

use crate::store::{Result, StoreError};

/// S3's limit on key length.
pub(crate) const MAX_KEY_BYTES: usize = 1024;
/// Most filesystems' limit on one path segment.
const MAX_SEGMENT_BYTES: usize = 255;

fn invalid(key: &str, reason: impl Into<String>) -> StoreError {
    StoreError::InvalidKey {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// Checks `key` and returns its path below `root`.
pub(crate) fn key_path(root: &Path, key: &str) -> Result<PathBuf> {
    if key.is_empty() {
        return Err(invalid(key, "empty key"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(
            key,
            format!("{} bytes, longer than {MAX_KEY_BYTES}", key.len()),
        ));
    }
    if key.contains('\0') {
        return Err(invalid(key, "contains NUL"));
    }
    let mut path = root.to_path_buf();
    for segment in key.split('/') {
        match segment {
            "" => {
                return Err(invalid(
                    key,
                    "empty path segment (leading, doubled or trailing '/')",
                ))
            }
            "." | ".." => return Err(invalid(key, format!("'{segment}' segment"))),
            s if s.len() > MAX_SEGMENT_BYTES => {
                return Err(invalid(
                    key,
                    format!("a segment is longer than {MAX_SEGMENT_BYTES} bytes"),
                ))
            }
            s => path.push(s),
        }
    }
    Ok(path)
}

/// The key of a file found below `root`, or `None` for a name no key maps to
/// (not UTF-8: the store never writes such a name, so it is not ours).
pub(crate) fn path_key(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let mut key = String::new();
    for (i, part) in rel.components().enumerate() {
        if i > 0 {
            key.push('/');
        }
        key.push_str(part.as_os_str().to_str()?);
    }
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        let root = Path::new("/r");
        assert_eq!(
            key_path(root, "s/session.tar.gz").unwrap(),
            Path::new("/r/s/session.tar.gz")
        );
        assert_eq!(
            key_path(root, "with space/ünïcødé").unwrap(),
            Path::new("/r/with space/ünïcødé")
        );
        assert_eq!(
            path_key(root, Path::new("/r/with space/ünïcødé")).unwrap(),
            "with space/ünïcødé"
        );
    }

    #[test]
    fn refuses_what_a_filesystem_cannot_hold() {
        let root = Path::new("/r");
        for bad in [
            "", "/a", "a//b", "a/", "a/../b", "..", "./a", "a/./b", "a\0b",
        ] {
            assert!(
                matches!(key_path(root, bad), Err(StoreError::InvalidKey { .. })),
                "{bad:?}"
            );
        }
        assert!(key_path(root, &"x".repeat(256)).is_err());
        assert!(key_path(root, &"x/".repeat(600)).is_err());
    }
}
