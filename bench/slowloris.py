"""Slow clients from one address against a real vibed: how many sockets can it hold, and does
``/healthz`` (asked from another address) stay fast meanwhile?

The attack of the issue-7 review: N sockets each send a partial request line and then one byte
every 5 s; M more send a body at 1 byte/s. Run twice in one go: with vibed's defaults, and
with the limits effectively off (the behaviour before they existed), so the two columns come
from the same machine and the same load.

    .venv/bin/python bench/slowloris.py [--sockets 500] [--bodies 50] [--seconds 70]
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Daemon, free_port, percentile  # noqa: E402

OFF = [
    "--http-header-timeout",
    "1000000",
    "--http-body-timeout",
    "1000000",
    "--http-body-min-rate",
    "0",
    "--max-connections-per-address",
    "10000000",
]


def attack(url_port: int, sockets: int, bodies: int, seconds: float) -> dict[str, float]:
    sel = selectors.DefaultSelector()
    open_socks: list[socket.socket] = []
    refused = 0
    for i in range(sockets + bodies):
        s = socket.socket()
        s.setblocking(True)
        try:
            s.connect(("127.0.0.1", url_port))
        except OSError:
            refused += 1
            continue
        if i < sockets:
            s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        else:
            s.send(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        open_socks.append(s)
    alive = set(open_socks)
    latencies: list[float] = []
    start = time.monotonic()
    last_byte = {s: start for s in open_socks}
    next_probe = start
    peak = 0
    while time.monotonic() - start < seconds:
        peak = max(peak, len(alive))
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                alive.discard(s)
                s.close()
        now = time.monotonic()
        for i, s in enumerate(open_socks):
            if s not in alive:
                continue
            every = 5.0 if i < sockets else 1.0
            if now - last_byte[s] >= every:
                last_byte[s] = now
                try:
                    s.send(b"a")
                except OSError:
                    alive.discard(s)
        if now >= next_probe:
            next_probe = now + 0.5
            probe = socket.socket()
            probe.bind(("127.0.0.2", 0))  # another address: not capped by the attacker's share
            t0 = time.monotonic()
            try:
                probe.settimeout(10)
                probe.connect(("127.0.0.1", url_port))
                probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := probe.recv(4096):
                    answer += chunk
                if b" 200 " in answer.split(b"\r\n", 1)[0]:
                    latencies.append((time.monotonic() - t0) * 1000)
            except OSError:
                pass
            finally:
                probe.close()
    held_heads = sum(1 for i, s in enumerate(open_socks) if s in alive and i < sockets)
    held_bodies = sum(1 for i, s in enumerate(open_socks) if s in alive and i >= sockets)
    for s in alive:
        s.close()
    return {
        "peak": peak,
        "held_heads": held_heads,
        "held_bodies": held_bodies,
        "refused_at_connect": refused,
        "healthz_p50": percentile(latencies, 50),
        "healthz_p99": percentile(latencies, 99),
        "healthz_n": len(latencies),
    }


def run(extra: list[str], args: argparse.Namespace) -> dict[str, float]:
    daemon = Daemon(*extra)
    port = free_port()
    # Listen on every loopback address, so the probe can come from 127.0.0.2.
    index = daemon.args.index("--port")
    daemon.args[index + 1] = f"tcp:{port}:interface=0.0.0.0"
    daemon.port, daemon.url = port, f"http://127.0.0.1:{port}"
    daemon.start()
    try:
        with urllib.request.urlopen(daemon.url + "/healthz", timeout=5):
            pass
        return attack(port, args.sockets, args.bodies, args.seconds)
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sockets", type=int, default=500, help="slow request heads")
    parser.add_argument("--bodies", type=int, default=50, help="bodies at 1 byte/s")
    parser.add_argument("--seconds", type=float, default=70)
    args = parser.parse_args()
    results = {"defaults": run([], args), "limits off": run(OFF, args)}
    print(
        f"{args.sockets} heads at 1 byte/5 s and {args.bodies} bodies at 1 byte/s from "
        f"127.0.0.1, for {args.seconds:g} s; /healthz probed from 127.0.0.2 every 0.5 s"
    )
    print(
        f"{'vibed':<12}{'peak open':>10}{'heads held':>12}{'bodies held':>13}{'refused':>9}"
        f"{'healthz p50 ms':>16}{'p99 ms':>9}{'probes':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<12}{r['peak']:>10}{r['held_heads']:>12}{r['held_bodies']:>13}{r['refused_at_connect']:>9}"
            f"{r['healthz_p50']:>16.1f}{r['healthz_p99']:>9.1f}{r['healthz_n']:>8}"
        )


if __name__ == "__main__":
    main()
