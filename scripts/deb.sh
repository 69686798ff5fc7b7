#!/usr/bin/env bash
# Builds the Debian package: the release binary (stripped; its debug info kept beside the
# .deb as sessionfs-VERSION.debug), the systemd units, the mount(8) helper link, the shell
# completions, the manual page and a commented default configuration (a conffile), all
# generated from this build.
#
#   scripts/deb.sh [--binary PATH] [--out DIR]
#
# --binary packages an already built binary instead of building the release one (the test
# suite packages its debug build this way, to check the package without a release build).
# Needs dpkg-deb, objcopy and strip (Debian's dpkg and binutils).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

binary="" out="target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: scripts/deb.sh [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  cargo build --release --quiet -p sessionfs-agent
  binary=target/release/sessionfs
fi
[ -x "$binary" ] || { echo "no binary at $binary" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
arch="$(dpkg --print-architecture)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
root="$(mktemp -d)"
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT

# The binary, stripped; its debug info beside the package, linked to it.
install -D -m 0755 "$binary" "$root/usr/bin/sessionfs"
objcopy --only-keep-debug "$root/usr/bin/sessionfs" "$out/sessionfs-$version.debug"
strip --strip-debug --strip-unneeded "$root/usr/bin/sessionfs"
objcopy --add-gnu-debuglink="$out/sessionfs-$version.debug" "$root/usr/bin/sessionfs"
sfs="$root/usr/bin/sessionfs"

# mount -t fuse.sessionfs and fstab lines find the helper here (/sbin is /usr/sbin).
install -d "$root/usr/sbin"
ln -s ../bin/sessionfs "$root/usr/sbin/mount.fuse.sessionfs"

# The units, pointing at the packaged binary.
install -d "$root/lib/systemd/system"
for unit in systemd/*.service; do
  sed 's#/usr/local/bin/sessionfs#/usr/bin/sessionfs#' "$unit" > "$root/lib/systemd/system/$(basename "$unit")"
done

# Completions and the manual page, from the same definitions as --help.
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d" "$root/usr/share/man/man1" "$root/usr/share/doc/sessionfs"
"$sfs" completions bash > "$root/usr/share/bash-completion/completions/sessionfs"
"$sfs" completions zsh > "$root/usr/share/zsh/vendor-completions/_sessionfs"
"$sfs" completions fish > "$root/usr/share/fish/vendor_completions.d/sessionfs.fish"
"$sfs" manpage | gzip -9n > "$root/usr/share/man/man1/sessionfs.1.gz"
gzip -9n < README.md > "$root/usr/share/doc/sessionfs/README.md.gz"
printf 'sessionfs\nLicense: Apache-2.0\n' > "$root/usr/share/doc/sessionfs/copyright"

# A commented default configuration: every key with its default.
install -d "$root/etc/sessionfs"
{
  echo "# sessionfs configuration (TOML). Each key is a flag's name; flags and environment"
  echo "# variables win over this file. \`sessionfs config\` shows the effective values."
  echo "# Uncomment and set what this host needs, e.g.:"
  echo "#   minio_endpoint = \"minio.internal\""
  echo "#   minio_port = 9000"
  echo "#   s3_access_key = \"…\""
  echo "#   s3_secret_key = \"…\""
  echo "#"
  env -i PATH="$PATH" HOME=/nonexistent "$sfs" config --config /dev/null |
    awk '{ printf "# %-24s default: %s\n", $1, $2 }'
} > "$root/etc/sessionfs/config.toml"
chmod 0640 "$root/etc/sessionfs/config.toml"

install -d "$root/DEBIAN"
size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat > "$root/DEBIAN/control" <<EOF
Package: sessionfs
Version: $version
Architecture: $arch
Maintainer: sessionfs developers <sessionfs@example.invalid>
Installed-Size: $size
Depends: fuse3, libc6
Section: utils
Priority: optional
Homepage: https://example.invalid/sessionfs
Description: coding sessions stored as tar.gz objects in S3, as live directories
 Mounts a session (or all of them) read-write with FUSE, reading lazily through a
 local block cache and writing changes back to the object; serves the
 storage-worker HTTP API over the same sessions.
EOF
echo "/etc/sessionfs/config.toml" > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
EOF
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
if [ "$1" = purge ]; then rmdir /etc/sessionfs 2>/dev/null || true; fi
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"

deb="$out/sessionfs_${version}_${arch}.deb"
dpkg-deb --build --root-owner-group "$root" "$deb" >/dev/null
echo "$deb"
