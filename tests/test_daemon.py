"""The daemon as a self-hoster meets it: the installed twistd plugin, options, and
`twistd -n vibed` with its embedded CouchDB."""

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
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, free_port

VENV_BIN = Path(sys.executable).parent


def _twistd(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "twistd"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


@pytest.mark.slow
@pytest.mark.parametrize("couch_engine", ["pouchdb"], indirect=True)
def test_non_editable_install_ships_and_finds_the_plugin(tmp_path: Path, couch_url: str) -> None:
    """A wheel built from the repo contains twisted/plugins/vibed_plugin.py (no __init__.py
    there), and after a non-editable install into a fresh venv `twistd --help` lists vibed and
    `twistd vibed --help` lists every option; the installed daemon serves the pages (landing,
    dashboard, its script and styles, gzipped with an ETag, and the browser 404)."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [str(VENV_BIN / "pip"), "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("vibed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/vibed_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    # The browser SDK, the React hooks and the pages' styles ship in the wheel (vibed_web).
    for name in (
        "sdk/vibe.js",
        "sdk/vibe.d.ts",
        "react/index.js",
        "static/vibe.css",
        "static/dashboard.js",
        "pages/index.html",
        "pages/dashboard.html",
    ):
        assert f"vibed_web/{name}" in names
    # The agent's routes (the daemon mounts them) ship too.
    assert "agent_bridge/api.py" in names and "agent_bridge/protocol.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            str(wheel),
        ],
        check=True,
        timeout=600,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    found = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from vibed.api.apps import web_dir; print(web_dir())",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert found.startswith(str(venv)) and found.endswith("vibed_web"), found
    out = subprocess.run(
        [str(venv / "bin" / "twistd"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert "vibed" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(
        [str(venv / "bin" / "twistd"), "vibed", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    for option in (
        "--port",
        "--couchdb",
        "--data-dir",
        "--public-url",
        "--jwt-key-file",
        "--crypto-threads",
        "--trusted-proxies",
    ):
        assert option in out.stdout, option
    # Every module of the source tree imports from the installed wheel (a package left out
    # of pyproject's list would only fail when the daemon starts).
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "vibed").rglob("*.py")
    )
    imported = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            f"import importlib; [importlib.import_module(m) for m in {modules!r}]",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert imported.returncode == 0, imported.stderr
    # The module came from the fresh venv, not the source checkout.
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import vibed, twisted.plugins.vibed_plugin as p; "
            "print(vibed.__file__); print(p.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert str(venv) in where.stdout and str(ROOT / "vibed") not in where.stdout
    _serves_pages_from(venv, tmp_path, env, couch_url)


def _fetch_page(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _serves_pages_from(venv: Path, tmp_path: Path, env: dict[str, str], couch_url: str) -> None:
    """`twistd vibed` of the installed wheel answers the site's pages and assets."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "wheel-vibed.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(venv / "bin" / "twistd"),
            "-n",
            "--pidfile=",
            "vibed",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--couchdb",
            couch_url,
            "--data-dir",
            str(tmp_path / "wheel-data"),
            "--public-url",
            base,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _up(base) or _fetch_page(base + "/readyz")[0] != 200:
            assert proc.poll() is None, (tmp_path / "wheel-vibed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the installed vibed did not get ready"
            time.sleep(0.2)
        code, headers, body = _fetch_page(base + "/")
        assert code == 200 and b"Create your account" in body
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        code, headers, body = _fetch_page(base + "/dashboard")
        assert code == 200 and b"/static/dashboard.js" in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        code, headers, body = _fetch_page(
            base + "/static/dashboard.js", {"Accept-Encoding": "gzip"}
        )
        assert code == 200 and headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"] == "text/javascript; charset=utf-8" and headers["ETag"]
        again = _fetch_page(
            base + "/static/dashboard.js",
            {"If-None-Match": headers["ETag"], "Accept-Encoding": "gzip"},
        )
        assert again[0] == 304
        assert _fetch_page(base + "/static/vibe.css")[0] == 200
        code, headers, body = _fetch_page(base + "/no-such-page", {"Accept": "text/html"})
        assert code == 404 and headers["Content-Type"].startswith("text/html")
        code, headers, _ = _fetch_page(base + "/no-such-page", {"Accept": "application/json"})
        assert code == 404 and headers["Content-Type"] == "application/problem+json"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _up(base: str) -> bool:
    try:
        urllib.request.urlopen(base + "/healthz", timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "nonsense:1"], {}, "--port"),
        (["--couchdb", "ftp://x"], {}, "--couchdb"),
        (["--crypto-threads", "zero"], {}, "--crypto-threads"),
        (["--public-url", "not a url"], {}, "--public-url"),
        ([], {"VIBE_CRYPTO_THREADS": "-3"}, "--crypto-threads"),
        (["--trusted-proxies", "10.0.0.0/8,bogus"], {}, "--trusted-proxies"),
        (
            ["--couchdb", "embedded", "--pouchdb-server", "/nonexistent/pouchdb-server"],
            {},
            "make install",
        ),
        (["--blobs", "ftp"], {}, "--blobs"),
        (["--signup-limit", "0"], {}, "--signup-limit"),
    ],
)
def test_bad_option_stops_with_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    """A bad option value (from the command line or VIBE_*) stops the start with one line
    naming the option, and no traceback."""
    full_env = {**os.environ, **env}
    result = _twistd(
        "-n",
        "vibed",
        "--data-dir",
        str(tmp_path / "d"),
        "--couchdb",
        "http://127.0.0.1:9/",
        *args,
        env=full_env,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_option_beats_environment(tmp_path: Path) -> None:
    """An option given on the command line wins over its VIBE_* variable."""
    from vibed.config import Config

    config = Config.from_options(
        {"port": "tcp:4001", "crypto-threads": None},
        {"VIBE_PORT": "tcp:4002", "VIBE_CRYPTO_THREADS": "3", "VIBE_DATA_DIR": str(tmp_path)},
    )
    assert config.port == "tcp:4001"
    assert config.crypto_threads == 3
    assert config.data_dir == tmp_path
    assert config.public_url == "http://localhost:4001"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: dict[str, str]) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        assert proc.poll() is None, "twistd exited early"
        try:
            if _get(url + "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("vibed did not become ready")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["plugin", "tac"])
def test_twistd_serves_with_embedded_couchdb(tmp_path: Path, how: str) -> None:
    """`twistd -n vibed` (and `twistd -ny vibed.tac`) starts PouchDB Server as a child, serves
    signup and login on the port, creates the JWT key with mode 0600, and on SIGTERM stops
    the child too; logs hold no password or token."""
    port = free_port()
    data = tmp_path / "data"
    env = {**os.environ, "VIBE_DATA_DIR": str(data), "VIBE_PORT": f"tcp:{port}"}
    if how == "plugin":
        cmd = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "vibed"]
    else:
        cmd = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "-y", str(ROOT / "vibed.tac")]
    log = tmp_path / "twistd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, time.monotonic() + 90)
        assert _get(url + "/healthz")[0] == 200
        code, body = _post(
            url + "/auth/signup", {"email": "self@host.example", "password": "hunter2hunter2"}
        )
        assert code == 201, body
        code, body = _post(
            url + "/auth/login", {"email": "self@host.example", "password": "hunter2hunter2"}
        )
        assert code == 200, body
        token = str(body["accessToken"])
        key = data / "jwt-ed25519.pem"
        assert key.stat().st_mode & 0o777 == 0o600
        children = subprocess.run(
            ["pgrep", "-f", str(data / "couchdb")], capture_output=True, text=True
        ).stdout.split()
        assert children, "expected a pouchdb-server child"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    left = subprocess.run(
        ["pgrep", "-f", str(data / "couchdb")], capture_output=True, text=True
    ).stdout.split()
    assert left == []
    text = log.read_text()
    assert "hunter2hunter2" not in text and token not in text
    # The access log (the default, ``-``) is in the same output with the daemon log's prefix,
    # gathered and written in whole lines, and flushed when the daemon stops.
    access = [line for line in text.splitlines() if " [vibed.access#info] " in line]
    assert any('"POST /auth/signup HTTP/1.1" 201 ' in line for line in access), text[-2000:]
    assert any('"POST /auth/login HTTP/1.1" 200 ' in line for line in access), access
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[vibed\.access#info\] \"")
    assert all(stamp.match(line) for line in access), access
