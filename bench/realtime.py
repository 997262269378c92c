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
events lost and repeated (both must be 0), as a baseline the latency from the write's
sending to its row on CouchDB's own continuous ``_changes`` feed read straight (what any
realtime layer over CouchDB starts from), the daemon's RSS before and after the sockets
connected (and per socket), and the CPU vibed and CouchDB spent per write.
``--sockets 1000 --identities 1`` is the one-busy-identity case; ``--idle`` only connects
and authenticates the sockets (no subscription, no writes) and reports memory.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import re
import resource
import select
import shlex
import socket
import subprocess
import sys
import time
import uuid
from array import array
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
from bench.sched import add_nice_argument, renice  # noqa: E402

PASSWORD = "bench password 123"
COLLECTION = "notes"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- worker: a process holding a share of the sockets ------------------------------------

#: The start of every ``change`` message vibed sends (``realtime._encode``: compact JSON, keys
#: in this order): the document id is read from the bytes, no JSON parsing per message.
_CHANGE_RE = re.compile(rb'\{"type":"change","collection":"[^"]*","id":"([^"]*)"')


class _Socket:
    """One client WebSocket on a plain non-blocking socket (see worker_main)."""

    __slots__ = ("buf", "number", "open", "ready", "sock", "token")

    def __init__(self, number: int, token: str, sock: socket.socket) -> None:
        self.number = number
        self.token = token
        self.sock = sock
        self.buf = bytearray()
        self.open = False  # past the HTTP handshake
        self.ready = False  # subscribed (or authenticated, for --idle)


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client-to-server frame (RFC 6455 5.3) of a small payload."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        head = bytes([0x80 | opcode, 0x80 | len(payload)])
    else:
        head = bytes([0x80 | opcode, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    return head + mask + masked


def worker_main() -> None:
    """Read {host, port, sockets: [[socket_no, token], ...], out, subscribe} on stdin; print
    "ready" once every socket is subscribed; on "stop" write the arrivals and print "done".

    Lean on purpose, so that what is measured is vibed and not this client: plain
    non-blocking sockets and one epoll loop, no Twisted and no Autobahn. One ``recv`` per
    readable socket, frames sliced out of the bytes, a change's document id read with one
    regular expression (no JSON parsing), its arrival kept in flat arrays; vibed's pings
    answered. The token goes in the URL (``?access_token=``), the subscription follows the
    ``authenticated`` message."""
    raise_fd_limit()
    job = json.loads(sys.stdin.readline())
    host, port, subscribe = job["host"], job["port"], job.get("subscribe", True)
    epoll = select.epoll()
    by_fd: dict[int, _Socket] = {}
    waiting = list(reversed(job["sockets"]))  # not yet connecting
    connecting = 0
    not_ready = len(waiting)
    ids: dict[bytes, int] = {}  # doc id -> index into id_list
    id_list: list[str] = []
    arr_id, arr_socket, arr_time = array("i"), array("i"), array("d")
    problems: list[str] = []
    stopping = False
    control = bytearray()

    def start_more() -> None:
        nonlocal connecting
        while waiting and connecting < 64:
            number, token = waiting.pop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"socket {number}: connect failed")
            by_fd[sock.fileno()] = _Socket(number, token, sock)
            epoll.register(sock.fileno(), select.EPOLLOUT)
            connecting += 1

    def handshake(client: _Socket) -> None:
        err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            lost(client, f"connect failed: {os.strerror(err)}")
            return
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /realtime?access_token={client.token} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        client.sock.send(request.encode())
        epoll.modify(client.sock.fileno(), select.EPOLLIN)

    def became_ready(client: _Socket) -> None:
        nonlocal connecting, not_ready
        if not client.ready:
            client.ready = True
            connecting -= 1
            not_ready -= 1
            start_more()
            if not_ready == 0:
                say("ready")

    def on_text(client: _Socket, start: int, end: int, now: float) -> None:
        buf = client.buf
        change = _CHANGE_RE.match(buf, start, end)
        if change is not None:
            doc_id = bytes(change.group(1))
            index = ids.get(doc_id)
            if index is None:
                index = ids[doc_id] = len(id_list)
                id_list.append(doc_id.decode())
            arr_id.append(index)
            arr_socket.append(client.number)
            arr_time.append(now)
            return
        message = json.loads(bytes(buf[start:end]))
        kind = message.get("type")
        if kind == "authenticated":
            if subscribe:
                text = json.dumps({"type": "subscribe", "collection": COLLECTION}).encode()
                client.sock.send(_client_frame(0x1, text))
            else:
                became_ready(client)
        elif kind == "subscribed":
            became_ready(client)
        elif kind == "error":
            problems.append(f"socket {client.number}: {message}")

    def on_readable(client: _Socket) -> None:
        try:
            data = client.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            data, reason = b"", repr(e)
        else:
            reason = "connection closed"
        now = time.time()
        if not data:
            lost(client, reason)
            return
        buf = client.buf
        buf += data
        pos = 0
        if not client.open:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                status = bytes(buf[: buf.find(b"\r\n")]).decode(errors="replace")
                lost(client, f"handshake refused: {status}")
                return
            client.open = True
            pos = head_end + 4
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > size:
                break
            opcode = b0 & 0x0F
            if opcode == 0x1 and b0 & 0x80:
                on_text(client, pos + head, end, now)
            elif opcode == 0x9:  # ping: answer with the same payload
                client.sock.send(_client_frame(0xA, bytes(buf[pos + head : end])))
            elif opcode == 0x8:
                code = int.from_bytes(buf[pos + head : pos + head + 2], "big") if length else 0
                lost(client, f"closed by vibed: {code} {bytes(buf[pos + head + 2 : end])!r}")
                return
            elif opcode != 0xA:
                problems.append(f"socket {client.number}: unexpected frame {b0:#x}")
            pos = end
        del buf[:pos]

    def lost(client: _Socket, reason: str) -> None:
        fd = client.sock.fileno()
        epoll.unregister(fd)
        del by_fd[fd]
        client.sock.close()
        if not stopping:
            problems.append(f"socket {client.number}: {reason}")
        if not client.ready:
            say(f"failed socket {client.number}: {reason}")

    def say(line: str) -> None:
        os.write(1, (line + "\n").encode())

    def stop() -> None:
        nonlocal stopping
        stopping = True
        out = job["out"]
        with open(out + ".bin", "wb") as raw:
            arr_id.tofile(raw)
            arr_socket.tofile(raw)
            arr_time.tofile(raw)
        with open(out, "w") as meta:
            json.dump({"ids": id_list, "count": len(arr_id), "problems": problems}, meta)
        for client in list(by_fd.values()):
            client.sock.close()
        say("done")

    epoll.register(0, select.EPOLLIN)
    start_more()
    while not stopping:
        for fd, events in epoll.poll(1.0):
            if fd == 0:
                chunk = os.read(0, 4096)
                control.extend(chunk)
                if b"stop" in control or not chunk:
                    stop()
                    break
                continue
            client = by_fd.get(fd)
            if client is None:
                continue
            if events & select.EPOLLOUT and not client.open and not client.buf:
                handshake(client)
            elif events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                on_readable(client)


# -- the baseline: CouchDB's own continuous feed, read straight ------------------------------


def feed_main() -> None:
    """Follow CouchDB's continuous ``_changes`` (``include_docs``, as vibed's shared feed does)
    of each database in the job, one connection each, straight to the engine; print ``ready``
    once every feed answered, and on ``stop`` the time each document's first row arrived."""
    import http.client
    import threading
    from urllib.parse import unquote, urlsplit

    job = json.loads(sys.stdin.readline())
    url = urlsplit(job["url"])
    headers = {}
    if url.username is not None:  # an engine with admins (Apache CouchDB, a URL's)
        auth = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(auth).decode()
    seen: dict[str, float] = {}
    answered = threading.Semaphore(0)
    refused: list[str] = []

    def follow(db: str) -> None:
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 5984)
        conn.request(
            "GET",
            f"/{db}/_changes?feed=continuous&since=now&include_docs=true&heartbeat=5000",
            headers=headers,
        )
        resp = conn.getresponse()
        if resp.status != 200:
            refused.append(f"{db}: HTTP {resp.status} {resp.read(200)!r}")
        answered.release()
        for line in resp:
            if line.strip():
                doc_id = str(json.loads(line).get("id", ""))
                seen.setdefault(doc_id.split(":", 1)[-1], time.time())

    for db in job["dbs"]:
        threading.Thread(target=follow, args=(db,), daemon=True).start()
    for _ in job["dbs"]:
        answered.acquire()
    print(f"refused: {refused}" if refused else "ready", flush=True)
    sys.stdin.readline()  # "stop"
    print(json.dumps(dict(seen)), flush=True)
    os._exit(0)


def start_feed(args: argparse.Namespace, engine: Engine, idns: list[str]) -> subprocess.Popen[str]:
    from vibed.naming import identity_db

    proc = subprocess.Popen(
        [*_away_from_vibed(args), sys.executable, os.path.abspath(__file__), "--feed"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    dbs = sorted({identity_db(idn, "data") for idn in idns})
    proc.stdin.write(json.dumps({"url": engine.url, "dbs": dbs}) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"the direct feed did not start: {line}")
    return proc


def stop_feed(proc: subprocess.Popen[str]) -> dict[str, float]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    seen: dict[str, float] = json.loads(proc.stdout.readline())
    proc.wait(timeout=30)
    return seen


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
    # Every client socket comes from 127.0.0.1: lift the per-address connection cap.
    extra = ["--couchdb", engine.url, "--max-connections-per-address", str(sockets + 1000)]
    extra += shlex.split(args.vibed_args)
    if args.workers:
        extra += ["--workers", str(args.workers)]
    daemon = Daemon(*extra, env=vibed_env(args)).start()
    assert daemon.proc is not None
    if args.cpus == "pinned":
        pin(daemon.pid, "0")
    renice(daemon.pid, args.nice)
    workers: list[subprocess.Popen[str]] = []
    feed: subprocess.Popen[str] | None = None
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
                [*_away_from_vibed(args), sys.executable, os.path.abspath(__file__), "--worker"],
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
        spy = None
        if args.profile:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                 str(daemon.pid), "--format", "raw", "--output", f"{args.profile}-{sockets}.txt",
                 "--nonblocking", "--gil", "--duration", str(max(1, round(args.seconds)))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        feed = start_feed(args, engine, [idn for idn, _ in identities])
        clients0 = sum(cpu_seconds(proc.pid) for proc in workers)
        cpu0, couch0, wall0 = cpu_seconds(daemon.pid), cpu_seconds(engine.pid), time.monotonic()
        writes = _writes(
            daemon.url, identities, doc_ids, rate=args.rate, prefix=_away_from_vibed(args)
        )
        time.sleep(args.drain)
        direct_seen = stop_feed(feed)
        if spy is not None:
            spy.wait()
        cpu_s, wall_s = cpu_seconds(daemon.pid) - cpu0, time.monotonic() - wall0
        couch_s = cpu_seconds(engine.pid) - couch0
        clients_s = sum(cpu_seconds(proc.pid) for proc in workers) - clients0
        arrivals: dict[str, list[tuple[int, float]]] = {}
        problems: list[str] = []
        for proc in workers:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            line = proc.stdout.readline().strip()
            if line != "done":
                raise RuntimeError(f"worker: {line!r}")
            out = Path(daemon.tmp.name) / f"worker-{workers.index(proc)}.json"
            result = json.loads(out.read_text())
            count = result["count"]
            id_index, numbers, times = array("i"), array("i"), array("d")
            with open(str(out) + ".bin", "rb") as raw:
                for column in (id_index, numbers, times):
                    column.fromfile(raw, count)
            doc_ids = result["ids"]
            for k in range(count):
                arrivals.setdefault(doc_ids[id_index[k]], []).append((numbers[k], times[k]))
            problems.extend(result["problems"])
            proc.wait(timeout=30)
        return _figures(
            sockets,
            identities,
            assignments,
            writes,
            arrivals,
            problems,
            direct_seen,
            rss_before=rss_before,
            rss_after=rss_after,
            cpu_s=cpu_s,
            couch_s=couch_s,
            clients_s=clients_s,
            wall_s=wall_s,
            signup_s=signup_s,
            connect_s=connect_s,
            couch_connections=connections,
        )
    finally:
        for proc in [*workers, *([feed] if feed is not None else [])]:
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


def _away_from_vibed(args: argparse.Namespace) -> list[str]:
    """The command prefix of a client process: off vibed's CPU when pinned, at ``--nice``."""
    prefix = ["taskset", "-c", "1"] if args.cpus == "pinned" else []
    return [*prefix, "nice", "-n", str(args.nice)] if args.nice else prefix


def _writes(
    base: str,
    identities: list[tuple[str, str]],
    doc_ids: list[str],
    rate: float = 0,
    prefix: list[str] | None = None,
) -> dict[str, Any]:
    """Write ``doc_ids`` (identities in turn) through the data API, at ``rate`` per second
    (0: as fast as 16 at a time go), in a child process of its own reactor; returns
    {acks: {doc id: [identity index, ack time]}, errors: [...], latencies: [...]}."""
    job = {"base": base, "tokens": [t for _, t in identities], "ids": doc_ids, "rate": rate}
    out = subprocess.run(
        [*(prefix or []), sys.executable, os.path.abspath(__file__), "--writer"],
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
        acks[doc_id] = [idx, now, sent]
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
    arrivals: dict[str, list[tuple[int, float]]],
    problems: list[str],
    direct_seen: dict[str, float],
    **extra: float,
) -> dict[str, Any]:
    subscribers: dict[int, list[int]] = {}
    for number, idx in assignments:
        subscribers.setdefault(idx, []).append(number)
    latencies: list[float] = []
    expected = lost = repeated = 0
    from_send: list[float] = []
    for doc_id, (idx, acked, sent) in writes["acks"].items():
        hits = arrivals.get(doc_id, [])
        by_socket: dict[int, int] = {}
        for number, received in hits:
            by_socket[number] = by_socket.get(number, 0) + 1
            latencies.append(received - acked)
            from_send.append(received - sent)
        for number in subscribers.get(idx, []):
            expected += 1
            got = by_socket.get(number, 0)
            lost += got == 0
            repeated += max(0, got - 1)
    # The baseline: the same writes' rows on CouchDB's own continuous feed, read straight.
    direct = [
        direct_seen[doc_id] - sent
        for doc_id, (_idx, _acked, sent) in writes["acks"].items()
        if doc_id in direct_seen
    ]
    stray = sum(
        1
        for doc_id, hits in arrivals.items()
        if doc_id in writes["acks"]
        for number, _t in hits
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
        "sent_p50_ms": percentile(from_send, 50) * 1000,
        "sent_p99_ms": percentile(from_send, 99) * 1000,
        "direct_p50_ms": percentile(direct, 50) * 1000,
        "direct_p99_ms": percentile(direct, 99) * 1000,
        "direct_missing": len(writes["acks"]) - len(direct),
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
    parser.add_argument(
        "--profile",
        help="a file prefix: py-spy samples vibed during the writes into PREFIX-<sockets>.txt "
        "(collapsed stacks; summarize with bench/profile.py)",
    )
    add_nice_argument(parser)
    add_engine_arguments(parser)
    args = parser.parse_args()
    if args.cpus == "both":
        parser.error("--cpus both: run shared and pinned one after the other")
    limit = raise_fd_limit()
    cases = [int(s) for s in args.sockets.split(",") if s]
    if max(cases) + 1000 > limit:
        print(f"warning: RLIMIT_NOFILE is {limit}; {max(cases)} sockets may not fit")
    engine = Engine(args.couchdb, args.erl_flags).start()
    if args.cpus == "pinned":
        pin(engine.pid, "1")
    renice(engine.pid, args.nice)
    renice(os.getpid(), args.nice)  # this run's session: the clients and the writer too
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
        f"{args.clients} client processes, vibed --workers {args.workers or 1}, nice "
        f"{args.nice}; load average "
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
            f"write ack p50 {r['write_p50_ms']:.1f} ms; from the write's sending to the "
            f"event p50 {r['sent_p50_ms']:.1f} ms, p99 {r['sent_p99_ms']:.1f} ms (the same rows "
            f"on CouchDB's own continuous feed, read straight: p50 {r['direct_p50_ms']:.1f} ms, "
            f"p99 {r['direct_p99_ms']:.1f} ms, {r['direct_missing']:.0f} missing); "
            f"signups {r['signup_s']:.1f} s; CPU during the writes: vibed "
            f"{100 * r['cpu_s'] / r['wall_s']:.0f} %, "
            f"CouchDB {100 * r['couch_s'] / r['wall_s']:.0f} %, "
            f"the client processes {100 * r['clients_s'] / r['wall_s']:.0f} % (of one core); "
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
    elif "--feed" in sys.argv:
        feed_main()
    else:
        main()
