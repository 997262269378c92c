"""``--access-log FILE``: a line per request appended to a file through a buffer flushed every
second; never a query string (tokens may ride in one); ``off`` writes nothing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import pytest_twisted
from harness import VibedFactory
from twisted.internet import reactor
from twisted.internet.task import deferLater

from vibed.web import ACCESS_LOG_CHUNK, AccessLines, access_line


@pytest_twisted.ensureDeferred
async def test_access_log_file_gets_a_line_per_request_without_queries(
    make_vibed: VibedFactory, tmp_path: Path
) -> None:
    """Three requests (one with a token in its query string) give three lines in the file
    within about a second, in the combined format, with the path but never the query."""
    log = tmp_path / "access.log"
    vibed = await make_vibed(access_log=str(log))
    for path in ("/healthz", "/readyz", "/healthz?access_token=secret-in-query"):
        assert (await vibed.request("GET", path)).code == 200
    for _ in range(40):
        if log.exists() and log.read_text().count("\n") >= 3:
            break
        await deferLater(reactor, 0.1, lambda: None)
    lines = log.read_text().splitlines()
    assert len(lines) == 3, lines
    assert all('"GET /' in line and " 200 " in line for line in lines)
    assert "secret-in-query" not in log.read_text()


@pytest_twisted.ensureDeferred
async def test_access_log_in_the_daemon_log_or_off(make_vibed: VibedFactory) -> None:
    """By default each request is a line in the daemon's log; with ``off`` there is none."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list[str] = []

    def observe(event: dict[str, object]) -> None:
        seen.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        default = await make_vibed()
        assert (await default.request("GET", "/healthz?default-marker")).code == 200
        quiet = await make_vibed(access_log="off")
        assert (await quiet.request("GET", "/readyz?off-marker")).code == 200
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any('"GET /healthz HTTP/1.1" 200' in line for line in seen)
    assert not any('"GET /readyz' in line for line in seen)
    assert not any("marker" in line for line in seen)


def test_gathered_lines_are_written_whole_and_at_most_a_pipe_buffer_at_a_time() -> None:
    """Lines of every length reach the descriptor in order, each write holding whole lines
    and at most 4096 bytes unless a single line is longer, so workers sharing one pipe or
    one file never interleave inside a line. A datagram socket keeps each write apart."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    lines = [(f"{n} " + "x" * (n * 37 % 700)).encode() + b"\n" for n in range(300)]
    lines.insert(150, b"y" * 6000 + b"\n")  # longer than a chunk: written alone
    sink = AccessLines(writer.fileno(), close=False)
    for line in lines:
        sink.add(line)
    sink.flush()
    writer.close()
    reader.setblocking(False)
    writes = []
    while True:
        try:
            writes.append(reader.recv(1 << 16))
        except BlockingIOError:
            break
    assert b"".join(writes) == b"".join(lines)
    assert len(writes) > 10
    for data in writes:
        assert data.endswith(b"\n")
        assert len(data) <= ACCESS_LOG_CHUNK or data.count(b"\n") == 1


def test_a_failing_access_log_drops_lines_and_says_so_once() -> None:
    """Writing to a descriptor that fails (here: closed) never raises into the request that
    logged; the daemon log says so once per run of failures."""
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, object]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        r, w = os.pipe()
        os.close(r)  # EPIPE on write (Python ignores SIGPIPE)
        sink = AccessLines(w, close=True)
        for _ in range(3):
            sink.add(b"a line\n")
            sink.flush()
        sink.close()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    failures = [e for e in seen if "access log: writing failed" in str(e.get("log_format"))]
    assert len(failures) == 1


@pytest.mark.parametrize(
    ("agent", "referer"),
    [
        (b"curl/8.0", None),
        (b'quote " and back\\slash', b"https://app.example/a b"),
        (b"tab\there and newline\nforged line", b"\xff\xfe bytes"),
        (b"caf\xc3\xa9", b"-"),
    ],
)
def test_access_line_escapes_as_twisted_does(agent: bytes, referer: bytes | None) -> None:
    """The line is twisted.web's combined format (escaping quotes, backslashes, control and
    non-ASCII bytes), only without the query string: a forged header cannot forge a line."""
    from twisted.internet.address import IPv4Address
    from twisted.web.http import combinedLogFormatter
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b"data", b"notes"])
    request.method = b"GET"
    request.uri = b"/data/notes"
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 17  # type: ignore[attr-defined]
    request.client = IPv4Address("TCP", "10.1.2.3", 5555)
    request.requestHeaders.setRawHeaders(b"user-agent", [agent])
    if referer is not None:
        request.requestHeaders.setRawHeaders(b"referer", [referer])
    stamp = "[30/Nov/2026:05:45:20 +0000]"
    line = access_line(stamp, request)
    assert line == combinedLogFormatter(stamp, request)
    assert "\n" not in line
    request.uri = b"/data/notes?access_token=secret"
    assert access_line(stamp, request) == line


def test_a_huge_head_gives_an_access_line_that_fits_one_write() -> None:
    """A client's 16 KiB path, Referer and User-Agent (escaped: up to four times longer)
    give a line that, with the daemon log's prefix, stays within one ACCESS_LOG_CHUNK
    write: another worker's write can never split it. An empty header logs "-"."""
    from twisted.internet.address import IPv4Address
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b"data"])
    request.method = b"GET"
    request.uri = b"/data/" + b"a" * 16000 + b"?q=1"
    request.clientproto = b"HTTP/1.1"
    request.code = 404
    request.sentLength = 0  # type: ignore[attr-defined]
    request.client = IPv4Address("TCP", "10.1.2.3", 5555)
    request.requestHeaders.setRawHeaders(b"referer", [b"\xff" * 16000])
    request.requestHeaders.setRawHeaders(b"user-agent", [b"b" * 16000])
    line = access_line("[30/Nov/2026:05:45:20 +0000]", request)
    prefix = "2026-11-30T05:45:20+0000 [vibed.access#info] "
    assert len((prefix + line + "\n").encode()) <= ACCESS_LOG_CHUNK
    assert '"GET /data/aaa' in line and 'aaa... HTTP/1.1" 404 ' in line and line.endswith('bbb..."')
    request.uri = b"/data/notes"
    request.requestHeaders.setRawHeaders(b"referer", [b""])
    request.requestHeaders.setRawHeaders(b"user-agent", [b""])
    assert access_line("[t]", request).endswith(' "-" "-"')


def test_a_line_cut_by_a_failed_write_is_not_glued_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that fails after part of the lines went out (a full disk) leaves a cut line;
    the next successful write starts on a new line."""
    written: list[bytes] = []
    calls = {"n": 0}

    def fake_write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            written.append(data[:5])
            return 5
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        written.append(bytes(data))
        return len(data)

    sink = AccessLines(99, close=False)
    monkeypatch.setattr(os, "write", fake_write)
    sink.add(b"first line\n")
    sink.flush()
    sink.add(b"second line\n")
    sink.flush()
    assert b"".join(written) == b"first\nsecond line\n"
