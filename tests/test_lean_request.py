"""The lean path (vibed.web.LeanRequest): the usual whole request to a document route is
answered without twisted.web's Request. It must answer exactly as twisted.web's Request
does, so the same conversation is held twice over one raw keep-alive connection, once with
the lean path on and once with it off, and the bytes on the wire (the Date, revisions, new
ids and the collection's name aside) and the access-log lines must be the same. The lean
path must also actually take the plain requests, browsers' ``Connection: keep-alive``
included (or this would compare twisted.web with itself), and leave the rest (HEAD, a query
string, ``Connection: close``, HTTP/1.0, a form, a body over the limit) to twisted.web.

The rest is the channel's part: a request pipelined behind a lean one waits for its answer,
and a client that goes away while a lean request is being answered gets nothing written."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest_twisted
from harness import Person, Vibed, VibedFactory, new_person, string_channel
from test_web_send import answers, answers_or_none, raw, until
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from vibed.web import LeanRequest, VibeSite

State = dict[str, bytes]
Step = Callable[[bytes, bytes, State], bytes]


def req(method: str, target: str, *, body: bytes | None = None, **headers: str) -> Step:
    """A request on ``/data/{c}...`` (``{c}``: the conversation's collection; ``{etag}``:
    the last ETag seen), sent with the person's token unless ``Authorization`` is given."""

    def make(collection: bytes, token: bytes, state: State) -> bytes:
        path = target.encode().replace(b"{c}", collection)
        lines = [b"%s %s HTTP/1.1" % (method.encode(), path), b"Host: vibe.test"]
        fields = {"Authorization": "Bearer {token}", **headers}
        for name, value in fields.items():
            if value:
                line = f"{name.replace('_', '-')}: {value}".encode()
                lines.append(line.replace(b"{token}", token).replace(b"{etag}", state["etag"]))
        if body is not None:
            lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

    return make


JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
CONVERSATION: list[tuple[Step, bool]] = [  # (the request, whether the lean path takes it)
    (req("PUT", "/data/{c}/a1", body=b'{"x": 1}', Content_Type=JSON), True),
    (req("GET", "/data/{c}/a1"), True),
    (req("GET", "/data/{c}/a1", Origin="https://app.example"), True),
    (req("GET", "/data/{c}/missing"), True),
    (req("GET", "/data/{c}/a1", Authorization=""), True),  # no token: 401
    (req("GET", "/data/{c}/a1", Authorization="Bearer not.a.token"), True),
    (req("GET", "/data/{c}/a1", Authorization="Basic eDp5"), True),
    (req("GET", "/data/{c}", Authorization="Bearer {token}"), True),  # a listing
    (req("POST", "/data/{c}", body=b'{"y": 2}', Content_Type=JSON), True),
    (req("POST", "/data/{c}", body=b'{"y": ', Content_Type=JSON), True),  # bad JSON
    (req("POST", "/data/{c}", body=b'{"y": 2}', Content_Type="text/plain"), True),
    (req("POST", "/data/{c}", body=b'{"_rev": "1-x"}', Content_Type=JSON), True),
    (req("POST", "/data/{c}", body=b"[1]", Content_Type=JSON), True),
    (req("PUT", "/data/{c}/a1", body=b'{"x": 2}', Content_Type=JSON, If_Match='"1-0"'), True),
    (req("PUT", "/data/{c}/a1", body=b'{"x": 2}', Content_Type=JSON, If_Match="W/x"), True),
    (req("PUT", "/data/{c}/a1", body=b'{"x": 3}', Content_Type=JSON, If_Match="{etag}"), True),
    (req("GET", "/data/{c}/a1"), True),
    (req("PUT", "/data/{c}/a1", body=b'{"x": 4}', Content_Type=JSON), True),  # conflict
    (req("GET", "/data/Bad/a1"), False),  # not a route the lean path knows: Klein's 400
    (req("GET", "/data/{c}/a1?x=1"), False),  # a query string
    (req("HEAD", "/data/{c}/a1"), False),
    (req("GET", "/data/{c}/a1", X_Frame_Options="ignored", User_Agent="raw/1 (test)"), True),
    (req("GET", "/data/{c}/a1", Connection="keep-alive"), True),  # what browsers send
    (req("GET", "/data/{c}/a1", Connection="Keep-Alive", Origin="https://app.example"), True),
    (req("GET", "/data/{c}/a1", Connection="close,keep-alive"), True),  # not "close" to twisted
    (req("POST", "/data/{c}", body=b"y=2", Content_Type=FORM), False),
    (req("DELETE", "/data/{c}/a1", If_Match="{etag}"), True),
    (req("GET", "/data/{c}/a1"), True),  # deleted: 404
    (req("GET", "/data/{c}/a1", Connection="close"), False),  # last: the connection closes
]

_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")
_REV = re.compile(rb"\d+-[0-9a-f]{32}")
_NEW_ID = re.compile(rb"\b[0-9a-f]{32}\b")
_STAMP = re.compile(r"\[\d\d/\w\w\w/\d{4}:[^\]]*\]")


def normalized(data: bytes, collection: bytes) -> bytes:
    data = _DATE.sub(b"\r\nDate: -\r\n", data)
    data = _REV.sub(b"REV", data.replace(collection, b"COLLECTION"))
    return _NEW_ID.sub(b"NEWID", data)


async def converse(vibed: Vibed, person: Person, *, lean: bool) -> tuple[list[bytes], int]:
    """The conversation's answers (normalized) and how many the lean path took."""
    site: Any = vibed.port.factory.wrappedFactory
    routes = site.lean_routes
    taken = [0]
    original = routes.start

    def counting(request: Any, route: Any) -> None:
        assert isinstance(request, LeanRequest)
        taken[0] += 1
        original(request, route)

    routes.start = counting
    site.lean_routes = routes if lean else None
    collection = f"lean{uuid.uuid4().hex[:10]}".encode()
    state: State = {"etag": b""}
    client = await raw(vibed)
    assert client.transport is not None
    out: list[bytes] = []
    try:
        for step, _ in CONVERSATION:
            seen = len(client.received)
            request = step(collection, person.token.encode(), state)
            client.transport.write(request)
            if request.startswith(b"HEAD "):  # a head with a length and no body
                await until(lambda seen=seen: b"\r\n\r\n" in client.received[seen:])
                head = client.received[seen:]
            else:
                await until(lambda seen=seen: len(answers_or_none(client.received[seen:])) == 1)
                (_, head, _), *_ = answers(client.received[seen:])
            answer = client.received[seen:]
            etag = re.search(rb"\r\nETag: ([^\r]*)", head)
            if etag:
                state["etag"] = etag.group(1)
            out.append(normalized(answer, collection))
        await client.lost  # "Connection: close" came last
    finally:
        site.lean_routes = routes
        routes.start = original
    return out, taken[0]


@pytest_twisted.ensureDeferred
async def test_the_lean_path_answers_byte_for_byte_as_twisted_web_does(
    make_vibed: VibedFactory,
) -> None:
    vibed = await make_vibed()
    person = await new_person(vibed)
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event) or ""
        if '"/data/' not in text and " /data/" in text and "HTTP/1." in text:
            lines.append(_STAMP.sub("[-]", text))

    globalLogPublisher.addObserver(observe)
    try:
        off, off_taken = await converse(vibed, person, lean=False)
        off_lines, lines[:] = lines[:], []
        on, on_taken = await converse(vibed, person, lean=True)
        on_lines = lines[:]
    finally:
        globalLogPublisher.removeObserver(observe)
    assert off_taken == 0
    assert on_taken == sum(1 for _, lean in CONVERSATION if lean)
    for number, (a, b) in enumerate(zip(off, on, strict=True)):
        assert a == b, (number, a, b)
    statuses = [int(a.split(b" ", 2)[1]) for a in on]
    assert statuses[:5] == [201, 200, 200, 404, 401] and statuses[-3:] == [200, 404, 404]
    assert 409 in statuses and 415 in statuses
    assert len(on_lines) == len(CONVERSATION)
    assert [re.sub("lean[0-9a-f]{10}", "C", x) for x in on_lines] == [
        re.sub("lean[0-9a-f]{10}", "C", x) for x in off_lines
    ]


# -- the channel's part, on a StringTransport ------------------------------------------------


class Held:
    """Lean routes that hold each request until the test answers it."""

    def __init__(self) -> None:
        self.held: list[LeanRequest] = []

    def match(self, method: bytes, path: bytes) -> Any:
        return "route" if path.startswith(b"/data/") else None

    def start(self, request: LeanRequest, route: Any) -> None:
        self.held.append(request)


def channel_with(routes: Held) -> tuple[Any, StringTransport]:
    site = VibeSite(Resource(), access_log="off")
    site.lean_routes = routes
    return string_channel(site, Clock())


def answer(request: LeanRequest, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(data))
    request.write(data)
    request.finish()


GET = b"GET /data/c/%s HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_request_pipelined_behind_a_lean_one_waits_for_its_answer() -> None:
    routes = Held()
    channel, transport = channel_with(routes)
    channel.dataReceived(GET % b"one")
    channel.dataReceived(GET % b"two")  # arrives while the first is being answered
    assert [r.path for r in routes.held] == [b"/data/c/one"]
    assert transport.value() == b""
    answer(routes.held[0], {"n": 1})
    assert [r.path for r in routes.held] == [b"/data/c/one", b"/data/c/two"]
    answer(routes.held[1], {"n": 2})
    got = answers(transport.value())
    assert [json.loads(body) for _, _, body in got] == [{"n": 1}, {"n": 2}]
    assert not transport.disconnecting  # kept alive


def test_a_client_that_goes_away_is_told_and_gets_nothing() -> None:
    routes = Held()
    channel, transport = channel_with(routes)
    channel.dataReceived(GET % b"one")
    request = routes.held[0]
    told: list[Any] = []
    request.notifyFinish().addErrback(told.append)
    channel.connectionLost(Failure(ConnectionLost()))
    assert len(told) == 1 and told[0].check(ConnectionLost)
    request.write(b"late")  # what a handler finishing late would do: nothing is written
    assert transport.value() == b""


def test_an_answer_without_a_length_is_framed_chunked_as_twisted_web_frames_it() -> None:
    routes = Held()
    channel, transport = channel_with(routes)
    channel.dataReceived(GET % b"one")
    request = routes.held[0]
    request.setHeader(b"Content-Type", b"text/plain")
    request.write(b"hello")
    request.finish()
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert rest == b"5\r\nhello\r\n0\r\n\r\n"
    channel.dataReceived(GET % b"two")  # and the connection goes on
    assert [r.path for r in routes.held] == [b"/data/c/one", b"/data/c/two"]


def test_a_route_that_raises_at_once_is_a_logged_500_and_the_connection_goes_on() -> None:
    class Raising(Held):
        def start(self, request: LeanRequest, route: Any) -> None:
            super().start(request, route)
            if len(self.held) == 1:
                raise ZeroDivisionError("bug")

    routes = Raising()
    channel, transport = channel_with(routes)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        channel.dataReceived(GET % b"one")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    ((status, head, body),) = answers(transport.value())
    assert status == 500 and b"application/problem+json" in head
    assert b"ZeroDivisionError" not in body and json.loads(body)["status"] == 500
    assert any(e.get("log_failure") is not None for e in logged)
    channel.dataReceived(GET % b"two")
    answer(routes.held[1], {"n": 2})
    assert [s for s, _, _ in answers(transport.value())] == [500, 200]


def test_set_header_stores_what_twisted_would() -> None:
    """VibeRequest.setHeader (LeanRequest's too) skips twisted's setRawHeaders for a name
    seen before and a value without a line break: what it stores must be what that stores,
    for those and for everything else (new names, str, line breaks, the Server name)."""
    from twisted.web.http_headers import Headers

    from vibed.web import VibeRequest

    cases: list[tuple[bytes | str, bytes | str]] = [
        (b"ETag", b'"1-abc"'),
        (b"etag", b'"1-abc"'),
        (b"Location", b"/data/notes/x"),
        ("Location", "/data/notes/y"),
        (b"Location", "/data/notes/\u00e9"),
        (b"X-Never-Seen-" + uuid.uuid4().hex.encode(), b"v"),
        (b"Location", b"/a\r\nSet-Cookie: x=1"),
        (b"Location", b"/a\nb\rc"),
        (b"Location", b"/a\rb"),
        (b"Location", b"/a\nb"),
        (b"Location", b""),
        (b"Server", b"TwistedWeb/1.0"),
        (b"server", b"x"),
        ("Server", "x"),
    ]
    for name, value in cases:
        expected = Headers()
        expected.setRawHeaders(name, [value])
        if str(name).lower().strip("b'") == "server":
            expected.setRawHeaders(name, [b"vibed"])
        request: Any = VibeRequest.__new__(VibeRequest)
        request.responseHeaders = Headers()
        VibeRequest.setHeader(request, name, value)
        assert request.responseHeaders._rawHeaders == expected._rawHeaders, (name, value)
