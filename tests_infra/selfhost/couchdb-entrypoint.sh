#!/bin/sh
# The official image's variables, written where this release reads its configuration.
set -eu
: "${COUCHDB_USER:?}" "${COUCHDB_PASSWORD:?}"
cat > /opt/couchdb/etc/local.d/docker.ini <<INI
[couchdb]
single_node = true
js_engine = quickjs
database_dir = /opt/couchdb/data
view_index_dir = /opt/couchdb/data

[chttpd]
bind_address = 0.0.0.0
port = 5984

[chttpd_auth]
secret = ${COUCHDB_SECRET:-}

[admins]
${COUCHDB_USER} = ${COUCHDB_PASSWORD}
INI
if [ -n "${COUCHDB_ERLANG_COOKIE:-}" ]; then
    umask 077
    printf '%s' "$COUCHDB_ERLANG_COOKIE" > /opt/couchdb/.erlang.cookie
fi
exec /opt/couchdb/bin/couchdb
