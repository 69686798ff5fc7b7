#!/usr/bin/env bash
# Runs the benchmarks in release mode against a real S3 server on 127.0.0.1, each figure
# printed beside a reference measured in the same run.
#   usage: scripts/bench.sh [SCALE] [tarball|sequential|writeback|roots|mount|copyup|api|all]
# SCALE 1.0 ≈ 1 GiB of source-like files for the tarball benchmark and 700 MB in
# 45,000 files for the mount benchmark; 0.1 for a quick look. The mount benchmark
# needs root (it drops the page cache and mounts ratarmount and archivemount). The API
# benchmark runs wrk against GET and PUT of a 4 KiB file, beside nginx (10 s each, x SCALE).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scale="${1:-1.0}" which="${2:-all}"
cargo build --release --quiet -p sessionfs-bench -p sessionfs-agent
export S3_PORT="${S3_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1] % 10000 + 20000)')}"
trap 'scripts/s3-server.sh stop >/dev/null 2>&1 || true' EXIT
s3_env="$(scripts/s3-server.sh start)"
eval "$s3_env"
if [ "$which" = all ] || [ "$which" = tarball ]; then
  target/release/sessionfs-bench "$scale"
fi
# `sequential`: only the tarball benchmark's sequential read, on a session of one large file
# (about a minute; `all` runs it as part of `tarball`).
if [ "$which" = sequential ]; then
  target/release/sessionfs-bench "$scale" sequential
fi
if [ "$which" = all ] || [ "$which" = writeback ]; then
  target/release/sessionfs-bench "$scale" writeback
fi
if [ "$which" = all ] || [ "$which" = roots ]; then
  target/release/sessionfs-bench "$scale" roots
fi
if [ "$which" = all ] || [ "$which" = mount ]; then
  bench/mount-bench.sh "$(pwd)/target/release/sessionfs" "$scale"
fi
# `copyup`: one byte changed in a 1 GiB file (x SCALE) of a session, then fsync.
if [ "$which" = all ] || [ "$which" = copyup ]; then
  bench/copyup-bench.sh "$(pwd)/target/release/sessionfs" "$scale"
fi
if [ "$which" = all ] || [ "$which" = api ]; then
  bench/api-bench.sh "$(pwd)/target/release/sessionfs" "$(python3 -c "print(max(3, round(10 * $scale)))")"
fi
