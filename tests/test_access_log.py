"""``--access-log FILE``: a line per request appended to a file through a buffer flushed every
second; never a query string (tokens may ride in one); ``off`` writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from harness import VibedFactory
from twisted.internet import reactor
from twisted.internet.task import deferLater


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
