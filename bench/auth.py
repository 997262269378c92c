"""Auth benchmark: signup and login through a real `twistd vibed` (embedded CouchDB), next to
the floor of the same machine (one bare Argon2id verify, one scrypt derivation), and the
reactor's lag (p99 of GET /healthz while a login burst runs).

    .venv/bin/python bench/auth.py [--scale 1.0] [--crypto-threads 2]
                                   [--couchdb pouchdb|shared|URL] [--cpus shared|pinned]

The engine is chosen as in bench/data.py. Each row also shows the CPU vibed (all its
processes) and CouchDB spent per request (process CPU seconds over the row / requests).

Prints one table; the ratios (vibed latency / floor) are what survive a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

import treq
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.client import HTTPConnectionPool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    Daemon,
    Engine,
    add_engine_arguments,
    cpu_seconds,
    fmt_ms,
    percentile,
    pin,
    run_load,
)
from vibed.keys import derive_wrap_key, hash_password, verify_password  # noqa: E402

PASSWORD = "bench password 123"


def floor(samples: int = 15) -> tuple[float, float]:
    """Median seconds of one Argon2id verify and one scrypt derivation, in this process."""
    pwd_hash = hash_password(PASSWORD)
    verifies, scrypts = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        verify_password(pwd_hash, PASSWORD)
        verifies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        derive_wrap_key(PASSWORD, os.urandom(16))
        scrypts.append(time.perf_counter() - t0)
    return percentile(verifies, 50), percentile(scrypts, 50)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    verify_s, scrypt_s = floor()
    print(
        f"floor: one Argon2id verify {fmt_ms(verify_s).strip()} ms, "
        f"one scrypt derivation {fmt_ms(scrypt_s).strip()} ms "
        f"(signup does one hash + one scrypt: ~{fmt_ms(verify_s + scrypt_s).strip()} ms)"
    )
    engine = Engine(args.couchdb, args.erl_flags).start()
    daemon = Daemon("--crypto-threads", str(args.crypto_threads), "--couchdb", engine.url).start()
    if args.cpus == "pinned":
        pin(daemon.pid, "0")
        pin(engine.pid, "1")
    print(f"{engine.name} behind vibed, cpus {args.cpus}")
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    try:
        await run(reactor, daemon.url, pool, args, verify_s, scrypt_s, (daemon.pid, engine.pid))
    finally:
        await pool.closeCachedConnections()
        daemon.stop()
        engine.stop()


async def post(pool: HTTPConnectionPool, url: str, body: dict[str, str]) -> None:
    headers: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}
    resp = await treq.post(url, data=json.dumps(body).encode(), headers=headers, pool=pool)
    await resp.content()
    if resp.code not in (200, 201):
        raise RuntimeError(f"{url}: {resp.code}")


async def run(
    reactor: Any,
    base: str,
    pool: HTTPConnectionPool,
    args: argparse.Namespace,
    verify_s: float,
    scrypt_s: float,
    pids: tuple[int | None, int | None],
) -> None:
    run_id = uuid.uuid4().hex[:8]
    emails: list[str] = []
    rows: list[tuple[str, int, int, float, list[float], int, float, float | None]] = []
    cpu: list[tuple[float, float]] = []
    header = (
        f"{'operation':<8} {'conc':>4} {'n':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6} {'p50/floor':>9} {'healthz p99 ms':>15} {'vibed CPU ms':>12} "
        f"{'couch CPU ms':>12}"
    )

    async def load(op: Any, n: int, concurrency: int) -> tuple[float, list[float], int]:
        v0, c0 = cpu_seconds(pids[0]), cpu_seconds(pids[1])
        result = await run_load(op, n, concurrency)
        cpu.append(((cpu_seconds(pids[0]) - v0) / n, (cpu_seconds(pids[1]) - c0) / n))
        return result

    for concurrency in (1, 8, 32):
        n = max(4, int(args.scale * {1: 8, 8: 32, 32: 64}[concurrency]))
        batch = [f"bench-{run_id}-{concurrency}-{i}@example.org" for i in range(n)]
        emails.extend(batch)

        async def signup(i: int, batch: list[str] = batch) -> None:
            await post(pool, base + "/auth/signup", {"email": batch[i], "password": PASSWORD})

        elapsed, lat, errors = await load(signup, n, concurrency)
        rows.append(
            (
                "signup",
                concurrency,
                n,
                n / elapsed,
                lat,
                errors,
                percentile(lat, 50) / (verify_s + scrypt_s),
                None,
            )
        )

    for concurrency in (1, 8, 32):
        n = max(4, int(args.scale * {1: 16, 8: 64, 32: 128}[concurrency]))

        async def login(i: int) -> None:
            await post(
                pool, base + "/auth/login", {"email": emails[i % len(emails)], "password": PASSWORD}
            )

        probe = HealthProbe(reactor, base)
        probe.start()
        elapsed, lat, errors = await load(login, n, concurrency)
        health = await probe.stop()
        rows.append(
            (
                "login",
                concurrency,
                n,
                n / elapsed,
                lat,
                errors,
                percentile(lat, 50) / verify_s,
                percentile(health, 99),
            )
        )

    print(header)
    for (op, conc, n, rps, lat, errors, ratio, health_p99), (v_cpu, c_cpu) in zip(
        rows, cpu, strict=True
    ):
        hp = fmt_ms(health_p99) if health_p99 is not None else "       -"
        print(
            f"{op:<8} {conc:>4} {n:>4} {rps:8.1f} {fmt_ms(percentile(lat, 50))} "
            f"{fmt_ms(percentile(lat, 99))} {errors:>6} {ratio:9.2f} {hp:>15} "
            f"{v_cpu * 1e3:12.2f} {c_cpu * 1e3:12.2f}"
        )
    print(
        f"crypto threads: {args.crypto_threads}; the floor is single-threaded, so at "
        f"concurrency >= threads the best possible login rate is about "
        f"{args.crypto_threads / verify_s:.1f}/s."
    )


class HealthProbe:
    """GET /healthz every 20 ms on its own connection; latencies show reactor lag."""

    def __init__(self, reactor: Any, base: str) -> None:
        self.reactor = reactor
        self.base = base
        self.latencies: list[float] = []
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self._running = False
        self._done: Deferred[None] | None = None

    def start(self) -> None:
        self._running = True
        self._done = ensureDeferred(self._loop())

    async def _loop(self) -> None:
        while self._running:
            t0 = time.perf_counter()
            resp = await treq.get(self.base + "/healthz", pool=self.pool)
            await resp.content()
            self.latencies.append(time.perf_counter() - t0)
            await task.deferLater(self.reactor, 0.02, lambda: None)

    async def stop(self) -> list[float]:
        self._running = False
        assert self._done is not None
        await self._done
        await self.pool.closeCachedConnections()
        return self.latencies


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--crypto-threads", type=int, default=2)
    add_engine_arguments(parser)
    ns = parser.parse_args()
    if ns.cpus == "both":
        parser.error("--cpus both: run shared and pinned one after the other")
    task.react(lambda reactor: ensureDeferred(main(reactor, ns)))
