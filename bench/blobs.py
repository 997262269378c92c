"""Blob benchmark: upload and download of 1 MiB and 256 MiB objects through the local store of
a real `twistd vibed` (embedded CouchDB), next to a plain copy of the same bytes on the same disk
in the same run, and the daemon's resident memory while the big objects pass through it.

    .venv/bin/python bench/blobs.py [--big-mib 256] [--small-count 20]
                                    [--couchdb pouchdb|shared|URL] [--cpus shared|pinned]

The client is blocking ``http.client`` in this process for the small objects (1 MiB reads
and writes) and ``curl`` for the big ones (when installed: an in-process Python client is
slower than vibed on big downloads); downloads are written to the same disk. So the figures
are vibed's plus the client's copy: one signed PUT streamed to a temporary file, fsync-ed and
linked into place; one signed GET streamed from disk. The copy baselines are ``shutil.copyfile`` of
the same file (with and without an fsync, since an upload is fsync-ed). Ratios (vibed MiB/s
over copy MiB/s) are what survive a noisy machine. Memory: VmRSS of the vibed process sampled
every 5 ms, before and during each transfer, and VmHWM (its peak ever) at the end; flat means
the 256 MiB peak is about the 1 MiB one, not 256 MiB above it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Daemon, Engine, add_engine_arguments, cpu_seconds, pin  # noqa: E402

MIB = 1024 * 1024
CHUNK = MIB


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Samples VmRSS of ``pid`` every 5 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_kib(self.pid, "VmRSS"))
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self.peak = proc_kib(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_kib(self.pid, "VmRSS"))


def api(base: str, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read() or b"null")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def download_location(base: str, token: str, blob_id: str) -> str:
    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(
        f"{base}/blob/download-url/{blob_id}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        opener.open(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 302:
            return str(e.headers["Location"])
        raise
    raise RuntimeError("download-url did not redirect")


def connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=300, blocksize=CHUNK)
    return conn, parts.path + "?" + parts.query


CURL = shutil.which("curl")
#: From this size on, transfers go through curl when there is one: a separate process that
#: outruns vibed, where the in-process Python client does not on big downloads. Below it, the
#: Python client avoids a process start per request.
CURL_FROM = 16 * MIB


def use_curl(size: int) -> bool:
    return CURL is not None and size >= CURL_FROM


def put_file(url: str, headers: dict[str, str], source: Path) -> None:
    if use_curl(source.stat().st_size):
        assert CURL is not None
        # Content-Length comes from the file, as the listed header says; no Expect wait.
        args = [CURL, "-sS", "-f", "-o", "/dev/null", "-T", str(source), "-H", "Expect:"]
        for name, value in headers.items():
            if name.lower() != "content-length":
                args += ["-H", f"{name}: {value}"]
        subprocess.run([*args, url], check=True)
        return
    conn, target = connection(url)
    with source.open("rb", buffering=0) as f:
        conn.request("PUT", target, body=f, headers=headers)
        resp = conn.getresponse()
        answer = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"PUT answered {resp.status}: {answer[:200]!r}")


def get_file(url: str, target: Path, size: int) -> int:
    if use_curl(size):
        assert CURL is not None
        subprocess.run([CURL, "-sS", "-f", "-o", str(target), url], check=True)
        return target.stat().st_size
    conn, path = connection(url)
    conn.request("GET", path)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"GET answered {resp.status}")
    received = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with target.open("wb", buffering=0) as f:
        while n := resp.readinto(view):
            f.write(view[:n])
            received += n
    conn.close()
    return received


def copy(source: Path, target: Path, fsync: bool) -> None:
    shutil.copyfile(source, target)
    if fsync:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def mibps(size: int, times: list[float]) -> float:
    return size * len(times) / sum(times) / MIB


def timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run(daemon: Daemon, work: Path, sizes: list[tuple[int, int]]) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    base = daemon.url
    signup = api(
        base,
        "POST",
        "/auth/signup",
        {"email": f"bench-{uuid.uuid4().hex[:8]}@example.org", "password": "bench password 123"},
    )
    token = signup["accessToken"]
    idle_rss = proc_kib(pid, "VmRSS")
    hwm_before = proc_kib(pid, "VmHWM")
    print(
        f"vibed pid {pid}, after start and one signup: VmRSS {idle_rss / 1024:.1f} MiB, "
        f"VmHWM {hwm_before / 1024:.1f} MiB (Argon2id's 64 MiB)"
    )
    header = (
        f"{'object':>8} {'n':>3} {'upload MiB/s':>13} {'download MiB/s':>15} "
        f"{'copy MiB/s':>11} {'copy+fsync':>11} {'up/copy+fsync':>14} {'down/copy':>10} "
        f"{'RSS before':>11} {'RSS peak':>9} {'client':>7}"
    )
    rows = []
    for size, count in sizes:
        source = work / f"source-{size}"
        with source.open("wb") as f:
            left = size
            while left:
                n = min(CHUNK, left)
                f.write(os.urandom(n))
                left -= n
        ups, downs, copies, synced = [], [], [], []
        before = proc_kib(pid, "VmRSS")
        with RssSampler(pid) as rss:
            for i in range(count):
                upload = api(
                    base,
                    "POST",
                    "/blob/upload-url",
                    {"mime": "application/octet-stream", "size": size},
                    token,
                )
                headers = {k: v for k, v in upload["headers"].items()}
                ups.append(timed(put_file, upload["url"], headers, source))
                api(base, "POST", "/blob/finalize-upload", {"id": upload["id"]}, token)
                location = download_location(base, token, upload["id"])
                target = work / f"download-{size}-{i}"
                downs.append(timed(get_file, location, target, size))
                if target.stat().st_size != size:
                    raise RuntimeError("downloaded size differs")
                target.unlink()
                api(base, "DELETE", f"/blob/{upload['id']}", None, token)
        for i in range(count):
            target = work / f"copy-{size}-{i}"
            copies.append(timed(copy, source, target, False))
            target.unlink()
            synced.append(timed(copy, source, target, True))
            target.unlink()
        source.unlink()

        rows.append(
            (
                size,
                count,
                mibps(size, ups),
                mibps(size, downs),
                mibps(size, copies),
                mibps(size, synced),
                before,
                rss.peak,
            )
        )
    print(header)
    for size, count, up, down, cp, cps, before, peak in rows:
        label = f"{size / MIB:.0f} MiB"
        client = "curl" if use_curl(size) else "python"
        print(
            f"{label:>8} {count:>3} {up:13.1f} {down:15.1f} {cp:11.1f} {cps:11.1f} "
            f"{up / cps:14.2f} {down / cp:10.2f} {before / 1024:9.1f}Mi {peak / 1024:7.1f}Mi "
            f"{client:>7}"
        )
    hwm_after = proc_kib(pid, "VmHWM")
    print(
        f"vibed VmHWM after all transfers: {hwm_after / 1024:.1f} MiB "
        f"({(hwm_after - hwm_before) / 1024:+.1f} MiB over the transfers)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--big-count", type=int, default=2)
    parser.add_argument("--small-count", type=int, default=20)
    add_engine_arguments(parser)
    ns = parser.parse_args()
    if ns.cpus == "both":
        parser.error("--cpus both: run shared and pinned one after the other")
    big = ns.big_mib * MIB
    engine = Engine(ns.couchdb, ns.erl_flags).start()
    daemon = Daemon("--blob-max-size", str(big), "--blob-quota", "0", "--couchdb", engine.url)
    daemon.args += ["--public-url", daemon.url]
    daemon.start()
    if ns.cpus == "pinned":
        pin(daemon.pid, "0")
        pin(engine.pid, "1")
    print(f"{engine.name} behind vibed (blob metadata), cpus {ns.cpus}")
    try:
        work = Path(daemon.tmp.name) / "bench"
        work.mkdir()
        v0, c0 = cpu_seconds(daemon.pid), cpu_seconds(engine.pid)
        run(daemon, work, [(MIB, ns.small_count), (big, ns.big_count)])
        print(
            f"CPU over the run: vibed {cpu_seconds(daemon.pid) - v0:.2f} s, "
            f"CouchDB {cpu_seconds(engine.pid) - c0:.2f} s"
        )
    finally:
        daemon.stop()
        engine.stop()


if __name__ == "__main__":
    main()
