"""Data API benchmark: create, get-by-id, list and query through a real `twistd vibed`, next to
the same requests sent straight to the CouchDB-protocol server it uses, in the same run.

    .venv/bin/python bench/data.py [--scale 1.0] [--seed-docs 1000]

A PouchDB Server (separate process, like the embedded one) and vibed (`twistd vibed --couchdb
<that server>`) are started; one identity signs up; its collection ``bench`` is seeded
straight in CouchDB. Each operation then runs at concurrency 1 and 32, through vibed and
direct. "direct" sends exactly what vibed sends: the same stored ``_id`` (``bench:<id>``), the
same ``_all_docs`` key range, the same ``$and`` selector. The ratios (vibed / direct) are the
proxy's cost and what survives a noisy machine.

Layout measured: a collection is the key range ``bench:`` .. ``bench:\\ufff0`` of the identity's
``db_<idn>_data``. ``list`` is ``_all_docs`` over that range (25 docs, no Mango); ``query`` is
``_find`` with ``{"group": k}`` ANDed with the range and the tag (25 of the seeded docs match,
no index: the server scans the collection); ``sorted`` adds ``sort: n`` served by a declared
index.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import treq
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.web.client import HTTPConnectionPool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, Daemon, fmt_ms, free_port, percentile, run_load  # noqa: E402
from vibed import layout  # noqa: E402
from vibed.naming import identity_db  # noqa: E402

COLLECTION = "bench"
GROUPS = 40  # {"group": k} matches seed_docs / GROUPS documents


class Pouch:
    """A PouchDB Server child process on a free port, in a temporary directory."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vibed-bench-pouch-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Pouch:
        exe = ROOT / "node_modules" / ".bin" / "pouchdb-server"
        data = Path(self.tmp.name)
        log = open(data / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(exe), "--port", str(self.port), "--host", "127.0.0.1", "--dir", str(data),
             "--config", str(data / "config.json"), "--no-stdout-logs"],
            stdout=log, stderr=subprocess.STDOUT, cwd=data, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    if json.load(r).get("version"):
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("pouchdb-server did not answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tmp.cleanup()


class Client:
    """JSON requests on one persistent pool; non-2xx answers raise."""

    def __init__(self, pool: HTTPConnectionPool, token: str | None = None) -> None:
        self.pool = pool
        self.headers: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    async def __call__(self, method: str, url: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        resp = await treq.request(method, url, data=data, headers=self.headers, pool=self.pool)
        content = await resp.content()
        if not 200 <= resp.code < 300:
            raise RuntimeError(f"{method} {url}: {resp.code} {content[:200]!r}")
        return json.loads(content) if content else None


Op = Callable[[int], Awaitable[Any]]


async def main(reactor: Any, args: argparse.Namespace) -> None:
    pouch = Pouch().start()
    daemon = Daemon("--couchdb", pouch.url).start()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    try:
        await run(daemon.url, pouch.url, pool, args)
    finally:
        await pool.closeCachedConnections()
        daemon.stop()
        pouch.stop()


async def run(base: str, couch: str, pool: HTTPConnectionPool, args: argparse.Namespace) -> None:
    anonymous = Client(pool)
    email = f"bench-{uuid.uuid4().hex[:8]}@example.org"
    signup = await anonymous("POST", base + "/auth/signup", {"email": email, "password": "x" * 16})
    idn, token = signup["identity"]["id"], signup["accessToken"]
    api, direct = Client(pool, token), Client(pool)
    db = couch + quote(identity_db(idn, "data"), safe="")
    data = f"{base}/data/{COLLECTION}"

    seeded = [uuid.uuid4().hex for _ in range(args.seed_docs)]
    docs = [
        layout.to_storage(COLLECTION, doc_id, {"n": i, "group": i % GROUPS, "title": f"t{i}"})
        for i, doc_id in enumerate(seeded)
    ]
    for chunk in range(0, len(docs), 500):
        await direct("POST", db + "/_bulk_docs", {"docs": docs[chunk : chunk + 500]})
    await api("POST", data + "/_index", {"fields": ["n"]})
    index = (await api("GET", data + "/_index"))["indexes"][0]["name"]

    start, end = layout.collection_range(COLLECTION)
    range_params = {"startkey": json.dumps(start), "endkey": json.dumps(end)}

    def selector(k: int, *extra: dict[str, Any]) -> dict[str, Any]:
        clauses = [{layout.TAG: {"$eq": COLLECTION}}, *extra, {"group": {"$eq": k}}]
        return {"$and": [*clauses, {"_id": {"$gt": start, "$lt": end}}]}

    async def direct_create(i: int) -> Any:
        doc = layout.to_storage(COLLECTION, uuid.uuid4().hex, {"n": i, "group": i % GROUPS})
        return await direct("PUT", f"{db}/{quote(doc['_id'], safe='')}", doc)

    def some_id(i: int) -> str:
        return seeded[i * 7919 % len(seeded)]

    ops: dict[str, tuple[Op, Op]] = {
        "get": (
            lambda i: api("GET", f"{data}/{some_id(i)}"),
            lambda i: direct("GET", f"{db}/{quote(f'{COLLECTION}:{some_id(i)}', safe='')}"),
        ),
        "list": (
            lambda i: api("GET", data + "?limit=25"),
            lambda i: direct(
                "GET",
                f"{db}/_all_docs?"
                + urlencode({**range_params, "include_docs": "true", "limit": "26"}),
            ),
        ),
        "query": (
            lambda i: api("GET", data + "?" + urlencode({"q": json.dumps({"group": i % GROUPS})})),
            lambda i: direct(
                "POST", db + "/_find", {"selector": selector(i % GROUPS), "limit": 25}
            ),
        ),
        "sorted": (
            lambda i: api(
                "GET",
                data + "?" + urlencode({"q": json.dumps({"group": i % GROUPS}), "sort": '["n"]'}),
            ),
            lambda i: direct(
                "POST",
                db + "/_find",
                {
                    "selector": selector(i % GROUPS, {"n": {"$exists": True}}),
                    "sort": [{layout.TAG: "asc"}, {"n": "asc"}],
                    "use_index": [layout.index_ddoc(COLLECTION, index), index],
                    "limit": 25,
                },
            ),
        ),
        # Last, so the reads above see only the seeded documents.
        "create": (
            lambda i: api("POST", data, {"n": i, "group": i % GROUPS, "title": "new"}),
            direct_create,
        ),
    }

    print(
        f"PouchDB Server 4.2.0 (LevelDB) behind vibed; collection '{COLLECTION}' = key range "
        f"'{start}'..'{start}\\ufff0' of {identity_db(idn, 'data')}, "
        f"{args.seed_docs} seeded docs"
    )
    header = (
        f"{'op':<7} {'conc':>4} {'n':>5} | {'vibed/s':>8} {'p50 ms':>8} {'p99 ms':>8} | "
        f"{'direct/s':>8} {'p50 ms':>8} {'p99 ms':>8} | "
        f"{'thru v/d':>8} {'p50 v/d':>8} {'err v/d':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, (through, straight) in ops.items():
        for concurrency in (1, 32):
            base_n = {1: 150, 32: 600}[concurrency]
            if name in ("query", "sorted"):
                # Mango on the embedded server scans the collection: a few per second.
                base_n //= 4 if name == "query" else 10
            n = max(10, int(args.scale * base_n))
            await run_load(through, min(n, 20), concurrency)  # warm up both paths
            await run_load(straight, min(n, 20), concurrency)
            v_elapsed, v_lat, v_err = await run_load(through, n, concurrency)
            d_elapsed, d_lat, d_err = await run_load(straight, n, concurrency)
            v_rps, d_rps = n / v_elapsed, n / d_elapsed
            print(
                f"{name:<7} {concurrency:>4} {n:>5} | {v_rps:8.1f} {fmt_ms(percentile(v_lat, 50))} "
                f"{fmt_ms(percentile(v_lat, 99))} | {d_rps:8.1f} "
                f"{fmt_ms(percentile(d_lat, 50))} {fmt_ms(percentile(d_lat, 99))} | "
                f"{v_rps / d_rps:8.2f} {percentile(v_lat, 50) / percentile(d_lat, 50):8.2f} "
                f"{f'{v_err}/{d_err}':>7}"
            )
    print(
        "thru v/d: vibed throughput / direct; p50 v/d: vibed median latency / direct. "
        "vibed keeps at most 32 idle connections to CouchDB (more are opened under load)."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--seed-docs", type=int, default=1000, help="docs in the collection")
    ns = parser.parse_args()
    task.react(lambda reactor: ensureDeferred(main(reactor, ns)))
