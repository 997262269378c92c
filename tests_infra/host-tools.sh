#!/usr/bin/env bash
# What `make test-infra` needs from Debian on the host, installed only when missing (so a
# second run costs nothing): podman and its OCI runtime, debootstrap for the base image,
# podman-compose for the self-host stack, Caddy (Debian's) to check the Caddyfile, and
# systemd for `systemd-analyze verify`, shellcheck (also used by actionlint). Needs root on a clean machine; says so otherwise.
set -euo pipefail
packages=(podman runc debootstrap podman-compose netavark aardvark-dns uidmap slirp4netns
          fuse-overlayfs caddy systemd curl ca-certificates debian-archive-keyring shellcheck)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "test-infra needs these Debian packages: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "host-tools.sh: installing ${missing[*]}" >&2
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
