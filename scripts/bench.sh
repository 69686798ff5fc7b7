#!/usr/bin/env bash
# Runs the benchmarks in release mode against a real S3 server on 127.0.0.1, each figure
# printed beside a reference measured in the same run.  usage: scripts/bench.sh [SCALE]
# (SCALE 1.0 ≈ 1 GiB of source-like files; 0.1 for a quick look)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet -p sessionfs-bench
export S3_PORT="${S3_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1] % 10000 + 20000)')}"
trap 'scripts/s3-server.sh stop >/dev/null 2>&1 || true' EXIT
s3_env="$(scripts/s3-server.sh start)"
eval "$s3_env"
target/release/sessionfs-bench "${1:-1.0}"
