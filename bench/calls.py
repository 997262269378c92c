"""Python function calls vibed makes per request, counted by cProfile: where the interpreter's
time goes, function by function, in a figure that does not move with the machine's load.

    .venv/bin/python bench/calls.py [--couchdb pouchdb|shared|URL] [--ops get,create]
                                    [--requests 10000] [--top 40] [--vibed-src DIR]

The engine and the workload are bench/data.py's. vibed runs under ``twistd --profile``
(cProfile, stats saved when it stops); per operation it serves a warm-up and then
``--requests`` requests at 32 connections, in a daemon of its own, so the counts divided by
the requests are that operation's (start-up and sign-up add a few calls, spread thin).
Printed per operation: Python-level calls per request (each a frame: the costly kind), calls
of C functions (``len``, ``dict.get``, a regex match...), and the functions called most often
per request. cProfile's own overhead makes its times meaningless; the counts are exact.
``bench/cost.py`` counts instructions, ``bench/data.py --profile`` samples with py-spy.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Daemon, Engine, add_engine_arguments, fixed_load  # noqa: E402
from bench.data import prepare  # noqa: E402


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/vibed/"):
        if marker in path:
            return ("vibed/" if marker == "/vibed/" else "") + path.split(marker, 1)[1]
    return path


def count(args: argparse.Namespace, op: str, out_dir: Path) -> tuple[float, float, Counter[str]]:
    """(Python calls, C calls, calls per function) per request of ``op``."""
    engine = Engine(args.couchdb, args.erl_flags).start()
    stats_file = out_dir / f"{op}.prof"
    env = {"PYTHONPATH": str(Path(args.vibed_src).resolve())} if args.vibed_src else {}
    daemon = Daemon("--couchdb", engine.url, *shlex.split(args.vibed_args), env=env)
    at = daemon.args.index("vibed")
    daemon.args[at:at] = [f"--profile={stats_file}", "--profiler=cprofile", "--savestats"]
    try:
        daemon.start(timeout=300)
        work = prepare(daemon, engine, args.seed_docs)
        through, _ = work.ops[op]
        fixed_load(daemon.url, through, count=args.warmup, connections=32)
        fixed_load(daemon.url, through, count=args.requests, connections=32)
    finally:
        daemon.stop()  # SIGTERM: twistd writes the stats as it stops
        engine.stop()
    served = args.requests + args.warmup
    stats = pstats.Stats(str(stats_file))
    python = c_calls = 0.0
    by_function: Counter[str] = Counter()
    for (path, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        calls = row[1] / served
        if path == "~":
            c_calls += calls
            by_function[name] += calls
        else:
            python += calls
            by_function[f"{_short(path)}:{line}({name})"] += calls
    return python, c_calls, by_function


def main(args: argparse.Namespace) -> None:
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="vibed-calls-")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = args.vibed_src or "this tree"
    for op in [name for name in args.ops.split(",") if name]:
        python, c_calls, by_function = count(args, op, out_dir)
        print(
            f"{op}: {python:.0f} Python calls and {c_calls:.0f} C calls per request "
            f"(cProfile, vibed from {source}, {args.requests} requests; stats in {out_dir})"
        )
        for name, calls in by_function.most_common(args.top):
            print(f"  {calls:6.1f}  {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--ops", default="get,create", help="comma-separated, as bench/data.py")
    parser.add_argument("--requests", type=int, default=10000, help="counted per operation")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--seed-docs", type=int, default=1000)
    parser.add_argument("--top", type=int, default=40, help="functions listed per operation")
    parser.add_argument("--keep", help="directory for the stats files (default: a new one)")
    main(parser.parse_args())
