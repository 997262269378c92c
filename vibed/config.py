"""Configuration: twistd options and ``VIBE_*`` environment variables, validated once at start.

Every option can also come from the environment (``--couchdb`` from ``VIBE_COUCHDB`` and so
on); an option given on the command line wins. A bad value raises :class:`ConfigError`, whose
message is one line naming the option, which the plugin prints instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import evolve, field, frozen
from twisted.python import usage

from vibed.web import ConnectionLimits

DEFAULT_PORT = "tcp:3000"


class ConfigError(Exception):
    """A configuration value is unusable; the message names the option."""


def _env_name(option: str) -> str:
    return "VIBE_" + option.upper().replace("-", "_")


# name, default, help. Kept in one table so --help, the env mapping and the README agree.
OPTIONS: list[tuple[str, str | None, str]] = [
    ("port", DEFAULT_PORT, "Endpoint to listen on (twisted endpoint string, e.g. tcp:3000)."),
    (
        "couchdb",
        "embedded",
        "'embedded' (run PouchDB Server as a child process) or a CouchDB URL with "
        "credentials, e.g. http://admin:secret@couch:5984/.",
    ),
    ("data-dir", "./vibe-data", "Directory for the embedded database, keys and local blobs."),
    (
        "public-url",
        None,
        "Public base URL of this server (token aud/iss, cookie Secure flag). "
        "Default: http://localhost:<port>.",
    ),
    (
        "jwt-key-file",
        None,
        "PEM Ed25519 private key signing access tokens; generated (mode 0600) when absent. "
        "Default: <data-dir>/jwt-ed25519.pem.",
    ),
    ("crypto-threads", "2", "Threads for Argon2id and scrypt (bounded pool)."),
    (
        "trusted-proxies",
        "",
        "Comma-separated proxy addresses/networks whose X-Forwarded-For is believed.",
    ),
    ("pouchdb-server", None, "Path to the pouchdb-server executable for --couchdb embedded."),
    ("couch-timeout", "10", "Seconds before a CouchDB request is abandoned."),
    (
        "signup-limit",
        "20",
        "Signups allowed per client address per hour (each costs ~0.2 s of CPU).",
    ),
    ("blobs", "local", "Blob store: 'local' (files under <data-dir>/blobs) or 's3'."),
    (
        "s3-endpoint",
        None,
        "S3 endpoint URL (MinIO, Scaleway, moto...); default AWS for the region.",
    ),
    (
        "s3-public-endpoint",
        None,
        "S3 endpoint URL that clients use with signed URLs, when it is not --s3-endpoint "
        "(S3 behind a reverse proxy that vibed reaches by an internal name).",
    ),
    ("s3-region", "us-east-1", "S3 region (signing)."),
    ("s3-bucket", "vibe-objects", "S3 bucket holding every identity's objects."),
    ("s3-access-key-id", None, "S3 access key id (or AWS_ACCESS_KEY_ID)."),
    ("s3-secret-access-key", None, "S3 secret access key (or AWS_SECRET_ACCESS_KEY)."),
    ("s3-addressing", "path", "'path' or 'virtual' (bucket as a host name) S3 addressing."),
    ("blob-max-size", "104857600", "Largest blob in bytes (default 100 MiB)."),
    (
        "blob-mime-types",
        "image/*,audio/*,video/*,text/plain,text/csv,application/pdf,application/json,"
        "application/octet-stream,application/zip",
        "Comma-separated mime types (type/* wildcards) a blob may have.",
    ),
    ("blob-quota", "10737418240", "Bytes of finalized blobs one identity may hold (0: none)."),
    ("blob-url-ttl", "300", "Seconds a signed download URL stays valid."),
    ("blob-upload-ttl", "900", "Seconds a signed upload URL stays valid."),
    ("realtime-auth-timeout", "10", "Seconds a new WebSocket has to authenticate."),
    ("realtime-queue-messages", "1000", "Messages queued for one slow socket before it is closed."),
    ("realtime-queue-bytes", "4194304", "Bytes queued for one slow socket before it is closed."),
    ("realtime-max-subscriptions", "64", "Subscriptions one socket may hold."),
    ("realtime-ping-interval", "20", "Seconds between WebSocket pings (0: none)."),
    (
        "realtime-max-unauthenticated",
        "1000",
        "Open sockets waiting for a token, in all, before new handshakes get 503.",
    ),
    ("realtime-ping-timeout", "10", "Seconds a pong may take before the peer is dropped."),
    (
        "realtime-batch-ms",
        "25",
        "Milliseconds a socket's changes may wait to leave together in one send (0: at once);"
        " with many sockets this saves most of the fan-out's CPU.",
    ),
    (
        "access-log",
        "-",
        "Access log: '-' (a line per request in the daemon's log), 'off', or a file to "
        "append to. Lines for a file, or for a daemon log on standard output (twistd -n), "
        "are written whole once a second.",
    ),
    (
        "workers",
        "1",
        "Processes serving the one listening socket (a tcp:, tcp6: or unix: --port); "
        "run in the foreground with more than one.",
    ),
    (
        "realtime-max-unauthenticated-per-address",
        "20",
        "Open sockets waiting for a token from one client address.",
    ),
    (
        "http-header-timeout",
        "20",
        "Seconds a request's head (request line and headers) may take to arrive.",
    ),
    ("http-idle-timeout", "60", "Seconds a keep-alive connection may wait for its next request."),
    (
        "http-body-timeout",
        "30",
        "Window in seconds over which a request body must keep --http-body-min-rate.",
    ),
    ("http-body-min-rate", "512", "Bytes per second a request body must arrive at, at least."),
    (
        "max-connections-per-address",
        "256",
        "Open connections (realtime sockets included) one client address may hold; "
        "--trusted-proxies are exempt.",
    ),
]


class Options(usage.Options):
    """``twistd vibed`` options; each also read from ``VIBE_<NAME>``."""

    optParameters = [
        [name, None, None, f"{text} [env {_env_name(name)}; default {default}]"]
        for name, default, text in OPTIONS
    ]

    def postOptions(self) -> None:
        pass


@frozen
class Config:
    """Validated daemon configuration (immutable)."""

    port: str
    couchdb: str  # "embedded" or a URL (may carry credentials: never log it whole)
    data_dir: Path
    public_url: str
    jwt_key_file: Path
    crypto_threads: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    pouchdb_server: str | None
    couch_timeout: float
    blobs: str = "local"
    s3_endpoint: str | None = None
    s3_public_endpoint: str | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "vibe-objects"
    s3_access_key_id: str | None = field(default=None, repr=False)
    s3_secret_access_key: str | None = field(default=None, repr=False)
    s3_addressing: str = "path"
    blob_max_size: int = 100 * 1024 * 1024
    blob_mime_types: tuple[str, ...] = ()
    blob_quota: int = 10 * 1024**3
    blob_url_ttl: int = 300
    blob_upload_ttl: int = 900
    # Auth tunables, not (yet) options; tests shorten them.
    access_ttl: int = 15 * 60
    refresh_ttl: int = 30 * 24 * 3600
    refresh_grace: int = 30
    nonce_ttl: int = 60
    login_limit_per_email: int = 5
    login_limit_per_address: int = 100  # NATs and offices share addresses; in-flight attempts count
    login_window: int = 15 * 60
    signup_limit_per_address: int = 20
    signup_window: int = 3600
    challenge_limit_per_address: int = 30
    connection_limits: ConnectionLimits = field(factory=ConnectionLimits)
    extra: Mapping[str, Any] = field(factory=dict)
    workers: int = 1
    access_log: str = "-"
    #: The option values this configuration was validated from (workers are started with
    #: them); they hold secrets: never log them.
    raw: Mapping[str, str | None] = field(factory=dict, repr=False, eq=False)

    def evolve_extra(self, **values: Any) -> Config:
        """This configuration with ``values`` added to ``extra``."""
        return evolve(self, extra={**self.extra, **values})

    @property
    def embedded(self) -> bool:
        return self.couchdb == "embedded"

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> Config:
        """Merge options over ``VIBE_*`` variables over defaults, then validate."""
        env = os.environ if environ is None else environ
        raw: dict[str, str | None] = {}
        for name, default, _ in OPTIONS:
            value = options.get(name)
            if value is None:
                value = env.get(_env_name(name))
            raw[name] = default if value is None else value
        return cls.validate(raw)

    @classmethod
    def validate(cls, raw: Mapping[str, str | None]) -> Config:
        port = raw["port"] or ""
        _check_endpoint(port)

        couchdb = (raw["couchdb"] or "").strip()
        if couchdb != "embedded":
            parts = urlsplit(couchdb)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    "--couchdb: expected 'embedded' or an http(s):// URL of a CouchDB server"
                )
            if not couchdb.endswith("/"):
                couchdb += "/"

        data_dir = Path(raw["data-dir"] or "./vibe-data").expanduser()
        if data_dir.exists() and not data_dir.is_dir():
            raise ConfigError(f"--data-dir: {data_dir} exists and is not a directory")

        public_url = raw["public-url"]
        if public_url is None:
            public_url = f"http://localhost:{_port_number(port)}"
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ConfigError("--public-url: expected http(s)://host[:port][/path]")
        public_url = public_url.rstrip("/")

        key_file = raw["jwt-key-file"]
        jwt_key_file = Path(key_file).expanduser() if key_file else data_dir / "jwt-ed25519.pem"

        crypto_threads = _positive_int("crypto-threads", raw["crypto-threads"], 64)
        couch_timeout = _positive_float("couch-timeout", raw["couch-timeout"])

        proxies = []
        for item in (raw["trusted-proxies"] or "").split(","):
            item = item.strip()
            if not item:
                continue
            try:
                proxies.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(
                    f"--trusted-proxies: {item!r} is not an IP address or network"
                ) from None

        blobs = (raw["blobs"] or "local").strip()
        if blobs not in ("local", "s3"):
            raise ConfigError("--blobs: expected 'local' or 's3'")
        s3_endpoint = raw["s3-endpoint"]
        s3_public_endpoint = raw.get("s3-public-endpoint")
        for name, url in (("s3-endpoint", s3_endpoint), ("s3-public-endpoint", s3_public_endpoint)):
            if url:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ConfigError(f"--{name}: expected an http(s):// URL")
        addressing = (raw["s3-addressing"] or "path").strip()
        if addressing not in ("path", "virtual"):
            raise ConfigError("--s3-addressing: expected 'path' or 'virtual'")
        bucket = (raw["s3-bucket"] or "").strip()
        if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in "-." for c in bucket):
            raise ConfigError("--s3-bucket: not a valid bucket name")
        mime_types = tuple(
            m.strip().lower() for m in (raw["blob-mime-types"] or "").split(",") if m.strip()
        )
        for mime in mime_types:
            if mime.count("/") != 1 or not all(mime.split("/")):
                raise ConfigError(f"--blob-mime-types: {mime!r} is not a type/subtype")
        realtime: dict[str, float | int] = {
            "auth_timeout": _positive_float("realtime-auth-timeout", raw["realtime-auth-timeout"]),
            "queue_messages": _positive_int(
                "realtime-queue-messages", raw["realtime-queue-messages"], 10**7
            ),
            "queue_bytes": _positive_int(
                "realtime-queue-bytes", raw["realtime-queue-bytes"], 2**34
            ),
            "max_subscriptions": _positive_int(
                "realtime-max-subscriptions", raw["realtime-max-subscriptions"], 10**4
            ),
            "ping_interval": float(
                _non_negative_int("realtime-ping-interval", raw["realtime-ping-interval"])
            ),
            "ping_timeout": _positive_float("realtime-ping-timeout", raw["realtime-ping-timeout"]),
            "batch_ms": float(_non_negative_int("realtime-batch-ms", raw.get("realtime-batch-ms"))),
            "max_unauthenticated": _positive_int(
                "realtime-max-unauthenticated", raw["realtime-max-unauthenticated"], 10**7
            ),
            "max_unauthenticated_per_address": _positive_int(
                "realtime-max-unauthenticated-per-address",
                raw.get("realtime-max-unauthenticated-per-address") or "20",
                10**7,
            ),
        }
        workers = _positive_int("workers", raw.get("workers") or "1", 64)
        if workers > 1:
            from vibed.workers import adoptable

            if not adoptable(port):
                raise ConfigError(
                    "--workers: the workers share a bare listening socket: use a tcp:, tcp6: "
                    "or unix: --port (terminate TLS in front of vibed)"
                )
        access_log = (raw.get("access-log") or "-").strip()
        if access_log not in ("-", "off"):
            parent = Path(access_log).expanduser().parent
            if not parent.is_dir():
                raise ConfigError(f"--access-log: {parent} is not a directory")
        limits = ConnectionLimits(
            header_timeout=_positive_float(
                "http-header-timeout", raw.get("http-header-timeout") or "20"
            ),
            idle_timeout=_positive_float("http-idle-timeout", raw.get("http-idle-timeout") or "60"),
            body_timeout=_positive_float("http-body-timeout", raw.get("http-body-timeout") or "30"),
            body_min_rate=_non_negative_int(
                "http-body-min-rate", raw.get("http-body-min-rate") or "512"
            ),
            max_per_address=_positive_int(
                "max-connections-per-address",
                raw.get("max-connections-per-address") or "256",
                10**7,
            ),
            trusted=tuple(proxies),
        )
        return cls(
            access_log=access_log,
            workers=workers,
            raw=dict(raw),
            extra={"realtime": realtime},
            connection_limits=limits,
            signup_limit_per_address=_positive_int("signup-limit", raw["signup-limit"], 10**9),
            blobs=blobs,
            s3_endpoint=s3_endpoint or None,
            s3_public_endpoint=s3_public_endpoint or None,
            s3_region=(raw["s3-region"] or "us-east-1").strip(),
            s3_bucket=bucket,
            s3_access_key_id=raw["s3-access-key-id"] or os.environ.get("AWS_ACCESS_KEY_ID"),
            s3_secret_access_key=(
                raw["s3-secret-access-key"] or os.environ.get("AWS_SECRET_ACCESS_KEY")
            ),
            s3_addressing=addressing,
            blob_max_size=_positive_int("blob-max-size", raw["blob-max-size"], 5 * 1024**4),
            blob_mime_types=mime_types,
            blob_quota=_non_negative_int("blob-quota", raw["blob-quota"]),
            blob_url_ttl=_positive_int("blob-url-ttl", raw["blob-url-ttl"], 7 * 24 * 3600),
            blob_upload_ttl=_positive_int("blob-upload-ttl", raw["blob-upload-ttl"], 7 * 24 * 3600),
            port=port,
            couchdb=couchdb,
            data_dir=data_dir,
            public_url=public_url,
            jwt_key_file=jwt_key_file,
            crypto_threads=crypto_threads,
            trusted_proxies=tuple(proxies),
            pouchdb_server=raw["pouchdb-server"],
            couch_timeout=couch_timeout,
        )


def _check_endpoint(port: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, port)
    except Exception as e:  # serverFromString raises ValueError, KeyError, TypeError...
        raise ConfigError(f"--port: {port!r} is not a usable endpoint ({e})") from None


def _port_number(port: str) -> str:
    for part in port.split(":")[1:]:
        if part.isdigit():
            return part
        if part.startswith("port="):
            return part[5:]
    return "3000"


def _positive_int(name: str, value: str | None, maximum: int) -> int:
    try:
        number = int(value or "")
    except ValueError:
        raise ConfigError(f"--{name}: {value!r} is not a whole number") from None
    if not 1 <= number <= maximum:
        raise ConfigError(f"--{name}: must be between 1 and {maximum}")
    return number


def _non_negative_int(name: str, value: str | None) -> int:
    try:
        number = int(value or "0")
    except ValueError:
        raise ConfigError(f"--{name}: {value!r} is not a whole number") from None
    if number < 0:
        raise ConfigError(f"--{name}: must not be negative")
    return number


def _positive_float(name: str, value: str | None) -> float:
    try:
        number = float(value or "")
    except ValueError:
        raise ConfigError(f"--{name}: {value!r} is not a number") from None
    if not number > 0:
        raise ConfigError(f"--{name}: must be greater than zero")
    return number
