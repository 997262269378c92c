"""Fixtures of `make test-infra`: podman on this machine, the image `make image` built, HTTP.

These tests run real tools (podman, podman-compose, hadolint, helm's Go SDK, checkov, ...)
against the files under infra/ and the Dockerfile. They are not part of `make test`: they
need root, podman and minutes. `make test-infra` installs what they need, builds the image
and runs them; CI runs it after `make test`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "infra" / "podman" / "containers.conf"
IMAGE = os.environ.get("IMAGE", "localhost/vibed:dev")
# Every container, volume and network a test makes carries this prefix and the run's id, so
# parallel runs on one machine never touch each other's.
RUN_ID = uuid.uuid4().hex[:8]


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS``; on failure the error names the command and shows its output."""
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make test-infra` (it installs it)")
    done = subprocess.run(
        ["podman", *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(name: str) -> str:
    return f"vibetest-{RUN_ID}-{name}"


STALE_AFTER_S = 2 * 3600


@pytest.fixture(scope="session", autouse=True)
def _remove_leftovers_of_killed_runs() -> None:
    """A run killed before its teardown leaves `vibetest-*` containers and volumes behind;
    those over two hours old are removed (younger ones may belong to a run going on now)."""
    if shutil.which("podman") is None:
        return
    now = time.time()
    listing = podman("ps", "-a", "--filter", "name=vibetest-", "--format", "json", check=False)
    for entry in json.loads(listing.stdout or "[]"):
        if now - float(entry.get("Created", now)) > STALE_AFTER_S:
            for name in entry.get("Names", []):
                podman("rm", "-f", "-v", "-t", "2", name, check=False)
    volumes = podman("volume", "ls", "--format", "json", check=False)
    for entry in json.loads(volumes.stdout or "[]"):
        name = entry.get("Name", "")
        created = podman("volume", "inspect", name, "--format", "{{.CreatedAt.Unix}}", check=False)
        if name.startswith("vibetest-") and created.stdout.strip().isdigit():
            if now - int(created.stdout.strip()) > STALE_AFTER_S:
                podman("volume", "rm", "-f", name, check=False)


@pytest.fixture(scope="session")
def image() -> str:
    """The image `make image` built (``IMAGE``), which every container test runs."""
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is missing: run `make image` (make test-infra does)")
    return IMAGE


class Http:
    """Tiny JSON client over urllib: no dependency the image tests could disagree with."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base.rstrip("/")
        self.context = context

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        url: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            url or self.base + path, data=data, method=method, headers=hdrs
        )
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self.context), _NoRedirect()
        )
        try:
            with opener.open(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        status, _, content = self.request(method, path, body, token)
        if status >= 400:
            raise AssertionError(f"{method} {path} -> {status}: {content[:500]!r}")
        return json.loads(content) if content else None

    def wait_healthy(self, deadline_s: float = 120, path: str = "/healthz") -> None:
        """Poll ``path`` until it answers 200; fail with the last error after the deadline."""
        deadline = time.monotonic() + deadline_s
        last: object = None
        while time.monotonic() < deadline:
            try:
                status, _, _ = self.request("GET", path)
                if status == 200:
                    return
                last = status
            except OSError as e:
                last = e
            time.sleep(0.5)
        raise AssertionError(f"{self.base}{path} did not answer 200 in {deadline_s} s: {last}")

    def signup(self, email: str, password: str = "a long test passphrase") -> str:
        """Create an identity; return its access token."""
        answer = self.json("POST", "/auth/signup", {"email": email, "password": password})
        return str(answer["accessToken"])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def volume() -> Iterator[str]:
    """A fresh named volume, removed afterwards."""
    name = unique(f"vol-{uuid.uuid4().hex[:6]}")
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of containers a test started; each is removed (with its logs shown) at the end."""
    names: list[str] = []
    yield names
    for name in names:
        podman("rm", "-f", "-v", "-t", "2", name, check=False)
