# syntax=docker/dockerfile:1
# vibed: one image for every way of running it.
#
#   docker build -t vibed .
#   docker run -p 3000:3000 -v vibe:/data vibed        # embedded defaults, data in the volume
#   docker run ... -e VIBE_COUCHDB=http://admin:...@couchdb:5984/ -e VIBE_BLOBS=s3 ... vibed
#
# Everything the daemon keeps (embedded database, JWT key, local blobs) lives under /data.
# Options: VIBE_* environment variables, or arguments after the image name (`--help`).
#
# Behind a TLS-intercepting proxy, hand its CA bundle to the build as the secret `ca-bundle`
# (`--secret id=ca-bundle,src=/path/to/ca.pem`): pip and npm use it for the build only; it
# never lands in a layer.

ARG DEBIAN_IMAGE=debian:bookworm-slim

# --- build: the vibed wheel from this tree, installed with its pinned dependencies --------
FROM ${DEBIAN_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in their own layer: a change to the code alone does not download them.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /opt/vibed \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && /opt/vibed/bin/pip install -c constraints.txt -r /tmp/requirements.txt
COPY . .
# The plugin-scan line: twistd caches what it finds at every start; doing it now, as root,
# means the non-root daemon never tries to write into site-packages.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && /opt/vibed/bin/pip wheel --no-deps --wheel-dir /tmp/dist . \
 && /opt/vibed/bin/pip install -c constraints.txt /tmp/dist/vibed-*.whl \
 && /opt/vibed/bin/pip uninstall -y pip \
 && /opt/vibed/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
 && /opt/vibed/bin/twistd --help | grep -q 'vibed'

# --- node: the embedded CouchDB-protocol server (PouchDB Server, pinned by package-lock) ---
FROM ${DEBIAN_IMAGE} AS node
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends npm ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vibed-node
COPY package.json package-lock.json ./
# --ignore-scripts: leveldown ships prebuilt binaries (nothing to run); the optional sqlite3
# adapter, unused by vibed, would otherwise be compiled from source for minutes.
RUN --mount=type=cache,target=/root/.npm \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/ca-bundle; fi \
 && npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error \
 && rm -rf node_modules/sqlite3 node_modules/leveldown/prebuilds/*-arm* \
           node_modules/leveldown/prebuilds/darwin-* node_modules/leveldown/prebuilds/win32-* \
           node_modules/leveldown/prebuilds/android-* node_modules/leveldown/deps

# --- runtime ---------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE}
# python3: the daemon; nodejs: the embedded server; tini: PID 1 that forwards SIGTERM and
# reaps; no compiler, no pip, no npm.
# hadolint ignore=DL3008
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 nodejs tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vibe \
 && useradd --system --uid 10001 --gid vibe --home-dir /data --no-create-home \
            --shell /usr/sbin/nologin vibe \
 && mkdir -p /data \
 && chown vibe:vibe /data \
 && chmod 0700 /data
COPY --from=build /opt/vibed /opt/vibed
COPY --from=node /opt/vibed-node/node_modules /opt/vibed/node_modules
COPY infra/image/healthcheck.py /opt/vibed/healthcheck.py
ENV PATH=/opt/vibed/bin:/opt/vibed/node_modules/.bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIBE_PORT=tcp:3000 \
    VIBE_DATA_DIR=/data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/vibed/bin/python", "/opt/vibed/healthcheck.py"]
# Labels last: the revision and date change every build, and must not bust earlier layers.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="vibed" \
      org.opencontainers.image.description="Vibe Cloud as one Twisted daemon: identities, per-identity CouchDB data, blobs, realtime." \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="Vibe Cloud" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}"
# tini -e 143: a stop by SIGTERM (what `docker stop` sends) is a clean exit, status 0.
# --pidfile='': a pid file in the volume would outlive the container and stop the next start.
ENTRYPOINT ["/usr/bin/tini", "-e", "143", "--", "/opt/vibed/bin/twistd", "--nodaemon", "--pidfile=", "vibed"]
