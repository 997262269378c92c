#!/usr/bin/env bash
# Make `debian:bookworm-slim` available to podman on a machine that reaches no container
# registry: debootstrap it from the Debian mirror apt already uses, trim it the way the
# official slim image is trimmed, and import it under the public name, so the Dockerfile's
# `FROM debian:bookworm-slim` builds unchanged. The tarball is cached (once per machine) in
# $VIBED_CACHE (default /var/cache/vibed-infra); a podman that already has the image does
# nothing at all.
#
#   CONTAINERS_CONF=infra/podman/containers.conf infra/podman/base-image.sh
set -euo pipefail

name=docker.io/library/debian:bookworm-slim
cache=${VIBED_CACHE:-/var/cache/vibed-infra}
tarball="$cache/debian-bookworm-slim-$(dpkg --print-architecture).tar"

if podman image exists "$name"; then
    exit 0
fi

mirror() {
    # The first Debian archive URI in apt's sources (deb822 or one-line format).
    local uri
    uri=$(grep -h -E '^URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | head -1 | awk '{print $2}') || true
    if [ -z "$uri" ]; then
        uri=$(grep -h -E '^deb +(\[[^]]*\] +)?https?://[^ ]*/debian/? +bookworm ' \
              /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
              | head -1 | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}') || true
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "base-image.sh: apt-get install debootstrap" >&2; exit 1; }
    mkdir -p "$cache"
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    echo "base-image.sh: debootstrap bookworm from $(mirror) (about a minute)" >&2
    debootstrap --variant=minbase bookworm "$root" "$(mirror)" > "$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }

    # What the official slim image does: no docs, man pages or translations, no apt caches.
    cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
    cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
    echo 'Acquire::Languages "none";' > "$root/etc/apt/apt.conf.d/docker-no-languages"
    echo 'APT::AutoRemove::SuggestsImportant "false";' > "$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    rm -f "$root/etc/apt/sources.list"
    cat > "$root/etc/apt/sources.list.d/debian.sources" <<'CFG'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
CFG
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/groff/* \
           "$root"/usr/share/lintian/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
           "$root"/var/log/* "$root"/tmp/* "$root"/etc/hostname "$root"/etc/resolv.conf
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi

podman import --change 'CMD ["bash"]' "$tarball" "$name" >/dev/null
echo "base-image.sh: imported $name from $tarball" >&2
