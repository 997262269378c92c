"""Realtime benchmark: many WebSocket subscribers over many identities against a real
`twistd vibed`, while documents are written through the data API at a steady rate.

    .venv/bin/python bench/realtime.py [--couchdb pouchdb|shared|URL] [--cpus shared|pinned]
                                       [--sockets 1000,5000] [--identities 100]
                                       [--rate 50] [--seconds 20] [--clients 2] [--workers N]

The engine (``--couchdb``, as in bench/data.py: a PouchDB Server of its own by default,
``shared`` for an Apache CouchDB 3.5 of its own, or a URL) runs for the whole run. For each
socket count: a fresh daemon (``--workers`` processes), ``--identities`` signups, the sockets
spread evenly over the identities (each subscribed to ``notes``) by ``--clients`` client
processes (so the clients do not starve the daemon of the reactor they would share), then
``--rate`` writes per second (``PUT /data/notes/<id>``, identities in turn) for ``--seconds``.
Printed per case: write acknowledgement latency (p50/p99), latency from the write's
acknowledgement (the 201) to the change's arrival on each subscribed socket (p50/p99/max),
events lost and repeated (both must be 0), the daemon's RSS before and after the sockets
connected (and per socket), and the CPU vibed and CouchDB spent per write.
``--sockets 1000 --identities 1`` is the one-busy-identity case; ``--idle`` only connects
and authenticates the sockets (no subscription, no writes) and reports memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    Daemon,
    Engine,
    add_engine_arguments,
    cpu_seconds,
    percentile,
    pin,
    vibed_env,
)

PASSWORD = "bench password 123"
COLLECTION = "notes"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- worker: a process holding a share of the sockets ------------------------------------


def worker_main() -> None:
    """Read {url, sockets: [[socket_no, token], ...]} on stdin; print "ready" once every
    socket is subscribed; on "stop" print the arrivals as JSON and exit."""
    raise_fd_limit()
    job = json.loads(sys.stdin.readline())
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
    from twisted.protocols.basic import LineReceiver

    arrivals: dict[str, list[tuple[int, float, str]]] = {}  # doc id -> [(socket, t, seq)]
    problems: list[str] = []

    class Client(WebSocketClientProtocol):
        number = -1
        token = ""
        ready: Deferred[None]

        def onOpen(self) -> None:  # noqa: N802
            self.sendMessage(json.dumps({"type": "auth", "token": self.token}).encode())
            if subscribe:
                message = {"type": "subscribe", "collection": COLLECTION}
                self.sendMessage(json.dumps(message).encode())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            now = time.time()
            message = json.loads(payload)
            kind = message.get("type")
            if kind == "change":
                arrivals.setdefault(message["id"], []).append((self.number, now, message["seq"]))
            elif kind == "subscribed" or (kind == "authenticated" and not subscribe):
                if not self.ready.called:
                    self.ready.callback(None)
            elif kind == "error":
                problems.append(f"socket {self.number}: {message}")

        def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802, N803
            if not stopping:
                problems.append(f"socket {self.number} closed: {code} {reason}")
            if not self.ready.called:
                self.ready.errback(ConnectionError(f"socket {self.number}: {code} {reason}"))

    stopping = False
    subscribe = job.get("subscribe", True)
    clients: list[Client] = []
    host, port = job["host"], job["port"]

    class Factory(WebSocketClientFactory):
        def __init__(self, number: int, token: str, ready: Deferred[None]) -> None:
            super().__init__(f"ws://{host}:{port}/realtime")
            self.number, self.token, self.ready = number, token, ready
            # The clients must not be the bottleneck: no UTF-8 check of what vibed sends.
            self.setProtocolOptions(
                openHandshakeTimeout=60, autoPingInterval=0, utf8validateIncoming=False
            )

        def buildProtocol(self, addr: Any) -> Client:  # noqa: N802
            proto = Client()
            proto.factory = self
            proto.number, proto.token, proto.ready = self.number, self.token, self.ready
            clients.append(proto)
            return proto

    async def open_one(number: int, token: str) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint

        ready: Deferred[None] = Deferred()
        factory = Factory(number, token, ready)

        await TCP4ClientEndpoint(reactor, host, port, timeout=60).connect(factory)
        await ready

    async def open_all() -> None:
        sem = DeferredSemaphore(64)
        await gatherResults(
            [sem.run(open_one, number, token) for number, token in job["sockets"]],
            consumeErrors=True,
        )
        say(b"ready")

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:  # noqa: N802
            nonlocal stopping
            if line.strip() == b"stop":
                stopping = True
                # stdout is non-blocking under StandardIO: the results go to a file.
                with open(job["out"], "w") as out:
                    json.dump({"arrivals": arrivals, "problems": problems}, out)
                say(b"done")
                for client in clients:
                    client.dropConnection(abort=True)
                reactor.callLater(0.5, reactor.stop)

    def failed(failure: Any) -> None:
        say(b"failed " + failure.getErrorMessage().encode())
        reactor.callLater(0.5, reactor.stop)

    def say(line: bytes) -> None:
        transport: Any = control.transport
        transport.write(line + b"\n")

    control = Control()
    stdio.StandardIO(control)
    Deferred.fromCoroutine(open_all()).addErrback(failed)
    reactor.run()


# -- orchestrator --------------------------------------------------------------------------


def signup_all(base: str, count: int) -> list[tuple[str, str]]:
    """(idn, access token) of ``count`` new identities, signed up through the API."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    run = uuid.uuid4().hex[:8]

    def one(i: int) -> tuple[str, str]:
        body = json.dumps({"email": f"rt-{run}-{i}@example.org", "password": PASSWORD})
        req = urllib.request.Request(
            base + "/auth/signup",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.load(resp)
        return answer["identity"]["id"], answer["accessToken"]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def run_case(args: argparse.Namespace, engine: Engine, sockets: int) -> dict[str, Any]:
    extra = ["--couchdb", engine.url, *shlex.split(args.vibed_args)]
    if args.workers:
        extra += ["--workers", str(args.workers)]
    daemon = Daemon(*extra, env=vibed_env(args)).start()
    assert daemon.proc is not None
    if args.cpus == "pinned":
        pin(daemon.pid, "0")
    workers: list[subprocess.Popen[str]] = []
    try:
        t0 = time.monotonic()
        identities = signup_all(daemon.url, args.identities)
        signup_s = time.monotonic() - t0
        # Warm the write path once per identity (first writes open files in PouchDB).
        writer_out = _writes(daemon.url, identities, [f"warm-{i}" for i in range(len(identities))])
        assert not writer_out["errors"], writer_out["errors"][:3]
        time.sleep(1.0)
        rss_before = daemon.rss_kib()

        assignments = [(n, n % len(identities)) for n in range(sockets)]
        shares: list[list[list[Any]]] = [[] for _ in range(args.clients)]
        for number, idx in assignments:
            shares[number % args.clients].append([number, identities[idx][1]])
        t0 = time.monotonic()
        for share in shares:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None
            out = Path(daemon.tmp.name) / f"worker-{len(workers)}.json"
            job = {
                "host": "127.0.0.1",
                "port": daemon.port,
                "sockets": share,
                "out": str(out),
                "subscribe": not args.idle,
            }
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            workers.append(proc)
        for proc in workers:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"worker: {line!r}")
        connect_s = time.monotonic() - t0
        time.sleep(2.0)
        rss_after = daemon.rss_kib()
        connections = couch_connections(daemon.proc.pid, engine)
        if args.idle:
            return {
                "sockets": sockets,
                "rss_before": rss_before,
                "rss_after": rss_after,
                "connect_s": connect_s,
            }

        count = int(args.rate * args.seconds)
        doc_ids = [f"d{k:06d}" for k in range(count)]
        cpu0, couch0, wall0 = cpu_seconds(daemon.pid), cpu_seconds(engine.pid), time.monotonic()
        writes = _writes(daemon.url, identities, doc_ids, rate=args.rate)
        time.sleep(args.drain)
        cpu_s, wall_s = cpu_seconds(daemon.pid) - cpu0, time.monotonic() - wall0
        couch_s = cpu_seconds(engine.pid) - couch0
        arrivals: dict[str, list[list[Any]]] = {}
        problems: list[str] = []
        for proc in workers:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            line = proc.stdout.readline().strip()
            if line != "done":
                raise RuntimeError(f"worker: {line!r}")
            index = workers.index(proc)
            result = json.loads((Path(daemon.tmp.name) / f"worker-{index}.json").read_text())
            for doc_id, hits in result["arrivals"].items():
                arrivals.setdefault(doc_id, []).extend(hits)
            problems.extend(result["problems"])
            proc.wait(timeout=30)
        return _figures(
            sockets,
            identities,
            assignments,
            writes,
            arrivals,
            problems,
            rss_before=rss_before,
            rss_after=rss_after,
            cpu_s=cpu_s,
            couch_s=couch_s,
            wall_s=wall_s,
            signup_s=signup_s,
            connect_s=connect_s,
            couch_connections=connections,
        )
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        daemon.stop()


def couch_connections(pid: int, engine: Engine) -> int:
    """Established TCP connections from the daemon (and its workers) to CouchDB (the shared
    feeds plus the request pools' connections)."""
    from urllib.parse import urlsplit

    from bench.common import descendants

    port = urlsplit(engine.url).port or 5984
    inodes = set()
    for p in descendants(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def _writes(
    base: str, identities: list[tuple[str, str]], doc_ids: list[str], rate: float = 0
) -> dict[str, Any]:
    """Write ``doc_ids`` (identities in turn) through the data API, at ``rate`` per second
    (0: as fast as 16 at a time go), in a child process of its own reactor; returns
    {acks: {doc id: [identity index, ack time]}, errors: [...], latencies: [...]}."""
    job = {"base": base, "tokens": [t for _, t in identities], "ids": doc_ids, "rate": rate}
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--writer"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def writer_main() -> None:
    job = json.loads(sys.stdin.read())
    import treq
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred, DeferredList
    from twisted.web.client import HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    acks: dict[str, list[Any]] = {}
    errors: list[str] = []
    latencies: list[float] = []
    tokens: list[str] = job["tokens"]

    async def write(k: int, doc_id: str) -> None:
        idx = k % len(tokens)
        headers: dict[bytes | str, bytes | str] = {
            "Authorization": f"Bearer {tokens[idx]}",
            "Content-Type": "application/json",
        }
        sent = time.time()
        try:
            resp = await treq.put(
                f"{job['base']}/data/{COLLECTION}/{doc_id}",
                data=json.dumps({"k": k, "sent": sent}).encode(),
                headers=headers,
                pool=pool,
            )
            await resp.content()
        except Exception as e:
            errors.append(f"{doc_id}: {e!r}")
            return
        now = time.time()
        if resp.code != 201:
            errors.append(f"{doc_id}: HTTP {resp.code}")
            return
        acks[doc_id] = [idx, now]
        latencies.append(now - sent)

    async def main() -> None:
        ids: list[str] = job["ids"]
        pending: list[Deferred[None]] = []
        if job["rate"]:
            interval = 1.0 / float(job["rate"])
            start = time.monotonic()
            for k, doc_id in enumerate(ids):
                delay = start + k * interval - time.monotonic()
                if delay > 0:
                    await task.deferLater(reactor, delay, lambda: None)
                pending.append(Deferred.fromCoroutine(write(k, doc_id)))
        else:
            from twisted.internet.defer import DeferredSemaphore

            sem = DeferredSemaphore(16)
            pending = [sem.run(write, k, doc_id) for k, doc_id in enumerate(ids)]
        await DeferredList(pending)
        await pool.closeCachedConnections()

    def done(_: object) -> None:
        sys.stdout.write(json.dumps({"acks": acks, "errors": errors, "latencies": latencies}))
        reactor.stop()

    Deferred.fromCoroutine(main()).addBoth(done)
    reactor.run()


def _figures(
    sockets: int,
    identities: list[tuple[str, str]],
    assignments: list[tuple[int, int]],
    writes: dict[str, Any],
    arrivals: dict[str, list[list[Any]]],
    problems: list[str],
    **extra: float,
) -> dict[str, Any]:
    subscribers: dict[int, list[int]] = {}
    for number, idx in assignments:
        subscribers.setdefault(idx, []).append(number)
    latencies: list[float] = []
    expected = lost = repeated = 0
    for doc_id, (idx, acked) in writes["acks"].items():
        hits = arrivals.get(doc_id, [])
        by_socket: dict[int, int] = {}
        for number, received, _seq in hits:
            by_socket[number] = by_socket.get(number, 0) + 1
            latencies.append(received - acked)
        for number in subscribers.get(idx, []):
            expected += 1
            got = by_socket.get(number, 0)
            lost += got == 0
            repeated += max(0, got - 1)
    stray = sum(
        1
        for doc_id, hits in arrivals.items()
        if doc_id in writes["acks"]
        for number, _t, _s in hits
        if number not in subscribers.get(writes["acks"][doc_id][0], [])
    )
    return {
        "sockets": sockets,
        "identities": len(identities),
        "writes": len(writes["acks"]),
        "write_errors": len(writes["errors"]),
        "write_p50_ms": percentile(writes["latencies"], 50) * 1000,
        "write_p99_ms": percentile(writes["latencies"], 99) * 1000,
        "expected": expected,
        "delivered": len(latencies),
        "lost": lost,
        "repeated": repeated,
        "stray": stray,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "problems": problems[:5],
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", default="1000,5000")
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0, help="writes per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--workers", type=int, default=0, help="vibed --workers (0: not set)")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds after the writes")
    parser.add_argument("--idle", action="store_true", help="connect and authenticate only")
    add_engine_arguments(parser)
    args = parser.parse_args()
    if args.cpus == "both":
        parser.error("--cpus both: run shared and pinned one after the other")
    limit = raise_fd_limit()
    cases = [int(s) for s in args.sockets.split(",") if s]
    if max(cases) + 1000 > limit:
        print(f"warning: RLIMIT_NOFILE is {limit}; {max(cases)} sockets may not fit")
    engine = Engine(args.couchdb).start()
    if args.cpus == "pinned":
        pin(engine.pid, "1")
    load = os.getloadavg()[0]
    try:
        rows = [run_case(args, engine, n) for n in cases]
    finally:
        engine.stop()
    print()
    if args.idle:
        print(f"realtime, idle: {engine.name}; sockets authenticated, not subscribed")
        print(
            f"{'sockets':>8} {'RSS before':>11} {'RSS after':>10} {'KiB/socket':>10} "
            f"{'connect s':>9}"
        )
        for r in rows:
            per_socket = (r["rss_after"] - r["rss_before"]) / r["sockets"]
            print(
                f"{r['sockets']:>8} {r['rss_before'] / 1024:>7.1f} MiB "
                f"{r['rss_after'] / 1024:>6.1f} MiB "
                f"{per_socket:>10.1f} {r['connect_s']:>9.1f}"
            )
        return
    print(
        f"realtime on {engine.name}, cpus {args.cpus}: {args.identities} identities, "
        f"{args.rate:g} writes/s for {args.seconds:g} s through PUT /data/{COLLECTION}/<id>, "
        f"{args.clients} client processes, vibed --workers {args.workers or 1}; load average "
        f"{load:.2f} at the start"
    )
    header = (
        f"{'sockets':>8} {'writes':>7} {'ack p99':>8} {'events':>8} {'lost':>5} {'dup':>4} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'RSS before':>11} {'RSS after':>10} "
        f"{'KiB/socket':>10} {'vibed ms/w':>10} {'couch ms/w':>10}"
    )
    print(header)
    for r in rows:
        per_socket = (r["rss_after"] - r["rss_before"]) / r["sockets"]
        print(
            f"{r['sockets']:>8} {r['writes']:>7} {r['write_p99_ms']:>8.1f} {r['delivered']:>8} "
            f"{r['lost']:>5} "
            f"{r['repeated']:>4} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} "
            f"{r['rss_before'] / 1024:>8.1f} MiB {r['rss_after'] / 1024:>6.1f} MiB "
            f"{per_socket:>10.1f} {1000 * r['cpu_s'] / max(r['writes'], 1):>10.2f} "
            f"{1000 * r['couch_s'] / max(r['writes'], 1):>10.2f}"
        )
    for r in rows:
        extra = []
        if r["write_errors"] or r["stray"] or r["problems"]:
            extra.append(
                f"write errors {r['write_errors']}, stray {r['stray']}, problems {r['problems']}"
            )
        print(
            f"  {r['sockets']} sockets: expected {r['expected']} deliveries; "
            f"write ack p50 {r['write_p50_ms']:.1f} ms; signups {r['signup_s']:.1f} s; "
            f"daemon->CouchDB connections with sockets up {r['couch_connections']:.0f}"
            + ("; " + "; ".join(extra) if extra else "")
        )
    if any(r["lost"] or r["repeated"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main()
    elif "--writer" in sys.argv:
        writer_main()
    else:
        main()
