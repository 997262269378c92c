"""Request bodies are refused while they arrive: no route can be made to buffer a huge body."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from harness import Vibed, make_config
from twisted.internet.threads import deferToThread


@pytest_twisted.async_yield_fixture
async def vibed(tmp_path: Path, couch_url: str) -> AsyncIterator[Vibed]:
    v = await Vibed(make_config(tmp_path, couch_url)).start()
    yield v
    await v.stop()


def _raw_exchange(port: int, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send a request by hand; return whatever the server answered before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except OSError:
            pass  # the server closed on us: that is the point
        data = b""
        try:
            while True:
                part = s.recv(65536)
                if not part:
                    break
                data += part
        except OSError:
            pass
        return data


@pytest_twisted.ensureDeferred
async def test_declared_oversized_body_is_refused_before_it_is_sent(vibed: Vibed) -> None:
    """A Content-Length of 10 GiB gets 413 problem+json at once, without sending a byte."""
    port = vibed.port.getHost().port
    head = (
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10737418240\r\n\r\n"
    )
    answer = await deferToThread(_raw_exchange, port, head, [])
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"application/problem+json" in answer


@pytest_twisted.ensureDeferred
async def test_chunked_body_past_the_limit_is_cut_off(vibed: Vibed) -> None:
    """A chunked body (no length announced) is cut off with 413 once it passes the limit,
    instead of being buffered whole in memory."""
    port = vibed.port.getHost().port
    head = (
        b"POST /auth/signup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    answer = await deferToThread(_raw_exchange, port, head, [framed] * 64)  # 4 MiB
    assert answer.startswith(b"HTTP/1.1 413")
    assert (await vibed.request("GET", "/healthz")).code == 200
