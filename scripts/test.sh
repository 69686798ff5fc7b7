#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one:
#   1. installs what is missing (fuse3 and libfuse3-dev from apt, the S3 server and
#      openapi-spec-validator from PyPI, pjdfstest and fsx from crates.io),
#   2. checks formatting and lints (cargo fmt --check, cargo clippy -D warnings),
#   3. fuzzes the parsers of untrusted input briefly (scripts/fuzz.sh),
#   4. starts a real S3 server on 127.0.0.1 and runs every test of the workspace against it,
#   5. stops the server, and exits non-zero if anything failed.
# Tests that need S3 fail (never skip) when the server is not there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n== %s\n' "$*" >&2; }

install_system_packages() {
  local missing=()
  # fuse3 for the mounts; bsdtar, node and python3 read our objects in the compatibility tests;
  # pigz makes foreign tarballs.
  for pkg in fuse3 libfuse3-dev pkg-config libarchive-tools nodejs python3 pigz man-db; do
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

# The npm `tar` package (what Node services extract with), pinned, into the
# repo's own .tools/node: the compatibility tests extract and create with it.
install_node_tar() {
  local dir=.tools/node version=7.4.3
  if ! grep -qs "\"version\": \"$version\"" "$dir/node_modules/tar/package.json"; then
    if ! command -v npm >/dev/null; then
      local sudo=""
      [ "$(id -u)" -eq 0 ] || sudo="sudo"
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq npm >/dev/null
    fi
    log "installing tar@$version from npm"
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --silent "tar@$version"
  fi
}
install_node_tar

# The filesystem suites run inside mounts: pjdfstest and fsx from crates.io,
# built once into the repo's own .tools/ (pjdfstest switches to the `tests` user).
install_fs_suites() {
  local root=.tools/cargo
  # Pinned: the counts the suite asserts are those of these versions.
  for pinned in pjdfstest@0.2.2 fsx@0.3.2; do
    local tool=${pinned%@*} version=${pinned#*@}
    if ! "$root/bin/$tool" --version 2>/dev/null | grep -q "$version"; then
      log "installing $pinned"
      cargo install --quiet --locked --force --root "$root" "$tool" --version "$version"
    fi
  done
  if ! id tests >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo useradd --no-create-home --user-group --shell /usr/sbin/nologin tests
  fi
}
install_fs_suites

# The OpenAPI document is checked by openapi-spec-validator (PyPI), in the repo's .tools/.
install_python_tools() {
  if [ ! -x .tools/py/bin/openapi-spec-validator ]; then
    log "installing openapi-spec-validator"
    python3 -m venv .tools/py
    .tools/py/bin/pip install -q --disable-pip-version-check "openapi-spec-validator==0.7.1"
  fi
}
install_python_tools

log "cargo fmt --check"
cargo fmt --all --check

log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "building"
cargo build --workspace --all-targets --quiet

log "systemd-analyze verify (units, with this build's binary)"
verify_units() {
  local dir; dir="$(mktemp -d)"
  for unit in systemd/*.service; do
    sed "s#/usr/local/bin/sessionfs#$PWD/target/debug/sessionfs#" "$unit" > "$dir/$(basename "$unit")"
  done
  # It exits 0 on warnings too: anything it says is a failure.
  local said
  said="$(cd "$dir" && systemd-analyze verify ./sessionfs-api.service ./sessionfs-root.service \
    ./sessionfs-mount@owner__repo__main.service 2>&1)"
  rm -rf "$dir"
  if [ -n "$said" ]; then
    printf '%s\n' "$said" >&2
    return 1
  fi
}
verify_units

log "fuzzing"
scripts/fuzz.sh

# A port for the S3 server whose gRPC companion (port + 10000) is free too, so a
# developer's own server, or another run, never collides with this one.
free_port_pair() {
  python3 - <<'PY'
import random, socket
for _ in range(200):
    port = random.randint(20000, 29999)
    try:
        socks = []
        for p in (port, port + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
        print(port)
        break
    except OSError:
        pass
    finally:
        for s in socks: s.close()
PY
}

log "starting the S3 server"
export S3_PORT="${S3_PORT:-$(free_port_pair)}"
trap 'scripts/s3-server.sh stop >/dev/null 2>&1 || true' EXIT
s3_env="$(scripts/s3-server.sh start)"
eval "$s3_env"

log "running the tests"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast || status=$?
else
  cargo test --workspace --no-fail-fast || status=$?
fi
if [ "$status" -ne 0 ]; then
  log "tests failed (exit $status); the S3 server and the disk, for telling its faults from ours"
  scripts/s3-server.sh diagnose || true
fi
exit "$status"
