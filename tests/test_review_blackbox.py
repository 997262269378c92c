"""Regressions for what the black-box review of a running vibed found (issue 7), one test per
behaviour; each failed before its fix."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from harness import (
    Vibed,
    VibedFactory,
    connect_realtime,
    new_person,
    realtime_identity,
    server_socket,
)

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

    victim.sendMessage = fail
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
