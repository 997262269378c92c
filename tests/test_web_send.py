"""Answers of the document routes leave in one piece, straight on the socket when nothing is
queued (:func:`vibed.web.send_now`): over one raw keep-alive connection, pipelined
requests get whole answers in their order, a large document arrives intact (the socket
takes part of it, twisted queues the rest), and a client that never reads does not stop
the daemon from serving others."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest_twisted
from harness import VibedFactory, new_person
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater


class Raw(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.lost.called:
            self.lost.callback(None)


async def raw(vibed: Any) -> Raw:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    address = vibed.port.getHost()
    client = Raw()
    await connectProtocol(TCP4ClientEndpoint(reactor, address.host, address.port), client)
    return client


def answers(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """Split HTTP/1.1 answers (Content-Length or chunked): (status, head, body) each."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        if b"content-length" in fields:
            length = int(fields[b"content-length"])
            if len(rest) < length:
                raise ValueError("incomplete")
            body, data = rest[:length], rest[length:]
        else:
            assert fields[b"transfer-encoding"] == b"chunked"
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if len(rest) < size + 2:
                    raise ValueError("incomplete")
                body, rest = body + rest[:size], rest[size + 2 :]
                if size == 0:
                    break
            data = rest
        out.append((int(lines[0].split(b" ")[1]), head, body))
    return out


async def until(predicate: Any, seconds: float = 20) -> None:
    waited = 0.0
    while not predicate():
        assert waited < seconds, "timed out"
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


@pytest_twisted.ensureDeferred
async def test_pipelined_document_requests_get_whole_answers_in_order(
    make_vibed: VibedFactory,
) -> None:
    """Five requests written at once on one connection (create, get, a missing id, get,
    a bad collection) get five complete answers, in that order, with their headers."""
    vibed = await make_vibed()
    person = await new_person(vibed)
    made = await person.call("PUT", "/data/notes/n1", {"t": "one"})
    assert made.code == 201
    auth = b"Authorization: Bearer " + person.token.encode() + b"\r\n"
    body = b'{"t": "two"}'
    requests = (
        b"POST /data/notes HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
        b"GET /data/notes/n1 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
        b"GET /data/notes/missing HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
        b"GET /data/notes/n1 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
        b"GET /data/Bad/n1 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
    )
    client = await raw(vibed)
    assert client.transport is not None
    client.transport.write(b"".join(requests))
    await until(lambda: len(answers_or_none(client.received)) == 5)
    got = answers(client.received)
    assert [status for status, _, _ in got] == [201, 200, 404, 200, 400]
    assert json.loads(got[1][2])["t"] == "one" and json.loads(got[3][2])["t"] == "one"
    for _, head, _ in got:
        assert b"X-Content-Type-Options: nosniff" in head
        assert b"Access-Control-Allow-Origin: *" in head
        # Problems too say their length up front (no chunked framing for a known body).
        assert b"\r\nContent-Length: " in head and b"chunked" not in head.lower(), head
    client.transport.loseConnection()


def answers_or_none(data: bytes) -> list[Any]:
    try:
        return answers(data)
    except (StopIteration, ValueError, IndexError):
        return []


@pytest_twisted.ensureDeferred
async def test_a_large_document_arrives_whole_while_a_stalled_reader_waits(
    make_vibed: VibedFactory,
) -> None:
    """A ~900 KB document is read whole over a connection whose reader is slow to start;
    meanwhile another client, that asked for it and never reads, does not block the daemon:
    a third request is answered at once."""
    vibed = await make_vibed()
    person = await new_person(vibed)
    big = {"t": "x" * 900_000}
    assert (await person.call("PUT", "/data/notes/big", big)).code == 201
    address = vibed.port.getHost()
    request = (
        b"GET /data/notes/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + person.token.encode()
        + b"\r\n\r\n"
    )
    stalled = socket.create_connection((address.host, address.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(request * 4)  # and never read
    reader = await raw(vibed)
    assert reader.transport is not None
    reader.transport.write(request)
    await until(lambda: len(answers_or_none(reader.received)) == 1)
    ((status, _, body),) = answers(reader.received)
    assert status == 200 and json.loads(body)["t"] == big["t"]
    assert (await person.call("GET", "/data/notes/big")).code == 200
    stalled.close()
    reader.transport.loseConnection()
