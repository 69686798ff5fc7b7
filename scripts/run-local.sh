#!/usr/bin/env bash
# The main job on the embedded default: no S3, no FUSE needed. Builds sessionfs and
# checks the local store end to end (put, conditional put, get, delete) in ./.sessionfs-store.
# Later issues extend this to push, mount and serve a session from the same store.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SESSIONFS_STORE=local
export SESSIONFS_STORE_DIR="${SESSIONFS_STORE_DIR:-$PWD/.sessionfs-store}"
cargo build --release --quiet -p sessionfs-agent
exec target/release/sessionfs store check "$@"
