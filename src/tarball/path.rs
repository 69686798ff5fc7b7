//! What an entry path inside a session may be.
//!
//! Paths come from objects other services wrote, so they are hostile until
//! checked: relative, UTF-8, no empty, `.` or `..` segments, no NUL or other
//! control characters, no backslashes (a Windows separator some extractors
//! honour), segments of at most 255 bytes. A path that passes cannot name
//! anything outside the session root.

use super::TarballError;

pub const MAX_SEGMENT: usize = 255;
pub const MAX_PATH: usize = 4096;

pub fn check_entry_path(path: &str) -> Result<(), TarballError> {
    let unsafe_path = |reason: &str| TarballError::UnsafePath {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if path.is_empty() {
        return Err(unsafe_path("empty"));
    }
    if path.len() > MAX_PATH {
        return Err(unsafe_path("longer than 4096 bytes"));
    }
    if path.starts_with('/') {
        return Err(unsafe_path("absolute"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(unsafe_path("control character"));
    }
    if path.contains('\\') {
        return Err(unsafe_path("backslash"));
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err(unsafe_path("empty segment")),
            "." | ".." => return Err(unsafe_path("'.' or '..' segment")),
            s if s.len() > MAX_SEGMENT => return Err(unsafe_path("segment longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for ok in [
            "workspace",
            "workspace/src/a.ts",
            ".session-metadata.json",
            "ü/日本",
        ] {
            assert!(check_entry_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "a/",
            "a\\..\\b",
            "a\0b",
            "a\nb",
        ] {
            assert!(check_entry_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_entry_path(&"x".repeat(256)).is_err());
    }
}
