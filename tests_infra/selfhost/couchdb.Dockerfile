# STAND-IN for the `couchdb:3.5.0` image, for this machine only (no registry is reachable
# here): the Apache CouchDB 3.5.0 release from ../shared/tools/couchdb/ (built from the
# public 3.5.0 tag with Debian 12's Erlang), configured from the same variables the official
# image reads (COUCHDB_USER, COUCHDB_PASSWORD, COUCHDB_SECRET, COUCHDB_ERLANG_COOKIE), data in
# /opt/couchdb/data, curl for the compose health check, running as user couchdb.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libicu72 libssl3 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 5984 couchdb \
 && useradd --system --uid 5984 --gid couchdb --home-dir /opt/couchdb couchdb
ADD apache-couchdb-3.5.0-debian12-x86_64.tar.gz /opt/
COPY couchdb-entrypoint.sh /usr/local/bin/couchdb-entrypoint.sh
RUN mv /opt/couchdb-3.5.0 /opt/couchdb \
 && mkdir -p /opt/couchdb/data /opt/couchdb/etc/local.d \
 && chown -R couchdb:couchdb /opt/couchdb
USER 5984:5984
WORKDIR /opt/couchdb
VOLUME ["/opt/couchdb/data"]
EXPOSE 5984
ENTRYPOINT ["/usr/local/bin/couchdb-entrypoint.sh"]
