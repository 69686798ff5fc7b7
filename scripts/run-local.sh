#!/usr/bin/env bash
# The main job on the embedded default: no S3. Builds sessionfs and, in a local store
# under ./.sessionfs-store, checks the store end to end, pushes a directory as a session
# (default: this repository's src/ as workspace/), lists it, reads one file lazily
# through the block cache, pulls the whole session back out, and, where /dev/fuse is
# usable, mounts the session read-write, changes it, unmounts and mounts it again.
# Then it serves the storage-worker HTTP API on a free port and uses it with curl.
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

if [ -w /dev/fuse ]; then
  mnt="$(mktemp -d)"
  # A fresh overlay: the push above replaced the object, and an overlay holding changes made
  # against the previous version would (rightly) be refused.
  export SESSIONFS_OVERLAY_DIR="$(mktemp -d)"
  "$sfs" mount "$session" "$mnt" --daemon
  echo "== mounted at $mnt: ls workspace"
  ls -la "$mnt/workspace" | head -10
  echo "written through the mount at $(date -u +%FT%TZ)" > "$mnt/workspace/NOTE.txt"
  "$sfs" umount "$mnt"
  "$sfs" mount "$session" "$mnt" --daemon --read-only
  echo "== after a remount: workspace/NOTE.txt"
  cat "$mnt/workspace/NOTE.txt"
  "$sfs" umount "$mnt"
  rmdir "$mnt"
  rm -rf "$SESSIONFS_OVERLAY_DIR"
else
  echo "== /dev/fuse is not usable here: skipping the mount"
fi

# The storage-worker HTTP API over the same store: list, read, write, download, stop.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export SESSIONFS_OVERLAY_DIR="$(mktemp -d)"
"$sfs" --quiet serve --bind 127.0.0.1 --port "$port" &
api_pid=$!
api="http://127.0.0.1:$port/api/storage-worker/sessions"
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
echo "== GET /health"
curl -fsS "http://127.0.0.1:$port/health"; echo
echo "== GET $api/$session/files (first 300 bytes)"
curl -fsS "$api/$session/files" | head -c 300; echo
echo "== PUT then GET workspace/api-note.txt"
curl -fsS -X PUT --data-binary "written through the API at $(date -u +%FT%TZ)" "$api/$session/files/workspace/api-note.txt"; echo
curl -fsS "$api/$session/files/workspace/api-note.txt"; echo
echo "== GET $api/$session/download (the change included):"
curl -fsS "$api/$session/download" | tar tzf - | grep -v '^\.sessionfs' | head -5
kill -TERM "$api_pid"; wait "$api_pid" || true
rm -rf "$SESSIONFS_OVERLAY_DIR"
