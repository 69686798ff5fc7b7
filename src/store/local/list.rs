//! Listing the local store with S3's semantics: keys in UTF-8 byte order,
//! common prefixes rolled up at the delimiter, pages of at most `max_keys`
//! keys and prefixes together, an opaque continuation token.
//!
//! Each page walks the directory tree below the prefix: simple, no second
//! index to keep consistent, and fast enough for an embedded store.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::keys::path_key;
use super::read_record;
use crate::store::{ListPage, ListRequest, ObjectSummary, Result, StoreError, MAX_LIST_KEYS};

/// Where a page resumes: after a key, or after every key of a common prefix.
enum Resume {
    Start,
    AfterKey(String),
    AfterPrefix(String),
}

impl Resume {
    fn parse(token: Option<&str>) -> Result<Resume> {
        match token {
            None => Ok(Resume::Start),
            Some(t) => match (t.strip_prefix("k:"), t.strip_prefix("p:")) {
                (Some(key), _) => Ok(Resume::AfterKey(key.to_owned())),
                (_, Some(prefix)) => Ok(Resume::AfterPrefix(prefix.to_owned())),
                _ => Err(StoreError::InvalidArgument {
                    op: "list",
                    key: String::new(),
                    message: format!("invalid continuation token {t:?}"),
                }),
            },
        }
    }

    fn skips(&self, key: &str) -> bool {
        match self {
            Resume::Start => false,
            Resume::AfterKey(after) => key <= after.as_str(),
            Resume::AfterPrefix(p) => key <= p.as_str() || key.starts_with(p.as_str()),
        }
    }
}

pub(super) fn list(root: &Path, req: &ListRequest) -> Result<ListPage> {
    let max = match req.max_keys {
        0 => MAX_LIST_KEYS,
        n => n.min(MAX_LIST_KEYS),
    };
    list_up_to(root, req, max)
}

/// The whole listing in one page, from one walk: what `list_all` needs,
/// where pages would walk the tree once each.
pub(super) fn list_whole(root: &Path, prefix: &str, delimiter: Option<&str>) -> Result<ListPage> {
    let req = ListRequest {
        prefix: prefix.to_owned(),
        delimiter: delimiter.map(str::to_owned),
        ..ListRequest::default()
    };
    list_up_to(root, &req, usize::MAX)
}

fn list_up_to(root: &Path, req: &ListRequest, max: usize) -> Result<ListPage> {
    let resume = Resume::parse(req.continuation.as_deref())?;
    let delimiter = req.delimiter.as_deref().filter(|d| !d.is_empty());
    let prefix = req.prefix.as_str();

    // Only the directory named by the prefix's complete segments can hold
    // matching keys. A prefix whose segments no key can have matches nothing,
    // and must never lead the walk outside the bucket.
    let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
    let mut start = root.to_path_buf();
    if !dir_part.is_empty() {
        for segment in dir_part.split('/') {
            if matches!(segment, "" | "." | "..") || segment.contains('\0') {
                return Ok(ListPage::default());
            }
            start.push(segment);
        }
    }

    let mut files = Vec::new();
    if delimiter == Some("/") && (prefix.is_empty() || prefix.ends_with('/')) {
        // Every directory below is one common prefix: read this directory
        // only, not the tree (a bucket of 100,000 sessions is 100,000
        // directories).
        collect_level(root, &start, &mut files);
    } else {
        collect_files(root, &start, prefix, &mut files);
    }
    files.sort_unstable_by(|a, b| a.0.cmp(&b.0));

    let mut page = ListPage::default();
    let mut emitted = 0;
    let mut last_token: Option<String> = None;
    for (key, path) in files {
        if resume.skips(&key) {
            continue;
        }
        if let Some(d) = delimiter {
            if let Some(i) = key[prefix.len()..].find(d) {
                let common = &key[..prefix.len() + i + d.len()];
                if page.common_prefixes.last().map(String::as_str) == Some(common) {
                    continue;
                }
                if emitted == max {
                    page.next = last_token;
                    return Ok(page);
                }
                page.common_prefixes.push(common.to_owned());
                last_token = Some(format!("p:{common}"));
                emitted += 1;
                continue;
            }
        }
        if emitted == max {
            page.next = last_token;
            return Ok(page);
        }
        // The file may have been deleted since the walk; then it is not listed.
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        let Ok(md) = file.metadata() else { continue };
        let record = read_record(&file, &md);
        page.objects.push(ObjectSummary {
            size: md.size(),
            etag: record.etag,
            last_modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            key: key.clone(),
        });
        last_token = Some(format!("k:{key}"));
        emitted += 1;
    }
    Ok(page)
}

/// The regular files of `dir`, and for each directory below it that holds a
/// file somewhere, its key with a trailing `/` (which the delimiter rolls up
/// into that common prefix). `dir` is the prefix's own directory, so every
/// key here starts with the prefix.
fn collect_level(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    for (key, path, kind) in keyed_entries(root, dir) {
        if kind.is_file() {
            out.push((key, path));
        } else if kind.is_dir() && holds_a_file(&path) {
            out.push((format!("{key}/"), path));
        }
    }
}

/// The entries of `dir` with their keys and kinds; an unreadable directory
/// (deleted during the walk) has none.
fn keyed_entries<'a>(
    root: &'a Path,
    dir: &Path,
) -> impl Iterator<Item = (String, PathBuf, fs::FileType)> + 'a {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |entry| {
            let kind = entry.file_type().ok()?;
            let path = entry.path();
            let key = path_key(root, &path)?;
            Some((key, path, kind))
        })
}

/// Whether a regular file lies anywhere below `dir` (a directory left empty
/// by a crash between a delete and its pruning lists nothing, as on S3).
fn holds_a_file(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| match e.file_type() {
        Ok(k) if k.is_file() => true,
        Ok(k) if k.is_dir() => holds_a_file(&e.path()),
        _ => false,
    })
}

/// Every regular file below `dir` whose key starts with `prefix`. Symbolic
/// links are not followed: the store never writes them, and following one
/// could lead outside the store.
fn collect_files(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) {
    for (key, path, kind) in keyed_entries(root, dir) {
        if kind.is_dir() {
            // Descend only where keys below can still match the prefix.
            let as_prefix = format!("{key}/");
            if as_prefix.starts_with(prefix) || prefix.starts_with(&as_prefix) {
                collect_files(root, &path, prefix, out);
            }
        } else if kind.is_file() && key.starts_with(prefix) {
            out.push((key, path));
        }
    }
}
