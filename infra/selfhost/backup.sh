#!/bin/sh
# Back up a self-hosted Vibe Cloud (docs/selfhost.md): run in infra/selfhost.
#
#   ./backup.sh [DIR]        -> DIR/vibe-backup-<UTC time>/ (default DIR: ./backups)
#
# The stack's services stop for the copy (a minute or so), so every volume is copied at one
# consistent moment, then start again. Written: one .tar.gz per volume (CouchDB's databases,
# MinIO's blobs, vibed's data with its JWT signing key, Caddy's certificates) and a copy of
# .env (mode 0600). Keep backups somewhere else than this machine: they hold every secret.
#
# Environment: COMPOSE (default "docker compose"), DOCKER (default "docker"),
# COMPOSE_PROJECT_NAME (default "vibe"), VIBED_IMAGE (the image whose tar makes the archives).
set -eu
COMPOSE=${COMPOSE:-docker compose}
DOCKER=${DOCKER:-docker}
project=${COMPOSE_PROJECT_NAME:-vibe}
image=${VIBED_IMAGE:-rg.fr-par.scw.cloud/vibe/vibed:latest}
volumes="couchdb-data minio-data vibe-data caddy-data"

mkdir -p "${1:-./backups}"
out="$(cd "${1:-./backups}" && pwd)/vibe-backup-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -m 700 "$out"

echo "backup: stopping the stack for a consistent copy" >&2
# shellcheck disable=SC2086  # COMPOSE is a command line
$COMPOSE stop
trap 'echo "backup: starting the stack again" >&2; $COMPOSE start >/dev/null' EXIT

for v in $volumes; do
    if ! $DOCKER volume inspect "${project}_$v" >/dev/null 2>&1; then
        echo "backup: no volume ${project}_$v (skipped)" >&2
        continue
    fi
    $DOCKER run --rm --user 0 --network none --entrypoint tar \
        -v "${project}_$v:/from:ro" -v "$out:/to" "$image" \
        --numeric-owner -C /from -czf "/to/$v.tar.gz" .
    echo "backup: $v -> $out/$v.tar.gz" >&2
done
if [ -f .env ]; then
    (umask 077 && cp .env "$out/env")
fi
echo "$out"
