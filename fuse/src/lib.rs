//! The FUSE filesystem of sessionfs (issue "Read-write FUSE mount of sessions").
//!
//! This crate will own everything between the kernel and a session: the `fuser`
//! `Filesystem` implementation for one session (`sessionfs mount`) and for a root
//! holding every session of a bucket (`sessionfs serve --mount-root`), the inode
//! table, the local write overlay with its crash-safe journal, the change feed the
//! sync agent consumes, and the mapping of core errors to errno values.
//!
//! It is empty until that issue lands: the crate exists so the workspace layout,
//! and the dependency direction (fuse → core, never core → fuse), are fixed now.
