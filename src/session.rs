//! Session paths and where their objects live.
//!
//! A session path is one segment, by the storage-worker convention
//! `{owner}__{repo}__{branch}`: never a `/`, never `.` or `..`, no control
//! characters, at most 255 bytes. Its object is `{sessionPath}/session.tar.gz`.

/// The object name inside a session's prefix.
pub const OBJECT_NAME: &str = "session.tar.gz";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionPath(String);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid session path {path:?}: {reason}")]
pub struct InvalidSessionPath {
    pub path: String,
    pub reason: &'static str,
}

impl SessionPath {
    pub fn parse(path: &str) -> Result<SessionPath, InvalidSessionPath> {
        let reason = if path.is_empty() {
            Some("empty")
        } else if path.len() > 255 {
            Some("longer than 255 bytes")
        } else if path.contains('/') || path.contains('\\') {
            Some("contains '/' or '\\\\'")
        } else if path == "." || path == ".." {
            Some("'.' or '..'")
        } else if path.chars().any(char::is_control) {
            Some("contains a control character")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidSessionPath {
                path: path.to_owned(),
                reason,
            }),
            None => Ok(SessionPath(path.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of the session's object.
    pub fn object_key(&self) -> String {
        format!("{}/{OBJECT_NAME}", self.0)
    }
}

impl std::fmt::Display for SessionPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_paths() {
        assert_eq!(
            SessionPath::parse("webedt__monorepo__main")
                .unwrap()
                .object_key(),
            "webedt__monorepo__main/session.tar.gz"
        );
        for bad in ["", "a/b", "..", ".", "a\0b", "a\\b"] {
            assert!(SessionPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(SessionPath::parse(&"x".repeat(256)).is_err());
    }
}
