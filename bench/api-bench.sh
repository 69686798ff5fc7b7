#!/usr/bin/env bash
# The HTTP API under load: wrk against GET and PUT of a 4 KiB file through
# `sessionfs serve` (the store given by the environment: S3 when MINIO_* is
# set, else a local directory), beside nginx serving and accepting (WebDAV
# PUT) the same file from local disk, on the same machine, in the same run.
#   usage: bench/api-bench.sh SESSIONFS_BINARY [SECONDS]
# wrk, nginx and the server share the machine's cores; both sides pay that
# equally, so the ratio is the figure to read. A sessionfs PUT is durable when answered
# (file and journal synced, group-committed across concurrent requests); nginx's is not.
set -euo pipefail
bin="$1" secs="${2:-10}"
threads=2 conns=32
# The references come from Debian's packages, installed when missing (as root; else it says
# which to install).
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-core)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "needs ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
work="$(mktemp -d)"
cleanup() {
  [ -n "${api_pid:-}" ] && kill "$api_pid" 2>/dev/null || true
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  sleep 0.5
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api_port="$(free_port)" nginx_port="$(free_port)"
session="bench__api__main"
file="workspace/src/file-4k.txt"
head -c 4096 /dev/urandom | base64 -w 0 | head -c 4096 > "$work/body"

# sessionfs
SESSIONFS_STORE_DIR="$work/store" SESSIONFS_CACHE_DIR="$work/cache" SESSIONFS_OVERLAY_DIR="$work/overlays" \
  SESSIONFS_LOG=warn "$bin" --quiet serve --bind 127.0.0.1 --port "$api_port" > "$work/api.log" 2>&1 &
api_pid=$!
api="http://127.0.0.1:$api_port/api/storage-worker/sessions/$session/files/$file"
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$api_port/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS -X PUT --data-binary @"$work/body" "$api" >/dev/null

# nginx, the same file on local disk, PUT through WebDAV
mkdir -p "$work/www/$(dirname "$file")" "$work/tmp"
cp "$work/body" "$work/www/$file"
cat > "$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/tmp;
  proxy_temp_path $work/tmp; fastcgi_temp_path $work/tmp; uwsgi_temp_path $work/tmp; scgi_temp_path $work/tmp;
  server {
    listen 127.0.0.1:$nginx_port;
    root $work/www;
    location / { dav_methods PUT; create_full_put_path on; client_max_body_size 1m; }
  }
}
CONF
# nginx's workers drop root: let them read the files and take the PUTs.
chmod 755 "$work"
chmod -R a+rwX "$work/www" "$work/tmp"
nginx -c "$work/nginx.conf"
ref="http://127.0.0.1:$nginx_port/$file"
for _ in $(seq 50); do curl -fsS "$ref" >/dev/null 2>&1 && break; sleep 0.1; done
# Both sides must answer the real thing before anything is measured.
for url in "$api" "$ref"; do
  cmp <(curl -fsS "$url") "$work/body" || { echo "GET $url does not give the file" >&2; exit 1; }
  curl -fsS -o /dev/null -X PUT --data-binary @"$work/body" "$url" || { echo "PUT $url fails" >&2; exit 1; }
done

cat > "$work/put.lua" <<LUA
wrk.method = "PUT"
local f = io.open("$work/body", "rb")
wrk.body = f:read("*a")
f:close()
LUA

# settle: waits for the server's write-back of the PUTs so far (`sessionfs flush`), so that it
# shares the cores with no run, the server's or nginx's.
settle() {
  SESSIONFS_STORE_DIR="$work/store" SESSIONFS_CACHE_DIR="$work/cache" \
    SESSIONFS_OVERLAY_DIR="$work/overlays" "$bin" -q flush "$session" >/dev/null || true
}
# Runs wrk; prints "requests/s p99_ms bytes_read".
measure() {
  local out
  settle
  out="$(wrk -t"$threads" -c"$conns" -d"${secs}s" --latency "$@")"
  echo "$out" >> "$work/wrk.log"
  if grep -q "Non-2xx" <<<"$out"; then
    echo "error answers during the run: $out" >&2
    exit 1
  fi
  local rps p99 read
  rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  p99="$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")"
  read="$(awk '/requests in/ {print $5}' <<<"$out")"
  echo "$rps $p99 $read"
}

printf '%-10s %14s %10s %14s %10s %8s %8s\n' op "sessionfs r/s" "p99 ms" "nginx r/s" "p99 ms" "r/s" "p99"
for op in GET PUT; do
  if [ "$op" = GET ]; then
    read -r s_rps s_p99 s_read < <(measure "$api")
    read -r n_rps n_p99 n_read < <(measure "$ref")
  else
    read -r s_rps s_p99 s_read < <(measure -s "$work/put.lua" "$api")
    read -r n_rps n_p99 n_read < <(measure -s "$work/put.lua" "$ref")
  fi
  ratio_rps="$(python3 -c "print(f'{$s_rps/$n_rps:.2f}')")"
  ratio_p99="$(python3 -c "print(f'{$s_p99/$n_p99:.2f}')")"
  printf '%-10s %14s %10s %14s %10s %8s %8s\n' "$op 4KiB" "$s_rps" "$s_p99" "$n_rps" "$n_p99" "$ratio_rps" "$ratio_p99"
  echo "           bytes read by wrk: sessionfs $s_read, nginx $n_read"
done
# The file as stored after the PUTs is still the one sent.
cmp <(curl -fsS "$api") "$work/body" && echo "after the run: the file reads back as sent"

# A 200,000-entry session (whatever SECONDS): its file list, and a download after one PUT (the
# merged view packed), each by a fresh server, beside the same from a local directory of the
# tree (`find`, `tar czf`), with the server's peak resident memory.
kill "$api_pid" 2>/dev/null; wait "$api_pid" 2>/dev/null || true
big="$work/big"
python3 - "$big" <<'PY'
import os, sys
for d in range(400):
    p = os.path.join(sys.argv[1], "workspace", f"dir{d:03d}", f"sub{d % 7}")
    os.makedirs(p, exist_ok=True)
    for i in range(500):
        with open(os.path.join(p, f"file{i:04d}.txt"), "w") as f:
            f.write(f"{d} {i} hello\n" * 3)
PY
export SESSIONFS_STORE_DIR="$work/store" SESSIONFS_CACHE_DIR="$work/cache2" SESSIONFS_OVERLAY_DIR="$work/overlays2"
"$bin" --quiet push "$big" bench__big__main
SESSIONFS_LOG=warn "$bin" --quiet serve --bind 127.0.0.1 --port "$api_port" > "$work/api2.log" 2>&1 &
api_pid=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$api_port/health" >/dev/null 2>&1 && break; sleep 0.1; done
bigapi="http://127.0.0.1:$api_port/api/storage-worker/sessions/bench__big__main"
secs_of() { local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null; t1=$(date +%s.%N); python3 -c "print(f'{$t1 - $t0:.2f}')"; }
hwm() { awk '/VmHWM/ {printf "%.0f MB", $2 / 1000}' "/proc/$api_pid/status"; }
s_list=$(secs_of curl -fsS -o "$work/list.json" "$bigapi/files")
listed=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['count'])" "$work/list.json")
l_list=$(secs_of find "$big" -type f -printf '%P %s\n')
list_rss=$(hwm)
curl -fsS -o /dev/null -X PUT --data-binary 'changed' "$bigapi/files/workspace/dir001/sub1/file0003.txt"
s_dl=$(secs_of curl -fsS -o "$work/big.tar.gz" "$bigapi/download")
l_dl=$(secs_of tar czf "$work/ref.tar.gz" -C "$big" .)
dl_rss=$(hwm)
entries=$(tar tzf "$work/big.tar.gz" | wc -l)
echo
echo "| 200,000-entry session | sessionfs | local directory | ratio | server peak RSS | bytes |"
echo "| --- | --- | --- | --- | --- | --- |"
echo "| list its files (first request) | $s_list s ($listed files) | $l_list s (find) | $(python3 -c "print(f'{$s_list/$l_list:.2f}')") | $list_rss | $(stat -c %s "$work/list.json") B of JSON |"
echo "| download after one PUT | $s_dl s ($entries entries) | $l_dl s (tar czf) | $(python3 -c "print(f'{$s_dl/$l_dl:.2f}')") | $dl_rss | $(stat -c %s "$work/big.tar.gz") B |"
