//! The shared core of sessionfs.
//!
//! The FUSE mounts (`fuse/`), the HTTP API (`api/`) and the sync agent and CLI
//! (`agent/`) are thin layers over what lives here:
//! - [`store`]: object stores, S3 and a local directory, behind one trait;
//! - [`tarball`]: the seekable session object, its writer, lazy reader and TOC index;
//! - [`cache`]: the on-disk block cache;
//! - [`session`]: session paths and the keys of their objects;
//! - [`overlay`]: open sessions and their pending changes (the tree, the
//!   journal, the changed bytes), shared by mounts and API;
//! - [`text`]: outside text made safe to show (control characters escaped);
//! - [`memory`]: freed memory handed back after large transient work.

pub mod cache;
pub mod memory;
pub mod overlay;
pub mod session;
pub mod store;
pub mod tarball;
pub mod text;
