"""infra/selfhost: the compose stack run here with podman-compose, used through Caddy over HTTPS.

The compose file is the one users run; `tests_infra/selfhost/compose.here.yml` (this machine
only) swaps in local stand-ins for the images no registry can give us here (Apache CouchDB
3.5.0 from ../shared/tools/couchdb, Debian's Caddy, moto in MinIO's place). The client trusts
Caddy's own root (`tls internal`) and nothing else, and reaches the stack by its LAN name
`vibe.lan` on a free port (connections pinned to 127.0.0.1, names and SNI kept).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import IMAGE, ROOT, Http, free_port, podman, podman_env, unique
from websockets.sync.client import connect as ws_connect

SELFHOST = ROOT / "infra" / "selfhost"
HERE = ROOT / "tests_infra" / "selfhost"
DOMAIN = "vibe.lan"
STANDINS = {
    "couchdb": "localhost/vibe-standin/couchdb:3.5.0",
    "caddy": "localhost/vibe-standin/caddy:debian",
    "minio-moto": "localhost/vibe-standin/minio-moto:5.2.5",
}
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def couchdb_release() -> Path | None:
    """The Apache CouchDB release tarball of ../shared/tools/couchdb, wherever shared/ is."""
    name = "apache-couchdb-3.5.0-debian12-x86_64.tar.gz"
    for base in (ROOT.parent, ROOT.parent.parent, Path("/work")):
        candidate = base / "shared" / "tools" / "couchdb" / name
        if candidate.is_file():
            return candidate
    return None


def build(tag: str, dockerfile: Path, context: Path) -> subprocess.Popen[str]:
    secret = ["--secret", f"id=ca-bundle,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
    return subprocess.Popen(
        [
            "podman", "build", "--isolation", "chroot", "--network", "host",
            "--format", "docker", "--pull=never", *secret,
            "-f", str(dockerfile), "-t", tag, str(context),
        ],
        env=podman_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture(scope="session")
def standins(image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The three stand-in images, built in parallel (podman's layer cache makes reruns quick)."""
    release = couchdb_release()
    if release is None:
        pytest.skip("../shared/tools/couchdb is absent: no Apache CouchDB for the stand-in image")
    context = tmp_path_factory.mktemp("couchdb-context")
    for name in ("couchdb.Dockerfile", "couchdb-entrypoint.sh"):
        shutil.copy2(HERE / name, context / name)
    shutil.copy2(release, context / release.name)
    jobs = {
        "couchdb": build(STANDINS["couchdb"], context / "couchdb.Dockerfile", context),
        "caddy": build(STANDINS["caddy"], HERE / "caddy.Dockerfile", HERE),
        "minio-moto": build(STANDINS["minio-moto"], HERE / "s3.Dockerfile", HERE),
    }
    for name, job in jobs.items():
        out, _ = job.communicate(timeout=900)
        assert job.returncode == 0, f"stand-in {name} did not build:\n{out[-3000:]}"
    return STANDINS


def secrets() -> dict[str, str]:
    return {
        "COUCHDB_USER": "vibe_admin",
        "COUCHDB_PASSWORD": uuid.uuid4().hex,
        "COUCHDB_SECRET": uuid.uuid4().hex,
        "COUCHDB_COOKIE": uuid.uuid4().hex,
        "MINIO_ROOT_USER": "vibe_minio",
        "MINIO_ROOT_PASSWORD": uuid.uuid4().hex,
    }


class Stack:
    """One compose project (its own containers, network and volumes) run by podman-compose."""

    def __init__(self, project: str, env: dict[str, str], https_port: int) -> None:
        self.project = project
        self.env = env
        self.https_port = https_port
        self.base = f"https://{DOMAIN}:{https_port}"

    @property
    def command(self) -> list[str]:
        return [
            "podman-compose", "-p", self.project,
            "-f", str(SELFHOST / "docker-compose.yml"), "-f", str(HERE / "compose.here.yml"),
        ]  # fmt: skip

    def environ(self) -> dict[str, str]:
        return {**podman_env(), **self.env}

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.command, *args],
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman-compose {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def logs(self) -> str:
        out = []
        for service in ("preflight", "couchdb", "minio", "vibed", "caddy"):
            done = podman("logs", "--tail", "30", f"{self.project}_{service}_1", check=False)
            out.append(f"--- {service}\n{done.stdout}{done.stderr}")
        return "\n".join(out)

    def client(self) -> Http:
        return Http(self.base, context=self.tls_context())

    def tls_context(self) -> ssl.SSLContext:
        """Trusts only the root of Caddy's internal CA (read from its data volume)."""
        deadline = time.monotonic() + 60
        while True:
            done = podman(
                "exec",
                f"{self.project}_caddy_1",
                "cat",
                "/data/caddy/pki/authorities/local/root.crt",
                check=False,
            )
            if done.returncode == 0 and "BEGIN CERTIFICATE" in done.stdout:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"Caddy made no root certificate:\n{self.logs()}")
            time.sleep(0.5)
        context = ssl.create_default_context(cadata=done.stdout)
        return context

    def wait_ready(self, http: Http, deadline_s: float = 240) -> None:
        try:
            http.wait_healthy(deadline_s, path="/readyz")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def destroy(self) -> None:
        # `rm -v` first: podman-compose's `down -v` leaves the anonymous /data volume of the
        # run-once preflight container behind.
        for service in ("preflight", "couchdb", "minio", "vibed", "caddy"):
            podman("rm", "-f", "-v", "-t", "5", f"{self.project}_{service}_1", check=False)
        self.compose("down", "-v", check=False)
        for suffix in ("couchdb-data", "minio-data", "vibe-data", "caddy-data", "caddy-config"):
            podman("volume", "rm", "-f", f"{self.project}_{suffix}", check=False)
        podman("network", "rm", "-f", f"{self.project}_default", check=False)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 whatever the name: certificate checks and SNI still use the name."""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self.pinned_context = context

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(PinnedHTTPSConnection, req, context=self.pinned_context)


class PinnedHttp(Http):
    """The suite's JSON client, over connections pinned to this machine."""

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                headers: dict[str, str] | None = None, data: bytes | None = None,
                url: str | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            url or self.base + path, data=data, method=method, headers=hdrs
        )
        assert self.context is not None
        opener = urllib.request.build_opener(PinnedHTTPSHandler(self.context), NoRedirect())
        try:
            with opener.open(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def start_stack(project: str, env: dict[str, str]) -> Stack:
    port = free_port()
    stack = Stack(
        project,
        {
            **env,
            "VIBED_IMAGE": IMAGE,
            "VIBE_DOMAIN": DOMAIN,
            "CADDY_TLS": "internal",
            "HTTPS_PORT": str(port),
            "HTTP_PORT": str(free_port()),
        },
        port,
    )
    stack.compose("up", "-d")
    return stack


@pytest.fixture
def stack(standins: dict[str, str]) -> Iterator[Stack]:
    """A running stack with fresh secrets; torn down with its volumes afterwards."""
    started = start_stack(unique("stack"), secrets())
    try:
        yield started
    finally:
        started.destroy()


def pinned(stack: Stack) -> PinnedHttp:
    return PinnedHttp(stack.base, context=stack.tls_context())


def test_stack_over_https_signup_data_realtime_blobs_then_backup_and_restore(
    stack: Stack, tmp_path: Path
) -> None:
    """Through Caddy over HTTPS (its internal CA trusted, nothing else): sign up, write and
    read a document, receive its change on the realtime WebSocket, upload a blob with the
    signed URL and download it again; then back up with backup.sh, destroy the stack with its
    volumes, restore into a fresh project with restore.sh, and find the identity (same
    password), the document and the blob there."""
    http = pinned(stack)
    stack.wait_ready(http)
    # CouchDB's Erlang runs with the compose file's ERL_FLAGS (schedulers that sleep when idle).
    beam = podman(
        "exec", f"{stack.project}_couchdb_1", "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '",
        check=False,
    ).stdout  # fmt: skip
    assert "beam.smp" in beam and "-sbwt none -sbwtdcpu none -sbwtdio none" in beam, beam[:2000]
    status, headers, page = http.request("GET", "/")
    assert status == 200 and headers.get("Content-Type", "").startswith("text/html")
    assert "max-age" in headers.get("Strict-Transport-Security", "")

    email, password = f"self-{uuid.uuid4().hex[:8]}@example.org", "a long test passphrase"
    token = http.signup(email, password)
    note = http.json("POST", "/data/notes", {"title": "from behind Caddy"}, token)
    assert (
        http.json("GET", f"/data/notes/{note['id']}", token=token)["title"] == "from behind Caddy"
    )

    # Realtime through the proxy: a WebSocket upgrade over TLS, pinned like the rest.
    sock = socket.create_connection(("127.0.0.1", stack.https_port), timeout=30)
    with ws_connect(
        f"wss://{DOMAIN}:{stack.https_port}/realtime",
        sock=sock, ssl=http.context, server_hostname=DOMAIN, open_timeout=30,
    ) as ws:  # fmt: skip
        ws.send(json.dumps({"type": "auth", "token": token}))
        assert json.loads(ws.recv(timeout=30))["type"] == "authenticated"
        ws.send(json.dumps({"type": "subscribe", "collection": "notes"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "subscribed"
        live = http.json("POST", "/data/notes", {"title": "live"}, token)
        deadline = time.monotonic() + 30
        while True:
            message = json.loads(ws.recv(timeout=max(1, deadline - time.monotonic())))
            if message["type"] == "change" and message["id"] == live["id"]:
                assert message["doc"]["title"] == "live"
                break

    # A blob: the signed URL names this server (Caddy routes the bucket's path to S3).
    content = os.urandom(3000)
    up = http.json(
        "POST",
        "/blob/upload-url",
        {"mime": "application/octet-stream", "size": len(content)},
        token,
    )
    assert up["url"].startswith(f"https://{DOMAIN}:{stack.https_port}/vibe-objects/"), up["url"]
    status, _, body = http.request(
        up["method"], "", url=up["url"], data=content, headers=up["headers"]
    )
    assert status in (200, 201), body[:300]
    blob = http.json("POST", "/blob/finalize-upload", {"id": up["id"]}, token)
    assert blob["size"] == len(content)
    status, headers, _ = http.request("GET", f"/blob/download-url/{blob['id']}", token=token)
    assert status == 302
    status, _, body = http.request("GET", "", url=headers["Location"])
    assert status == 200 and body == content

    # Backup, destroy, restore into a fresh instance.
    tools = {
        **stack.environ(),
        "COMPOSE": " ".join(stack.command),
        "DOCKER": "podman",
        "COMPOSE_PROJECT_NAME": stack.project,
    }
    done = subprocess.run(
        [str(SELFHOST / "backup.sh"), str(tmp_path / "backups")],
        cwd=SELFHOST, env=tools, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    backup = Path(done.stdout.strip().splitlines()[-1])
    assert {p.name for p in backup.iterdir()} >= {
        "couchdb-data.tar.gz",
        "vibe-data.tar.gz",
        "minio-data.tar.gz",
    }
    stack.destroy()

    fresh = Stack(unique("restored"), stack.env, stack.https_port)
    try:
        done = subprocess.run(
            [str(SELFHOST / "restore.sh"), str(backup)],
            cwd=SELFHOST,
            env={**tools, "COMPOSE": " ".join(fresh.command),
                 "COMPOSE_PROJECT_NAME": fresh.project},
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        http = pinned(fresh)
        fresh.wait_ready(http)
        # The old token still verifies (the JWT key came back) and a fresh login works.
        assert (
            http.json("GET", f"/data/notes/{note['id']}", token=token)["title"]
            == "from behind Caddy"
        )
        login = http.json("POST", "/auth/login", {"email": email, "password": password})
        token = login["accessToken"]
        assert http.json("GET", f"/data/notes/{live['id']}", token=token)["title"] == "live"
        # The blob's record came back; its bytes cannot be fetched here, because the moto
        # stand-in keeps objects in memory (MinIO keeps them in the minio-data volume, which
        # the backup holds).
        status, headers, _ = http.request("GET", f"/blob/download-url/{blob['id']}", token=token)
        assert status == 302 and headers["Location"].startswith(fresh.base + "/vibe-objects/")
    finally:
        fresh.destroy()


def preflight_script() -> tuple[list[str], list[str]]:
    service = yaml.safe_load((SELFHOST / "docker-compose.yml").read_text())["services"]["preflight"]
    # Compose turns $$ into $ before the shell sees it.
    return service["entrypoint"], [c.replace("$$", "$") for c in service["command"]]


def run_preflight(image: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    entrypoint, command = preflight_script()
    args = ["run", "--rm", "--network", "none", "--ulimit", "host"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    return podman(*args, "--entrypoint", json.dumps(entrypoint), image, *command, check=False)


def good_env() -> dict[str, str]:
    return {**secrets(), "VIBE_DOMAIN": DOMAIN, "CADDY_TLS": "admin@example.org"}


def test_preflight_accepts_a_filled_in_env(image: str) -> None:
    """With every secret long and random, the preflight service says so and exits 0."""
    done = run_preflight(image, good_env())
    assert done.returncode == 0, done.stderr
    assert ".env looks right" in done.stdout


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"COUCHDB_PASSWORD": ""}, "COUCHDB_PASSWORD is not set"),
        ({"COUCHDB_PASSWORD": "short"}, "COUCHDB_PASSWORD in .env is too weak"),
        (
            {"MINIO_ROOT_PASSWORD": "minioadmin-minioadmin"},
            "MINIO_ROOT_PASSWORD in .env is a well-known",
        ),
        ({"COUCHDB_COOKIE": "monster-monster-monster"}, "COUCHDB_COOKIE in .env is a well-known"),
        (
            {"COUCHDB_PASSWORD": "p@ss/word:with?url#chars"},
            "COUCHDB_PASSWORD in .env may only hold",
        ),
        ({"COUCHDB_USER": "admin"}, "COUCHDB_USER in .env must be set"),
        ({"MINIO_ROOT_USER": "minioadmin"}, "MINIO_ROOT_USER in .env must be set"),
        ({"CADDY_TLS": ""}, "CADDY_TLS in .env must be"),
        ({"VIBE_DOMAIN": ""}, "VIBE_DOMAIN is not set"),
    ],
)
def test_preflight_refuses_a_missing_or_weak_secret_naming_it(
    image: str, change: dict[str, str], named: str
) -> None:
    """Each missing or weak value of .env stops the start with a line naming the variable and
    saying how to make a good one; nothing else is reported for a filled-in .env."""
    done = run_preflight(image, {**good_env(), **change})
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("preflight:")]
    assert len(lines) == 1 and named in lines[0], done.stderr


def test_env_example_does_not_start_as_it_is(image: str) -> None:
    """Copying .env.example without filling it in is refused: no default secret ships."""
    env = {}
    for line in (SELFHOST / ".env.example").read_text().splitlines():
        match = re.match(r"^([A-Z_]+)=(.*)$", line)
        if match:
            env[match[1]] = match[2]
    done = run_preflight(image, env)
    assert done.returncode == 1
    for name in (
        "CADDY_TLS",
        "COUCHDB_PASSWORD",
        "COUCHDB_SECRET",
        "COUCHDB_COOKIE",
        "MINIO_ROOT_PASSWORD",
    ):
        assert name in done.stderr


def test_compose_file_wires_what_the_docs_promise() -> None:
    """Every service has a restart policy and a health check, vibed and CouchDB wait for what
    they need to be healthy, data lives in named volumes, only Caddy publishes ports, and no
    secret has a default value in the compose file."""
    text = (SELFHOST / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    for name, service in services.items():
        assert "restart" in service, name
        if name != "preflight":
            assert "healthcheck" in service, name
        if name not in ("preflight", "caddy"):
            condition = service["depends_on"]["preflight"]["condition"]
            assert condition == "service_completed_successfully", name
        assert "ports" not in service or name == "caddy", name
    assert services["vibed"]["depends_on"]["couchdb"]["condition"] == "service_healthy"
    assert services["caddy"]["depends_on"]["vibed"]["condition"] == "service_healthy"
    for name in ("COUCHDB_PASSWORD", "COUCHDB_SECRET", "COUCHDB_COOKIE", "MINIO_ROOT_PASSWORD"):
        assert not re.search(r"\$\{" + name + r":-", text), f"{name} has a default"
    assert set(compose["volumes"]) >= {"couchdb-data", "minio-data", "vibe-data", "caddy-data"}


def test_caddyfile_is_valid_for_caddy() -> None:
    """Debian's caddy adapts the Caddyfile (with the .env values substituted) without error,
    in both TLS modes, and routes the bucket's path to MinIO and the rest to vibed."""
    caddy = shutil.which("caddy")
    assert caddy, "caddy is not installed: make test-infra installs Debian's package"
    for tls in ("internal", "admin@example.org"):
        done = subprocess.run(
            [caddy, "adapt", "--config", str(SELFHOST / "Caddyfile"), "--adapter", "caddyfile"],
            env={**os.environ, "VIBE_DOMAIN": "vibe.example.org", "CADDY_TLS": tls,
                 "S3_BUCKET": "vibe-objects"},
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        config = json.loads(done.stdout)
        text = json.dumps(config)
        assert "/vibe-objects/*" in text and "minio:9000" in text and "vibed:3000" in text
