"""Real-browser test support: Debian's chromium driven by Playwright (``executable_path``),
a real ``twistd vibed`` in a child process, and a static server for an app on a second
origin. Tests skip, saying why, when chromium or Playwright is missing (``make test`` installs
both; see the Makefile)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("VIBE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "build" / "browser-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
PASSWORD = "correct horse battery"


def need_browser() -> Any:
    """The sync Playwright module, or skip with the reason."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (make test does)")
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("Python Playwright is missing: pip install -e '.[test]' (make install does)")
    return sync_api


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {within} s; see {log}")


class Process:
    def __init__(self, args: list[str], log: Path, cwd: Path | None = None) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class VibedProcess:
    """``twistd -n vibed`` on a free port against the session's CouchDB-protocol server."""

    def __init__(self, tmp: Path, couch_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        twistd = str(Path(sys.executable).parent / "twistd")
        self.process = Process(
            [
                twistd,
                "-n",
                "--pidfile=",
                "vibed",
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1",
                "--couchdb",
                couch_url,
                "--data-dir",
                str(tmp / "vibe-data"),
                "--public-url",
                self.url,
                # The session's CouchDB counts every test's signups from 127.0.0.1.
                "--signup-limit",
                "1000000",
            ],
            tmp / "vibed.log",
            cwd=tmp,
        )
        _wait(self.url + "/readyz", self.process.proc, self.process.log)

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def signup(self) -> tuple[str, str]:
        """A new identity: (email, first-party access token)."""
        email = f"browser-{uuid.uuid4().hex[:10]}@example.org"
        code, body = self.call("POST", "/auth/signup", {"email": email, "password": PASSWORD})
        assert code == 201, body
        return email, body["accessToken"]

    def stop(self) -> None:
        self.process.stop()


class StaticSite:
    """A directory served on its own origin (``http://localhost:<port>``)."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.port = free_port()
        self.origin = f"http://localhost:{self.port}"
        self.process = Process(
            [
                sys.executable,
                "-m",
                "http.server",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(directory),
            ],
            log,
        )
        _wait(f"http://127.0.0.1:{self.port}/", self.process.proc, log)

    def stop(self) -> None:
        self.process.stop()


def launch(sync_api: Any) -> Iterator[Any]:
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                yield browser
            finally:
                browser.close()
    finally:
        # Playwright's sync API runs on greenlets, as pytest-twisted's reactor does. A
        # suspended Playwright greenlet collected later, inside a Twisted test, would switch
        # back into it ("illegal switch in blockon"): collect them now, outside any test.
        import gc

        gc.collect()


def shot(page: Any, name: str) -> None:
    """Keep a screenshot as an artifact (build/browser-artifacts/<name>.png)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def until(check: Any, within: float = 15.0, what: str = "condition", on_fail: Any = None) -> float:
    """Seconds until ``check()`` is truthy (polled); AssertionError after ``within`` (with
    what ``on_fail()`` returns, e.g. after taking a screenshot). 15 s by default: a bound on a
    browser's round trips (often through the realtime feed) on a box that CI keeps busy, not
    a timing being checked (a note once took more than 5 s to be listed there)."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            extra = on_fail() if on_fail is not None else ""
            raise AssertionError(f"{what}: not within {within} s {extra}")
        time.sleep(0.05)


def have(name: str) -> bool:
    return shutil.which(name) is not None
