"""``twistd vibed --workers 2``: two processes on one listening socket behave as one vibed.

Each test runs a real `twistd -n vibed --workers 2` against the session's CouchDB (each
engine) and reaches it through fresh connections, which the kernel hands to either worker:
auth (signup, login, refresh rotation), realtime (sockets on both workers see every write made
through either), blobs (a signed upload made on one worker, finalized and fetched through
the other), and a clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import free_port
from harness import connect_realtime, fetch

VENV_BIN = Path(sys.executable).parent


def _get(url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return 0, None  # not listening (yet, or any more)


class Workers:
    """A running `twistd -n vibed --workers N` and its address (a stand-in for the harness's
    Vibed where the realtime helpers need ``url`` and ``port``)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

        class _Port:
            def getHost(self) -> Any:  # noqa: N802
                return type("Host", (), {"host": "127.0.0.1", "port": port})()

        self.port = _Port()

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(p) for p in children.split()]

    def seen_workers(self, tries: int = 40) -> set[int]:
        """Worker numbers /healthz reports over ``tries`` new connections."""
        seen = set()
        for _ in range(tries):
            code, body = _get(self.url + "/healthz")
            if code == 200 and isinstance(body, dict) and "worker" in body:
                seen.add(body["worker"])
        return seen


@pytest.fixture
def workers(tmp_path: Path, couch_url: str) -> Iterator[Workers]:
    port = free_port()
    log = tmp_path / "twistd.log"
    cmd = [
        str(VENV_BIN / "twistd"), "-n", "--pidfile=", "vibed",
        "--port", f"tcp:{port}:interface=127.0.0.1", "--couchdb", couch_url,
        "--data-dir", str(tmp_path / "data"), "--workers", "2",
        "--public-url", f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    env = {**os.environ, "VIBE_SIGNUP_LIMIT": "100000"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    running = Workers(proc, port, log)
    try:
        deadline = time.monotonic() + 90
        while running.seen_workers(8) != {0, 1}:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "both workers never answered"
            time.sleep(0.3)
        while _get(running.url + "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.3)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _connections_per_worker(w: Workers, port: int) -> dict[int, int]:
    """Established connections to ``port`` held by each worker process."""
    inodes: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01":
            inodes[fields[9]] = 1
    held: dict[int, int] = {}
    for pid in w.worker_pids():
        count = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
        held[pid] = count
    return held


@pytest_twisted.ensureDeferred
async def test_auth_realtime_and_blobs_across_two_workers(workers: Workers) -> None:
    """Both workers answer; a signup on one logs in and refreshes on either; sockets held by
    both workers each receive every write made through either worker, once and in order; a
    blob uploaded through one worker is finalized and downloaded through the other(s)."""
    headers = {"Content-Type": "application/json", "Connection": "close"}
    email, password = "workers@example.org", "a long passphrase"
    body = json.dumps({"email": email, "password": password}).encode()
    signup = await fetch("POST", workers.url + "/auth/signup", data=body, headers=headers)
    assert signup.code == 201, signup.content
    token = signup.json()["accessToken"]
    cookie = None
    for _ in range(4):  # logins and refreshes land on either worker
        login = await fetch("POST", workers.url + "/auth/login", data=body, headers=headers)
        assert login.code == 200, login.content
        cookie = login.refresh_cookie
    for _ in range(4):
        refreshed = await fetch(
            "POST",
            workers.url + "/auth/refresh",
            headers={**headers, "Cookie": f"vibe_refresh={cookie}"},
        )
        assert refreshed.code == 200, refreshed.content
        cookie = refreshed.refresh_cookie

    sockets = []
    port = int(workers.url.rsplit(":", 1)[1])
    for _ in range(60):  # the kernel picks the worker: connect until both hold sockets
        client = await connect_realtime(workers, token)
        client.send({"type": "subscribe", "collection": "notes"})
        await client.next_of("subscribed")
        sockets.append(client)
        held = _connections_per_worker(workers, port)
        if len(sockets) >= 4 and all(count > 0 for count in held.values()):
            break
    held = _connections_per_worker(workers, port)
    assert len(held) == 2 and all(count > 0 for count in held.values()), held
    auth = {**headers, "Authorization": f"Bearer {token}"}
    written = []
    for i in range(6):
        made = await fetch(
            "PUT",
            f"{workers.url}/data/notes/n{i}",
            data=json.dumps({"i": i}).encode(),
            headers=auth,
        )
        assert made.code == 201, made.content
        written.append(f"n{i}")
    for client in sockets:
        got = await client.changes(len(written), within=20)
        assert [c["id"] for c in got] == written
    for client in sockets:
        client.sendClose()
        await client.wait_closed()

    upload = await fetch(
        "POST",
        workers.url + "/blob/upload-url",
        data=json.dumps({"mime": "text/plain", "size": 5}).encode(),
        headers=auth,
    )
    assert upload.code == 200, upload.content
    plan = upload.json()
    put_headers = {k: v for k, v in plan["headers"].items() if k.lower() != "content-length"}
    put = await fetch(plan["method"], plan["url"], data=b"hello", headers=put_headers)
    assert put.code == 200, put.content
    final = await fetch(
        "POST",
        workers.url + "/blob/finalize-upload",
        data=json.dumps({"id": plan["id"]}).encode(),
        headers=auth,
    )
    assert final.code == 201, final.content
    for _ in range(4):
        link = await fetch("GET", f"{workers.url}/blob/download-url/{plan['id']}", headers=auth)
        assert link.code == 302
        got = await fetch("GET", link.header("location") or "")
        assert got.content == b"hello"


def test_stopping_the_supervisor_stops_every_worker(workers: Workers) -> None:
    """SIGTERM to the daemon stops both workers and closes the port; nothing is left running
    and the log holds no secret."""
    pids = workers.worker_pids()
    assert len(pids) == 2
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # twistd re-raises it
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    assert _get(workers.url + "/healthz")[0] == 0
    assert "admin:admin" not in workers.log.read_text()


def test_workers_access_lines_arrive_whole_in_the_shared_output(workers: Workers) -> None:
    """Both workers write their access lines (the default ``--access-log -``) to the
    supervisor's output, gathered in whole-line writes of at most PIPE_BUF bytes: every line
    arrives whole, none is lost, and stopping flushes what was still gathered."""
    agent = "whole-line-check-" + "x" * 300  # ~400-byte lines: many writes of several lines
    sent = 0
    for n in range(300):
        request = urllib.request.Request(
            f"{workers.url}/healthz?n={n}", headers={"Connection": "close", "User-Agent": agent}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200
            sent += 1
    workers.proc.send_signal(signal.SIGTERM)
    workers.proc.wait(timeout=60)
    text = workers.log.read_text()
    ours = [line for line in text.splitlines() if "whole-line-check-" in line]
    whole = re.compile(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[vibed\.access#info\] "
        r'"127\.0\.0\.1" - - \[[^\]]+\] "GET /healthz HTTP/1\.1" 200 \d+ "-" '
        rf'"{agent}"\Z'
    )
    assert len(ours) == sent, (len(ours), sent)
    broken = [line for line in ours if not whole.match(line)]
    assert not broken, broken[:3]
