#!/usr/bin/env bash
# Real-tool workloads run in one directory (a mount, or a local directory to
# compare with); prints what each produced, so two runs can be compared line
# by line. usage: workloads.sh DIR TARBALL
set -euo pipefail
dir=$1 tarball=$2
cd "$dir"
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.com GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@example.com
export GIT_AUTHOR_DATE="2026-01-01T00:00:00Z" GIT_COMMITTER_DATE="2026-01-01T00:00:00Z"

# 1. git on a 5,000-file tree.
mkdir repo && cd repo
python3 - <<'PY'
import os
for i in range(5000):
    d = f"src/m{i % 50:02d}/p{i % 7}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i:04d}.txt", "w") as f:
        f.write(f"file {i}\n" + "line\n" * (i % 40))
PY
git init -q -b main .
git add -A
git commit -q -m initial
echo "git tree $(git rev-parse 'HEAD^{tree}') commit $(git rev-parse HEAD)"
echo "changed" >> src/m07/p0/f0007.txt
rm src/m01/p1/f0001.txt
echo new > untracked.txt
echo "git status: $(git status --porcelain | tr '\n' ' ')"
git add -A && git commit -q -m second
echo "git log: $(git log --format='%H %s' | tr '\n' ' ')"
git gc -q
git fsck --strict 2>&1 | tail -1
echo "git count: $(git count-objects -v | grep -E '^(count|in-pack)' | tr '\n' ' ')"
cd ..

# 2. Extracting a 10,000-file tarball.
mkdir extracted && tar xzf "$tarball" -C extracted
echo "extracted $(find extracted -type f | wc -l) files, $(find extracted | sort | md5sum)"

# 3. SQLite with transactions (and a rollback).
python3 - <<'PY'
import sqlite3
c = sqlite3.connect("app.db")
c.execute("PRAGMA journal_mode=WAL")
c.execute("create table kv(k integer primary key, v text)")
for i in range(300):
    with c:
        c.execute("insert into kv values (?, ?)", (i, "v" * (i % 97)))
try:
    with c:
        c.execute("update kv set v = 'gone'")
        raise RuntimeError("roll back")
except RuntimeError:
    pass
with c:
    c.execute("delete from kv where k % 3 = 0")
c.execute("vacuum")
print("sqlite", c.execute("select count(*), sum(length(v)) from kv").fetchone(),
      c.execute("pragma integrity_check").fetchone()[0])
c.close()
PY

# 4. An editor's save: temp file, fsync, rename over the original.
printf 'version 1\n' > notes.txt
python3 - <<'PY'
import os
for n in range(2, 6):
    with open(".notes.txt.swp", "w") as f:
        f.write(f"version {n}\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(".notes.txt.swp", "notes.txt")
    fd = os.open(".", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
print("editor", open("notes.txt").read().strip(), sorted(os.listdir(".")).count(".notes.txt.swp"))
PY

# 5. A package manager's install: staged extraction, renames into place, bin symlinks.
mkdir -p node_modules/.bin
for p in $(seq 1 40); do
  stage=node_modules/.staging/pkg$p-$RANDOM
  mkdir -p "$stage/lib"
  printf '{"name":"pkg%s","version":"1.0.%s"}\n' "$p" "$p" > "$stage/package.json"
  for f in $(seq 1 25); do printf 'module.exports = %s;\n' "$f" > "$stage/lib/m$f.js"; done
  printf '#!/usr/bin/env node\n' > "$stage/cli.js" && chmod +x "$stage/cli.js"
  [ -e node_modules/pkg$p ] && rm -rf node_modules/pkg$p
  mv "$stage" node_modules/pkg$p
  ln -sf ../pkg$p/cli.js node_modules/.bin/pkg$p
done
rmdir node_modules/.staging
# An upgrade of one package: the old one moved aside, the new one in, the old removed.
mv node_modules/pkg7 node_modules/.pkg7-old && cp -a node_modules/.pkg7-old node_modules/pkg7 && rm -rf node_modules/.pkg7-old
echo "npm $(find node_modules | sort | md5sum) $(readlink node_modules/.bin/pkg3) $(test -x node_modules/pkg3/cli.js && echo exec)"
