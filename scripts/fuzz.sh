#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS (default 20) each, starting from
# the seeds in fuzz/seeds/. Works on the stable toolchain (no sanitizer: `-s none`).
# Installs cargo-fuzz when missing. A crash fails the run and leaves its input in
# fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  cp -n "seeds/$target/"* "corpus/$target/" 2>/dev/null || true
  echo "fuzzing $target for ${seconds}s" >&2
  cargo fuzz run "$target" -s none "corpus/$target" -- -max_total_time="$seconds" 2>&1 | tail -2
  [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
done
