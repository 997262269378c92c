# STAND-IN for the MinIO image, for this machine only (no registry is reachable here): moto's
# S3 server from PyPI on port 9000. It takes MinIO's arguments (`server /data`) and answers
# the compose health check (`mc ready local`); it keeps objects in memory and checks no
# signatures, which the self-host test does not rely on.
FROM debian:bookworm-slim
ARG MOTO_VERSION=5.2.5
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /opt/moto \
 && /opt/moto/bin/pip install --no-cache-dir "moto[server]==${MOTO_VERSION}"
RUN printf '#!/bin/sh\nexec curl -fsS -o /dev/null http://127.0.0.1:9000/\n' > /usr/local/bin/mc \
 && printf '#!/bin/sh\nexec /opt/moto/bin/moto_server -H 0.0.0.0 -p 9000\n' > /usr/local/bin/minio-standin \
 && chmod +x /usr/local/bin/mc /usr/local/bin/minio-standin \
 && useradd --system --uid 1000 moto
# MinIO takes path-style requests whatever the Host (vibed signs https://<domain>/<bucket>/...);
# moto would read a bucket name out of such a host unless told not to.
ENV S3_IGNORE_SUBDOMAIN_BUCKETNAME=true
USER 1000:1000
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/minio-standin"]
