"""VibeChannel's one-pass parse of a request that arrives whole (``_whole_request``) against
twisted.web's own line-by-line parser, on the same bytes.

Each request below is sent to one connection in a single ``dataReceived`` (the one-pass parse
when it takes it) and to another one byte at a time (twisted.web's parser always: the head is
never whole in one call). Both must produce the same request (method, URI, version, headers,
body) and the same bytes on the wire, down to the 400s and 413s of malformed or hostile input
and whether the connection is closed. The one-pass parse must also actually take the common
requests, or this test would compare twisted.web with itself.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from harness import string_channel
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from vibed.web import BodyPolicy, VibeChannel, VibeSite


class Echo(Resource):
    """Answers with what the request was, as the channel built it."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        headers = sorted(
            (name.decode("latin-1"), [v.decode("latin-1") for v in values])
            for name, values in request.requestHeaders.getAllRawHeaders()
        )
        return json.dumps(
            {
                "method": request.method.decode("latin-1"),
                "uri": request.uri.decode("latin-1"),
                "version": request.clientproto.decode("latin-1"),
                "headers": headers,
                "body": request.content.read().decode("latin-1"),
            }
        ).encode()


def connect(**policies: int) -> tuple[Any, StringTransport]:
    """A channel on a StringTransport; ``policies`` maps path prefixes to body limits."""
    clock = Clock()
    site = VibeSite(
        Echo(),
        access_log="off",
        body_policies={
            prefix.encode(): BodyPolicy(limit=lambda request, n=limit: n)
            for prefix, limit in policies.items()
        },
    )
    return string_channel(site, clock)


_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


def wire(transport: StringTransport) -> bytes:
    return _DATE.sub(b"\r\nDate: -\r\n", transport.value())


def count_taken(channel: Any) -> list[int]:
    """A one-item list counting the requests the one-pass parse takes on ``channel``."""
    taken = [0]
    original = channel._whole_request

    def counting(chunk: bytes) -> bool:
        result = bool(original(chunk))
        taken[0] += result
        return result

    channel._whole_request = counting
    return taken


def whole(data: bytes) -> tuple[bytes, bool, int]:
    """The answer to ``data`` sent in one piece, whether the connection is closing, and how
    many requests the one-pass parse took."""
    channel, transport = connect()
    taken = count_taken(channel)
    channel.dataReceived(data)
    return wire(transport), transport.disconnecting, taken[0]


def trickled(data: bytes) -> tuple[bytes, bool]:
    """The answer to ``data`` sent one byte at a time: twisted.web's parser, line by line."""
    channel, transport = connect()
    for i in range(len(data)):
        if transport.disconnecting:
            break
        channel.dataReceived(data[i : i + 1])
    return wire(transport), transport.disconnecting


TAKEN = {
    "get": b"GET /data/notes/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n",
    "odd case, repeats, spaces, empty": (
        b"GET /a?b=c HTTP/1.1\r\nhOsT: x\r\nX-A: one\r\nx-a: two\r\nX-Sp: \t a b \t\r\n"
        b"X-Empty:\r\nAccept: */*\r\n\r\n"
    ),
    "post": (
        b"POST /data/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 13\r\n\r\n{"title": 1}\n'
    ),
    "content-length padded": b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length:  2 \r\n\r\nok",
    "http/1.0": b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n",
    "connection close": b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "latin-1 value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-L: caf\xe9\r\n\r\n",
    "token method, escapes": b"M-SEARCH /a%20b?x=1&y=%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n",
    "lowercase method": b"get /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "target bytes at the edges": b"GET /!\x7f\xb0 HTTP/1.1\r\nHost: x\r\n\r\n",
}

LEFT_TO_TWISTED = {
    "two content-lengths": (
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "signed content-length": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nab",
    "chunked": (
        b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
    ),
    "chunked and a length": (
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n2\r\nab\r\n0\r\n\r\n"
    ),
    "folded header": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n",
    "space before the colon": b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n",
    "no colon": b"GET /a HTTP/1.1\r\nHost x\r\n\r\n",
    "bare LF in a value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n",
    "bare CR in a value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "NUL in a value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "CR before a line end": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\r\r\n\r\n",
    "LF after a line end": b"GET /a HTTP/1.1\r\nHost: x\r\n\nX-A: a\r\n\r\n",
    "bad version": b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n",
    "double space": b"GET  /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "target byte past 0xB0": b"GET /a\xb1 HTTP/1.1\r\nHost: x\r\n\r\n",
    "control byte in the target": b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
    "tab in the request line": b"GET\t/a HTTP/1.1\r\nHost: x\r\n\r\n",
    "method not a token": b"GE(T /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "no target": b"GET HTTP/1.1\r\nHost: x\r\n\r\n",
    "trailing space": b"GET /a HTTP/1.1 \r\nHost: x\r\n\r\n",
    "lowercase version": b"GET /a http/1.1\r\nHost: x\r\n\r\n",
    "leading empty line": b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "too many headers": b"GET /a HTTP/1.1\r\n" + b"X-A: 1\r\n" * 501 + b"\r\n",
    "header line too long": b"GET /a HTTP/1.1\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n",
    "head too large": b"GET /a HTTP/1.1\r\n" + (b"X-A: " + b"a" * 4000 + b"\r\n") * 5 + b"\r\n",
    "expect continue": (
        b"POST /p HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab"
    ),
    "body too large": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\nab",
    "body longer than its length": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nab",
    "pipelined": b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
    "smuggled after a GET": (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
}


@pytest.mark.parametrize("name", sorted(TAKEN))
def test_the_one_pass_parse_builds_the_request_twisted_builds(name: str) -> None:
    """A common request, whole in one piece, is taken by the one-pass parse and answered
    byte for byte as twisted.web's parser answers it."""
    data = TAKEN[name]
    answer, closing, taken = whole(data)
    assert taken == 1, "the one-pass parse did not take a common request"
    # A target that is not UTF-8 is vibed's 400, given to both parsers' requests alike.
    status = b"400" if name == "target bytes at the edges" else b"200"
    assert re.match(rb"HTTP/1\.[01] " + status + b" ", answer), answer[:300]
    assert (answer, closing) == trickled(data)


@pytest.mark.parametrize("name", sorted(LEFT_TO_TWISTED))
def test_anything_unusual_gets_twisteds_own_answer(name: str) -> None:
    """Malformed, hostile or merely unusual input is left to twisted.web's parser: the same
    answer (400, 413, the request as twisted reads it) and the same closing."""
    data = LEFT_TO_TWISTED[name]
    answer, closing, taken = whole(data)
    assert taken == 0
    assert (answer, closing) == trickled(data)


def test_a_body_still_on_its_way_is_read_as_before() -> None:
    """A head whose body has not all arrived is left to twisted.web; the rest then arrives
    and the request is answered with the whole body."""
    channel, transport = connect()
    channel.dataReceived(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
    assert transport.value() == b""
    channel.dataReceived(b"cde")
    assert json.loads(transport.value().split(b"\r\n\r\n", 1)[1])["body"] == "abcde"


def test_keep_alive_requests_one_after_another_are_all_taken() -> None:
    """On a keep-alive connection every whole request is taken in turn, and each answer is
    its own."""
    channel, transport = connect()
    taken = count_taken(channel)
    for i in range(5):
        transport.clear()
        channel.dataReceived(b"GET /n/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        assert json.loads(transport.value().split(b"\r\n\r\n", 1)[1])["uri"] == f"/n/{i}"
    assert taken == [5]
    assert isinstance(channel, VibeChannel) and not transport.disconnecting


def test_a_refused_body_leaves_the_channel_as_twisted_leaves_it() -> None:
    """A body refused at its length (413, the connection closing) stays unread, as under
    twisted.web's parser: bytes that keep arriving (TLS delivers them until the client's own
    close) are never read as more headers of the refused request, which is never rendered."""
    refused = b"PUT /small/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde"
    later = [b"X-Smuggled: 1\r\n", b"Content-Length: 0\r\n", b"\r\n", b"x", b"y"]
    answers = []
    for first in ([refused], [refused[i : i + 1] for i in range(len(refused))]):
        channel, transport = connect(**{"/small/": 3})
        for chunk in first + later:
            channel.dataReceived(chunk)
        answers.append((wire(transport), transport.disconnecting, channel._vibe_phase))
    assert answers[0] == answers[1]
    answer, closing, _ = answers[0]
    assert answer.startswith(b"HTTP/1.1 413 ") and closing
    assert b" 200 " not in answer and b"Smuggled" not in answer


def test_nothing_is_taken_on_a_connection_already_closing() -> None:
    """Once the channel is closing (after a 408, say), a whole request arriving is left to
    twisted.web's parser, which reads no further than its first line."""
    data = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"
    channel, transport = connect()
    channel.transport.loseConnection()
    taken = channel._whole_request
    channel._whole_request = lambda chunk: pytest.fail("the one-pass parse ran")  # noqa: ARG005
    channel.dataReceived(data)
    channel._whole_request = taken
    assert transport.value() == b"" and channel._vibe_phase == "head"


def test_the_request_line_check_accepts_only_what_twisted_accepts() -> None:
    """On 20,000 random request lines made of the bytes that matter (spaces, tabs, token and
    non-token bytes, the 0x20/0x21 and 0xB0/0xB1 edges, CR, LF, NUL), every line the one-pass
    check accepts twisted.web's ``_parseRequestLine`` accepts too, split the same way; and
    twisted accepts none the check refuses (so nothing valid is slowed either)."""
    import random

    from twisted.web.http import _parseRequestLine

    from vibed.web import _REQUEST_LINE

    rng = random.Random(11)
    methods = [b"GET", b"M-SEARCH", b"get", b"GE(T", b"", b"G\tET", b"POST", b"~!#"]
    target_bytes = [b"/", b"a", b"%", b"?", b"\x20", b"\x21", b"\xb0", b"\xb1", b"\x7f"]
    target_bytes += [b"\x00", b"\r", b"\n", b"\t", b"*"]
    versions = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""]
    separators = [b" ", b" ", b" ", b"  ", b"\t", b""]
    accepted = 0
    for _ in range(20_000):
        target = b"".join(rng.choice(target_bytes) for _ in range(rng.randint(0, 4)))
        line = rng.choice(methods) + rng.choice(separators) + target
        line += rng.choice(separators) + rng.choice(versions)
        match = _REQUEST_LINE.match(line)
        try:
            expected = _parseRequestLine(line)
        except ValueError:
            expected = None
        assert (match.groups() if match else None) == expected, line
        accepted += match is not None
    assert accepted > 200, accepted  # the random lines did reach the accepting side
