"""``WS /realtime`` end to end: a real vibed on TCP, a real PouchDB Server, a real WebSocket
client (Autobahn) — authentication, isolation, scopes, delivery and bad input."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import (
    FakeClock,
    Vibed,
    VibedFactory,
    connect_realtime,
    put_doc,
    realtime_identity,
    realtime_service,
    self_signed,
)

from vibed.layout import TAG, storage_id
from vibed.realtime import (
    CLOSE_FORBIDDEN,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_UNAUTHORIZED,
)
from vibed.tokens import TokenIssuer


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed(realtime={"auth_timeout": 1.0})


async def subscribe(client: Any, collection: str, since: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "subscribe", "collection": collection}
    if since is not None:
        message["since"] = since
    client.send(message)
    answer: dict[str, Any] = await client.next()
    assert answer["type"] == "subscribed" and answer["collection"] == collection, answer
    return answer


def other_issuer(vibed: Vibed, **changes: Any) -> TokenIssuer:
    issuer = vibed.parts.issuer
    fields = {
        "key": issuer.key,
        "issuer": issuer.issuer,
        "audience": issuer.audience,
        "ttl": issuer.ttl,
        "clock": issuer.clock,
    } | changes
    return TokenIssuer(**fields)


# -- authentication ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_query_token_authenticates_and_changes_arrive(vibed: Vibed) -> None:
    """With ``?access_token=`` the socket is authenticated at once (``authenticated`` with the
    token's exp); a subscribed collection then receives a written document as the data API
    shows it: its own ``_id``, its ``_rev``, no storage tag."""
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token, auth=False)
    hello = await client.next()
    assert hello["type"] == "authenticated" and isinstance(hello["exp"], int)
    ack = await subscribe(client, "notes")
    assert isinstance(ack["seq"], str)
    rev = await put_doc(vibed.couch, me.db, "notes", "n1", {"title": "hello"})
    (change,) = await client.changes(1)
    assert change == {
        "type": "change",
        "collection": "notes",
        "id": "n1",
        "rev": rev,
        "deleted": False,
        "doc": {"_id": "n1", "_rev": rev, "title": "hello"},
        "seq": change["seq"],
    }
    assert isinstance(change["seq"], str) and TAG not in json.dumps(change)
    client.sendClose()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_first_message_auth(vibed: Vibed) -> None:
    """Without a query token, ``{"type": "auth", "token": ...}`` as the first message
    authenticates the socket."""
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed)
    client.send({"type": "auth", "token": me.token})
    assert (await client.next())["type"] == "authenticated"
    await subscribe(client, "notes")
    client.sendClose()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_bad_tokens_close_with_4001(vibed: Vibed) -> None:
    """A forged, expired, wrong-audience or garbage token closes the socket with 4001, whether
    it came in the query string or in the first message."""
    me = await realtime_identity(vibed)
    forged, _ = other_issuer(vibed, key=Ed25519PrivateKey.generate()).issue_access(
        me.idn, ["data:*"]
    )
    # kid differs for a foreign key; a token signed by the right key for another audience:
    elsewhere, _ = other_issuer(vibed, audience="http://elsewhere.test").issue_access(
        me.idn, ["data:*"]
    )
    expired, _ = other_issuer(vibed, clock=lambda: time.time() - 3600).issue_access(
        me.idn, ["data:*"]
    )
    tampered = me.token[:-4] + ("AAAA" if not me.token.endswith("AAAA") else "BBBB")
    for token in (forged, elsewhere, expired, tampered, "not-a-jwt"):
        by_query = await connect_realtime(vibed, token, auth=False)
        assert await by_query.wait_closed() == CLOSE_UNAUTHORIZED, token
        by_message = await connect_realtime(vibed)
        by_message.send({"type": "auth", "token": token})
        assert await by_message.wait_closed() == CLOSE_UNAUTHORIZED, token
        assert all(m["type"] != "authenticated" for m in by_query.inbox + by_message.inbox)


@pytest_twisted.ensureDeferred
async def test_no_auth_closes_after_the_timeout(vibed: Vibed) -> None:
    """A socket that sends nothing is closed with 4001 once auth_timeout (1 s here) passes,
    not before."""
    started = time.monotonic()
    client = await connect_realtime(vibed)
    assert await client.wait_closed() == CLOSE_UNAUTHORIZED
    assert time.monotonic() - started >= 0.9
    assert not realtime_service(vibed).sockets


@pytest_twisted.ensureDeferred
async def test_sockets_waiting_for_auth_are_capped(make_vibed: VibedFactory) -> None:
    """Past ``max_unauthenticated`` open sockets without a token, new handshakes are refused
    (503) instead of piling up; a socket with a token in its URL is still welcome, and once
    a waiting socket authenticates another may wait again."""
    vibed = await make_vibed(realtime={"auth_timeout": 5.0, "max_unauthenticated": 2})
    waiting = [await connect_realtime(vibed), await connect_realtime(vibed)]
    with pytest.raises(ConnectionError):
        await connect_realtime(vibed)
    me = await realtime_identity(vibed)
    authed = await connect_realtime(vibed, me.token)
    waiting[0].send({"type": "auth", "token": me.token})
    assert (await waiting[0].next_of("authenticated"))["type"] == "authenticated"
    third = await connect_realtime(vibed)
    for client in (*waiting, authed, third):
        client.transport.loseConnection()
        await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_a_message_before_auth_closes_with_4001(vibed: Vibed) -> None:
    """Subscribing (or sending anything but auth) before authenticating closes with 4001."""
    for first in (
        json.dumps({"type": "subscribe", "collection": "notes"}).encode(),
        b"not json",
        b'{"type": "auth"}',
    ):
        client = await connect_realtime(vibed)
        client.send_raw(first)
        assert await client.wait_closed() == CLOSE_UNAUTHORIZED


@pytest_twisted.ensureDeferred
async def test_token_refresh_keeps_the_socket_past_the_first_expiry(
    make_vibed: VibedFactory,
) -> None:
    """A fresh token sent on an open socket keeps it alive (and subscribed) past the first
    token's expiry; a socket that sends none is closed with 4002 at expiry."""
    vibed = await make_vibed(access_ttl=2, realtime={"expiry_grace": 0})
    me = await realtime_identity(vibed)
    issuer = vibed.parts.issuer
    first_exp = issuer.verify_access(me.token).exp
    stale = await connect_realtime(vibed, me.token)
    fresh = await connect_realtime(vibed, me.token)
    await subscribe(fresh, "notes")
    longer, _ = other_issuer(vibed, ttl=60).issue_access(me.idn, ["data:*"])
    fresh.send({"type": "auth", "token": longer})
    assert (await fresh.next())["exp"] > first_exp

    assert await stale.wait_closed(within=5) == CLOSE_TOKEN_EXPIRED
    assert issuer.clock() >= first_exp
    await put_doc(vibed.couch, me.db, "notes", "after-expiry", {})
    (change,) = await fresh.changes(1)
    assert change["id"] == "after-expiry" and not fresh.closed.called
    fresh.sendClose()
    await fresh.wait_closed()


@pytest_twisted.ensureDeferred
async def test_refresh_with_another_identitys_token_closes_4003(vibed: Vibed) -> None:
    """An open socket cannot switch identity: a fresh token for someone else closes it with
    4003."""
    me = await realtime_identity(vibed)
    other = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    client.send({"type": "auth", "token": other.token})
    assert await client.wait_closed() == CLOSE_FORBIDDEN


@pytest_twisted.ensureDeferred
async def test_expiry_follows_the_token_clock(make_vibed: VibedFactory) -> None:
    """The expiry deadline is read from the token clock: with the clock moved past exp the
    socket closes with 4002 at the next check instead of living on."""
    clock = FakeClock()
    vibed = await make_vibed(clock=clock, access_ttl=3600, realtime={"expiry_grace": 0})
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    clock.advance(3600)
    # A fresh (valid) token re-arms the expiry timer against the moved clock; then it lapses.
    short, _ = other_issuer(vibed, ttl=1).issue_access(me.idn, ["data:*"])
    client.send({"type": "auth", "token": short})
    assert (await client.next())["type"] == "authenticated"
    assert await client.wait_closed(within=5) == CLOSE_TOKEN_EXPIRED


# -- isolation and scopes ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_identity_a_never_sees_identity_b(vibed: Vibed) -> None:
    """A socket carries one identity: no message field names another database, and whatever
    A sends (B's database or id in extra fields, path-like collection names), B's writes
    never reach A's socket while B's own socket receives them."""
    a = await realtime_identity(vibed)
    b = await realtime_identity(vibed)
    sock_a = await connect_realtime(vibed, a.token)
    sock_b = await connect_realtime(vibed, b.token)
    sock_a.send(
        {
            "type": "subscribe",
            "collection": "notes",
            "database": b.db,
            "identity": b.idn,
            "db": b.db,
        }
    )
    assert (await sock_a.next())["type"] == "subscribed"
    for name in (f"../{b.db}", f"{b.db}/notes", "notes:x", b.db.upper(), "_all_docs"):
        sock_a.send({"type": "subscribe", "collection": name})
        assert (await sock_a.next())["code"] == "bad-collection"
    await subscribe(sock_b, "notes")
    for i in range(5):
        await put_doc(vibed.couch, b.db, "notes", f"b{i}", {"secret": "of b"})
    await put_doc(vibed.couch, a.db, "notes", "a-marker", {})
    got_b = await sock_b.changes(5)
    (got_a,) = await sock_a.changes(1)
    assert got_a["id"] == "a-marker"
    assert [c["id"] for c in got_b] == [f"b{i}" for i in range(5)]
    assert "of b" not in json.dumps(sock_a.inbox)
    for s in (sock_a, sock_b):
        s.sendClose()
        await s.wait_closed()


@pytest_twisted.ensureDeferred
async def test_scopes_apply_to_subscriptions(vibed: Vibed) -> None:
    """A ``data:read:notes`` token subscribes to notes but not todos (error ``forbidden``, no
    subscription); ``data:write:notes`` alone cannot subscribe; a fresh token with narrower
    scopes ends the subscriptions it no longer allows."""
    me = await realtime_identity(vibed, scopes=("data:read:notes",))
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    client.send({"type": "subscribe", "collection": "todos"})
    error = await client.next()
    assert error["type"] == "error" and error["code"] == "forbidden"
    assert error["collection"] == "todos"
    await put_doc(vibed.couch, me.db, "todos", "t1", {})
    await put_doc(vibed.couch, me.db, "notes", "n1", {})
    (change,) = await client.changes(1)
    assert change["collection"] == "notes"

    writer, _ = vibed.parts.issuer.issue_access(me.idn, ["data:write:notes"])
    write_only = await connect_realtime(vibed, writer)
    write_only.send({"type": "subscribe", "collection": "notes"})
    assert (await write_only.next())["code"] == "forbidden"

    narrower, _ = vibed.parts.issuer.issue_access(me.idn, ["data:read:todos"])
    client.send({"type": "auth", "token": narrower})
    assert await client.next() == {"type": "unsubscribed", "collection": "notes", "reason": "scope"}
    assert (await client.next())["type"] == "authenticated"
    await put_doc(vibed.couch, me.db, "notes", "n2", {})
    await subscribe(client, "todos")
    await put_doc(vibed.couch, me.db, "todos", "t2", {})
    (change,) = await client.changes(1)
    assert change["id"] == "t2"
    for s in (client, write_only):
        s.sendClose()
        await s.wait_closed()


# -- delivery ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_writes_arrive_in_order_filtered_with_deletes(vibed: Vibed) -> None:
    """Writes arrive on the subscribed socket in the order they were made; only the
    subscribed collection's (todos, a design doc, a blob record are not sent); an update
    carries the new rev and a delete arrives with deleted=true and doc null."""
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    db = vibed.couch.database(me.db)
    revs = {}
    for i in range(12):
        revs[f"n{i}"] = await put_doc(vibed.couch, me.db, "notes", f"n{i}", {"i": i})
        if i % 3 == 0:
            await put_doc(vibed.couch, me.db, "todos", f"t{i}", {"i": i})
    await db.put({"_id": "$blob:x", "size": 1})
    await db.put({"_id": "_design/x", "views": {}})
    updated = await put_doc(
        vibed.couch, me.db, "notes", "n3", {"_rev": revs["n3"], "i": 3, "edited": True}
    )
    deleted = await db.delete(storage_id("notes", "n5"), revs["n5"])
    got = await client.changes(14)
    assert [c["id"] for c in got] == [f"n{i}" for i in range(12)] + ["n3", "n5"]
    assert {c["collection"] for c in got} == {"notes"}
    assert got[12]["rev"] == updated and got[12]["doc"]["edited"] is True
    assert got[13]["deleted"] is True and got[13]["doc"] is None
    assert got[13]["rev"] == deleted["rev"]
    assert len({c["seq"] for c in got}) == 14
    client.sendClose()
    await client.wait_closed()
    assert len([m for m in client.inbox if m["type"] == "change"]) == 14


@pytest_twisted.ensureDeferred
async def test_writes_through_the_data_api_arrive_in_order(vibed: Vibed) -> None:
    """Creates (PUT with an id, POST with a server id), an update with If-Match and a delete
    made through the data API arrive in that order, each change carrying the rev the API
    answered and the document as GET returns it; the other collection's write does not."""
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    token = me.token
    first = await vibed.request("PUT", "/data/notes/first", {"n": 1}, token=token)
    assert first.code == 201, first.content
    posted = await vibed.request("POST", "/data/notes", {"n": 2}, token=token)
    assert posted.code == 201, posted.content
    other = await vibed.request("PUT", "/data/todos/t", {"n": 0}, token=token)
    assert other.code == 201, other.content
    updated = await vibed.request(
        "PUT",
        "/data/notes/first",
        {"n": 3},
        token=token,
        headers={"If-Match": f'"{first.json()["rev"]}"'},
    )
    assert updated.code == 200, updated.content
    current = await vibed.request("GET", "/data/notes/first", token=token)
    removed = await vibed.request(
        "DELETE", f"/data/notes/{posted.json()['id']}?rev={posted.json()['rev']}", token=token
    )
    assert removed.code == 200, removed.content
    got = await client.changes(4)
    assert [(c["id"], c["rev"]) for c in got] == [
        ("first", first.json()["rev"]),
        (posted.json()["id"], posted.json()["rev"]),
        ("first", updated.json()["rev"]),
        (posted.json()["id"], removed.json()["rev"]),
    ]
    assert got[2]["doc"] == current.json()
    assert got[3]["deleted"] is True and got[3]["doc"] is None
    client.sendClose()
    await client.wait_closed()
    assert all(m.get("collection") != "todos" for m in client.inbox)


# -- bad input -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_an_error_and_the_socket_lives(vibed: Vibed) -> None:
    """Every malformed message of every type gets an ``error`` with a stable code, and the
    socket keeps working afterwards."""
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    cases: list[tuple[bytes, bool, str]] = [
        (b"not json", False, "bad-json"),
        (b'{"type": "subscribe", "collection": "a", "collection": "b"}', False, "bad-json"),
        (b'{"type": "subscribe", "collection": NaN}', False, "bad-json"),
        (b"[" * 30_000 + b"]" * 30_000, False, "bad-json"),
        (b"\x00\x01binary", True, "bad-message"),
        (b"[1, 2]", False, "bad-message"),
        (b'"subscribe"', False, "bad-message"),
        (b"{}", False, "bad-message"),
        (b'{"type": 5}', False, "bad-message"),
        (b'{"type": "publish"}', False, "unknown-type"),
        (b'{"type": "SUBSCRIBE", "collection": "notes"}', False, "unknown-type"),
        (b'{"type": "subscribe"}', False, "bad-collection"),
        (b'{"type": "subscribe", "collection": null}', False, "bad-collection"),
        (b'{"type": "subscribe", "collection": 7}', False, "bad-collection"),
        (b'{"type": "subscribe", "collection": ""}', False, "bad-collection"),
        (b'{"type": "subscribe", "collection": "Notes"}', False, "bad-collection"),
        (b'{"type": "subscribe", "collection": "' + b"a" * 65 + b'"}', False, "bad-collection"),
        (b'{"type": "subscribe", "collection": "notes", "since": 5}', False, "bad-since"),
        (b'{"type": "subscribe", "collection": "notes", "since": ""}', False, "bad-since"),
        (b'{"type": "subscribe", "collection": "notes", "since": "a"}', False, "bad-since"),
        (b'{"type": "subscribe", "collection": "notes", "since": "1 OR"}', False, "bad-since"),
        (b'{"type": "subscribe", "collection": "notes", "since": ["x"]}', False, "bad-since"),
        (b'{"type": "unsubscribe"}', False, "bad-collection"),
        (b'{"type": "unsubscribe", "collection": "../x"}', False, "bad-collection"),
        (b'{"type": "unsubscribe", "collection": "notes"}', False, "not-subscribed"),
        (b'{"type": "auth"}', False, "bad-message"),
        (b'{"type": "auth", "token": 42}', False, "bad-message"),
        (b'{"type": "auth", "token": ""}', False, "bad-message"),
    ]
    for payload, binary, code in cases:
        client.send_raw(payload, binary)
        answer = await client.next()
        assert answer["type"] == "error" and answer["code"] == code, (payload[:60], answer)
        assert answer["message"] and "Traceback" not in answer["message"]
    await subscribe(client, "notes")
    client.send({"type": "subscribe", "collection": "notes"})
    assert (await client.next())["code"] == "already-subscribed"
    await put_doc(vibed.couch, me.db, "notes", "still-alive", {})
    assert (await client.changes(1))[0]["id"] == "still-alive"
    client.send({"type": "unsubscribe", "collection": "notes"})
    assert await client.next() == {
        "type": "unsubscribed",
        "collection": "notes",
        "reason": "request",
    }
    client.sendClose()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_oversized_and_invalid_utf8_frames_close_with_their_codes(vibed: Vibed) -> None:
    """A message over the size limit (64 KiB) closes with 1009, a text frame that is not
    UTF-8 with 1007; before or after authentication alike."""
    me = await realtime_identity(vibed)
    authed = await connect_realtime(vibed, me.token)
    authed.send({"type": "subscribe", "collection": "notes", "pad": "x" * 70_000})
    assert await authed.wait_closed() == 1009
    anonymous = await connect_realtime(vibed)
    anonymous.send_raw(b'{"type": "auth", "token": "' + b"x" * 70_000 + b'"}')
    assert await anonymous.wait_closed() == 1009
    broken = await connect_realtime(vibed, me.token)
    broken.send_raw(b'{"type": "\xff\xfe"}')
    assert await broken.wait_closed() == 1007


@pytest_twisted.ensureDeferred
async def test_too_many_subscriptions_is_an_error(make_vibed: VibedFactory) -> None:
    """Past max_subscriptions per socket, subscribe answers ``too-many-subscriptions``."""
    vibed = await make_vibed(realtime={"max_subscriptions": 3})
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    for name in ("a", "b", "c"):
        await subscribe(client, name)
    client.send({"type": "subscribe", "collection": "d"})
    assert (await client.next())["code"] == "too-many-subscriptions"
    client.sendClose()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_plain_http_get_is_refused_without_a_500(vibed: Vibed) -> None:
    """``GET /realtime`` without the WebSocket upgrade is a 4xx, with no server banner."""
    resp = await treq.get(vibed.url + "/realtime", persistent=False)
    body = await resp.content()
    assert 400 <= resp.code < 500
    assert b"Autobahn" not in body and b"Traceback" not in body


@pytest_twisted.ensureDeferred
async def test_changes_go_through_tls_when_vibed_terminates_it(vibed: Vibed) -> None:
    """On a TLS port (``--port ssl:...``) a change reaches a ``wss://`` client intact and in
    order: the fast send path (straight to the socket) never writes a frame past the TLS
    layer, which would put the document on the wire in clear."""
    from autobahn.twisted.websocket import WebSocketClientFactory
    from harness import RealtimeClient
    from twisted.internet import reactor, ssl
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

    cert, key = self_signed()
    server_options = ssl.CertificateOptions(privateKey=key, certificate=cert)
    port = reactor.listenSSL(0, vibed.parts.site(), server_options, interface="127.0.0.1")
    try:
        me = await realtime_identity(vibed)
        number = port.getHost().port
        factory = WebSocketClientFactory(
            f"wss://127.0.0.1:{number}/realtime?access_token={me.token}"
        )
        factory.protocol = RealtimeClient
        factory.setProtocolOptions(openHandshakeTimeout=5, closeHandshakeTimeout=5)
        trust = ssl.Certificate(cert)
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", number),
        )
        client = await endpoint.connect(factory)
        await client.opened
        assert (await client.next())["type"] == "authenticated"
        await subscribe(client, "notes")
        for k in range(3):
            await put_doc(vibed.couch, me.db, "notes", f"n{k}", {"k": k, "secret": "s3cr3t"})
        changes = await client.changes(3)
        assert [c["doc"]["k"] for c in changes] == [0, 1, 2]
        client.sendClose()
        await client.wait_closed()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_upgraded_http_channel_keeps_no_timer(vibed: Vibed) -> None:
    """Once a WebSocket took a connection over, the HTTP channel that carried the upgrade
    leaves no timer behind (a pending one would hold the channel, and its request, in memory
    for every socket until the HTTP timeouts ran out: 8 KiB a socket, measured)."""
    from twisted.internet import reactor

    from vibed.web import VibeChannel

    me = await realtime_identity(vibed)
    clients = [await connect_realtime(vibed, me.token) for _ in range(3)]
    left = [
        call
        for call in reactor.getDelayedCalls()
        if isinstance(getattr(call.func, "__self__", None), VibeChannel)
        and call.func.__self__.transport is None  # handed over to the WebSocket
    ]
    assert left == []
    for client in clients:
        client.sendClose()
        await client.wait_closed()
