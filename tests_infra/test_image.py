"""The image: built by `make image` from the Dockerfile, run here with podman.

What a self-hoster does with it (`docker run -v vibe:/data IMAGE`) is what these tests do:
start it with its embedded defaults, sign up, write, stop it the way `docker stop` does
(SIGTERM), start it again and find the data in the volume. The port is published on a free
port of 127.0.0.1, so parallel runs never collide.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from conftest import ROOT, Http, free_port, podman, unique


def run_vibed(
    image: str, volume: str, containers: list[str], *extra: str, port: int | None = None
) -> tuple[str, Http]:
    """`docker run -d -p PORT:3000 -v VOLUME:/data IMAGE` (podman's bridge network; the port
    published on 127.0.0.1 only); return (name, client)."""
    port = port or free_port()
    name = unique(f"vibed-{uuid.uuid4().hex[:6]}")
    podman(
        "run", "-d", "--name", name, "--ulimit", "host",
        "-p", f"127.0.0.1:{port}:3000",
        "-v", f"{volume}:/data",
        *extra, image,
    )  # fmt: skip
    containers.append(name)
    return name, Http(f"http://127.0.0.1:{port}")


def inspect(name: str) -> dict:
    return json.loads(podman("inspect", name).stdout)[0]


def test_image_metadata(image: str) -> None:
    """The image runs as a numeric non-root user, keeps its data in the /data volume, has a
    HEALTHCHECK (kept because it is built in docker format) and OCI labels naming it."""
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    user = config["User"].split(":")[0]
    assert user.isdigit() and int(user) != 0, config["User"]
    assert "/data" in config["Volumes"]
    assert "3000/tcp" in config["ExposedPorts"]
    health = info.get("Healthcheck") or config.get("Healthcheck")
    assert health, "HEALTHCHECK missing: was the image built with --format docker?"
    assert health["Test"][0] == "CMD" and "healthcheck.py" in health["Test"][-1]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "vibed"
    assert labels["org.opencontainers.image.version"]
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    if revision:
        assert labels["org.opencontainers.image.revision"] == revision


def test_embedded_data_survives_a_sigterm_stop_and_restart(
    image: str, volume: str, containers: list[str]
) -> None:
    """Alone with its embedded defaults the image serves pages and the API; a document written
    just before `podman stop` (SIGTERM) is read back after the restart, from the volume, and
    the stop is a clean exit (status 0, not a kill after the timeout)."""
    name, http = run_vibed(image, volume, containers)
    http.wait_healthy()
    http.wait_healthy(path="/readyz")
    status, headers, body = http.request("GET", "/")
    assert status == 200 and headers.get("Content-Type", "").startswith("text/html"), body[:200]

    token = http.signup(f"first-{uuid.uuid4().hex[:8]}@example.org")
    first = http.json("POST", "/data/notes", {"title": "written long before"}, token)
    # The last write, acknowledged, then at once the stop signal.
    last = http.json("POST", "/data/notes", {"title": "written just before the stop"}, token)
    started = time.monotonic()
    podman("stop", "-t", "20", name)
    took = time.monotonic() - started
    state = inspect(name)["State"]
    assert state["ExitCode"] == 0, (state, podman("logs", name).stderr[-2000:])
    assert took < 15, f"stop took {took:.1f} s: SIGTERM did not stop vibed promptly"
    logs = podman("logs", name)
    assert "Server Shut Down." in logs.stdout + logs.stderr

    podman("start", name)
    http.wait_healthy()
    http.wait_healthy(path="/readyz")
    for written, title in ((first, "written long before"), (last, "written just before the stop")):
        doc = http.json("GET", f"/data/notes/{written['id']}", token=token)
        assert doc["title"] == title
    # The same JWT signing key came back from the volume: the old token is still good, and a
    # login works against the identity stored before the restart.
    assert http.json("GET", "/me", token=token)


def test_every_process_runs_as_non_root(image: str, volume: str, containers: list[str]) -> None:
    """No process in the running container (tini, twistd, the embedded node server) is root,
    and the data it writes in the volume is private to its user."""
    name, http = run_vibed(image, volume, containers)
    http.wait_healthy(path="/readyz")
    out = podman(
        "exec", name, "sh", "-c",
        "for s in /proc/[0-9]*/status; do grep -H '^Uid:' $s; done; ls -ln /data",
    ).stdout  # fmt: skip
    uids = {line.split()[1] for line in out.splitlines() if "Uid:" in line}
    assert uids and "0" not in uids, out
    node = podman("exec", name, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    assert "pouchdb-server" in node  # the embedded server was among the processes checked
    key = podman("exec", name, "stat", "-c", "%a %u", "/data/jwt-ed25519.pem").stdout.split()
    assert key[0] == "600" and key[1] != "0"


def test_healthcheck_reports_both_ways(image: str, volume: str, containers: list[str]) -> None:
    """`podman healthcheck run` is healthy while vibed answers, and the same check pointed at
    a port where nothing answers fails (so an unhealthy daemon would be seen)."""
    name, http = run_vibed(image, volume, containers)
    http.wait_healthy()
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    dead = podman(
        "exec", "-e", f"VIBE_PORT=tcp:{free_port()}", name,
        "/opt/vibed/bin/python", "/opt/vibed/healthcheck.py", check=False,
    )  # fmt: skip
    assert dead.returncode == 1 and "healthcheck:" in dead.stderr


def test_bad_option_stops_the_start_with_one_line(image: str) -> None:
    """A bad setting given to the container stops it at once with vibed's one-line message
    naming the option, not a traceback and not a restart loop of half-started daemons."""
    done = podman(
        "run", "--rm", "--network", "host", "--ulimit", "host",
        "-e", "VIBE_COUCHDB=ftp://nowhere", image, check=False, timeout=120,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "--couchdb" in out and "Traceback" not in out, out[-2000:]


def test_image_holds_the_wheel_not_the_tree_nor_build_secrets(image: str) -> None:
    """vibed is installed from its wheel (site-packages, twistd finds the plugin), without the
    source tree, tests, pip or a compiler; the CA bundle given to the build as a secret is
    nowhere in the image."""
    script = (
        "import vibed, os, sys;"
        "print(vibed.__file__);"
        "print(os.path.exists('/src'), os.path.exists('/opt/vibed/bin/pip'));"
        "print(os.path.exists('/run/secrets/ca-bundle'))"
    )
    out = podman(
        "run", "--rm", "--network", "host", "--ulimit", "host",
        "--entrypoint", "/opt/vibed/bin/python", image, "-c", script,
    ).stdout.split()  # fmt: skip
    assert "/site-packages/vibed/" in out[0]
    assert out[1:] == ["False", "False", "False"], out
    # The browser files (web/, package data of the wheel) came along, not from a checkout.
    web = podman(
        "run", "--rm", "--network", "host", "--ulimit", "host",
        "--entrypoint", "/opt/vibed/bin/python", image, "-c",
        "from vibed.api.apps import web_dir; d = web_dir(); "
        "print(d, (d / 'sdk' / 'vibe.js').is_file())",
    ).stdout.split()  # fmt: skip
    assert "/site-packages/" in web[0] and web[1] == "True", web
    helped = podman(
        "run", "--rm", "--network", "host", "--ulimit", "host", image, "--help", timeout=120,
    ).stdout  # fmt: skip
    assert "--couchdb" in helped and "--data-dir" in helped
    for probe in ("gcc", "npm", "pip3"):
        found = podman(
            "run", "--rm", "--network", "host", "--ulimit", "host", "--entrypoint", "sh",
            image, "-c", f"command -v {probe} || echo absent",
        ).stdout.strip()  # fmt: skip
        assert found == "absent", f"{probe} is in the runtime image: {found}"
    # Certificates only the build machine trusts must not become trusted by the image.
    extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    bundle = podman(
        "run", "--rm", "--network", "host", "--ulimit", "host", "--entrypoint", "cat",
        image, "/etc/ssl/certs/ca-certificates.crt",
    ).stdout  # fmt: skip
    for cert in extra:
        body = "".join(
            line for line in cert.read_text().splitlines() if line and "CERTIFICATE" not in line
        )
        assert body[:200] not in bundle.replace("\n", ""), f"{cert} leaked into the image"
