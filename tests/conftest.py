"""Test session fixtures: a real PouchDB Server (separate process) on a free port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import settings

from vibed.embedded import pouchdb_server_args

ROOT = Path(__file__).resolve().parent.parent

# CI must not turn red on the draw of a random seed: there, property tests run a fixed,
# repeatable sequence of examples. Developers' runs stay random and keep finding new cases.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pouchdb_server_bin() -> str:
    local = ROOT / "node_modules" / ".bin" / "pouchdb-server"
    if local.exists():
        return str(local)
    found = shutil.which("pouchdb-server")
    if not found:
        pytest.fail("pouchdb-server is not installed: run `make install` (npm ci)")
    return found


class PouchServer:
    """A PouchDB Server child process the tests can kill and restart."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [pouchdb_server_bin(), *pouchdb_server_args(self.port, self.data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.data_dir,  # pouchdb-server writes log.txt into its working dir
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    if json.load(r).get("version"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("pouchdb-server did not answer within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def couch_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PouchDB Server shared by the session; tests use unique database names."""
    server = PouchServer(tmp_path_factory.mktemp("pouchdb"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def own_couch(tmp_path: Path) -> Iterator[PouchServer]:
    """A PouchDB Server of this test's own, for tests that kill and restart it."""
    server = PouchServer(tmp_path / "pouchdb")
    server.start()
    yield server
    server.stop()


class MotoS3:
    """moto's S3 server mode (``python -m moto.server``) as a child process on a free port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import sys

        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "moto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.data_dir,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited; see {self.data_dir / 'moto.log'}")
            try:
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not answer within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def s3_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server shared by the session; tests use their own buckets."""
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server.url
    server.stop()


@pytest_twisted.async_yield_fixture
async def make_vibed(tmp_path: Path, couch_url: str) -> AsyncIterator[Any]:
    """Starts vibeds for this test (``make_vibed(**config_overrides)``), stops them after."""
    from harness import VibedSet

    vibeds = VibedSet(tmp_path, couch_url)
    yield vibeds.start
    await vibeds.stop()
