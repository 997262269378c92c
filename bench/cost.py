"""Instructions vibed executes per request, counted by valgrind (callgrind): a cost figure that
does not move with the machine's load, for before/after comparisons on a busy machine.

    .venv/bin/python bench/cost.py [--couchdb pouchdb|shared|URL] [--ops get,create,query]
                                   [--requests 1000] [--concurrency 32] [--vibed-src DIR]

The engine and the workload are bench/data.py's (one identity, its seeded collection ``bench``,
the indexes an app declares). vibed runs under ``valgrind --tool=callgrind`` with counting
off; per operation, after a warm-up, counting is switched on (``callgrind_control -i on``)
for exactly ``--requests`` requests at ``--concurrency`` connections, switched off, and the
counts dumped. Printed per operation: instructions per request (the whole process: twisted,
vibed, the Python interpreter and the kernel interface, not the kernel itself) and, as a
yardstick, the same for a bare ``twisted.web`` site answering fixed bytes (``--ops floor``).
The dumps stay in ``--keep`` for ``callgrind_annotate`` (which shows the interpreter's C
functions; py-spy, ``bench/data.py --profile``, shows the Python ones).

Under valgrind vibed runs 20 to 50 times slower, so the engine and the clients are never the
bottleneck and the daemon always has ``--concurrency`` requests waiting, as under wrk. The
counts still move by a few percent between runs (how many requests one turn of the reactor
picks up varies). valgrind is a Debian package (``make bench-tools`` installs it and wrk).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    BIN,
    Daemon,
    Engine,
    Request,
    add_engine_arguments,
    fixed_load,
    free_port,
)
from bench.data import prepare  # noqa: E402

FLOOR_SITE = """
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

class Fixed(Resource):
    isLeaf = True
    def render(self, request):
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"ok": true}'

site = Site(Fixed())
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
print("listening", flush=True)
reactor.run()
"""


def valgrind(out_dir: Path) -> list[str]:
    if shutil.which("valgrind") is None:
        raise SystemExit("bench/cost.py counts with valgrind: make bench-tools (apt-get)")
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir}/callgrind.%p.out",
    ]


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, stdout=subprocess.DEVNULL)


def counted(pid: int, out_dir: Path, label: str, send: object) -> int:
    """Instructions ``pid`` executes while ``send()`` runs."""
    before = set(out_dir.glob(f"callgrind.{pid}.out.*"))
    control(pid, "-z")
    control(pid, "-i", "on")
    assert callable(send)
    send()
    control(pid, "-i", "off")
    control(pid, "-d", label)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = set(out_dir.glob(f"callgrind.{pid}.out.*")) - before
        for path in new:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.5)
    raise RuntimeError("callgrind wrote no dump")


def floor(args: argparse.Namespace, out_dir: Path) -> int:
    """Instructions per request of a bare twisted.web site answering fixed bytes."""
    port = free_port()
    script = out_dir / "floor_site.py"
    script.write_text(FLOOR_SITE)
    proc = subprocess.Popen(
        [*valgrind(out_dir), str(BIN / "python"), str(script), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        requests: list[Request] = [("GET", "/x", {"Authorization": "Bearer " + "x" * 300}, None)]
        fixed_load(base, requests, count=100, connections=args.concurrency)
        total = counted(
            proc.pid,
            out_dir,
            "floor",
            lambda: fixed_load(base, requests, count=args.requests, connections=args.concurrency),
        )
        return total // args.requests
    finally:
        proc.terminate()
        proc.wait()


def main(args: argparse.Namespace) -> None:
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="vibed-cost-")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = [name for name in args.ops.split(",") if name]
    rows: list[tuple[str, int, int]] = []
    if "floor" in wanted:
        rows.append(("floor", floor(args, out_dir), 0))
        wanted.remove("floor")
    if wanted:
        engine = Engine(args.couchdb, args.erl_flags).start()
        extra = ["--couchdb", engine.url, *shlex.split(args.vibed_args)]
        env = {"PYTHONPATH": str(Path(args.vibed_src).resolve())} if args.vibed_src else {}
        daemon = Daemon(*extra, env=env, wrapper=valgrind(out_dir))
        try:
            daemon.start(timeout=900)
            assert daemon.pid is not None
            work = prepare(daemon, engine, args.seed_docs)
            for name in wanted:
                through, _ = work.ops[name]
                fixed_load(daemon.url, through, count=args.warmup, connections=args.concurrency)
                outcome: list[int] = []

                def send(requests: list[Request] = through, outcome: list[int] = outcome) -> None:
                    _, errors = fixed_load(
                        daemon.url, requests, count=args.requests, connections=args.concurrency
                    )
                    outcome.append(errors)

                total = counted(daemon.pid, out_dir, name, send)
                rows.append((name, total // args.requests, sum(outcome)))
        finally:
            daemon.stop()
            engine.stop()
    source = args.vibed_src or "this tree"
    print(
        f"instructions per request (callgrind), vibed from {source}, {args.requests} requests "
        f"at {args.concurrency} connections per figure; dumps in {out_dir}"
    )
    for name, per_request, errors in rows:
        note = f"  ({errors} answers not 2xx)" if errors else ""
        print(f"{name:<8} {per_request / 1e6:8.3f} M{note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--ops", default="get,create,query", help="and 'floor'; comma-separated")
    parser.add_argument("--requests", type=int, default=1000, help="counted per operation")
    parser.add_argument("--warmup", type=int, default=200, help="requests before counting")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed-docs", type=int, default=1000)
    parser.add_argument("--keep", help="directory for the callgrind dumps (default: a new one)")
    main(parser.parse_args())
