#!/bin/sh
# Restore a backup made by backup.sh into a FRESH instance (docs/selfhost.md): run in
# infra/selfhost, with .env in place (cp BACKUP/env .env, then adjust VIBE_DOMAIN if the
# machine changed), and no volumes of this project yet (`docker compose down -v` removes
# them: that destroys the data they hold).
#
#   ./restore.sh BACKUP_DIR
#
# Environment: as backup.sh.
set -eu
COMPOSE=${COMPOSE:-docker compose}
DOCKER=${DOCKER:-docker}
project=${COMPOSE_PROJECT_NAME:-vibe}
image=${VIBED_IMAGE:-rg.fr-par.scw.cloud/vibe/vibed:latest}
volumes="couchdb-data minio-data vibe-data caddy-data"

if [ $# -ne 1 ] || [ ! -d "$1" ]; then echo "usage: $0 BACKUP_DIR" >&2; exit 2; fi
from=$(cd "$1" && pwd)
[ -f "$from/vibe-data.tar.gz" ] || { echo "restore: $from holds no vibe-data.tar.gz: not a backup" >&2; exit 2; }

for v in $volumes; do
    if $DOCKER volume inspect "${project}_$v" >/dev/null 2>&1; then
        echo "restore: volume ${project}_$v already exists; restore only into a fresh instance" >&2
        exit 1
    fi
done
for v in $volumes; do
    [ -f "$from/$v.tar.gz" ] || continue
    $DOCKER volume create --label "com.docker.compose.project=$project" \
        --label "com.docker.compose.volume=$v" "${project}_$v" >/dev/null
    $DOCKER run --rm --user 0 --network none --entrypoint tar \
        -v "${project}_$v:/to" -v "$from:/from:ro" "$image" \
        --numeric-owner -C /to -xzpf "/from/$v.tar.gz"
    echo "restore: $v <- $from/$v.tar.gz" >&2
done
# shellcheck disable=SC2086  # COMPOSE is a command line
$COMPOSE up -d
