"""Unit tests of vibed.couch.client against in-memory servers (StubTreq) and a fake clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import pytest
from treq.testing import HasHeaders, RequestSequence, StringStubbingResource, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from vibed.couch import (
    CouchBadRequest,
    CouchConflict,
    CouchError,
    CouchNotFound,
    CouchServer,
    CouchUnauthorized,
    CouchUnavailable,
)
from vibed.couch.client import FindResult

BASE = "http://couch.test:5984/"


def server_for(resource: Resource, clock: Clock | None = None, **kw: Any) -> CouchServer:
    return CouchServer(BASE, StubTreq(resource), clock=clock or Clock(), **kw)


def answering(status: int, body: bytes | dict[str, Any] | list[Any]) -> StringStubbingResource:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return StringStubbingResource(
        lambda method, url, params, headers, data: (
            status,
            {b"Content-Type": b"application/json"},
            raw,
        )
    )


def result_of(coro: Any) -> Any:
    """Run a coroutine that StubTreq completes synchronously; its result or its exception."""
    d = Deferred.fromCoroutine(coro)
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the request did not complete synchronously"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


class Recorder(Resource):
    """Records each raw request (method, uri, headers, body) and answers from a script."""

    isLeaf = True

    def __init__(self, answer: Callable[[Request], tuple[int, Any]] | None = None) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes, dict[bytes, list[bytes]], bytes]] = []
        self.answer = answer or (lambda request: (200, {"ok": True}))

    def render(self, request: Request) -> bytes:
        self.requests.append(
            (
                request.method,
                request.uri,
                dict(request.requestHeaders.getAllRawHeaders()),
                request.content.read(),
            )
        )
        status, body = self.answer(request)
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode()


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.mark.parametrize(
    ("status", "body", "exc_type", "error", "reason"),
    [
        (404, {"error": "not_found", "reason": "missing"}, CouchNotFound, "not_found", "missing"),
        (409, {"error": "conflict", "reason": "Document update conflict"}, CouchConflict,
         "conflict", "Document update conflict"),
        (412, {"error": "file_exists", "reason": "exists"}, CouchConflict, "file_exists",
         "exists"),
        (401, {"error": "unauthorized", "reason": "Name or password is incorrect."},
         CouchUnauthorized, "unauthorized", "Name or password is incorrect."),
        (403, {"error": "forbidden", "reason": "no"}, CouchUnauthorized, "forbidden", "no"),
        (400, {"error": "bad_request", "reason": "invalid UTF-8 JSON"}, CouchBadRequest,
         "bad_request", "invalid UTF-8 JSON"),
        (415, {"error": "bad_content_type", "reason": "x"}, CouchBadRequest,
         "bad_content_type", "x"),
        (500, {"error": "unknown_error", "reason": "badarg"}, CouchUnavailable,
         "unknown_error", "badarg"),
        (503, b"<html>gateway says no</html>", CouchUnavailable, "service_unavailable", ""),
    ],
)  # fmt: skip
def test_status_maps_to_typed_error(
    status: int, body: Any, exc_type: type[CouchError], error: str, reason: str
) -> None:
    """Each non-2xx status raises its CouchError subclass with error/reason from the body."""
    db = server_for(answering(status, body)).database("db")
    with pytest.raises(exc_type) as info:
        result_of(db.get("doc"))
    assert type(info.value) is exc_type
    assert (info.value.status, info.value.error, info.value.reason) == (status, error, reason)


def test_create_db_412_is_false_and_201_true() -> None:
    """create_db answers False on 412 file_exists (idempotent), True on 201, in that order."""
    seq = RequestSequence(
        [
            ((b"put", BASE + "new", {}, HasHeaders({}), b""), (201, {}, b'{"ok":true}')),
            (
                (b"put", BASE + "new", {}, HasHeaders({}), b""),
                (412, {}, b'{"error":"file_exists","reason":"The database could not be created."}'),
            ),
        ],
        pytest.fail,
    )
    server = server_for(StringStubbingResource(seq))
    with seq.consume(pytest.fail):
        assert result_of(server.create_db("new")) is True
        assert result_of(server.create_db("new")) is False


def test_delete_db_missing_is_false_without_delete() -> None:
    """delete_db of a missing database is False, decided by HEAD, no DELETE sent."""
    recorder = Recorder(lambda request: (404, {"error": "not_found", "reason": "missing"}))
    assert result_of(server_for(recorder).delete_db("gone")) is False
    assert [r[0] for r in recorder.requests] == [b"HEAD"]


def test_paths_percent_encode_every_segment() -> None:
    """DB names and doc ids are percent-encoded per segment; _design/ keeps its slash."""
    recorder = Recorder()
    db = server_for(recorder).database("db_a/b$(c)+d-e")
    for docid in ["a/b?c#d", "sp ace", "üñ☃", "pct%2F", "_design/x/y", "_local/l?", "plus+"]:
        result_of(db.get(docid))
    assert [r[1] for r in recorder.requests] == [
        b"/db_a%2Fb%24%28c%29%2Bd-e/a%2Fb%3Fc%23d",
        b"/db_a%2Fb%24%28c%29%2Bd-e/sp%20ace",
        b"/db_a%2Fb%24%28c%29%2Bd-e/%C3%BC%C3%B1%E2%98%83",
        b"/db_a%2Fb%24%28c%29%2Bd-e/pct%252F",
        b"/db_a%2Fb%24%28c%29%2Bd-e/_design/x%2Fy",
        b"/db_a%2Fb%24%28c%29%2Bd-e/_local/l%3F",
        b"/db_a%2Fb%24%28c%29%2Bd-e/plus%2B",
    ]


def test_query_values_are_json_encoded() -> None:
    """all_docs sends startkey/endkey as JSON in the query, and keys= as a POST body."""
    recorder = Recorder(lambda request: (200, {"rows": []}))
    db = server_for(recorder).database("db")
    result_of(db.all_docs(startkey="a:", endkey="a:\ufff0", include_docs=True, limit=5))
    result_of(db.all_docs(keys=["x&y", "z"]))
    (m1, uri1, _, _), (m2, uri2, _, body2) = recorder.requests
    path, _, query = uri1.decode("ascii").partition("?")
    assert (m1, path) == (b"GET", "/db/_all_docs")
    params = dict(parse_qsl(query, strict_parsing=True))
    assert {k: json.loads(v) for k, v in params.items()} == {
        "startkey": "a:",
        "endkey": "a:\ufff0",
        "include_docs": True,
        "limit": 5,
    }
    assert (m2, uri2, json.loads(body2)) == (b"POST", b"/db/_all_docs", {"keys": ["x&y", "z"]})


def test_illegal_names_are_refused_before_any_request() -> None:
    """A bad db name or a doc id naming an endpoint raises CouchBadRequest, sending nothing."""
    recorder = Recorder()
    server = server_for(recorder)
    for name in ["Upper", "1abc", "", "a b", "_all_dbs"]:
        with pytest.raises(CouchBadRequest):
            result_of(server.create_db(name))
    for docid in ["", "_all_docs", "_design/"]:
        with pytest.raises(CouchBadRequest):
            result_of(server.database("db").get(docid))
    assert recorder.requests == []


def test_timeout_before_headers() -> None:
    """No answer within `timeout` seconds: CouchUnavailable(0, 'timeout')."""
    pending: list[Request] = []

    class Silent(Resource):
        isLeaf = True

        def render(self, request: Request) -> Any:
            pending.append(request)
            return NOT_DONE_YET

    clock = Clock()
    d = Deferred.fromCoroutine(server_for(Silent(), clock, timeout=5.0).info())
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert pending and not outcome
    clock.advance(4.9)
    assert not outcome
    clock.advance(0.2)
    assert len(outcome) == 1 and isinstance(outcome[0], Failure)
    exc = outcome[0].value
    assert isinstance(exc, CouchUnavailable)
    assert (exc.status, exc.error) == (0, "timeout")


def test_timeout_covers_a_stalled_body() -> None:
    """Headers in time but the body stalls: still CouchUnavailable timeout, connection aborted."""
    pending: list[Request] = []

    class Stalling(Resource):
        isLeaf = True

        def render(self, request: Request) -> Any:
            pending.append(request)
            request.write(b'{"couchdb": ')
            return NOT_DONE_YET

    clock = Clock()
    stub = StubTreq(Stalling())
    server = CouchServer(BASE, stub, clock=clock, timeout=3.0)
    d = Deferred.fromCoroutine(server.info())
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    stub.flush()
    assert pending and not outcome
    clock.advance(3.1)
    stub.flush()
    assert len(outcome) == 1 and isinstance(outcome[0], Failure)
    assert isinstance(outcome[0].value, CouchUnavailable)
    assert outcome[0].value.error == "timeout"


def test_caller_cancel_is_not_a_timeout() -> None:
    """Cancelling a request (e.g. Klein on client disconnect) raises CancelledError, not Couch*."""
    from twisted.internet.defer import CancelledError

    class Silent(Resource):
        isLeaf = True

        def render(self, request: Request) -> Any:
            return NOT_DONE_YET

    clock = Clock()
    d = Deferred.fromCoroutine(server_for(Silent(), clock).info())
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    d.cancel()
    assert isinstance(outcome[0], Failure) and outcome[0].check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_from_url_strips_and_decodes_credentials() -> None:
    """from_url moves percent-decoded user:password into auth; url keeps neither."""
    clock = Clock()
    server = CouchServer.from_url("http://ad%40min:p%3As%2Fw@db.example:5984", reactor=clock)
    assert server.url == "http://db.example:5984/"
    assert server.auth == ("ad@min", "p:s/w")
    plain = CouchServer.from_url("https://db.example/couch/", reactor=clock)
    assert (plain.url, plain.auth) == ("https://db.example/couch/", None)


def test_credentials_never_in_repr_str_or_errors() -> None:
    """The password appears in no repr/str of server, database, feed, or error."""
    secret = "hunter2-S3CRET"
    server = CouchServer.from_url(f"http://alice:{secret}@db.example:5984/", reactor=Clock())
    db = server.database("db")
    feed = db.changes_feed(lambda row: None)
    for text in [repr(server), str(server), repr(db), repr(feed)]:
        assert secret not in text and "alice" not in text
    with pytest.raises(ValueError) as info:
        CouchServer(f"http://alice:{secret}@db.example/", server.http)
    assert secret not in str(info.value)


def test_auth_is_a_basic_header(log_events: list[LogEvent]) -> None:
    """auth goes out as an Authorization: Basic header; errors and feed logs do not repeat it."""
    secret = "hunter2-S3CRET"
    recorder = Recorder(lambda request: (401, {"error": "unauthorized", "reason": "bad"}))
    server = server_for(recorder, auth=("alice", secret))
    with pytest.raises(CouchUnauthorized) as info:
        result_of(server.info())
    headers = recorder.requests[0][2]
    assert headers[b"Authorization"] == [b"Basic YWxpY2U6aHVudGVyMi1TM0NSRVQ="]
    assert secret not in str(info.value) and secret not in repr(info.value)
    feed = server.database("db").changes_feed(lambda row: None, since="0")
    feed.start()  # answered 401: logged, retried later
    feed.stop()
    assert any("401" in formatEvent(e) for e in log_events)
    for event in log_events:
        assert secret not in formatEvent(event) and secret not in repr(event)


def test_find_synthesises_bookmark_when_server_gives_none() -> None:
    """Without a server bookmark, a full page yields a vb1. bookmark that becomes skip next call."""
    pages = [
        {"docs": [{"_id": "1"}, {"_id": "2"}]},
        {"docs": [{"_id": "3"}, {"_id": "4"}]},
        {"docs": [{"_id": "5"}]},
    ]
    recorder = Recorder(lambda request: (200, pages[len(recorder.requests) - 1]))
    db = server_for(recorder).database("db")
    first: FindResult = result_of(db.find({"a": 1}, limit=2))
    assert first.bookmark is not None and first.bookmark.startswith("vb1.")
    second: FindResult = result_of(db.find({"a": 1}, limit=2, bookmark=first.bookmark))
    third: FindResult = result_of(db.find({"a": 1}, limit=2, bookmark=second.bookmark))
    assert [d["_id"] for r in (first, second, third) for d in r.docs] == ["1", "2", "3", "4", "5"]
    assert third.bookmark is None
    bodies = [json.loads(r[3]) for r in recorder.requests]
    assert [b.get("skip") for b in bodies] == [None, 2, 4]
    assert all("bookmark" not in b for b in bodies)


def test_find_passes_server_bookmark_and_ends_on_short_page() -> None:
    """A server bookmark is passed back verbatim; a short page gives None even with a bookmark."""
    pages = [
        {"docs": [{"_id": "1"}, {"_id": "2"}], "bookmark": "g1AAAA"},
        {"docs": [{"_id": "3"}], "bookmark": "g1BBBB", "warning": "No matching index found"},
    ]
    recorder = Recorder(lambda request: (200, pages[len(recorder.requests) - 1]))
    db = server_for(recorder).database("db")
    first = result_of(db.find({"a": 1}, limit=2))
    second = result_of(db.find({"a": 1}, limit=2, bookmark=first.bookmark))
    assert first.bookmark == "g1AAAA"
    assert (second.bookmark, second.warning) == (None, "No matching index found")
    assert json.loads(recorder.requests[1][3])["bookmark"] == "g1AAAA"
    assert json.loads(recorder.requests[0][3])["limit"] == 2


def test_find_rejects_forged_bookmark() -> None:
    """A vb1. bookmark that does not decode to a non-negative skip is a CouchBadRequest."""
    db = server_for(Recorder()).database("db")
    for bad in ["vb1.", "vb1.!!!", "vb1.eyJza2lwIjotMX0"]:  # the last is {"skip":-1}
        with pytest.raises(CouchBadRequest):
            result_of(db.find({}, limit=2, bookmark=bad))


def test_changes_seqs_become_strings() -> None:
    """Integer seqs (as some servers send) come back from changes() and info() as str."""
    answers = {
        b"/db/_changes?since=0": {"results": [{"id": "a", "seq": 1, "changes": []}], "last_seq": 1},
        b"/db": {"db_name": "db", "update_seq": 7},
    }
    recorder = Recorder(lambda request: (200, answers[request.uri]))
    db = server_for(recorder).database("db")
    changes = result_of(db.changes())
    assert changes["results"][0]["seq"] == "1" and changes["last_seq"] == "1"
    assert result_of(db.info())["update_seq"] == "7"


class FeedServer(Resource):
    """A scripted continuous _changes endpoint: each request is held open for the test to drive."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.status = 200

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        request.setResponseCode(self.status)
        if self.status != 200:
            return b'{"error":"internal_server_error","reason":"down"}'
        request.write(b"\n")
        return NOT_DONE_YET

    def since(self, i: int) -> bytes:
        return self.requests[i].args[b"since"][0]


def feed_fixture(
    **kw: Any,
) -> tuple[FeedServer, StubTreq, Clock, Any, list[dict[str, Any]]]:
    resource = FeedServer()
    stub = StubTreq(resource)
    clock = Clock()
    db = CouchServer(BASE, stub, clock=clock).database("db")
    rows: list[dict[str, Any]] = []
    feed = db.changes_feed(rows.append, since="0", heartbeat_ms=1000, **kw)
    return resource, stub, clock, feed, rows


def test_feed_parses_split_lines_heartbeats_and_int_seqs() -> None:
    """Rows split across chunks, blank heartbeats and int seqs: one on_change per row, seq str."""
    resource, stub, clock, feed, rows = feed_fixture()
    feed.start()
    stub.flush()
    request = resource.requests[0]
    assert request.args[b"feed"] == [b"continuous"] and request.args[b"heartbeat"] == [b"1000"]
    assert b"filter" not in request.args
    request.write(b'{"seq":1,"id":"a","changes":[]}\n\n{"seq":2,"id"')
    stub.flush()
    assert [r["id"] for r in rows] == ["a"]
    request.write(b':"b","changes":[]}\n\n\n{"seq":"3-g1AA","id":"c","changes":[]}\n')
    stub.flush()
    assert [(r["id"], r["seq"]) for r in rows] == [("a", "1"), ("b", "2"), ("c", "3-g1AA")]
    assert feed.last_seq == "3-g1AA"
    d = feed.stop()
    stub.flush()
    assert d.called
    request.write(b'{"seq":4,"id":"d","changes":[]}\n')
    stub.flush()
    assert len(rows) == 3


def test_feed_callback_exception_is_logged_and_feed_continues(
    log_events: list[LogEvent],
) -> None:
    """An exception in on_change is logged; later rows are still delivered."""
    resource, stub, clock, _feed, _rows = feed_fixture()
    seen: list[str] = []

    def fragile(row: dict[str, Any]) -> None:
        seen.append(row["id"])
        if row["id"] == "a":
            raise RuntimeError("boom")

    feed = CouchServer(BASE, stub, clock=clock).database("db").changes_feed(fragile, since="0")
    feed.start()
    stub.flush()
    resource.requests[0].write(b'{"seq":1,"id":"a"}\n{"seq":2,"id":"b"}\n')
    stub.flush()
    assert seen == ["a", "b"]
    assert any(e.get("log_failure") and e["log_failure"].check(RuntimeError) for e in log_events)
    feed.stop()
    stub.flush()


def test_feed_reconnects_after_missed_heartbeats_with_last_seq() -> None:
    """No bytes for 3 heartbeats: the connection is dropped and reopened since last_seq."""
    resource, stub, clock, feed, rows = feed_fixture()
    connected: list[int] = []
    feed.on_connected = lambda: connected.append(1)
    feed.start()
    stub.flush()
    resource.requests[0].write(b'{"seq":"5-x","id":"a"}\n')
    stub.flush()
    clock.advance(2.9)
    stub.flush()
    assert len(resource.requests) == 1
    clock.advance(0.2)  # 3 s without a byte
    stub.flush()
    clock.advance(0.5)  # backoff after a good connection
    stub.flush()
    assert len(resource.requests) == 2
    assert resource.since(1) == b"5-x"
    assert connected == [1, 1]
    feed.stop()
    stub.flush()


def test_feed_backs_off_on_5xx_and_resets_after_success() -> None:
    """5xx answers: retries after 0.5, 1, 2 s...; a good connection resets the delay to 0.5 s."""
    resource, stub, clock, feed, rows = feed_fixture()
    errors: list[CouchError] = []
    feed.on_error = errors.append
    resource.status = 500
    feed.start()
    stub.flush()
    assert len(resource.requests) == 1
    for delay, total in [(0.5, 2), (1.0, 3), (2.0, 4), (4.0, 5)]:
        clock.advance(delay - 0.01)
        stub.flush()
        assert len(resource.requests) == total - 1
        clock.advance(0.01)
        stub.flush()
        assert len(resource.requests) == total
    assert all(isinstance(e, CouchUnavailable) and e.status == 500 for e in errors)
    resource.status = 200
    clock.advance(8.0)
    stub.flush()
    assert len(resource.requests) == 6
    resource.requests[-1].finish()  # the server ends the feed
    stub.flush()
    clock.advance(0.5)
    stub.flush()
    assert len(resource.requests) == 7
    feed.stop()
    stub.flush()


def test_feed_stop_while_waiting_to_retry() -> None:
    """stop() between attempts cancels the retry; no request follows and the Deferred fires."""
    resource, stub, clock, feed, rows = feed_fixture()
    resource.status = 503
    feed.start()
    stub.flush()
    d = feed.stop()
    assert d.called
    clock.advance(60)
    stub.flush()
    assert len(resource.requests) == 1
    assert clock.getDelayedCalls() == []


def test_feed_since_now_is_pinned_before_connecting() -> None:
    """since='now' is replaced by the db's update_seq, so a reconnection cannot skip changes."""

    class Both(FeedServer):
        def render(self, request: Request) -> Any:
            if request.path == b"/db":
                return json.dumps({"db_name": "db", "update_seq": 42}).encode()
            return super().render(request)

    resource = Both()
    stub = StubTreq(resource)
    clock = Clock()
    feed = CouchServer(BASE, stub, clock=clock).database("db").changes_feed(lambda r: None)
    feed.start()
    stub.flush()
    assert feed.last_seq == "42"
    assert resource.since(0) == b"42"
    feed.stop()
    stub.flush()


def test_feed_stop_from_on_change_drops_rest_of_chunk() -> None:
    """stop() called inside on_change: later rows of the same chunk are not delivered."""
    resource, stub, clock, _feed, _rows = feed_fixture()
    seen: list[str] = []
    stopped: list[Deferred[None]] = []

    def stop_at_b(row: dict[str, Any]) -> None:
        seen.append(row["id"])
        if row["id"] == "b":
            stopped.append(feed.stop())

    feed = CouchServer(BASE, stub, clock=clock).database("db").changes_feed(stop_at_b, since="0")
    feed.start()
    stub.flush()
    resource.requests[0].write(b'{"seq":1,"id":"a"}\n{"seq":2,"id":"b"}\n{"seq":3,"id":"c"}\n')
    stub.flush()
    assert seen == ["a", "b"]
    assert stopped[0].called
    assert feed.last_seq == "2"
