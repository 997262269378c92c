"""The lean CouchDB request path (:mod:`vibed.couch.wire`) against a scripted TCP server: a
request that gets no (complete) answer within the client's timeout fails as a CouchDB
timeout, on a new connection and on a reused one, and the stalled connection is never used
again; answers in time are unaffected by the timers of earlier requests."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from vibed.couch import CouchServer
from vibed.couch.errors import CouchUnavailable

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class Scripted(Protocol):
    """Answers the first ``answered`` requests of each connection, then stays silent (or,
    with ``partial``, sends the head and half a body and stalls)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.seen = 0

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.server.connections += 1

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.seen += data.count(b"\r\n\r\n")
        if self.seen <= self.server.answered:
            assert self.transport is not None
            self.transport.write(OK)
        elif self.server.partial:
            assert self.transport is not None
            self.transport.write(OK[:-5])


class ScriptedServer(Factory):
    def __init__(self, answered: int, partial: bool = False) -> None:
        self.answered = answered
        self.partial = partial
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Scripted:  # noqa: N802
        return Scripted(self)


def start(server: ScriptedServer, timeout: float) -> tuple[CouchServer, Any]:
    port = reactor.listenTCP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
    couch = CouchServer.from_url(f"http://127.0.0.1:{port.getHost().port}/", timeout=timeout)
    assert couch.wire is not None
    return couch, port


@pytest_twisted.ensureDeferred
async def test_a_silent_server_times_out_on_a_new_connection() -> None:
    """No byte of an answer: CouchUnavailable(0, 'timeout') after about ``timeout``."""
    couch, port = start(ScriptedServer(answered=0), timeout=0.5)
    try:
        began = time.monotonic()
        with pytest.raises(CouchUnavailable) as caught:
            await couch.info()
        assert (caught.value.status, caught.value.error) == (0, "timeout")
        assert 0.4 <= time.monotonic() - began < 3
    finally:
        await couch.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_that_stalls_times_out_and_is_dropped() -> None:
    """Two answers in time on one connection (each well after the previous request's
    timer was set), then a third that stops half-way through its body: a timeout, and the
    next request goes out on a new connection."""
    server = ScriptedServer(answered=2, partial=True)
    couch, port = start(server, timeout=0.6)
    try:
        assert await couch.info() == {"ok": True}
        await _sleep(0.4)
        assert await couch.info() == {"ok": True}  # reused; past the first request's timer
        assert server.connections == 1
        began = time.monotonic()
        with pytest.raises(CouchUnavailable) as caught:
            await couch.info()
        assert caught.value.error == "timeout"
        assert 0.5 <= time.monotonic() - began < 3
        assert await couch.info() == {"ok": True}  # a fresh connection answers again
        assert server.connections == 2
    finally:
        await couch.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_answers_in_time_never_time_out() -> None:
    """Many requests on a connection over longer than ``timeout`` in total, each answered
    at once: none fails (an earlier request's deadline never cuts a later one)."""
    server = ScriptedServer(answered=10_000)
    couch, port = start(server, timeout=0.3)
    try:
        began = time.monotonic()
        count = 0
        while time.monotonic() - began < 1.0:
            assert await couch.info() == {"ok": True}
            count += 1
            await _sleep(0.02)
        assert count > 10 and server.connections == 1
    finally:
        await couch.close()
        await port.stopListening()


def _sleep(seconds: float) -> Any:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
