"""The embedded PouchDB Server: start, readiness, persistence, supervision, stop, missing deps."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.web.client import Agent

from vibed.embedded import (
    EmbeddedCouch,
    EmbeddedCouchMissing,
    EmbeddedCouchNotReady,
    find_pouchdb_server,
)

WAIT = 20.0  # upper bound for any single wait; the happy path takes well under a second


def http() -> HTTPClient:
    # A non-persistent pool: no idle connection outlives a test or a killed server.
    return HTTPClient(Agent(reactor))


async def within(d: Deferred[Any], seconds: float = WAIT) -> Any:
    return await d.addTimeout(seconds, reactor)


async def get_json(url: str) -> Any:
    response = await within(http().get(url))
    return json.loads(await within(response.content()))


async def put_json(url: str, body: dict[str, Any] | None = None) -> int:
    data = json.dumps(body or {}).encode()
    response = await within(
        http().put(url, data=data, headers={b"Content-Type": [b"application/json"]})
    )
    await within(response.content())
    return int(response.code)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


async def stop(couch: EmbeddedCouch) -> None:
    if couch.running:
        await within(couch.stopService())


@pytest_twisted.ensureDeferred
async def test_starts_answers_and_keeps_data_across_stop_start(tmp_path: Path) -> None:
    """whenReady fires with a 127.0.0.1 URL answering GET / with a version; a database and doc
    written before stopService are still there after startService on the same data dir, and
    the URL did not change."""
    couch = EmbeddedCouch(tmp_path / "couch")
    try:
        couch.startService()
        url = await within(couch.whenReady())
        assert url == couch.url
        assert url.startswith("http://127.0.0.1:")
        assert (await get_json(url))["version"]
        assert (tmp_path / "couch").stat().st_mode & 0o777 == 0o700
        assert await put_json(url + "notes") == 201
        assert await put_json(url + "notes/n1", {"text": "kept"}) == 201

        await within(couch.stopService())
        couch.startService()
        assert await within(couch.whenReady()) == url
        assert (await get_json(url + "notes/n1"))["text"] == "kept"
        assert (tmp_path / "couch" / "pouchdb-server.log").exists()
    finally:
        await stop(couch)


@pytest_twisted.ensureDeferred
async def test_sigkilled_child_is_restarted_on_the_same_url(tmp_path: Path) -> None:
    """After SIGKILL of the child, one warning naming the signal is logged and a new child is
    started on the same URL and data dir; it answers and the data is still there."""
    couch = EmbeddedCouch(tmp_path / "couch")
    warnings: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "vibed.embedded" and event["log_level"].name == "warn":
            warnings.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        couch.startService()
        url = await within(couch.whenReady())
        assert await put_json(url + "notes") == 201
        assert await put_json(url + "notes/n1", {"text": "survives"}) == 201
        first_pid = couch.pid
        assert first_pid is not None

        restarted = couch.whenRestarted()
        os.kill(first_pid, signal.SIGKILL)
        assert await within(restarted) == 1
        assert couch.restarts == 1
        assert couch.url == url
        assert couch.pid not in (None, first_pid)
        assert not alive(first_pid)
        assert await within(couch.whenReady()) == url
        assert (await get_json(url + "notes/n1"))["text"] == "survives"
        assert len(warnings) == 1
        assert f"signal {int(signal.SIGKILL)}" in warnings[0]
    finally:
        globalLogPublisher.removeObserver(observe)
        await stop(couch)


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    """stopService fires only once the child has exited: its pid is gone and no process with
    the data dir on its command line remains; the child is not restarted afterwards."""
    data_dir = tmp_path / "couch"
    couch = EmbeddedCouch(data_dir)
    try:
        couch.startService()
        await within(couch.whenReady())
        pid = couch.pid
        assert pid is not None
        assert pid in processes_mentioning(str(data_dir))
    finally:
        await stop(couch)
    assert couch.pid is None
    assert not alive(pid)
    assert processes_mentioning(str(data_dir)) == []
    assert couch.restarts == 0


@pytest_twisted.ensureDeferred
async def test_start_while_previous_child_exits(tmp_path: Path) -> None:
    """startService called before the previous stopService has fired waits for the old child
    to exit, then starts a new one on the same URL; that exit is not counted as a crash."""
    couch = EmbeddedCouch(tmp_path / "couch")
    try:
        couch.startService()
        url = await within(couch.whenReady())
        old_pid = couch.pid
        assert old_pid is not None
        stopped = couch.stopService()
        couch.startService()
        await within(stopped)
        assert await within(couch.whenReady()) == url
        assert couch.pid not in (None, old_pid)
        assert couch.restarts == 0
        assert (await get_json(url))["version"]
    finally:
        await stop(couch)


@pytest_twisted.ensureDeferred
async def test_child_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    """A child that ignores SIGTERM is SIGKILLed after stop_grace, and stopService still fires."""
    script = tmp_path / "stubborn"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(60)\n"
    )
    script.chmod(0o755)
    couch = EmbeddedCouch(tmp_path / "couch", executable=str(script), ready_timeout=0.5)
    couch.stop_grace = 0.5
    couch.startService()
    pid = couch.pid
    assert pid is not None
    with pytest.raises(EmbeddedCouchNotReady, match="did not answer"):
        await within(couch.whenReady())
    await within(couch.stopService(), 5)
    assert not alive(pid)


@pytest_twisted.ensureDeferred
async def test_when_ready_fails_if_stopped_first(tmp_path: Path) -> None:
    """A pending whenReady errbacks with EmbeddedCouchNotReady when the service stops first."""
    script = tmp_path / "silent"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    couch = EmbeddedCouch(tmp_path / "couch", executable=str(script))
    couch.startService()
    ready = couch.whenReady()
    await within(couch.stopService(), 10)
    with pytest.raises(EmbeddedCouchNotReady, match="stopped"):
        await ready


def assert_one_line_with_hint(error: EmbeddedCouchMissing) -> None:
    message = str(error)
    assert "\n" not in message
    assert "make install" in message
    assert "apt-get install nodejs npm" in message
    assert "--couchdb" in message


def test_missing_explicit_executable(tmp_path: Path) -> None:
    """An explicit --pouchdb-server path that does not exist raises EmbeddedCouchMissing with
    one line naming the path, how to install and --couchdb; startService raises it too."""
    missing = str(tmp_path / "nope" / "pouchdb-server")
    with pytest.raises(EmbeddedCouchMissing) as raised:
        find_pouchdb_server(missing)
    assert_one_line_with_hint(raised.value)
    assert missing in str(raised.value)

    couch = EmbeddedCouch(tmp_path / "couch", executable=missing)
    with pytest.raises(EmbeddedCouchMissing):
        couch.check()
    with pytest.raises(EmbeddedCouchMissing):
        couch.startService()
    assert not couch.running


def test_missing_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no `node` on PATH, finding pouchdb-server (which is a node script) fails in one
    line saying Node.js is missing, how to install and --couchdb."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(EmbeddedCouchMissing) as raised:
        find_pouchdb_server()
    assert_one_line_with_hint(raised.value)
    assert "node" in str(raised.value)
    with pytest.raises(EmbeddedCouchMissing):
        EmbeddedCouch(tmp_path / "couch").check()


def test_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a checkout with node_modules and with nothing on PATH, the error says where it
    looked, in one line."""
    import vibed.embedded as embedded

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(embedded, "_CHECKOUT", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedCouchMissing, match="not found") as raised:
        find_pouchdb_server()
    assert_one_line_with_hint(raised.value)


def test_finds_checkout_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From any working directory, the checkout's node_modules/.bin/pouchdb-server is found."""
    monkeypatch.chdir(tmp_path)
    found = Path(find_pouchdb_server())
    assert found.name == "pouchdb-server"
    assert found.is_file()
