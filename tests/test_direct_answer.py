"""The document routes' own coroutine driver (vibed.api.direct._Answer): an answer goes out
once the awaited CouchDB call answers, a failure becomes its problem+json, and a client that
goes away first cancels the call being awaited and gets nothing written, with nothing
logged as a failure. Each test runs with the awaited calls as plain Deferreds and as the wire
client's ``Pending`` (handed to the driver without a callback chain)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyChannel

from vibed.api.direct import DirectRoutes
from vibed.api.http import json_response
from vibed.couch.wire import Pending
from vibed.errors import NotFound
from vibed.web import VibeRequest

KIND: list[type[Deferred[Any]]] = [Deferred]


@pytest.fixture(autouse=True, params=[Deferred, Pending], ids=["Deferred", "Pending"])
def kind(request: pytest.FixtureRequest) -> Any:
    """The kind of Deferred FakeData's calls answer with."""
    KIND[0] = request.param
    yield request.param
    KIND[0] = Deferred


class FakeData:
    """The handlers DirectRoutes takes from DataAPI; the document GET awaits ``pending``."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []
        self.seen: list[object] = []

    async def get_document(self, request: Any, collection: str, doc_id: str) -> bytes:
        first: Deferred[Any] = KIND[0]()
        self.pending.append(first)
        try:
            value = await first
            self.seen.append(value)
            second: Deferred[Any] = KIND[0]()
            self.pending.append(second)
            more = await second
        except BaseException as e:
            self.seen.append(type(e))
            raise
        return json_response(request, {"collection": collection, "id": doc_id, "v": [value, more]})

    list_documents = create_document = put_document = delete_document = get_document


CHANNELS: dict[int, Any] = {}


def start(data: FakeData, path: bytes = b"/data/notes/a1") -> VibeRequest:
    channel = DummyChannel()
    request = VibeRequest(channel, False)
    CHANNELS[id(request)] = channel  # the request lets go of its channel once finished
    request.method = b"GET"
    request.uri = request.path = path
    request.clientproto = b"HTTP/1.1"
    routes = DirectRoutes(data, Resource())  # type: ignore[arg-type]
    assert routes.render(request) is NOT_DONE_YET
    return request


def written(request: VibeRequest) -> bytes:
    sent = CHANNELS[id(request)].transport.written.getvalue()
    return b"".join(sent.split(b"\r\n\r\n", 1)[1:])


@pytest.fixture
def logged() -> Any:
    """Every event logged meanwhile."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_failure") is not None]


def test_the_answer_goes_out_after_each_await(logged: list[Any]) -> None:
    data = FakeData()
    request = start(data)
    assert not request.finished
    data.pending[0].callback("one")
    assert data.seen == ["one"] and not request.finished
    data.pending[1].callback("two")
    assert request.finished
    assert json.loads(written(request)) == {"collection": "notes", "id": "a1", "v": ["one", "two"]}
    assert failures(logged) == []


def test_a_pending_answer_skips_the_callback_chain(kind: Any) -> None:
    """The driver takes a Pending's result through ``resume``, adding no callback; a plain
    Deferred gets the driver's one callback."""
    data = FakeData()
    request = start(data)
    waiting = data.pending[0]
    if kind is Pending:
        assert waiting.resume is not None and waiting._callbacks == []
    else:
        assert len(waiting._callbacks) == 1
    waiting.callback("one")
    assert data.seen == ["one"] and waiting.called
    data.pending[1].callback("two")
    assert request.finished


def test_an_already_answered_call_is_taken_at_once() -> None:
    class Ready(FakeData):
        async def get_document(self, request: Any, collection: str, doc_id: str) -> bytes:
            from twisted.internet.defer import succeed

            value = await succeed("now")
            return json_response(request, {"v": value})

    request = start(Ready())
    assert request.finished and json.loads(written(request)) == {"v": "now"}


def test_a_failure_is_raised_in_the_handler_and_answered_as_a_problem(
    logged: list[Any],
) -> None:
    data = FakeData()
    request = start(data)
    data.pending[0].errback(NotFound("No such document."))
    assert data.seen == [NotFound]
    assert request.finished and request.code == 404
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/problem+json"]
    assert json.loads(written(request))["detail"] == "No such document."
    assert failures(logged) == []


def test_a_bug_is_a_500_problem_and_logged(logged: list[Any]) -> None:
    data = FakeData()
    request = start(data)
    data.pending[0].errback(ZeroDivisionError("bug"))
    assert request.finished and request.code == 500
    assert b"ZeroDivisionError" not in written(request)
    assert failures(logged)  # the bug is in the daemon log


def test_a_client_that_goes_away_cancels_the_call_and_gets_nothing(logged: list[Any]) -> None:
    data = FakeData()
    request = start(data)
    data.pending[0].callback("one")
    request.connectionLost(Failure(ConnectionLost()))
    assert data.seen == ["one", CancelledError]  # the awaited call was cancelled
    assert data.pending[1].called  # (by its cancel)
    assert written(request) == b"" and not request.finished
    assert failures(logged) == []  # a cancel after the client left is not a failure


def test_cancelled_while_the_client_is_here_is_a_503_not_an_empty_200(logged: list[Any]) -> None:
    data = FakeData()
    request = start(data)
    data.pending[0].errback(CancelledError())  # cancelled by something else than the client
    assert request.finished and request.code == 503
    assert json.loads(written(request))["status"] == 503


def test_an_answer_that_cannot_be_written_drops_the_connection(
    logged: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import vibed.api.direct as direct

    def broken(request: Any, failure: Failure) -> bytes:
        raise UnicodeEncodeError("ascii", "é", 0, 1, "a header value")

    monkeypatch.setattr(direct, "answer_failure", broken)
    data = FakeData()
    request = start(data)
    transport = CHANNELS[id(request)].transport
    aborted: list[bool] = []
    transport.abortConnection = lambda: aborted.append(True)
    data.pending[0].errback(NotFound("No such document."))
    assert aborted == [True]  # not left open with no deadline
    assert failures(logged)


def test_a_canceller_that_raises_stays_inside_the_answer(logged: list[Any]) -> None:
    class Stubborn(FakeData):
        async def get_document(self, request: Any, collection: str, doc_id: str) -> bytes:
            def refuse(_: Deferred[Any]) -> None:
                raise RuntimeError("cannot cancel")

            waiting: Deferred[Any] = KIND[0](refuse)
            self.pending.append(waiting)
            await waiting
            return b""

    data = Stubborn()
    request = start(data)
    request.connectionLost(Failure(ConnectionLost()))  # does not raise
    assert [e["log_failure"].type for e in failures(logged)] == [RuntimeError]


def test_every_path_a_document_route_takes_is_cors_allowed() -> None:
    """LeanDirectRoutes.start sets the CORS headers without asking vibed.cors.allowed: that
    holds only while every path the route pattern takes is one allowed would allow (plain
    /data/..., no percent escape that could decode to another path)."""
    import random

    from vibed.api.direct import _ROUTE
    from vibed.cors import allowed

    alphabet = b"/%.~-_:aZ09?#;\\ \x00"
    paths = [
        b"/data/notes",
        b"/data/notes/abc",
        b"/data/a/_index",
        b"/data/notes/%2e%2e",
        b"/data/../me/key",
        b"/data/notes/..",
        b"/data//x",
        b"/me/key",
        b"/blob/local/x",
    ]
    rng = random.Random(11)
    for _ in range(20000):
        tail = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        paths.append(b"/data/" + tail)
    taken = [p for p in paths if _ROUTE.match(p)]
    assert len(taken) > 100  # the sample reaches the pattern
    for path in taken:
        assert b"%" not in path and allowed(path), path
