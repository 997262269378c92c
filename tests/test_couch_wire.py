"""The lean CouchDB request path (:mod:`vibed.couch.wire`) against a scripted TCP server: a
request that gets no (complete) answer within the client's timeout fails as a CouchDB
timeout, on a new connection and on a reused one, and the stalled connection is never used
again; answers in time are unaffected by the timers of earlier requests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import AlreadyCalledError, CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from vibed.couch import CouchServer
from vibed.couch.errors import CouchUnavailable
from vibed.couch.wire import Pending

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


@contextlib.asynccontextmanager
async def serving(server: Factory, couch_timeout: float) -> AsyncIterator[CouchServer]:
    """A client (with ``couch_timeout``) of ``server``, listening for the block; both closed
    afterwards."""
    port = reactor.listenTCP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port.getHost().port}/"
    couch = CouchServer.from_url(url, timeout=couch_timeout)
    assert couch.wire is not None
    try:
        yield couch
    finally:
        await couch.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_silent_server_times_out_on_a_new_connection() -> None:
    """No byte of an answer: CouchUnavailable(0, 'timeout') after about ``timeout``."""
    async with serving(ScriptedServer(answered=0), couch_timeout=0.5) as couch:
        began = time.monotonic()
        with pytest.raises(CouchUnavailable) as caught:
            await couch.info()
        assert (caught.value.status, caught.value.error) == (0, "timeout")
        assert 0.4 <= time.monotonic() - began < 3


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_that_stalls_times_out_and_is_dropped() -> None:
    """Two answers in time on one connection (each well after the previous request's
    timer was set), then a third that stops half-way through its body: a timeout, and the
    next request goes out on a new connection."""
    server = ScriptedServer(answered=2, partial=True)
    async with serving(server, couch_timeout=0.6) as couch:
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


@pytest_twisted.ensureDeferred
async def test_answers_in_time_never_time_out() -> None:
    """Many requests on a connection over longer than ``timeout`` in total, each answered
    at once: none fails (an earlier request's deadline never cuts a later one)."""
    server = ScriptedServer(answered=10_000)
    async with serving(server, couch_timeout=0.3) as couch:
        began = time.monotonic()
        count = 0
        while time.monotonic() - began < 1.0:
            assert await couch.info() == {"ok": True}
            count += 1
            await _sleep(0.02)
        assert count > 10 and server.connections == 1


def _sleep(seconds: float) -> Any:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


# -- the second try of a request whose reused connection failed ----------------------------


class Closing(Protocol):
    """Connection ``n`` (from 0) follows ``server.plans[n]``, one step per request: "ok"
    answers, "close" closes without a byte of answer, "half" sends half an answer and closes,
    "silent" says nothing. Connections beyond the plans, and requests beyond a plan, are
    answered: a request sent when it should not be shows as an answer."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.index = server.connections
        self.seen = 0

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.server.connections += 1

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        assert self.transport is not None
        for _ in range(data.count(b"\r\n\r\n")):
            plans = self.server.plans
            plan = plans[self.index] if self.index < len(plans) else []
            step = plan[self.seen] if self.seen < len(plan) else "ok"
            self.seen += 1
            self.server.requests.append((self.index, data.split(b" ", 1)[0]))
            if step == "ok":
                self.transport.write(OK)
            elif step == "close":
                self.transport.loseConnection()
            elif step == "half":
                self.transport.write(OK[:-5])
                self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.server.lost.append(self.index)


class ClosingServer(Factory):
    def __init__(self, *plans: list[str]) -> None:
        self.plans = plans
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []
        self.lost: list[int] = []

    def buildProtocol(self, addr: Any) -> Closing:  # noqa: N802
        return Closing(self)


@pytest_twisted.ensureDeferred
async def test_a_get_on_a_reused_connection_closed_unanswered_is_sent_again() -> None:
    """The server closes an idle keep-alive connection just as a GET goes out on it (no byte
    of an answer): the GET goes out once more, on a new connection, and is answered."""
    server = ClosingServer(["ok", "close"], ["ok"])
    async with serving(server, couch_timeout=5) as couch:
        assert await couch.info() == {"ok": True}
        assert await couch.info() == {"ok": True}  # the second try's answer
        assert server.requests == [(0, b"GET"), (0, b"GET"), (1, b"GET")]


@pytest_twisted.ensureDeferred
async def test_a_write_or_a_begun_answer_is_never_sent_again() -> None:
    """A PUT may have been applied before its connection closed, and a GET whose answer had
    begun was seen by the server: neither goes out a second time; both fail as unavailable."""
    server = ClosingServer(["ok", "close"], ["ok", "half"])
    async with serving(server, couch_timeout=5) as couch:
        assert await couch.info() == {"ok": True}
        with pytest.raises(CouchUnavailable):
            await couch.request("PUT", "db/doc", body={"a": 1})
        assert await couch.info() == {"ok": True}  # on connection 1
        with pytest.raises(CouchUnavailable):
            await couch.info()
        assert server.requests == [(0, b"GET"), (0, b"PUT"), (1, b"GET"), (1, b"GET")]


@pytest_twisted.ensureDeferred
async def test_cancelling_during_the_second_try_cancels_it() -> None:
    """A caller that gives up while the second try waits for its answer gets CancelledError
    once, and the second try's connection is closed (nothing answers into a spent call)."""
    from twisted.internet.defer import CancelledError, Deferred

    server = ClosingServer(["ok", "close"], ["silent"])
    async with serving(server, couch_timeout=5) as couch:
        assert await couch.info() == {"ok": True}
        call = Deferred.fromCoroutine(couch.info())
        outcome: list[Any] = []
        call.addBoth(outcome.append)
        for _ in range(200):  # until the second try's request has arrived
            if (1, b"GET") in server.requests:
                break
            await _sleep(0.01)
        assert server.requests == [(0, b"GET"), (0, b"GET"), (1, b"GET")] and not outcome
        call.cancel()
        assert len(outcome) == 1 and isinstance(outcome[0], Failure)
        assert outcome[0].check(CancelledError)
        for _ in range(200):
            if 1 in server.lost:
                break
            await _sleep(0.01)
        assert server.lost == [0, 1]


# -- how an answer's head is read --------------------------------------------------------------


class Raw(Protocol):
    """Answers each request with the next of ``server.answers`` (bytes, as given)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.server.connections += 1

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        assert self.transport is not None
        for _ in range(data.count(b"\r\n\r\n")):
            self.transport.write(self.server.answers.pop(0))


class RawServer(Factory):
    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Raw:  # noqa: N802
        return Raw(self)


_BODY = b'{"ok":true}'


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 2\rX-A: b",  # a bare CR could end the value early
        b"Content-Length: 2\nX-A: b",
        b"Content-Length: 11\r\n 3",  # a folded line continues the length
        b"Transfer-Encoding: chunked\r\n\tgzip\r\nContent-Length: 11",
        b"Connection: keep-alive\r\n close\r\nContent-Length: 11",
        b"Content-Length: 11\r\nContent-Length: 12",  # two lengths that differ
        b"Content-Length: 1x",
        b"Content-Length: -1",
    ],
    ids=[
        "bare CR",
        "bare LF",
        "folded length",
        "folded chunked",
        "folded connection",
        "two lengths",
        "bad length",
        "negative",
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_malformed_answer_head_is_refused(head: bytes) -> None:
    """Heads a wrong framing could be read from fail as unavailable (the connection is
    dropped, never reused: the next request is answered on a new one)."""
    server = RawServer(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + _BODY, OK)
    async with serving(server, couch_timeout=5) as couch:
        with pytest.raises(CouchUnavailable):
            await couch.info()
        assert await couch.info() == {"ok": True}
        assert server.connections == 2


@pytest_twisted.ensureDeferred
async def test_a_folded_line_continues_the_header_before_it() -> None:
    """A folded line after another header is part of that header's value (RFC 9112): it
    names no framing header, and the answer is read by its own Content-Length."""
    folded = b"HTTP/1.1 200 OK\r\nX-A: a\r\n Content-Length: 3\r\nContent-Length: 11\r\n\r\n"
    server = RawServer(folded + _BODY, OK)
    async with serving(server, couch_timeout=5) as couch:
        assert await couch.info() == {"ok": True}
        assert await couch.info() == {"ok": True}
        assert server.connections == 1


@pytest_twisted.ensureDeferred
async def test_framing_headers_in_any_case_and_chunked_over_a_length() -> None:
    """Header names in any case; the same length twice is one length; chunked wins over a
    Content-Length, and such a connection is not reused."""
    chunked = b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 3\r\nTRANSFER-encoding: Chunked\r\n\r\n"
    server = RawServer(
        b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 11\r\nContent-Length: 11\r\n\r\n" + _BODY,
        chunked + b"b\r\n" + _BODY + b"\r\n0\r\n\r\n",
        OK,
    )
    async with serving(server, couch_timeout=5) as couch:
        assert await couch.info() == {"ok": True}
        assert await couch.info() == {"ok": True}
        assert server.connections == 1
        assert await couch.info() == {"ok": True}
        assert server.connections == 2  # the chunked-and-length answer's connection was closed


# -- Pending: an ordinary Deferred unless a driver sets ``resume`` ---------------------------


def test_pending_without_resume_is_an_ordinary_deferred() -> None:
    got: list[object] = []
    ok: Pending = Pending()
    ok.addCallback(got.append)
    ok.callback("answer")
    bad: Pending = Pending()
    bad.addErrback(lambda f: got.append(f.type))
    bad.errback(ValueError("no"))
    assert got == ["answer", ValueError]
    with pytest.raises(AlreadyCalledError):
        ok.callback("again")


def test_pending_with_resume_hands_over_its_result_once() -> None:
    resumed: list[object] = []
    waiting: Pending = Pending()
    # (what a resumed await reads: called, and the result, already set)
    waiting.resume = lambda result: resumed.append((result, waiting.called, waiting.result))
    waiting.callback("answer")
    assert resumed == [("answer", True, "answer")] and waiting.result is None
    resumed.clear()
    with pytest.raises(AlreadyCalledError):
        waiting.callback("again")
    failing: Pending = Pending()
    failing.resume = resumed.append
    failing.errback(ValueError("no"))
    assert isinstance(resumed[-1], Failure) and resumed[-1].type is ValueError
    cancelled: Pending = Pending()
    cancelled.resume = resumed.append
    cancelled.cancel()  # no canceller: fails with CancelledError, through resume
    assert resumed[-1].type is CancelledError  # type: ignore[union-attr]


def test_pending_with_resume_and_callbacks_runs_the_chain() -> None:
    """Another waiter's callbacks are never skipped, nor is the driver: its resume runs
    first in the chain (where its addBoth would have put it), then the others get what it
    returned, as before."""
    resumed: list[object] = []
    chained: list[object] = []
    waiting: Pending = Pending()
    waiting.resume = resumed.append
    waiting.addCallback(chained.append)
    waiting.callback("answer")
    assert resumed == ["answer"] and chained == [None]
    paused: Pending = Pending()
    paused.resume = resumed.append
    paused.pause()
    paused.callback("later")
    assert resumed == ["answer"]
    paused.unpause()
    assert resumed == ["answer", "later"]


def test_pending_contains_an_error_of_resume_and_lets_go_of_its_result() -> None:
    """What resume raises is logged, not raised into whatever fired the answer (the
    connection reading CouchDB's bytes); the result is not kept once handed over."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)  # type: ignore[arg-type]
    try:

        def broken(result: object) -> None:
            raise RuntimeError("bug")

        waiting: Pending = Pending()
        waiting.resume = broken
        waiting.callback("answer")  # does not raise
        failing: Pending = Pending()
        failing.resume = lambda result: None
        failing.errback(ValueError("no"))
    finally:
        globalLogPublisher.removeObserver(events.append)  # type: ignore[arg-type]
    logged = [e["log_failure"].type for e in events if e.get("log_failure") is not None]
    assert logged == [RuntimeError]
    assert waiting.called and waiting.result is None
    assert failing.called and failing.result is None


def test_pending_awaited_by_twisted_coroutines() -> None:
    """A coroutine driven by Deferred.fromCoroutine (not the document routes' driver) waits
    for a Pending as for any Deferred."""
    waiting: Pending = Pending()

    async def handler() -> object:
        return await waiting

    done = Deferred.fromCoroutine(handler())
    assert not done.called
    waiting.callback("answer")
    assert done.result == "answer"


@pytest_twisted.ensureDeferred
async def test_a_connection_reads_straight_from_its_socket_and_hears_its_end() -> None:
    """Once connected, the TCP connection hands its bytes to the pool's connection directly
    (not through the endpoint's wrapper), and its end still reaches it: a connection the
    server closes while idle is forgotten, and the next request goes out on a new one."""

    class Kept(ScriptedServer):
        protocols: list[Scripted] = []

        def buildProtocol(self, addr: Any) -> Scripted:  # noqa: N802
            protocol = super().buildProtocol(addr)
            self.protocols.append(protocol)
            return protocol

    server = Kept(answered=10)
    async with serving(server, couch_timeout=5) as couch:
        assert await couch.info() == {"ok": True}
        assert couch.wire is not None
        (connection,) = couch.wire._idle
        assert connection.transport.protocol is connection  # type: ignore[union-attr]
        server.protocols[0].transport.loseConnection()  # type: ignore[union-attr]
        await connection.lost
        assert connection.closed and couch.wire._idle == [] and couch.wire._all == set()
        assert await couch.info() == {"ok": True}
        assert server.connections == 2
