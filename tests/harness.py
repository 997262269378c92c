"""An in-process vibed on a real TCP port against a real CouchDB-protocol server, for tests."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import reactor

from vibed.bootstrap import BootstrapService, bootstrap
from vibed.config import Config
from vibed.couch import CouchServer
from vibed.cpu import CryptoPool
from vibed.service import Components, build

#: ``RateLimiter.purge(older_than=-EVERY_EVENT)`` deletes every event: the session's CouchDB
#: keeps events of earlier tests, some dated ahead by a FakeClock they advanced.
EVERY_EVENT = 10 * 365 * 86400


class FakeClock:
    """Wall time plus an offset the test moves forward."""

    def __init__(self) -> None:
        import time

        self._time = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self._time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def make_config(tmp_path: Path, couch_url: str, **overrides: Any) -> Config:
    from vibed.config import OPTIONS

    raw: dict[str, str | None] = {name: default for name, default, _ in OPTIONS}
    raw |= {
        "port": "tcp:0:interface=127.0.0.1",
        "couchdb": couch_url,
        "data-dir": str(tmp_path / "data"),
        "public-url": "http://vibe.test",
        "jwt-key-file": None,
        "crypto-threads": "2",
        "trusted-proxies": "",
        "pouchdb-server": None,
        "couch-timeout": "10",
    }
    # Tests sign up many identities from 127.0.0.1; tests of these limits set their own.
    overrides.setdefault("signup_limit_per_address", 1_000_000)
    overrides.setdefault("challenge_limit_per_address", 1_000_000)
    for key in list(overrides):
        if key.replace("_", "-") in raw:
            raw[key.replace("_", "-")] = overrides.pop(key)
    config = Config.validate(raw)
    return attrs.evolve(config, **overrides)


def string_channel(site: Any, clock: Any) -> tuple[Any, Any]:
    """A channel of ``site`` (timed by ``clock``) connected to a StringTransport, for tests
    of the HTTP channel on exact bytes: (channel, transport)."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    site.reactor = clock
    channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    channel.callLater = clock.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


class Vibed:
    """A running vibed API; ``url`` is its base URL."""

    def __init__(self, config: Config, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.clock = clock or FakeClock()
        self.couch = CouchServer.from_url(config.couchdb, reactor=reactor)
        self.pool = CryptoPool(config.crypto_threads, reactor)
        self.bootstrap = BootstrapService(self.couch, reactor)
        self.parts: Components = build(
            config, reactor, self.couch, self.pool, self.bootstrap, clock=self.clock
        )
        self.port: Any = None
        self.url = ""

    async def start(self) -> Vibed:
        self.pool.startService()
        await bootstrap(self.couch)
        self.bootstrap.ready = True
        self.bootstrap.last_error = None
        for service in self.parts.services:
            service.startService()
        await self.parts.revocations.when_ready()
        self.port = reactor.listenTCP(0, self.parts.site(), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        for service in reversed(self.parts.services):
            if service.running:
                stopped = service.stopService()
                if stopped is not None:
                    await stopped
        await self.pool.stopService()
        await self.couch.close()

    # -- client helpers --------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        cookie: str | None = None,
    ) -> Response:
        hdrs = {"Content-Type": "application/json"}
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        if cookie:
            hdrs["Cookie"] = f"vibe_refresh={cookie}"
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        resp = await treq.request(
            method, self.url + path, data=data, headers=hdrs, persistent=False
        )
        content = await resp.content()
        return Response(resp.code, resp.headers, content)

    async def signup(self, email: str, password: str = "correct horse battery") -> Response:
        return await self.request("POST", "/auth/signup", {"email": email, "password": password})

    def here(self, url: str) -> str:
        """``url`` (made with the configured public URL) pointed at this running instance."""
        if url.startswith(self.config.public_url + "/"):
            return self.url + url[len(self.config.public_url) :]
        return url


async def fetch(
    method: str,
    url: str,
    *,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One request to an absolute URL (a signed blob URL...), redirects not followed; ``data``
    may be bytes or a file-like object (streamed)."""
    resp = await treq.request(
        method,
        url,
        data=data,
        headers=headers or {},
        persistent=False,
        allow_redirects=False,
    )
    content = await resp.content()
    return Response(resp.code, resp.headers, content)


@attrs.define
class Response:
    code: int
    headers: Any
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def headers_all(self, name: str) -> list[str]:
        return list(self.headers.getRawHeaders(name) or [])

    @property
    def refresh_cookie(self) -> str | None:
        for value in self.headers_all("set-cookie"):
            if value.startswith("vibe_refresh="):
                return value.split(";", 1)[0].split("=", 1)[1]
        return None


# -- blobs ---------------------------------------------------------------------------------


VibedFactory = Callable[..., Awaitable[Vibed]]


class VibedSet:
    """Starts vibeds for one test (each in its own data dir) and stops them all.

    ``start`` takes make_config overrides (``defaults`` first), plus ``clock``, ``couch_url``
    (another CouchDB) and ``realtime`` (RealtimeSettings overrides)."""

    def __init__(self, tmp_path: Path, couch_url: str, **defaults: Any) -> None:
        self.tmp_path = tmp_path
        self.couch_url = couch_url
        self.defaults = {"login_limit_per_address": 10_000, **defaults}
        self.started: list[Vibed] = []

    async def start(self, **overrides: Any) -> Vibed:
        overrides = {**self.defaults, **overrides}
        clock = overrides.pop("clock", None)
        realtime = overrides.pop("realtime", None)
        if realtime is not None:
            overrides["extra"] = {"realtime": realtime}
        sub = self.tmp_path / f"v{len(self.started)}"
        v = Vibed(make_config(sub, overrides.pop("couch_url", self.couch_url), **overrides), clock)
        await v.start()
        self.started.append(v)
        return v

    async def stop(self) -> None:
        for v in self.started:
            await v.stop()


def s3_options(s3_url: str, **more: Any) -> dict[str, Any]:
    """Options for a vibed storing blobs in a fresh bucket of the moto server at ``s3_url``."""
    import uuid

    return {
        "blobs": "s3",
        "s3_endpoint": s3_url,
        "s3_bucket": f"vibe-test-{uuid.uuid4().hex[:16]}",
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
        **more,
    }


@attrs.define
class Person:
    """An identity signed up on ``vibed``, with its access token."""

    vibed: Vibed
    idn: str
    token: str

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """A JSON request with this person's token (or ``token``); redirects not followed."""
        hdrs = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token or self.token}",
        }
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        return await fetch(method, self.vibed.url + path, data=data, headers=hdrs)

    async def upload_url(self, mime: str, size: int) -> dict[str, Any]:
        resp = await self.call("POST", "/blob/upload-url", {"mime": mime, "size": size})
        assert resp.code == 200, resp.content
        result: dict[str, Any] = resp.json()
        return result

    async def put(
        self, upload: dict[str, Any], body: Any, headers: dict[str, str] | None = None
    ) -> Response:
        """PUT ``body`` to the signed URL with the listed headers (Content-Length comes from
        the body, as a browser sets it) or with ``headers``."""
        if headers is None:
            headers = {k: v for k, v in upload["headers"].items() if k.lower() != "content-length"}
        return await fetch(
            upload["method"], self.vibed.here(upload["url"]), data=body, headers=headers
        )

    async def upload(
        self, data: bytes, mime: str = "image/png", meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """upload-url, PUT, finalize: the finalized blob."""
        upload = await self.upload_url(mime, len(data))
        put = await self.put(upload, data)
        assert put.code == 200, put.content
        resp = await self.call("POST", "/blob/finalize-upload", {"id": upload["id"], "meta": meta})
        assert resp.code == 201, resp.content
        blob: dict[str, Any] = resp.json()
        return blob

    async def download(self, blob_id: str, headers: dict[str, str] | None = None) -> Response:
        """Follow the download redirect (without the bearer token) and fetch the bytes."""
        resp = await self.call("GET", f"/blob/download-url/{blob_id}")
        assert resp.code == 302, resp.content
        location = resp.header("location")
        assert location is not None
        return await fetch("GET", self.vibed.here(location), headers=headers)


async def new_person(vibed: Vibed) -> Person:
    import uuid

    resp = await vibed.signup(f"blob-{uuid.uuid4().hex[:12]}@example.org")
    assert resp.code == 201, resp.content
    body = resp.json()
    return Person(vibed=vibed, idn=body["identity"]["id"], token=body["accessToken"])


# -- realtime (WS /realtime) helpers -------------------------------------------------------


def realtime_service(vibed: Vibed) -> Any:
    """The RealtimeService of a harness vibed (its hub, sockets and settings)."""
    from vibed.realtime import RealtimeService

    return next(s for s in vibed.parts.services if isinstance(s, RealtimeService))


@attrs.define
class RealtimeIdentity:
    """An identity for realtime tests: its id, a token and its data database (created)."""

    idn: str
    token: str
    db: str


async def realtime_identity(
    vibed: Vibed, scopes: tuple[str, ...] = ("data:*",)
) -> RealtimeIdentity:
    """A fresh identity without the cost of a signup: its data database and a token."""
    from vibed.naming import identity_db, new_idn

    idn = new_idn()
    db = identity_db(idn, "data")
    await vibed.couch.create_db(db)
    token, _ = vibed.parts.issuer.issue_access(idn, list(scopes))
    return RealtimeIdentity(idn, token, db)


async def put_doc(
    couch: CouchServer, db: str, collection: str, doc_id: str, body: dict[str, Any]
) -> str:
    """Write an app document the way the data API stores it; its new rev."""
    from vibed.layout import to_storage

    result = await couch.database(db).put(to_storage(collection, doc_id, body))
    return str(result["rev"])


def _ws_client_class() -> Any:
    from autobahn.twisted.websocket import WebSocketClientProtocol
    from twisted.internet.defer import Deferred

    class RealtimeClient(WebSocketClientProtocol):  # type: ignore[misc]
        """A test client: JSON messages land in ``inbox``; ``closed`` fires (code, reason)."""

        def __init__(self) -> None:
            super().__init__()
            self.inbox: list[dict[str, Any]] = []
            self.cursor = 0
            self._wake: list[Deferred[None]] = []
            self.opened: Deferred[Any] = Deferred()
            self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
            self.close_code: int | None = None

        def onOpen(self) -> None:  # noqa: N802
            self.opened.callback(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            self.inbox.append(json.loads(payload))
            self._poke()

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
            self.close_code = self.remoteCloseCode if self.remoteCloseCode is not None else code
            reason = self.remoteCloseReason if self.remoteCloseCode is not None else reason
            if not self.opened.called:
                self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
            if not self.closed.called:
                self.closed.callback((self.close_code, reason))
            self._poke()

        def _poke(self) -> None:
            wake, self._wake = self._wake, []
            for d in wake:
                d.callback(None)

        def send(self, message: Any) -> None:
            self.sendMessage(json.dumps(message).encode(), False)

        def send_raw(self, payload: bytes, binary: bool = False) -> None:
            self.sendMessage(payload, binary)

        async def next(self, within: float = 5.0) -> dict[str, Any]:
            """The next message not yet read; TimeoutError after ``within`` seconds."""
            await self._until(lambda: len(self.inbox) > self.cursor, within)
            message = self.inbox[self.cursor]
            self.cursor += 1
            return message

        async def next_of(self, kind: str, within: float = 5.0) -> dict[str, Any]:
            """The next message of type ``kind``, skipping others."""
            while True:
                message = await self.next(within)
                if message.get("type") == kind:
                    return message

        async def changes(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
            """The next ``count`` change messages (other messages are skipped)."""
            out: list[dict[str, Any]] = []
            while len(out) < count:
                message = await self.next(within)
                if message.get("type") == "change":
                    out.append(message)
            return out

        async def wait_closed(self, within: float = 10.0) -> int | None:
            await self._until(lambda: self.closed.called, within)
            return self.close_code

        async def _until(self, ready: Callable[[], bool], within: float) -> None:
            from twisted.internet.defer import CancelledError
            from twisted.internet.defer import TimeoutError as DeferredTimeout

            while not ready():
                if self.closed.called and not ready():
                    raise ConnectionError(f"socket closed ({self.close_code})")
                d: Deferred[None] = Deferred()
                self._wake.append(d)
                d.addTimeout(within, reactor)
                try:
                    await d
                except (CancelledError, DeferredTimeout) as e:
                    raise TimeoutError(f"nothing within {within} s") from e

    return RealtimeClient


RealtimeClient = _ws_client_class()


async def connect_realtime(
    vibed: Vibed, token: str | None = None, *, auth: bool = True, opened: bool = True
) -> Any:
    """A RealtimeClient on ``WS /realtime``: the token in the query (``auth``: and its
    ``authenticated`` answer read) when given; only connected, not opened, if ``opened`` is
    False."""
    from urllib.parse import quote

    from autobahn.twisted.websocket import WebSocketClientFactory
    from twisted.internet.endpoints import TCP4ClientEndpoint

    url = vibed.url.replace("http://", "ws://") + "/realtime"
    if token is not None:
        url += "?access_token=" + quote(token, safe="")
    factory = WebSocketClientFactory(url)
    factory.protocol = RealtimeClient
    factory.setProtocolOptions(openHandshakeTimeout=5, closeHandshakeTimeout=5)
    host, port = vibed.port.getHost().host, vibed.port.getHost().port
    client = await TCP4ClientEndpoint(reactor, host, port).connect(factory)
    if opened:
        await client.opened
        if token is not None and auth:
            message = await client.next()
            assert message["type"] == "authenticated", message
    return client


def server_socket(vibed: Vibed, client: Any) -> Any:
    """The vibed-side RealtimeProtocol of a test client's connection."""
    port = client.transport.getHost().port
    service = realtime_service(vibed)
    return next(s for s in service.sockets if s.transport.getPeer().port == port)


async def poll(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> float:
    """Seconds until ``await check()`` is true; AssertionError after ``within`` seconds."""
    import time

    from twisted.internet.task import deferLater

    start = time.monotonic()
    while time.monotonic() - start < within:
        if await check():
            return time.monotonic() - start
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"not within {within} s")


def assert_problem(resp: Any, status: int) -> dict[str, Any]:
    """``resp`` is a problem+json answer with ``status`` (and no traceback); its body."""
    assert resp.code == status, resp.content
    assert resp.header("content-type") == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["type"].startswith("https://") and body["title"]
    assert "Traceback" not in resp.content.decode()
    return body


def self_signed() -> tuple[Any, Any]:
    """A certificate and key for 127.0.0.1 (pyOpenSSL objects), made for the test."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return crypto.X509.from_cryptography(cert), crypto.PKey.from_cryptography_key(key)
