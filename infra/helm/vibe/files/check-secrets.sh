# shellcheck shell=sh
# Init container of the vibed pods: the Secrets' values must be there and strong, or the pod
# stops here with a line naming the Secret and key (kubectl logs <pod> -c check-secrets).
fail=0
check() {
  name=$1; value=$2
  if [ -z "$value" ]; then echo "check-secrets: $name is empty or missing" >&2; fail=1; return; fi
  if [ "${#value}" -lt 16 ]; then
    echo "check-secrets: $name is too weak (${#value} characters, at least 16): openssl rand -hex 24" >&2; fail=1; return
  fi
  case "$(echo "$value" | tr '[:upper:]' '[:lower:]')" in
    *changeme*|*change-me*|*password*|*example*|minioadmin*|monster*|admin*|12345678*)
      echo "check-secrets: $name is a well-known placeholder: openssl rand -hex 24" >&2; fail=1;;
  esac
  case "$value" in
    *[!A-Za-z0-9._~-]*) echo "check-secrets: $name may only hold letters, digits and . _ ~ - (it goes into a URL)" >&2; fail=1;;
  esac
}
check "$COUCHDB_PASSWORD_NAME" "$COUCHDB_PASSWORD"
[ -z "${COUCHDB_COOKIE_NAME:-}" ] || check "$COUCHDB_COOKIE_NAME" "$COUCHDB_COOKIE"
[ -s "$VIBE_JWT_KEY_FILE" ] || { echo "check-secrets: $JWT_NAME is empty or missing" >&2; fail=1; }
grep -q "BEGIN PRIVATE KEY" "$VIBE_JWT_KEY_FILE" 2>/dev/null || { echo "check-secrets: $JWT_NAME is not a PEM private key" >&2; fail=1; }
[ -n "$AWS_ACCESS_KEY_ID" ] || { echo "check-secrets: $S3_NAME: AWS_ACCESS_KEY_ID is empty or missing" >&2; fail=1; }
[ -n "$AWS_SECRET_ACCESS_KEY" ] || { echo "check-secrets: $S3_NAME: AWS_SECRET_ACCESS_KEY is empty or missing" >&2; fail=1; }
[ "$fail" = 0 ] && echo "check-secrets: ok"
exit "$fail"
