#!/usr/bin/env bash
# The second half of the workloads, on the tree the first half made
# (workloads.sh), once that tree has been pushed as a session and mounted
# fresh: git on a repository it did not create, changes through an extracted
# tarball, SQLite on a database from the object, an editor's save over an
# object file. Prints what each produced. usage: workloads-pushed.sh DIR
set -euo pipefail
cd "$1"
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.com GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@example.com
export GIT_AUTHOR_DATE="2026-01-02T00:00:00Z" GIT_COMMITTER_DATE="2026-01-02T00:00:00Z"

# 1. git: a clean status in a fresh place, then history made on top.
cd repo
echo "git status: [$(git status --porcelain | tr '\n' ' ')]"
echo "appended" >> src/m02/p2/f0002.txt
git mv src/m03 src/m03-moved
rm -r src/m04
git add -A && git commit -q -m third
git gc -q
git fsck --strict 2>&1 | tail -1
echo "git log: $(git log --format='%H %s' | tr '\n' ' ')"
echo "git tree $(git rev-parse 'HEAD^{tree}') files $(git ls-files | wc -l)"
git checkout -q HEAD~1 -- src/m04 && git status --porcelain | wc -l
cd ..

# 2. The extracted tarball: a package removed, files edited in place, one added.
rm -rf extracted/pkg05
sed -i 's/n = /n := /' extracted/pkg01/lib1/*.js
echo "export const added = 1;" > extracted/pkg02/added.js
echo "extracted $(find extracted -type f | wc -l) files, $(find extracted -type f | sort | xargs cat | md5sum)"

# 3. SQLite: updates to a database read from the object.
python3 - <<'PY'
import sqlite3
c = sqlite3.connect("app.db")
with c:
    c.execute("update kv set v = v || 'x' where k % 5 = 1")
    c.execute("insert into kv values (1000, 'late')")
print("sqlite", c.execute("select count(*), sum(length(v)) from kv").fetchone(),
      c.execute("pragma integrity_check").fetchone()[0])
c.close()
PY

# 4. An editor's save over a file from the object.
python3 - <<'PY'
import os
with open(".notes.txt.swp", "w") as f:
    f.write(open("notes.txt").read() + "edited after the push\n")
    f.flush()
    os.fsync(f.fileno())
os.rename(".notes.txt.swp", "notes.txt")
print("editor", open("notes.txt").read().split("\n"))
PY

# 5. A package upgrade in place.
rm -rf node_modules/pkg9 && mkdir -p node_modules/pkg9 && echo '{"name":"pkg9","version":"2.0.0"}' > node_modules/pkg9/package.json
echo "npm $(find node_modules | sort | md5sum)"
