"""Data API benchmark: create, get-by-id, list and query through a real `twistd vibed`, next to
the same requests sent straight to the CouchDB-protocol server it uses, in the same run.

    .venv/bin/python bench/data.py [--couchdb pouchdb|shared|URL] [--cpus shared|pinned|both]
                                   [--workers N] [--seconds 5] [--concurrency 32]

The engine (``--couchdb``: a PouchDB Server of its own by default, ``shared`` for an Apache
CouchDB 3.5 of its own from ``../shared/tools/couchdb``, or any CouchDB URL) and vibed
(``twistd vibed --couchdb <that server>``) run as separate processes; one identity signs up;
its collection ``bench`` is seeded straight in CouchDB and gets the indexes an app would
declare (``group``, ``n``). wrk (``apt-get install wrk``) then drives each operation for
``--seconds`` at ``--concurrency`` keep-alive connections, through vibed and direct. "direct"
sends exactly what vibed sends: the same stored ``_id`` (``bench:<id>``), the same
``_all_docs`` key range, the same ``_find`` body.

Printed per operation: requests per second and latency (p50/p99) both ways, the ratio, and the
CPU each process spent per request (its user+system CPU seconds over the run / requests):
vibed's own, CouchDB's when reached through vibed, CouchDB's when reached directly. With
``--cpus pinned`` vibed (and its workers) runs on CPU 0 and CouchDB on CPU 1 (taskset), so the
proxy's own cost shows apart from the competition for cores; wrk is not pinned.

Operations: ``get`` one document by id; ``create`` one document (POST; direct: PUT with a new
id); ``list`` 25 documents (``_all_docs`` over the collection's key range); ``query`` 25 by a
field with its index declared (``{"group": k}``); ``sorted`` the same sorted by ``n``; ``floor``
the yardstick, a bare twisted.web site answering fixed bytes (bench/cost.py's) on vibed's CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attrs import define  # noqa: E402

from bench.common import (  # noqa: E402
    Daemon,
    Engine,
    Request,
    WrkResult,
    add_engine_arguments,
    cpu_seconds,
    free_port,
    pin,
    vibed_env,
    wrk,
)
from bench.sched import add_nice_argument, renice  # noqa: E402
from vibed import layout  # noqa: E402
from vibed.data import parse_selector, parse_sort, plan_find  # noqa: E402
from vibed.naming import identity_db  # noqa: E402

COLLECTION = "bench"
GROUPS = 40  # {"group": k} matches seed_docs / GROUPS documents


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    with urllib.request.urlopen(request, timeout=600) as r:
        content = r.read()
    return json.loads(content) if content else None


def vibed_find_body(
    selector: dict[str, Any], sort: list[str] | None, indexes: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``_find`` body vibed sends for ``q=selector`` (and ``sort``): its own planner's."""
    checked = parse_selector(json.dumps(selector), COLLECTION)
    order = parse_sort(json.dumps(sort)) if sort else None
    index = None
    if order is not None:
        index = next(i for i in indexes if i["fields"][: len(order.fields)] == list(order.fields))
    return plan_find(COLLECTION, checked, order, index).body(25)


def measure(
    base: str,
    requests: list[Request],
    args: argparse.Namespace,
    daemon_pid: int | None,
    engine_pid: int | None,
    profile: Path | None = None,
) -> tuple[WrkResult, float, float]:
    """One wrk run; (its result, vibed CPU s/request, CouchDB CPU s/request). With
    ``profile``, py-spy samples vibed meanwhile into that file (collapsed stacks)."""
    spy = None
    if profile is not None and daemon_pid is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(daemon_pid),
             "--format", "raw", "--output", str(profile), "--nonblocking", "--gil",
             "--duration", str(max(1, round(args.seconds)))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    v0, c0 = cpu_seconds(daemon_pid), cpu_seconds(engine_pid)
    result = wrk(base, requests, seconds=args.seconds, connections=args.concurrency)
    v1, c1 = cpu_seconds(daemon_pid), cpu_seconds(engine_pid)
    if spy is not None:
        spy.wait()
    n = max(result.requests, 1)
    return result, (v1 - v0) / n, (c1 - c0) / n


def _pooled(
    rounds: list[tuple[WrkResult, float, float, WrkResult, float]],
) -> tuple[WrkResult, float, float, WrkResult, float]:
    """Several alternating rounds as one: requests and seconds added up, CPU per request over
    all of them, latency percentiles the median of the rounds'."""

    def pool(results: list[WrkResult]) -> WrkResult:
        return WrkResult(
            requests=sum(r.requests for r in results),
            seconds=sum(r.seconds for r in results),
            p50=statistics.median(r.p50 for r in results),
            p99=statistics.median(r.p99 for r in results),
            errors=sum(r.errors for r in results),
        )

    def per_request(results: list[WrkResult], cpu: list[float]) -> float:
        total = sum(c * max(r.requests, 1) for r, c in zip(results, cpu, strict=True))
        return total / max(sum(r.requests for r in results), 1)

    vs, ds = [r[0] for r in rounds], [r[3] for r in rounds]
    return (
        pool(vs),
        per_request(vs, [r[1] for r in rounds]),
        per_request(vs, [r[2] for r in rounds]),
        pool(ds),
        per_request(ds, [r[4] for r in rounds]),
    )


def main(args: argparse.Namespace) -> None:
    engine = Engine(args.couchdb, args.erl_flags).start()
    extra = ["--couchdb", engine.url, *shlex.split(args.vibed_args)]
    if args.workers:
        extra += ["--workers", str(args.workers)]
    daemon = Daemon(*extra, env=vibed_env(args)).start()
    for pid in (engine.pid, daemon.pid, os.getpid()):  # wrk runs in this one's session
        renice(pid, args.nice)
    try:
        run(daemon, engine, args)
    finally:
        daemon.stop()
        engine.stop()


@define
class Workload:
    """One identity's seeded collection and, per operation, the requests through vibed and
    the same requests straight to CouchDB."""

    idn: str
    couch: str  # CouchDB's URL without credentials
    ops: dict[str, tuple[list[Request], list[Request]]]


def prepare(daemon: Daemon, engine: Engine, seed_docs: int) -> Workload:
    """Sign up an identity, seed its collection straight in CouchDB, declare the indexes an
    app would (``group``, ``n``) and build every operation's requests."""
    base = daemon.url
    email = f"bench-{uuid.uuid4().hex[:8]}@example.org"
    signup = call("POST", base + "/auth/signup", {"email": email, "password": "x" * 16})
    idn, token = signup["identity"]["id"], signup["accessToken"]
    bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    basic = {"Content-Type": "application/json"}
    if engine.basic_auth():
        basic["Authorization"] = str(engine.basic_auth())
    couch = engine.bare_url()
    db_path = "/" + quote(identity_db(idn, "data"), safe="")
    data = f"/data/{COLLECTION}"

    seeded = [uuid.uuid4().hex for _ in range(seed_docs)]
    docs = [
        layout.to_storage(COLLECTION, doc_id, {"n": i, "group": i % GROUPS, "title": f"t{i}"})
        for i, doc_id in enumerate(seeded)
    ]
    for chunk in range(0, len(docs), 500):
        call(
            "POST",
            couch.rstrip("/") + db_path + "/_bulk_docs",
            {"docs": docs[chunk : chunk + 500]},
            basic,
        )
    for fields in (["group"], ["n"]):
        call("POST", base + data + "/_index", {"fields": fields}, bearer)
    start, end = layout.collection_range(COLLECTION)
    range_params = {"startkey": json.dumps(start), "endkey": json.dumps(end)}
    picks = [seeded[i * 7919 % len(seeded)] for i in range(min(1000, len(seeded)))]

    # CouchDB may list a just-declared index a moment late on a busy machine: wait for both.
    deadline = time.monotonic() + 30
    while True:
        indexes = call("GET", base + data + "/_index", headers=bearer)["indexes"]
        if {tuple(i["fields"]) for i in indexes} >= {("group",), ("n",)}:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the declared indexes are not listed: {indexes}")
        time.sleep(0.2)

    def find(selector: dict[str, Any], sort: list[str] | None = None) -> str:
        return json.dumps(vibed_find_body(selector, sort, indexes))

    body = json.dumps({"n": 1, "group": 1, "title": "new"})
    ops: dict[str, tuple[list[Request], list[Request]]] = {
        "get": (
            [("GET", f"{data}/{doc_id}", bearer, None) for doc_id in picks],
            [
                ("GET", f"{db_path}/{quote(f'{COLLECTION}:{doc_id}', safe='')}", basic, None)
                for doc_id in picks
            ],
        ),
        "list": (
            [("GET", f"{data}?limit=25", bearer, None)],
            [
                (
                    "GET",
                    f"{db_path}/_all_docs?"
                    + urlencode({**range_params, "include_docs": "true", "limit": "26"}),
                    basic,
                    None,
                )
            ],
        ),
        "query": (
            [
                ("GET", f"{data}?" + urlencode({"q": json.dumps({"group": k})}), bearer, None)
                for k in range(GROUPS)
            ],
            [("POST", f"{db_path}/_find", basic, find({"group": k})) for k in range(GROUPS)],
        ),
        "sorted": (
            [
                (
                    "GET",
                    f"{data}?" + urlencode({"q": json.dumps({"group": k}), "sort": '["n"]'}),
                    bearer,
                    None,
                )
                for k in range(GROUPS)
            ],
            [("POST", f"{db_path}/_find", basic, find({"group": k}, ["n"])) for k in range(GROUPS)],
        ),
        # Last, so the reads above see only the seeded documents.
        "create": (
            [("POST", data, bearer, body)],
            [("PUT", f"{db_path}/{COLLECTION}%3A{{n}}", basic, body)],
        ),
    }
    return Workload(idn, couch, ops)


def floor_row(mode: str, args: argparse.Namespace) -> None:
    """The yardstick: a bare twisted.web site answering fixed bytes (bench/cost.py's), under
    the same wrk load and on vibed's CPUs; its CPU per request is about as low as a Python
    HTTP server on twisted.web goes (one HTTP exchange, where a proxied request has two)."""
    from bench.cost import FLOOR_SITE

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vibed-floor-") as tmp:
        script = Path(tmp) / "floor_site.py"
        script.write_text(FLOOR_SITE)
        proc = subprocess.Popen(
            [sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            pin(proc.pid, "0" if mode == "pinned" else "0-1")
            base = f"http://127.0.0.1:{port}"
            bearer = {"Authorization": "Bearer " + "x" * 300}  # about a real token's size
            requests: list[Request] = [("GET", "/x", bearer, None)]
            wrk(base, requests, seconds=1, connections=args.concurrency)
            result, cpu, _ = measure(base, requests, args, proc.pid, None)
        finally:
            proc.terminate()
            proc.wait()
    print(
        f"{'floor':<7} {mode:<6} | {result.rate:8.0f} {result.p50 * 1e3:7.1f} "
        f"{result.p99 * 1e3:7.1f} | {'':>8} {'':>7} {'':>7} | {'':>5} | {cpu * 1e3:9.3f} "
        f"{'':>9} {'':>10} | {result.errors:>7}   (bare twisted.web, fixed bytes)",
        flush=True,
    )


def run(daemon: Daemon, engine: Engine, args: argparse.Namespace) -> None:
    base = daemon.url
    work = prepare(daemon, engine, args.seed_docs)
    idn, couch, ops = work.idn, work.couch, work.ops
    start, _ = layout.collection_range(COLLECTION)
    wanted = [name for name in args.ops.split(",") if name]

    modes = ["shared", "pinned"] if args.cpus == "both" else [args.cpus]
    print(
        f"{engine.name} behind vibed ({args.workers or 1} process"
        f"{'es' if (args.workers or 1) > 1 else ''}"
        f"{'; ' + args.vibed_args if args.vibed_args else ''}); "
        f"collection '{COLLECTION}' = key range "
        f"'{start}'..'{start}\\ufff0' of {identity_db(idn, 'data')}, {args.seed_docs} seeded "
        f"docs; wrk {args.concurrency} connections, {args.seconds:g} s per figure; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'op':<7} {'cpus':<6} | {'vibed/s':>8} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'direct/s':>8} {'p50 ms':>7} {'p99 ms':>7} | {'v/d':>5} | "
        f"{'vibed CPU':>9} {'couch CPU':>9} {'direct CPU':>10} | {'err v/d':>7}"
    )
    print(header)
    print(f"{'':<16}| {'':<24}| {'':<24}| {'':<6}| {'ms per request':^31} |")
    print("-" * len(header))
    for mode in modes:
        if mode == "pinned":
            pin(daemon.pid, "0")
            pin(engine.pid, "1")
        else:
            pin(daemon.pid, "0-1")
            pin(engine.pid, "0-1")
        for name in wanted:
            if name == "floor":
                floor_row(mode, args)
                continue
            through, straight = ops[name]
            wrk(base, through, seconds=1, connections=args.concurrency)  # warm up both paths
            wrk(couch, straight, seconds=1, connections=args.concurrency)
            profile = Path(args.profile) / f"{name}-{mode}.txt" if args.profile else None
            v, v_cpu, vc_cpu = measure(base, through, args, daemon.pid, engine.pid, profile)
            d, _, d_cpu = measure(couch, straight, args, None, engine.pid)
            if args.rounds > 1:  # alternate, so that a change of the machine's load hits both
                rounds = [(v, v_cpu, vc_cpu, d, d_cpu)]
                for _ in range(args.rounds - 1):
                    v, v_cpu, vc_cpu = measure(base, through, args, daemon.pid, engine.pid)
                    d, _, d_cpu = measure(couch, straight, args, None, engine.pid)
                    rounds.append((v, v_cpu, vc_cpu, d, d_cpu))
                v, v_cpu, vc_cpu, d, d_cpu = _pooled(rounds)
            print(
                f"{name:<7} {mode:<6} | {v.rate:8.0f} {v.p50 * 1e3:7.1f} {v.p99 * 1e3:7.1f} | "
                f"{d.rate:8.0f} {d.p50 * 1e3:7.1f} {d.p99 * 1e3:7.1f} | "
                f"{v.rate / d.rate:5.2f} | {v_cpu * 1e3:9.3f} {vc_cpu * 1e3:9.3f} "
                f"{d_cpu * 1e3:10.3f} | {f'{v.errors}/{d.errors}':>7}",
                flush=True,
            )
    pin(daemon.pid, "0-1")
    pin(engine.pid, "0-1")
    print(
        "v/d: vibed requests per second / direct. CPU: process CPU seconds during the run / "
        "requests (vibed: all its processes; couch: CouchDB while serving vibed; direct: "
        f"CouchDB serving the same requests straight). Finished at load average "
        f"{os.getloadavg()[0]:.2f}."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_engine_arguments(parser)
    add_nice_argument(parser)
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk duration per figure")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate vibed and direct this many times per figure and pool them",
    )
    parser.add_argument("--workers", type=int, default=0, help="vibed --workers (0: not set)")
    parser.add_argument("--seed-docs", type=int, default=1000, help="docs in the collection")
    parser.add_argument(
        "--ops", default="get,create,list,query,sorted", help="comma-separated operations"
    )
    parser.add_argument(
        "--profile",
        help="a directory: py-spy samples vibed during each vibed run (op-cpus.txt, collapsed "
        "stacks; summarize with bench/profile.py)",
    )
    main(parser.parse_args())
