#!/usr/bin/env bash
# The copy-up benchmark: one byte changed in a large file of a session (1 GiB
# at SCALE 1.0: base64 text of random bytes, which deflate shrinks to ~76 %)
# on a host that never read it, then fsync; timed beside the same change on a
# local disk, with the bytes fetched from S3 (what the block cache grew by).
# The reference for the bytes is reading the whole file cold through a fresh
# mount: what a whole-file copy-up costs at least. Then the write-back of the
# change, with what it uploaded and copied server-side. usage: bench/copyup-bench.sh BIN [SCALE]   (root: drops page caches)
set -euo pipefail
bin=$1 scale=${2:-1.0}
work=$(mktemp -d /tmp/sessionfs-copyup-bench.XXXXXX)
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cache_bytes() { du -sb "$work/cache" 2>/dev/null | cut -f1; }
mib() { python3 -c "print(f'{$1 / 2**20:.2f} MiB')"; }

size=$(python3 -c "print(int(2**30 * $scale) // 4 * 4)")
raw=$((size / 4 * 3))
echo "generating a file of $((size >> 20)) MiB" >&2
mkdir -p "$work/tree/workspace"
head -c "$raw" /dev/urandom | base64 -w 0 | head -c "$size" > "$work/tree/workspace/big.dat"
echo "small" > "$work/tree/workspace/small.txt"
offset=$((size * 2 / 3 + 12345))

session="bench__copyup${RANDOM}__main"
export SESSIONFS_CACHE_DIR="$work/cache" SESSIONFS_OVERLAY_DIR="$work/overlays"
echo "pushing" >&2
"$bin" -q push "$work/tree" "$session"

change() {  # change PATH: open for writing, one byte, fsync, close; prints seconds
  python3 - "$1" "$offset" <<'PY'
import os, sys, time
path, off = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
fd = os.open(path, os.O_WRONLY)
os.pwrite(fd, b"X", off)
os.fsync(fd)
os.close(fd)
print(time.perf_counter() - t)
PY
}

mnt="$work/mnt"
mkdir -p "$mnt"
"$bin" -q mount "$session" "$mnt" --daemon --writeback-quiet-ms 3600000 --writeback-max-lag-ms 3600000
mounts+=("$mnt")
stat "$mnt/workspace/big.dat" >/dev/null
drop_caches
before=$(cache_bytes)
sfs=$(change "$mnt/workspace/big.dat")
fetched=$(( $(cache_bytes) - before ))
local_copy="$work/local.dat"
cp "$work/tree/workspace/big.dat" "$local_copy"
drop_caches
loc=$(change "$local_copy")

# The write-back of the change (the mount packs the file from its overlay
# chunks and the object's).
before=$(cache_bytes)
t0=$(now)
"$bin" -q flush "$mnt" >/dev/null
t1=$(now)
wb_fetched=$(( $(cache_bytes) - before ))
wb=$("$bin" -q status --json "$mnt" | python3 -c "
import json, sys
w = json.load(sys.stdin)['lastWriteBack']
print(f\"uploaded {w['uploadedBytes'] / 2**20:.2f} MiB, copied server-side {w['copiedBytes'] / 2**20:.2f} MiB, {w['requests']} requests\")")
umount "$mnt"

# Reference: the whole file read cold through a fresh mount and cache.
rm -rf "$work/cache" "$work/overlays"
mkdir -p "$mnt"
"$bin" -q mount "$session" "$mnt" --daemon
drop_caches
before=$(cache_bytes)
r0=$(now)
cat "$mnt/workspace/big.dat" >/dev/null
r1=$(now)
whole=$(( $(cache_bytes) - before ))
got=$(python3 -c "import sys; f=open('$mnt/workspace/big.dat','rb'); f.seek($offset); print(f.read(1).decode())")
umount "$mnt"

echo
echo "# sessionfs copy-up benchmark: a $((size >> 20)) MiB file, $(nproc) cores"
echo
echo "| operation | sessionfs | reference | ratio | bytes fetched |"
echo "| --- | --- | --- | --- | --- |"
printf '| change 1 byte, fsync (cold) | %.3f s | %.3f s local disk | %.1f | %s (whole file read cold: %s in %.2f s) |\n' \
  "$sfs" "$loc" "$(python3 -c "print($sfs / $loc)")" "$(mib "$fetched")" "$(mib "$whole")" "$(python3 -c "print($r1 - $r0)")"
printf '| write-back of that change | %.2f s | – | – | %s (%s) |\n' "$(python3 -c "print($t1 - $t0)")" "$(mib "$wb_fetched")" "$wb"
[ "$got" = X ] || { echo "the written-back object does not hold the change (read '$got')" >&2; exit 1; }
