//! The shared core of sessionfs.
//!
//! The FUSE mounts (`fuse/`), the HTTP API (`api/`) and the sync agent and CLI
//! (`agent/`) are thin layers over what lives here:
//! - [`store`]: object stores, S3 and a local directory, behind one trait;
//! - the session tarball format and its index, the block cache and sessions
//!   with their pending changes arrive with the issues that need them.

pub mod store;
