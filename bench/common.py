"""Shared pieces of the benchmarks: start a real vibed (twistd, separate process), percentiles,
and a bounded-concurrency load runner on treq."""

from __future__ import annotations

import os
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

    def __init__(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vibed-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
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

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

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
