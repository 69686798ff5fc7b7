#!/usr/bin/env bash
# The mount benchmark: a generated tree of source-like files (SCALE 1.0 ≈ 700 MB
# in 45,000 files, a git repository) pushed to the S3 server given in MINIO_*,
# mounted with `sessionfs mount`, and each operation timed beside the same on a
# local directory; the read-only ones also beside ratarmount (PyPI) and
# archivemount (Debian) on a `tar czf` of the same tree.
# Caches are dropped before every cold row (needs root). Bytes fetched from S3
# are what the block cache grew by.  usage: bench/mount-bench.sh BIN [SCALE]
set -euo pipefail
bin=$1 scale=${2:-1.0}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
work=$(mktemp -d /tmp/sessionfs-mount-bench.XXXXXX)
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

install_references() {
  if ! command -v archivemount >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq archivemount >/dev/null
  fi
  if [ ! -x .tools/bench-venv/bin/ratarmount ]; then
    python3 -m venv .tools/bench-venv
    .tools/bench-venv/bin/pip install -q ratarmount
  fi
}
install_references

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f} s')"; }
ratio() { python3 -c "a=$1; b=$2; print(f'{a/b:.2f}' if a >= 0 and b > 0 else '-')"; }
# settle: waits for the mount's write-back of what earlier rows changed (`sessionfs flush`), so
# that it shares the cores with no command timed here, the mount's or a reference's. A row's
# own write-back starts once its changes have been quiet for 2 s, after its command.
settle() {
  if [ -n "${mnt:-}" ] && mountpoint -q "$mnt"; then "$bin" -q flush "$mnt" >/dev/null || true; fi
}
drop_caches() { settle; sync; echo 3 > /proc/sys/vm/drop_caches; }
# time_cmd VAR command...: runs the command (at most LIMIT seconds), stores seconds in VAR
# (-1 when it ran out of time).
LIMIT=${LIMIT:-300}
time_cmd() {
  local var=$1; shift
  local t0 t1
  [ "$var" = s ] || settle
  t0=$(now)
  if timeout "$LIMIT" bash -c "$*" >/dev/null; then
    t1=$(now); printf -v "$var" '%s' "$(python3 -c "print($t1 - $t0)")"
  else
    printf -v "$var" '%s' -1
  fi
}
fmt() { python3 -c "t=$1; print(f'{t:.2f} s' if t >= 0 else '> $LIMIT s (stopped)')"; }
# The kernel's requests to the sessionfs mount so far, by kind, as the mount counts them.
requests() {
  python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], "user.sessionfs.requests").decode())' \
    "$mnt" 2>/dev/null || echo '{}'
}
# req_delta BEFORE AFTER: "N requests (kind n, ...)" between two readings, the three most
# frequent kinds, without the getxattr of the reading AFTER itself.
req_delta() {
  python3 - "$1" "$2" <<'PY'
import json, sys
a, b = (json.loads(x) for x in sys.argv[1:])
d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
for k in ("getxattr", "total"):
    d[k] = d.get(k, 0) - 1
kinds = sorted(((n, k) for k, n in d.items() if k != "total" and n > 0), reverse=True)[:3]
top = ", ".join(f"{k} {n:,}" for n, k in kinds)
print(f"{d['total']:,} requests" + (f" ({top})" if top else ""))
PY
}
# time_sfs command...: time_cmd s, and in q the requests the command sent the mount.
time_sfs() {
  local before
  settle
  before=$(requests)
  time_cmd s "$@"
  q=$(req_delta "$before" "$(requests)")
}
row() { printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$(fmt "$2")" "$(fmt "$3")" "$(ratio "$2" "$3")" "$4" "$5"; }
refs() { printf '%s / %s' "$(fmt "$1")" "$(fmt "$2")"; }

echo "generating the tree (scale $scale)" >&2
tree="$work/tree"
python3 - "$tree" "$scale" <<'PY'
import os, random, sys
root, scale = sys.argv[1], float(sys.argv[2])
rng = random.Random(1234)
words = "fn let mut pub struct impl self return match if else for in while loop use mod crate async await Vec u64 usize config buffer offset length reader writer session store cache block entry index segment error value".split()
n = int(45000 * scale)
total = 0
for i in range(n):
    d = os.path.join(root, "workspace", f"pkg{i % 300:03d}", "src", f"mod{(i // 300) % 30:02d}")
    os.makedirs(d, exist_ok=True)
    size = int(rng.expovariate(1 / 15500))
    lines, got = [], 0
    while got < size:
        line = " " * (4 * rng.randrange(4)) + " ".join(rng.choice(words) for _ in range(3 + rng.randrange(9))) + "\n"
        lines.append(line)
        got += len(line)
    data = "".join(lines)[:size]
    with open(os.path.join(d, f"file{i:05d}.rs"), "w") as f:
        f.write(data)
    total += len(data)
print(f"{n} files, {total / 2**20:.0f} MiB", file=sys.stderr)
PY
(cd "$tree/workspace" && git init -q -b main . && git config gc.auto 0 && git add -A && \
  GIT_AUTHOR_NAME=b GIT_AUTHOR_EMAIL=b@b GIT_COMMITTER_NAME=b GIT_COMMITTER_EMAIL=b@b git commit -q -m tree)
files=$(find "$tree/workspace" -type f -not -path '*/.git/*' | wc -l)
bytes=$(du -sb "$tree" | cut -f1)

session="bench__mount${RANDOM}__main"
export SESSIONFS_CACHE_DIR="$work/cache" SESSIONFS_OVERLAY_DIR="$work/overlays"
echo "pushing and packing the reference tarball" >&2
"$bin" -q push "$tree" "$session"
tar czf "$work/tree.tar.gz" -C "$tree" .
object=$(stat -c %s "$work/tree.tar.gz")

mnt="$work/mnt" rat="$work/rat" arch="$work/arch" local="$tree/workspace"
mkdir -p "$mnt" "$rat" "$arch"
drop_caches
t0=$(now)
"$bin" -q mount "$session" "$mnt" --daemon; mounts+=("$mnt")
ls -l "$mnt/workspace" >/dev/null
t1=$(now); sfs_ls=$(python3 -c "print($t1 - $t0)")
q_ls=$(req_delta '{}' "$(requests)")
t0=$(now); ls -l "$local" >/dev/null; t1=$(now); local_ls=$(python3 -c "print($t1 - $t0)")
t0=$(now); .tools/bench-venv/bin/ratarmount "$work/tree.tar.gz" "$rat" >/dev/null 2>&1; mounts+=("$rat")
ls -l "$rat/workspace" >/dev/null; t1=$(now); rat_ls=$(python3 -c "print($t1 - $t0)")
t0=$(now); archivemount -o readonly "$work/tree.tar.gz" "$arch"; mounts+=("$arch")
ls -l "$arch/workspace" >/dev/null; t1=$(now); arch_ls=$(python3 -c "print($t1 - $t0)")
cache_bytes() { du -sb "$work/cache" 2>/dev/null | cut -f1; }
# A reference stopped at the limit goes on serving the reads queued in it
# (archivemount for minutes, on one core), under the rows measured next:
# it is mounted afresh instead.
# The peak memory of a process replaced so is kept (kB), for the RSS row.
hwm() { awk '/VmHWM/ {print $2}' "/proc/$(pgrep -f -- "$1" | head -1)/status" 2>/dev/null || echo 0; }
rat_hwm=0; arch_hwm=0
remount_stopped() {
  if [ "$r" = -1 ]; then
    rat_hwm=$(( $(hwm "ratarmount $work/tree.tar.gz") > rat_hwm ? $(hwm "ratarmount $work/tree.tar.gz") : rat_hwm ))
    fusermount -u -z "$rat" 2>/dev/null || umount -l "$rat" || true
    pkill -9 -f -- "ratarmount $work/tree.tar.gz" || true
    sleep 1
    .tools/bench-venv/bin/ratarmount "$work/tree.tar.gz" "$rat" >/dev/null 2>&1
  fi
  if [ "$a" = -1 ]; then
    arch_hwm=$(( $(hwm "archivemount -o readonly $work/tree.tar.gz") > arch_hwm ? $(hwm "archivemount -o readonly $work/tree.tar.gz") : arch_hwm ))
    fusermount -u -z "$arch" 2>/dev/null || umount -l "$arch" || true
    pkill -9 -f -- "archivemount -o readonly $work/tree.tar.gz" || true
    sleep 1
    archivemount -o readonly "$work/tree.tar.gz" "$arch"
  fi
}

echo
echo "# sessionfs mount benchmark: $files files, $((bytes >> 20)) MiB, tar.gz $((object >> 20)) MiB, $(nproc) cores"
echo
echo "| operation | sessionfs | local dir | ratio | ratarmount / archivemount | bytes; the kernel's requests to sessionfs |"
echo "| --- | --- | --- | --- | --- | --- |"
row "mount + first ls (cold)" "$sfs_ls" "$local_ls" "$(refs "$rat_ls" "$arch_ls")" "$(cache_bytes) B fetched; $q_ls"

# git trusts its index while ctime, mtime, inode number, owner and size match lstat: the share
# of entries that match in the fresh mount (the repository was committed in the local tree).
stat_share() {
  git -C "$1" ls-files --debug | python3 -c '
import os, sys
root = sys.argv[1]
entries, cur = [], None
for line in sys.stdin:
    if not line.startswith(" "):
        cur = {"path": line.rstrip("\n")}; entries.append(cur); continue
    words = line.split()
    for name, value in zip(words[0::2], words[1::2]):
        cur[name.rstrip(":")] = int(value.split(":")[0])
ok = 0
for e in entries:
    st = os.lstat(os.path.join(root, e["path"]))
    ok += (e["ctime"], e["mtime"], e["ino"], e["uid"], e["gid"], e["size"]) == (
        int(st.st_ctime), int(st.st_mtime), st.st_ino & 0xFFFFFFFF, st.st_uid, st.st_gid, st.st_size)
print(f"{ok} of {len(entries)} ({100 * ok / max(1, len(entries)):.1f} %)")
' "$1"
}
printf '| %s | %s | %s | %s | %s | %s |\n' "git index entries whose stat data match lstat" \
  "$(stat_share "$mnt/workspace")" "$(stat_share "$local")" "-" "-" "-"

find_stat() { find "$1" -path '*/.git' -prune -o -type f -printf '%s %T@\n' | wc -l; }
export -f find_stat
drop_caches
time_sfs find_stat "$mnt/workspace"; time_cmd l find_stat "$local"
time_cmd r find_stat "$rat/workspace"; time_cmd a find_stat "$arch/workspace"
remount_stopped
row "find + stat of every file" "$s" "$l" "$(refs "$r" "$a")" "$q"
lstat_walk=$s
time_sfs find_stat "$mnt/workspace"; time_cmd l find_stat "$local"
time_cmd r find_stat "$rat/workspace"; time_cmd a find_stat "$arch/workspace"
remount_stopped
row "find + stat of every file (warm)" "$s" "$l" "$(refs "$r" "$a")" "$q"

read_all() { find "$1" -path '*/.git' -prune -o -type f -print0 | xargs -0 -P 4 cat | wc -c; }
export -f read_all
before=$(cache_bytes); drop_caches
time_sfs read_all "$mnt/workspace"; time_cmd l read_all "$local"
time_cmd r read_all "$rat/workspace"; time_cmd a read_all "$arch/workspace"
remount_stopped
row "read every file (cold)" "$s" "$l" "$(refs "$r" "$a")" "$(( $(cache_bytes) - before )) B fetched; $q"
before=$(cache_bytes)
time_sfs read_all "$mnt/workspace"; time_cmd l read_all "$local"
time_cmd r read_all "$rat/workspace"; time_cmd a read_all "$arch/workspace"
remount_stopped
row "read every file (warm)" "$s" "$l" "$(refs "$r" "$a")" "$(( $(cache_bytes) - before )) B fetched; $q"
grep_all() { grep -r --exclude-dir=.git -c 'needle not in the tree' "$1" | wc -l; }
export -f grep_all
time_sfs grep_all "$mnt/workspace"; time_cmd l grep_all "$local"
time_cmd r grep_all "$rat/workspace"; time_cmd a grep_all "$arch/workspace"
remount_stopped
row "grep -r of every file (warm)" "$s" "$l" "$(refs "$r" "$a")" "$q"
# Peak resident memory of each mount process once it has read every file
# (of a reference mounted afresh, the most of its processes).
peak() {
  if [ -n "$1" ] && [ -r "/proc/$1/status" ]; then
    awk -v before="${2:-0}" '/VmHWM/ {printf "%.0f MB", ($2 > before ? $2 : before) / 1000}' "/proc/$1/status"
  else echo "-"; fi
}
sfs_pid=$(pgrep -f -- "mount $session $mnt" | head -1)
rat_pid=$(pgrep -f -- "ratarmount $work/tree.tar.gz" | head -1)
arch_pid=$(pgrep -f -- "archivemount -o readonly $work/tree.tar.gz" | head -1)
printf '| %s | %s | %s | %s | %s | %s |\n' "mount process peak RSS after reading every file" \
  "$(peak "$sfs_pid")" "-" "-" "$(peak "$rat_pid" "$rat_hwm") / $(peak "$arch_pid" "$arch_hwm")" "-"

create_files() {
  mkdir -p "$1/created"
  python3 - "$1/created" <<'PY'
import os, sys
d = sys.argv[1]
block = b"x" * 4096
for i in range(10000):
    with open(os.path.join(d, f"new{i:05d}"), "wb") as f:
        f.write(block)
PY
}
export -f create_files
time_sfs create_files "$mnt/workspace"; time_cmd l create_files "$local"
row "create 10,000 files of 4 KiB" "$s" "$l" "-" "40 MiB written; $q"
rm -rf "$mnt/workspace/created" "$local/created"

git_status() { git -C "$1" status --porcelain | wc -l; }
export -f git_status
drop_caches
time_sfs git_status "$mnt/workspace"; time_cmd l git_status "$local"
row "git status (first: refreshes the index)" "$s" "$l" \
  "$(ratio "$s" "$lstat_walk") × the mount's cold find + stat" "$q"
time_sfs git_status "$mnt/workspace"; time_cmd l git_status "$local"
row "git status (again)" "$s" "$l" "-" "$q"

# Write storms inside the mount, each beside the same on the local disk: a 1,950-file directory
# (13 packages of the tree) copied and removed, and a 5,100-file repository (34 packages)
# cloned from a local path (git's pack transport, no network).
copy_pkgs() { mkdir -p "$2"; for p in $(seq -f 'pkg%03g' 0 12); do cp -r "$1/$p" "$2/"; done; }
export -f copy_pkgs
time_sfs copy_pkgs "$mnt/workspace" "$mnt/workspace/copied"
time_cmd l copy_pkgs "$local" "$work/copied"
row "cp -r of a $(find "$work/copied" -type f | wc -l)-file directory" "$s" "$l" "-" "$q"
time_sfs rm -rf "$mnt/workspace/copied"; time_cmd l rm -rf "$work/copied"
row "rm -rf of that directory" "$s" "$l" "-" "$q"
repo="$work/repo5k"
mkdir -p "$repo"
for p in $(seq -f 'pkg%03g' 0 33); do cp -r "$local/$p" "$repo/"; done
(cd "$repo" && git init -q -b main . && git add -A && \
  GIT_AUTHOR_NAME=b GIT_AUTHOR_EMAIL=b@b GIT_COMMITTER_NAME=b GIT_COMMITTER_EMAIL=b@b git commit -q -m repo)
clone() { git clone -q --no-local "$1" "$2"; }
export -f clone
time_sfs clone "$repo" "$mnt/workspace/clone"; time_cmd l clone "$repo" "$work/clone"
row "git clone of a $(git -C "$repo" ls-files | wc -l)-file repository" "$s" "$l" "-" "$q"
rm -rf "$mnt/workspace/clone" "$work/clone"
echo
echo "(ratio: sessionfs time / local directory time; ratarmount and archivemount are read-only, over a local tar.gz, no network)"
"$bin" umount "$mnt" || umount -l "$mnt"
