//! Multipart uploads in the local store, with S3's rules: part numbers
//! 1..=10000, a part uploaded again replaces the earlier one, parts other than
//! the last at least 5 MiB, completion names parts in ascending order with the
//! ETags their uploads returned, and range copies only from sources over 5 MiB.
//!
//! An upload is a directory `uploads/{id}` holding `upload.json` (key, content
//! type, metadata) and one file per part, its ETag in the same extended
//! attribute as objects. Completion concatenates the parts into a temporary
//! file and commits it like a put, under the completion's precondition.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::durable::{self, TempFile};
use super::keys::key_path;
use super::{new_etag, read_record, stamp, Inner, ObjectRecord};
use crate::store::{
    validate_completion, validate_part_number, CompletedPart, CopySource, Precondition, PutOptions,
    PutResult, Result, StoreError, MIN_PART_SIZE,
};

#[derive(Serialize, Deserialize)]
struct UploadInfo {
    key: String,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    metadata: std::collections::BTreeMap<String, String>,
}

fn upload_dir(s: &Inner, op: &'static str, key: &str, upload_id: &str) -> Result<PathBuf> {
    // Upload ids are ours (hex); anything else, a path above all, names no upload.
    let well_formed = upload_id.len() == 32 && upload_id.bytes().all(|b| b.is_ascii_hexdigit());
    let not_found = || StoreError::UploadNotFound {
        op,
        key: key.to_owned(),
        upload_id: upload_id.to_owned(),
    };
    if !well_formed {
        return Err(not_found());
    }
    let dir = s.uploads.join(upload_id);
    let info: UploadInfo = match fs::read(dir.join("upload.json")) {
        Ok(raw) => serde_json::from_slice(&raw).map_err(|e| StoreError::Other {
            op,
            key: key.to_owned(),
            message: format!("corrupt upload record: {e}"),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(StoreError::io(op, key, e)),
    };
    if info.key != key {
        return Err(not_found());
    }
    Ok(dir)
}

fn part_path(dir: &std::path::Path, part_number: u32) -> PathBuf {
    dir.join(format!("part-{part_number:05}"))
}

pub(super) fn create(s: &Inner, key: &str, opts: PutOptions) -> Result<String> {
    const OP: &str = "create_multipart";
    key_path(&s.root, key)?;
    let id = format!("{:032x}", rand::random::<u128>());
    let dir = s.uploads.join(&id);
    let info = UploadInfo {
        key: key.to_owned(),
        content_type: opts.content_type,
        metadata: opts.metadata,
    };
    let io_err = |e| StoreError::io(OP, key, e);
    fs::create_dir(&dir).map_err(io_err)?;
    let mut temp = TempFile::create(&s.tmp).map_err(io_err)?;
    let encoded = serde_json::to_vec(&info).map_err(|e| StoreError::Other {
        op: OP,
        key: key.to_owned(),
        message: e.to_string(),
    })?;
    temp.write_all(&encoded).map_err(io_err)?;
    temp.sync().map_err(io_err)?;
    temp.rename_into(&dir.join("upload.json")).map_err(io_err)?;
    Ok(id)
}

/// Writes a part from `fill` (which writes the bytes into the temp file) and
/// gives it a fresh ETag.
fn store_part(
    s: &Inner,
    op: &'static str,
    key: &str,
    upload_id: &str,
    part_number: u32,
    fill: impl FnOnce(&mut TempFile) -> Result<()>,
) -> Result<CompletedPart> {
    validate_part_number(op, key, part_number)?;
    let dir = upload_dir(s, op, key, upload_id)?;
    let io_err = |e| StoreError::io(op, key, e);
    let mut temp = TempFile::create(&s.tmp).map_err(io_err)?;
    fill(&mut temp)?;
    let etag = new_etag(None);
    let record = ObjectRecord {
        etag: etag.clone(),
        ..ObjectRecord::default()
    };
    stamp(op, key, &temp, &record)?;
    match temp.rename_into(&part_path(&dir, part_number)) {
        Ok(()) => Ok(CompletedPart { part_number, etag }),
        // Aborted while the part was being written.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::UploadNotFound {
            op,
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
        }),
        Err(e) => Err(io_err(e)),
    }
}

pub(super) fn upload_part(
    s: &Inner,
    key: &str,
    upload_id: &str,
    part_number: u32,
    body: &[u8],
) -> Result<CompletedPart> {
    const OP: &str = "upload_part";
    store_part(s, OP, key, upload_id, part_number, |temp| {
        temp.write_all(body).map_err(|e| StoreError::io(OP, key, e))
    })
}

pub(super) fn upload_part_copy(
    s: &Inner,
    key: &str,
    upload_id: &str,
    part_number: u32,
    source: &CopySource,
) -> Result<CompletedPart> {
    const OP: &str = "upload_part_copy";
    // Validate the upload before reading the source, as S3 does.
    upload_dir(s, OP, key, upload_id)?;
    let (file, meta) = s.open_object(OP, &source.key)?;
    if let Some(expected) = &source.if_match {
        if *expected != meta.etag {
            return Err(StoreError::precondition(OP, &source.key));
        }
    }
    let range = source.range.clone();
    let as_range = crate::store::ByteRange::Bounded {
        start: range.start,
        end: range.end,
    };
    if range.end <= range.start || range.end > meta.size {
        return Err(StoreError::invalid_range(
            OP,
            &source.key,
            &as_range,
            Some(meta.size),
        ));
    }
    if meta.size <= MIN_PART_SIZE && (range.start, range.end) != (0, meta.size) {
        return Err(StoreError::InvalidArgument {
            op: OP,
            key: source.key.clone(),
            message: format!(
                "a byte range can only be copied from a source larger than {MIN_PART_SIZE} bytes (S3's rule)"
            ),
        });
    }
    store_part(s, OP, key, upload_id, part_number, |temp| {
        copy_bytes(&file, range.start, range.end - range.start, temp.file(), 0)
            .map_err(|e| StoreError::io(OP, key, e))
    })
}

/// Copies `len` bytes of `src` from offset `from` into `dst` at offset `to`.
fn copy_bytes(src: &File, from: u64, len: u64, dst: &File, to: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = src.read_at(&mut buf[..want], from + done)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

pub(super) fn complete(
    s: &Inner,
    key: &str,
    upload_id: &str,
    parts: &[CompletedPart],
    precondition: &Precondition,
) -> Result<PutResult> {
    const OP: &str = "complete_multipart";
    let dir = upload_dir(s, OP, key, upload_id)?;
    let invalid = |message: String| StoreError::InvalidPart {
        op: OP,
        key: key.to_owned(),
        message,
    };
    validate_completion(OP, key, parts)?;
    let io_err = |e| StoreError::io(OP, key, e);
    let temp = TempFile::create(&s.tmp).map_err(io_err)?;
    let mut written = 0u64;
    for (i, part) in parts.iter().enumerate() {
        let file = match File::open(part_path(&dir, part.part_number)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(invalid(format!(
                    "part {} was not uploaded",
                    part.part_number
                )))
            }
            Err(e) => return Err(io_err(e)),
        };
        let md = file.metadata().map_err(io_err)?;
        if read_record(&file, &md).etag != part.etag {
            return Err(invalid(format!(
                "part {} has another ETag than {}",
                part.part_number, part.etag
            )));
        }
        let is_last = i + 1 == parts.len();
        if !is_last && md.len() < MIN_PART_SIZE {
            return Err(invalid(format!(
                "part {} is {} bytes; parts other than the last must be at least {MIN_PART_SIZE}",
                part.part_number,
                md.len()
            )));
        }
        copy_bytes(&file, 0, md.len(), temp.file(), written).map_err(io_err)?;
        written += md.len();
    }
    let upload: UploadInfo = serde_json::from_slice(
        &fs::read(dir.join("upload.json")).map_err(io_err)?,
    )
    .map_err(|e| StoreError::Other {
        op: OP,
        key: key.to_owned(),
        message: e.to_string(),
    })?;
    let record = ObjectRecord {
        etag: new_etag(Some(parts.len())),
        content_type: upload.content_type,
        metadata: upload.metadata,
    };
    let etag = s.commit(OP, key, temp, &record, precondition)?;
    let _ = fs::remove_dir_all(&dir);
    let _ = durable::sync_dir(&s.uploads);
    Ok(PutResult { etag })
}

pub(super) fn abort(s: &Inner, key: &str, upload_id: &str) -> Result<()> {
    const OP: &str = "abort_multipart";
    let dir = upload_dir(s, OP, key, upload_id)?;
    fs::remove_dir_all(&dir).map_err(|e| StoreError::io(OP, key, e))?;
    durable::sync_dir(&s.uploads).map_err(|e| StoreError::io(OP, key, e))
}

pub(super) fn list(s: &Inner, key: &str) -> Result<Vec<crate::store::PendingUpload>> {
    const OP: &str = "list_multipart";
    let mut out = Vec::new();
    let dir = match fs::read_dir(&s.uploads) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(OP, key, e)),
    };
    for entry in dir.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // Uploads being aborted or created meanwhile are not errors.
        let Ok(raw) = fs::read(entry.path().join("upload.json")) else {
            continue;
        };
        let Ok(info) = serde_json::from_slice::<UploadInfo>(&raw) else {
            continue;
        };
        if info.key == key {
            let initiated = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            out.push(crate::store::PendingUpload {
                key: key.to_owned(),
                upload_id: id,
                initiated,
            });
        }
    }
    Ok(out)
}
