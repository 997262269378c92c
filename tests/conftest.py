"""Test session fixtures: the real CouchDB-protocol servers, moto's S3, and vibeds on them.

Integration tests reach CouchDB through ``couch_url`` (one server per engine for the session)
or ``own_couch`` (a server of the test's own, to stop and restart). Both are parametrized by
engine: PouchDB Server (the embedded default, always there after ``make install``) and Apache
CouchDB 3.5 (the production engine), from ``../shared/tools/couchdb/couchdb-test-server``
beside the checkout or from a ``VIBE_TEST_COUCHDB`` URL. Where neither exists (a fresh clone
on its own) the CouchDB half skips with the reason. ``VIBE_TEST_ENGINES=pouchdb`` (or
``couchdb``) runs one engine only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
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


# Argon2id at vibed's production cost (46 MiB, t=2) costs the suite CPU in every signup and
# login of an in-process vibed (~0.1-0.5 s each on 2 busy cores). Where a test is not about
# hashing, the in-process vibeds hash with these cheap parameters instead (the PHC string
# records them, so verify works across both). Production defaults stay as they are; tests
# about hashing (marked ``real_argon2``, e.g. tests/test_keys.py) and every twistd child
# process use the real cost.
TEST_ARGON2 = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}


@pytest.fixture(autouse=True)
def cheap_argon2(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Cheap Argon2id parameters for in-process vibeds, except in ``real_argon2`` tests."""
    from argon2 import PasswordHasher, Type

    from vibed import keys

    if request.node.get_closest_marker("real_argon2") is not None:
        keys.dummy_hash.cache_clear()
        yield
        return
    cheap = PasswordHasher(hash_len=32, salt_len=16, type=Type.ID, **TEST_ARGON2)
    monkeypatch.setattr(keys, "_hasher", cheap)
    # dummy_hash() caches its hash: never let a cheap one outlive the patch.
    keys.dummy_hash.cache_clear()
    yield
    keys.dummy_hash.cache_clear()


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


def couchdb_test_server() -> Path | None:
    """The shared ``couchdb-test-server`` script: ``shared/tools/couchdb/`` beside the checkout
    (or beside one of its parent folders, for worktrees), None where there is none."""
    for parent in ROOT.parents:
        script = parent / "shared" / "tools" / "couchdb" / "couchdb-test-server"
        if script.is_file():
            return script
    return None


class ApacheCouch:
    """An Apache CouchDB 3.5 started by the shared ``couchdb-test-server`` in ``data_dir``.

    ``stop()`` then ``start()`` restarts the same server (same directory, data and port);
    ``url`` carries the admin's credentials, as an operator's ``--couchdb`` URL does."""

    def __init__(self, data_dir: Path, script: Path) -> None:
        self.data_dir = data_dir
        self.script = script
        self.port = free_port()
        self.url = f"http://admin:admin@127.0.0.1:{self.port}/"

    #: A release unpacked by an earlier start of this session: later servers copy it (a
    #: fraction of a second) instead of unpacking the 43 MB tarball again (seconds of CPU).
    #: CouchDB writes nothing inside its release (its data, logs and ini are beside it).
    unpacked: Path | None = None

    def start(self) -> None:
        release = self.data_dir / "release"
        source = ApacheCouch.unpacked
        if source is not None and not release.exists():
            shutil.copytree(source, release, symlinks=True)
        # Through bash: CI's copy of shared/ may have lost its mode bits.
        subprocess.run(
            ["bash", str(self.script), "start", str(self.data_dir), str(self.port)],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=120,
        )
        if ApacheCouch.unpacked is None:
            ApacheCouch.unpacked = release

    def stop(self) -> None:
        """A clean stop (SIGTERM, as an operator's restart does)."""
        subprocess.run(
            ["bash", str(self.script), "stop", str(self.data_dir)], check=True, timeout=60
        )

    def discard(self) -> None:
        """At the end of a test: SIGKILL, nothing to keep."""
        pid_file = self.data_dir / "couchdb.pid"
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        pid_file.unlink(missing_ok=True)


CouchProcess = PouchServer | ApacheCouch

ENGINES = ("pouchdb", "couchdb")


def _engines() -> list[Any]:
    wanted = os.environ.get("VIBE_TEST_ENGINES", ",".join(ENGINES)).split(",")
    return [
        pytest.param(engine, id=engine, marks=getattr(pytest.mark, engine))
        for engine in ENGINES
        if engine in wanted
    ]


def _no_couchdb() -> str:
    return (
        "Apache CouchDB is not available: no ../shared/tools/couchdb/couchdb-test-server "
        "beside the checkout and no VIBE_TEST_COUCHDB URL (CI has them)"
    )


@pytest.fixture(scope="session", params=_engines())
def couch_engine(request: pytest.FixtureRequest) -> str:
    """The engine under test: ``pouchdb`` (PouchDB Server) or ``couchdb`` (Apache CouchDB)."""
    engine: str = request.param
    return engine


@pytest.fixture(scope="session")
def couch_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """The URL of an engine's server, started on first use and kept until the session ends.

    A parametrized session fixture alone would be torn down and started again each time the
    tests switch engine (every file of both halves, under xdist's --dist loadfile); tests use
    unique database names, so one server per engine serves the whole session."""
    urls: dict[str, str] = {}
    running: list[CouchProcess] = []

    def url_of(engine: str) -> str:
        if engine in urls:
            return urls[engine]
        server: CouchProcess
        if engine == "pouchdb":
            server = PouchServer(tmp_path_factory.mktemp("pouchdb"))
        else:
            external = os.environ.get("VIBE_TEST_COUCHDB")
            if external:
                urls[engine] = external if external.endswith("/") else external + "/"
                return urls[engine]
            script = couchdb_test_server()
            if script is None:
                pytest.skip(_no_couchdb())
            server = ApacheCouch(tmp_path_factory.mktemp("couchdb"), script)
        running.append(server)
        server.start()
        urls[engine] = server.url
        return server.url

    yield url_of
    for server in running:
        if isinstance(server, ApacheCouch):
            server.discard()
        else:
            server.stop()


@pytest.fixture(scope="session")
def couch_url(couch_engine: str, couch_servers: Callable[[str], str]) -> str:
    """URL of the engine's server shared by the session; tests use unique database names."""
    return couch_servers(couch_engine)


@pytest.fixture
def own_couch(couch_engine: str, tmp_path: Path) -> Iterator[CouchProcess]:
    """A server of this test's own (the engine under test), for tests that stop and restart
    it."""
    server: CouchProcess
    if couch_engine == "pouchdb":
        server = PouchServer(tmp_path / "pouchdb")
    else:
        script = couchdb_test_server()
        if script is None:
            pytest.skip(
                "this test stops and restarts an Apache CouchDB of its own, which needs "
                "../shared/tools/couchdb/couchdb-test-server beside the checkout (CI has it; "
                "a VIBE_TEST_COUCHDB URL cannot be restarted)"
            )
        server = ApacheCouch(tmp_path / "couchdb", script)
    server.start()
    yield server
    if isinstance(server, ApacheCouch):
        server.discard()
    else:
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


@pytest_twisted.async_yield_fixture
async def replicas(tmp_path: Path, couch_url: str) -> AsyncIterator[tuple[Any, Any]]:
    """Two vibeds against one CouchDB, sharing the JWT key file and a clock: replicas behind
    one load balancer."""
    from harness import FakeClock, Vibed, make_config

    key = str(tmp_path / "shared-jwt.pem")
    clock = FakeClock()
    a = await Vibed(make_config(tmp_path / "a", couch_url, jwt_key_file=key), clock).start()
    b = await Vibed(make_config(tmp_path / "b", couch_url, jwt_key_file=key), clock).start()
    yield a, b
    await a.stop()
    await b.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests (Playwright's sync API, on greenlets of its own) run after every test
    that runs on pytest-twisted's reactor greenlet, so the two never interleave."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
