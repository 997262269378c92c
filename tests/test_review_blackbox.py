"""Regressions for what the black-box review of a running vibed found (issue 7), one test per
behaviour; each failed before its fix."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from harness import (
    EVERY_EVENT,
    Vibed,
    VibedFactory,
    connect_realtime,
    fetch,
    new_person,
    realtime_identity,
    server_socket,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

PASSWORD = "correct horse battery"


def email() -> str:
    return f"bb-{uuid.uuid4().hex[:12]}@example.org"


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed()


async def subscribe(client: Any, collection: str, since: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "subscribe", "collection": collection}
    if since is not None:
        message["since"] = since
    client.send(message)
    answer: dict[str, Any] = await client.next_of("subscribed")
    return answer


def assert_invalid_json(resp: Any) -> None:
    assert resp.code == 400, resp.content
    assert resp.header("content-type") == "application/problem+json"
    body = resp.json()
    assert body["type"].endswith("/invalid-json"), body
    assert "Traceback" not in resp.content.decode()


# -- 1. realtime delivers documents of every size ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_realtime_delivers_documents_up_to_the_size_limit_live_and_on_catch_up(
    vibed: Vibed,
) -> None:
    """A 70,000-character document and one of nearly 1 MiB (the data API's limit) reach a
    live subscriber, and a later subscriber catching up with ``since`` gets both too."""
    me = await realtime_identity(vibed)
    live = await connect_realtime(vibed, me.token)
    ack = await subscribe(live, "big")
    sizes = [70_000, 1024 * 1024 - 200]
    revs = []
    for n, size in enumerate(sizes):
        resp = await vibed.request("PUT", f"/data/big/x{n}", {"f": "y" * size}, token=me.token)
        assert resp.code == 201, resp.content
        revs.append(resp.json()["rev"])
    got = await live.changes(2)
    assert [c["rev"] for c in got] == revs
    assert [len(c["doc"]["f"]) for c in got] == sizes

    late = await connect_realtime(vibed, me.token)
    await subscribe(late, "big", since=ack["seq"])
    caught = await late.changes(2)
    assert [c["rev"] for c in caught] == revs
    for client in (live, late):
        assert not [m for m in client.inbox if m["type"] == "error"]
        client.sendClose()
        await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_one_subscribers_failure_does_not_cost_another_its_event(vibed: Vibed) -> None:
    """When sending to one socket fails, that socket alone is closed (1011); the other
    subscribers of the same change still receive it, and later ones too."""
    me = await realtime_identity(vibed)
    broken = await connect_realtime(vibed, me.token)
    healthy = await connect_realtime(vibed, me.token)
    for client in (broken, healthy):
        await subscribe(client, "notes")
    victim = server_socket(vibed, broken)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the wire broke")

    # Take the per-message path (as with compression) and make it fail for this socket only.
    victim._perMessageCompress = object()
    victim.sendMessage = fail
    victim.write_frames = fail  # where framed changes go to the wire (vibed.realtime)
    for n in range(2):
        resp = await vibed.request("PUT", f"/data/notes/n{n}", {"n": n}, token=me.token)
        assert resp.code == 201
    assert [c["id"] for c in await healthy.changes(2)] == ["n0", "n1"]
    assert await broken.wait_closed() in (1011, 1006)


@pytest_twisted.ensureDeferred
async def test_incoming_messages_stay_bounded_across_fragments(vibed: Vibed) -> None:
    """Lifting Autobahn's limit for what vibed sends keeps the 64 KiB bound on what it
    receives, also for a message split into frames that are each under the limit."""
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    payload = json.dumps({"type": "subscribe", "collection": "n", "pad": "x" * 100_000})
    client.sendMessage(payload.encode(), False, fragmentSize=30_000)
    assert await client.wait_closed() == 1009


# -- 2. lone surrogates are invalid JSON --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lone_surrogate_in_json_is_a_400_on_every_route(vibed: Vibed) -> None:
    """``"\\ud800"`` in signup's or login's email or password, in a document, in a query or in
    finalize's meta is 400 ``invalid-json``, never a 500."""
    bad = '"a\\ud800b@example.org"'
    assert_invalid_json(
        await vibed.request(
            "POST", "/auth/signup", raw=f'{{"email": {bad}, "password": "{PASSWORD}"}}'.encode()
        )
    )
    for field in (
        '"email": "x@example.org", "password": "pass\\udfffword"',
        f'"email": {bad}, "password": "x"',
    ):
        for route in ("/auth/signup", "/auth/login"):
            assert_invalid_json(await vibed.request("POST", route, raw=f"{{{field}}}".encode()))
    person = await new_person(vibed)
    assert_invalid_json(await person.call("PUT", "/data/notes/a", raw=b'{"t": "\\ud800"}'))
    assert_invalid_json(await person.call("POST", "/data/notes", raw=b'{"\\udc00": 1}'))
    upload = await person.upload_url("image/png", 3)
    assert (await person.put(upload, b"png")).code == 200
    resp = await person.call(
        "POST",
        "/blob/finalize-upload",
        raw=('{"id": "' + upload["id"] + '", "meta": {"name": "\\ud83d"}}').encode(),
    )
    assert_invalid_json(resp)
    # A proper pair (an emoji) is fine, and so is an escaped backslash before "ud800".
    ok = await person.call("PUT", "/data/notes/b", raw=b'{"t": "\\ud83d\\ude00", "u": "\\\\ud800"}')
    assert ok.code == 201, ok.content
    got = (await person.call("GET", "/data/notes/b")).json()
    assert got["t"] == "\U0001f600" and got["u"] == "\\ud800"


@pytest_twisted.ensureDeferred
async def test_lone_surrogate_on_the_socket_is_an_error_and_the_socket_stays(
    vibed: Vibed,
) -> None:
    """``{"type": "\\ud800"}`` after auth answers an ``error`` (bad-json); the socket stays
    open and keeps working."""
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    for raw in (b'{"type": "\\ud800"}', b'{"type": "subscribe", "collection": "\\udfff"}'):
        client.send_raw(raw)
        answer = await client.next()
        assert answer["type"] == "error" and answer["code"] == "bad-json", answer
    await subscribe(client, "notes")
    client.sendClose()
    assert await client.wait_closed() == 1000


@pytest_twisted.ensureDeferred
async def test_json_errors_speak_our_words_not_pythons(vibed: Vibed) -> None:
    """A 5,000-digit integer, a byte order mark or invalid UTF-8 get a message of ours: no
    ``sys.set_int_max_str_digits``, no ``utf-8-sig``, no codec names."""
    person = await new_person(vibed)
    for raw in (
        b'{"n": ' + b"9" * 5000 + b"}",
        b'\xef\xbb\xbf{"n": 1}',
        b'{"n": "\xff"}',
        b'{"n": 1e999}',
        b'{"n": NaN}',
    ):
        resp = await person.call("PUT", "/data/notes/x", raw=raw)
        assert_invalid_json(resp)
        detail = resp.json()["detail"]
        for leak in ("set_int_max_str_digits", "utf-8-sig", "codec", "Exceeds the limit"):
            assert leak not in detail, detail


# -- 3. connections that make no progress, and one address's share ------------------------


class RawClient(Protocol):
    """A TCP client that sends what it is told and records what comes back."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.lost.called:
            self.lost.callback(None)


async def raw_connect(vibed: Vibed) -> RawClient:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    address = vibed.port.getHost()
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, address.host, address.port), client)
    return client


async def trickle(client: RawClient, data: bytes, every: float, within: float) -> float:
    """Send ``data`` a byte every ``every`` s until the server closes; the seconds it took."""
    start = reactor.seconds()
    for byte in data:
        if client.lost.called:
            break
        assert client.transport is not None
        client.transport.write(bytes([byte]))
        await deferLater(reactor, every, lambda: None)
        assert reactor.seconds() - start < within, "the server kept the connection"
    await client.lost
    return reactor.seconds() - start


@pytest_twisted.ensureDeferred
async def test_a_request_head_trickled_byte_by_byte_is_cut_off(make_vibed: VibedFactory) -> None:
    """A client sending a request line and headers a byte at a time (each byte resetting any
    idle timer) gets 408 and is closed once the head has taken --http-header-timeout."""
    vibed = await make_vibed(http_header_timeout="1")
    client = await raw_connect(vibed)
    took = await trickle(
        client, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200, 0.1, 10
    )
    assert 0.9 <= took < 5
    assert client.received.startswith(b"HTTP/1.1 408 ")
    assert b"application/problem+json" in client.received


@pytest_twisted.ensureDeferred
async def test_a_silent_connection_is_closed_after_the_header_timeout(
    make_vibed: VibedFactory,
) -> None:
    """A connection that opens and sends nothing is closed after --http-header-timeout."""
    vibed = await make_vibed(http_header_timeout="1")
    client = await raw_connect(vibed)
    start = reactor.seconds()
    await client.lost
    assert reactor.seconds() - start < 5


@pytest_twisted.ensureDeferred
async def test_a_body_trickled_slower_than_the_minimum_rate_is_cut_off(
    make_vibed: VibedFactory,
) -> None:
    """A body arriving below --http-body-min-rate over a --http-body-timeout window gets 408;
    one arriving fast enough is served."""
    vibed = await make_vibed(http_body_timeout="1", http_body_min_rate="100")
    person = await new_person(vibed)
    head = (
        b"PUT /data/notes/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + person.token.encode() + b"\r\nContent-Length: 5000\r\n\r\n"
    )
    client = await raw_connect(vibed)
    assert client.transport is not None
    client.transport.write(head)
    took = await trickle(client, b'{"t": "' + b"x" * 4990 + b'"}', 0.05, 10)
    assert took < 5
    assert client.received.startswith(b"HTTP/1.1 408 ")
    fast = await person.call("PUT", "/data/notes/fast", {"t": "x" * 4990})
    assert fast.code == 201


@pytest_twisted.ensureDeferred
async def test_an_idle_keep_alive_connection_is_closed(make_vibed: VibedFactory) -> None:
    """After a response, a keep-alive connection that sends nothing more is closed after
    --http-idle-timeout."""
    vibed = await make_vibed(http_idle_timeout="1", http_header_timeout="30")
    client = await raw_connect(vibed)
    assert client.transport is not None
    client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    start = reactor.seconds()
    await client.lost
    assert b"200 OK" in client.received
    assert reactor.seconds() - start < 5


@pytest_twisted.ensureDeferred
async def test_one_address_holds_at_most_its_share_of_connections(
    make_vibed: VibedFactory,
) -> None:
    """Past --max-connections-per-address open connections from one address, the next gets
    503 and is closed; once one closes, a new one is served; realtime sockets count too."""
    vibed = await make_vibed(max_connections_per_address="4", http_header_timeout="30")
    me = await realtime_identity(vibed)
    socket = await connect_realtime(vibed, me.token)
    held = [await raw_connect(vibed) for _ in range(3)]
    over = await raw_connect(vibed)
    await over.lost
    assert over.received.startswith(b"HTTP/1.1 503 ")
    assert b"too-many-connections" in over.received
    assert held[0].transport is not None
    held[0].transport.loseConnection()
    await held[0].lost
    served = await raw_connect(vibed)
    assert served.transport is not None
    served.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await served.lost
    assert b"200 OK" in served.received
    for client in held[1:]:
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
    socket.sendClose()
    await socket.wait_closed()


@pytest_twisted.ensureDeferred
async def test_trusted_proxies_are_exempt_from_the_connection_cap(
    make_vibed: VibedFactory,
) -> None:
    """A load balancer in --trusted-proxies carries many clients: its connections are not
    capped (it must enforce the cap itself)."""
    vibed = await make_vibed(
        max_connections_per_address="2", trusted_proxies="127.0.0.1", http_header_timeout="30"
    )
    held = [await raw_connect(vibed) for _ in range(4)]
    await deferLater(reactor, 0.2, lambda: None)
    assert not any(c.lost.called for c in held)
    for client in held:
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost


@pytest_twisted.ensureDeferred
async def test_sockets_waiting_to_authenticate_are_capped_per_address(
    make_vibed: VibedFactory,
) -> None:
    """Past the per-address cap of sockets that have not sent a token, the next handshake
    gets 503; sockets with a token still connect."""
    vibed = await make_vibed(realtime={"max_unauthenticated_per_address": 3, "auth_timeout": 30})
    waiting = [await connect_realtime(vibed) for _ in range(3)]
    try:
        await connect_realtime(vibed)
    except ConnectionError as e:
        assert "503" in str(e)
    else:
        raise AssertionError("a fourth waiting socket was accepted")
    me = await realtime_identity(vibed)
    authed = await connect_realtime(vibed, me.token)
    for client in [*waiting, authed]:
        client.sendClose()
        await client.wait_closed()


# -- 5, 6, 7. redirects, leaks, headers, contract drift -----------------------------------


@pytest_twisted.ensureDeferred
async def test_a_double_slash_is_a_404_that_never_echoes_the_host(vibed: Vibed) -> None:
    """``GET /data//notes`` with a forged Host is a 404 problem: no redirect, no Location, and
    nothing of the client's Host in the answer."""
    person = await new_person(vibed)
    for path in ("/data//notes", "//data/notes", "/auth"):
        resp = await person.call("GET", path, headers={"Host": "evil.example:3950"})
        assert resp.code == 404, (path, resp.code, resp.content)
        assert resp.header("location") is None
        assert b"evil" not in resp.content
        assert resp.header("content-type") == "application/problem+json"


@pytest_twisted.ensureDeferred
async def test_errors_speak_our_words_and_name_no_server_version(vibed: Vibed) -> None:
    """A 404 carries no werkzeug advice; a path that is not UTF-8 once decoded (``%C0%AE``) is
    a 400 problem+json (not Klein's text line); no response names Twisted or its version."""
    nowhere = await vibed.request("GET", "/nowhere")
    assert nowhere.code == 404
    assert b"manually" not in nowhere.content and b"spelling" not in nowhere.content
    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        bad = await vibed.request("GET", "/data/%C0%AE")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, "a traceback was logged for a non-UTF-8 path"
    assert bad.code == 400 and bad.header("content-type") == "application/problem+json"
    assert b"Non-UTF-8" not in bad.content
    for resp in (nowhere, bad, await vibed.request("GET", "/healthz")):
        assert resp.header("server") == "vibed"


@pytest_twisted.ensureDeferred
async def test_every_response_carries_the_security_headers(vibed: Vibed) -> None:
    """The HTML landing page and API answers alike: nosniff, no framing (X-Frame-Options and
    CSP frame-ancestors), no referrer."""
    for path in ("/", "/healthz", "/nowhere", "/openapi.json"):
        resp = await vibed.request("GET", path)
        assert resp.header("x-content-type-options") == "nosniff", path
        assert resp.header("x-frame-options") == "DENY", path
        assert "frame-ancestors 'none'" in (resp.header("content-security-policy") or ""), path
        assert resp.header("referrer-policy") == "no-referrer", path


@pytest_twisted.ensureDeferred
async def test_contract_drift_found_by_schemathesis_is_fixed(vibed: Vibed) -> None:
    """Collection names with control characters are 400 invalid-collection (not 404); a
    bodiless JSON POST is 400 (not 415); a plain GET /realtime is our 426 problem; a token
    with no scope cannot read /me; methods a path does not take are 405 with an honest Allow."""
    person = await new_person(vibed)
    for name in ("a%0Ab", "a%01b", "a%0D%0Ab", "a%09"):
        resp = await person.call("GET", f"/data/{name}")
        assert resp.code == 400 and resp.json()["type"].endswith("/invalid-collection"), name
    for path in ("/blob/finalize-upload", "/data/a/_index"):
        resp = await fetch(
            "POST", vibed.url + path, headers={"Authorization": f"Bearer {person.token}"}
        )
        assert resp.code == 400, (path, resp.content)
    plain = await vibed.request("GET", "/realtime")
    assert plain.code == 426 and plain.header("content-type") == "application/problem+json"
    assert b"utobahn" not in plain.content
    empty, _ = vibed.parts.issuer.issue_access(person.idn, [])
    assert (await vibed.request("GET", "/me", token=empty)).code == 403
    app_token, _ = vibed.parts.issuer.issue_access(person.idn, ["data:read:notes"])
    seen = (await vibed.request("GET", "/me", token=app_token)).json()
    assert "email" not in seen and seen["id"] == person.idn
    for method, path, allow in (
        ("PUT", "/data/a/_index", {"GET", "POST"}),
        ("DELETE", "/blob/upload-url", {"POST"}),
        ("TRACE", "/blob", {"GET"}),
    ):
        resp = await person.call(method, path)
        assert resp.code == 405, (method, path, resp.code)
        assert set((resp.header("allow") or "").replace(" ", "").split(",")) - {"HEAD"} == allow


# -- the lead's review of the apps surface -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_failed_token_requests_are_rate_limited_per_address(
    make_vibed: VibedFactory,
) -> None:
    """Guessing at /auth/token (invented codes or refresh tokens) is bounded per address:
    past the limit the answer is 429 ``slow_down`` with Retry-After, in OAuth's JSON shape."""
    vibed = await make_vibed(login_limit_per_address=3)
    # The windows live in the session's CouchDB: earlier tests' failed token requests from
    # 127.0.0.1 (test_apps_attacks) would count here, some dated ahead by a test's advanced
    # FakeClock: every event goes, whatever its date.
    await vibed.parts.limiter.purge(older_than=-EVERY_EVENT)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = b"grant_type=refresh_token&client_id=https%3A%2F%2Fapp.example&refresh_token=nope"
    codes = []
    for _ in range(5):
        resp = await fetch("POST", vibed.url + "/auth/token", data=body, headers=form)
        codes.append(resp.code)
    assert codes[:3] == [400, 400, 400] and codes[3:] == [429, 429], codes
    assert resp.json()["error"] == "slow_down" and resp.header("retry-after")


@pytest_twisted.ensureDeferred
async def test_a_body_refused_early_still_carries_cors_for_apps(vibed: Vibed) -> None:
    """A 413 decided before the body is read answers an app on another origin with CORS, so
    its code sees the 413 rather than a network error."""
    person = await new_person(vibed)
    client = await raw_connect(vibed)
    assert client.transport is not None
    client.transport.write(
        b"PUT /data/notes/big HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n"
        b"Authorization: Bearer " + person.token.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{"
    )
    await client.lost
    head = client.received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413 ")
    assert b"access-control-allow-origin: *" in head
