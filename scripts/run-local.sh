#!/usr/bin/env bash
# The main job on the embedded default: no S3, no FUSE. Builds sessionfs and, in a local
# store under ./.sessionfs-store, checks the store end to end, pushes a directory as a
# session (default: this repository's src/ as workspace/), lists it, reads one file
# lazily through the block cache, and pulls the whole session back out.
#   usage: scripts/run-local.sh [DIR [SESSION]]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SESSIONFS_STORE=local
export SESSIONFS_STORE_DIR="${SESSIONFS_STORE_DIR:-$PWD/.sessionfs-store}"
export SESSIONFS_CACHE_DIR="${SESSIONFS_CACHE_DIR:-$PWD/.sessionfs-store/.cache}"
cargo build --release --quiet -p sessionfs-agent
sfs=target/release/sessionfs
session="${2:-local__sessionfs__demo}"
if [ -n "${1:-}" ]; then
  dir="$1"
else
  dir="$(mktemp -d)"
  trap 'rm -rf "$dir"' EXIT
  mkdir -p "$dir/workspace"
  cp -r src "$dir/workspace/src"
  echo "{\"sessionPath\":\"$session\"}" > "$dir/.session-metadata.json"
fi
"$sfs" store check
"$sfs" push "$dir" "$session"
echo "== sessionfs ls $session (first 10 entries)"
"$sfs" ls -l "$session" | head -10
first_file="$("$sfs" ls -l "$session" | awk '$1 ~ /^-/ {print $4; exit}')"
echo "== sessionfs cat $session $first_file (first 5 lines)"
"$sfs" cat "$session" "$first_file" | head -5
out="$(mktemp -d)"
"$sfs" pull "$session" "$out/$session"
echo "== pulled into $out/$session:"
ls -la "$out/$session"
