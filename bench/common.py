"""Shared pieces of the benchmarks: start a real vibed (twistd, separate process), percentiles,
and a bounded-concurrency load runner on treq."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from attrs import define
from twisted.internet.defer import DeferredSemaphore, gatherResults

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


class Daemon:
    """`twistd -n vibed` with the embedded CouchDB in a temporary data dir."""

    def __init__(
        self, *extra: str, env: dict[str, str] | None = None, wrapper: list[str] | None = None
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vibed-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # ``wrapper``: a command that runs twistd (e.g. valgrind), so ``pid`` is the daemon.
        self.args = [
            *(wrapper or []),
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "vibed",
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--data-dir",
            str(Path(self.tmp.name) / "data"),
            "--signup-limit",
            "1000000",  # benchmarks sign up many identities from one address
            *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> Daemon:
        log = open(Path(self.tmp.name) / "twistd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp.name, env=self.env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("vibed exited; see " + str(Path(self.tmp.name) / "twistd.log"))
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.2)
        raise RuntimeError("vibed did not become ready")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def rss_kib(self) -> int:
        """Resident memory of the daemon and its workers, KiB."""
        assert self.proc is not None
        total = 0
        for pid in descendants(self.proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tmp.cleanup()


async def run_load(
    op: Callable[[int], Awaitable[Any]], count: int, concurrency: int
) -> tuple[float, list[float], int]:
    """Run ``op(i)`` for i in range(count), at most ``concurrency`` at once.
    Returns (elapsed seconds, latencies in seconds, errors)."""
    sem = DeferredSemaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            await op(i)
        except Exception:
            errors += 1
            return
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await gatherResults([sem.run(one, i) for i in range(count)])
    return time.perf_counter() - start, latencies, errors


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


# -- the engine under the benchmark, CPU accounting, pinning -------------------------------


def couchdb_test_server() -> Path | None:
    """The team's ``shared/tools/couchdb/couchdb-test-server`` beside the checkout (or beside
    one of its parent folders), None where there is none."""
    for parent in ROOT.parents:
        script = parent / "shared" / "tools" / "couchdb" / "couchdb-test-server"
        if script.is_file():
            return script
    return None


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (0 when unknown)."""
    if pid is None:
        return 0.0
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pin(pid: int | None, cpus: str) -> None:
    """Move ``pid``, its threads and its descendants onto ``cpus`` (taskset list, "0-1")."""
    if pid is None:
        return
    for p in descendants(pid):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpus, str(p)],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def listening_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:``port``, if this user can see it."""
    try:
        out = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return None
    marker = "pid="
    if marker not in out:
        return None
    return int(out.split(marker, 1)[1].split(",", 1)[0])


class Engine:
    """The CouchDB-protocol server a benchmark runs on (``--couchdb``):

    ``pouchdb`` (default): a PouchDB Server process of its own, as the embedded mode runs;
    ``shared``: an Apache CouchDB 3.5 of its own, from ``../shared/tools/couchdb``;
    a URL (``http://admin:pw@host:5984``): that server, left running at the end.
    ``url`` carries the credentials; ``pid`` is the server's process (None: not ours and not
    found), for CPU accounting and pinning. ``erl_flags`` (``--erl-flags``): the Erlang VM
    flags an Apache CouchDB of its own starts with (``ERL_FLAGS``), named in ``name``."""

    def __init__(self, spec: str, erl_flags: str = "") -> None:
        self.spec = spec
        self.erl_flags = erl_flags
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.script: Path | None = None
        self.pid: int | None = None
        self.url = ""
        self.name = ""

    def start(self) -> Engine:
        if self.erl_flags and self.spec != "shared":
            raise SystemExit("--erl-flags: only for --couchdb shared (a CouchDB started here)")
        if self.spec == "pouchdb":
            self._start_pouchdb()
        elif self.spec == "shared":
            self._start_shared()
        else:
            from urllib.parse import urlsplit

            self.url = self.spec if self.spec.endswith("/") else self.spec + "/"
            self.pid = listening_pid(urlsplit(self.url).port or 5984)
        self.name = self._describe()
        if self.erl_flags:
            self.name += f" (ERL_FLAGS '{self.erl_flags}')"
        return self

    def _start_pouchdb(self) -> None:
        from vibed.embedded import pouchdb_server_args

        self.tmp = tempfile.TemporaryDirectory(prefix="vibed-bench-pouch-")
        port = free_port()
        data = Path(self.tmp.name)
        exe = ROOT / "node_modules" / ".bin" / "pouchdb-server"
        log = open(data / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(exe), *pouchdb_server_args(port, data)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{port}/"
        self._wait()

    def _start_shared(self) -> None:
        self.script = couchdb_test_server()
        if self.script is None:
            raise SystemExit(
                "--couchdb shared: no ../shared/tools/couchdb/couchdb-test-server beside the "
                "checkout; pass a CouchDB URL instead"
            )
        self.tmp = tempfile.TemporaryDirectory(prefix="vibed-bench-couchdb-")
        env = dict(os.environ)
        if self.erl_flags:
            env["ERL_FLAGS"] = self.erl_flags
        url = subprocess.run(
            ["bash", str(self.script), "start", self.tmp.name],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip()
        self.url = url + "/"
        self.pid = int((Path(self.tmp.name) / "couchdb.pid").read_text())

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.spec} did not answer")

    def _describe(self) -> str:
        import base64
        import json
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.url)
        request = urllib.request.Request(
            urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        )
        if parts.username:
            token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as r:
            welcome = json.load(r)
        vendor = (welcome.get("vendor") or {}).get("name", "")
        if welcome.get("couchdb") == "Welcome" and "Apache" in vendor:
            return f"Apache CouchDB {welcome.get('version')}"
        if "pouchdb" in json.dumps(welcome).lower():
            return f"PouchDB Server {welcome.get('version')}"
        return f"{welcome.get('couchdb', 'CouchDB-protocol server')} {welcome.get('version')}"

    def basic_auth(self) -> str | None:
        """The ``Authorization`` header value the URL's credentials make, if any."""
        import base64
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(self.url)
        if parts.username is None:
            return None
        raw = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        return "Basic " + base64.b64encode(raw.encode()).decode()

    def bare_url(self) -> str:
        """``url`` without the credentials."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.script is not None and self.tmp is not None:
            subprocess.run(["bash", str(self.script), "stop", self.tmp.name], check=False)
        if self.tmp is not None:
            self.tmp.cleanup()


#: Erlang's scheduler busy-waiting off (normal, dirty CPU and dirty I/O schedulers): what a
#: CouchDB sharing its cores with vibed and the load should run with.
QUIET_SCHEDULERS = "+sbwt none +sbwtdcpu none +sbwtdio none"


def add_engine_arguments(parser: Any) -> None:
    """``--couchdb`` and ``--cpus``, the same in every benchmark."""
    parser.add_argument(
        "--couchdb",
        default="pouchdb",
        help="pouchdb (a PouchDB Server of its own, the default), shared (an Apache CouchDB "
        "3.5 of its own from ../shared/tools/couchdb) or the URL of a CouchDB with admin "
        "credentials",
    )
    parser.add_argument(
        "--erl-flags",
        default="",
        help="with --couchdb shared: Erlang VM flags for that CouchDB (its ERL_FLAGS), e.g. "
        f"'{QUIET_SCHEDULERS}': its schedulers then sleep when idle instead of spinning on a "
        "core the other processes need (see the README's performance section)",
    )
    parser.add_argument(
        "--vibed-src",
        help="run the vibed found in this source tree (e.g. a worktree of an older commit, "
        "for before/after figures) instead of the installed one",
    )
    parser.add_argument(
        "--vibed-args",
        default="",
        help="more twistd vibed options, e.g. '--access-log off' or '--workers 2'",
    )
    parser.add_argument(
        "--cpus",
        choices=("shared", "pinned", "both"),
        default="shared",
        help="shared: vibed and CouchDB share every core; pinned: vibed on CPU 0, CouchDB on "
        "CPU 1 (taskset); both: one run of each",
    )


# -- wrk -----------------------------------------------------------------------------------


@define(frozen=True)
class WrkResult:
    """What one wrk run measured."""

    requests: int
    seconds: float
    p50: float  # seconds
    p99: float
    errors: int  # non-2xx/3xx answers and socket errors

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _lua(text: str) -> str:
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if 32 <= byte < 127 and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


Request = tuple[str, str, dict[str, str], str | None]


def wrk(
    base: str,
    requests: list[Request],
    *,
    seconds: float,
    connections: int,
    threads: int = 2,
) -> WrkResult:
    """Send ``requests`` (method, path, headers, body; ``{n}`` in a path becomes a number
    unique to this run) in turn, over ``connections`` keep-alive connections, for ``seconds``.
    Needs wrk (``apt-get install wrk``)."""
    if shutil.which("wrk") is None:
        raise SystemExit("the benchmarks drive load with wrk: apt-get install wrk")
    import uuid

    lines = ["local reqs = {}", f"local run = {_lua(uuid.uuid4().hex[:12])}"]
    for method, path, headers, body in requests:
        hdrs = "{" + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in headers.items()) + "}"
        lines.append(
            f"reqs[#reqs + 1] = {{{_lua(method)}, {_lua(path)}, {hdrs}, "
            f"{_lua(body) if body is not None else 'nil'}}}"
        )
    lines.append(
        """
local i, n, count = 0, 0, 0
function setup(thread) count = count + 1; thread:set("tid", count) end
function request()
  i = i % #reqs + 1
  n = n + 1
  local r = reqs[i]
  local path = string.gsub(r[2], "{n}", run .. "x" .. tostring(tid) .. "x" .. tostring(n))
  return wrk.format(r[1], path, r[3], r[4])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"status\\": %d, \\"socket\\": %d, "
    .. "\\"p50_us\\": %d, \\"p99_us\\": %d}\\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines))
    try:
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "30s",
                "-s",
                script.name,
                base,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        os.unlink(script.name)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr.strip() or out.stdout.strip()}")
    import json

    line = next(x for x in out.stdout.splitlines() if x.startswith("WRKJSON "))
    got = json.loads(line[len("WRKJSON ") :])
    return WrkResult(
        requests=got["requests"],
        seconds=got["duration_us"] / 1e6,
        p50=got["p50_us"] / 1e6,
        p99=got["p99_us"] / 1e6,
        errors=got["status"] + got["socket"],
    )


def vibed_env(args: Any) -> dict[str, str] | None:
    """The daemon's extra environment for ``--vibed-src``."""
    return {"PYTHONPATH": str(Path(args.vibed_src).resolve())} if args.vibed_src else None


def fixed_load(
    base: str, requests: list[Request], *, count: int, connections: int
) -> tuple[float, int]:
    """Send exactly ``count`` of ``requests`` (in turn; ``{n}`` as in :func:`wrk`) over
    ``connections`` keep-alive connections; returns (seconds, answers that were not 2xx).
    Slower than wrk, but the daemon serves a known number of requests (instruction counts)."""
    import http.client
    import threading
    import uuid
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    run = uuid.uuid4().hex[:12]
    lock = threading.Lock()
    state = {"next": 0, "errors": 0}

    def take() -> int | None:
        with lock:
            k = state["next"]
            if k >= count:
                return None
            state["next"] = k + 1
            return k

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=600)
        while (k := take()) is not None:
            method, path, headers, body = requests[k % len(requests)]
            conn.request(
                method,
                path.replace("{n}", f"{run}x{k}"),
                body=body.encode() if body is not None else None,
                headers=headers,
            )
            answer = conn.getresponse()
            answer.read()
            if not 200 <= answer.status < 300:
                with lock:
                    state["errors"] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(connections)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - start, state["errors"]
