"""Scheduling priority for benchmark runs on a machine other work keeps busy."""

from __future__ import annotations

import os
from typing import Any

from bench.common import descendants


def renice(pid: int | None, nice: int) -> None:
    """Give ``pid``, its threads and its descendants the scheduling priority ``nice`` (0:
    leave it). Linux keeps a priority per thread (CouchDB's schedulers are threads), and with
    autogroups (``/proc/sys/kernel/sched_autogroup_enabled``) it first shares the CPUs
    between sessions, each other terminal's or job's work being one: the autogroup of each
    process gets ``nice`` too, or the whole run would get one session's share however busy
    the machine is."""
    if pid is None or not nice:
        return
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/autogroup", "w") as group:
                group.write(str(nice))
        except OSError:
            pass
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for tid in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:
                pass


def add_nice_argument(parser: Any) -> None:
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling priority of every process of the run (vibed, CouchDB, the load "
        "generators), e.g. -19 on a machine other work keeps busy (root only below 0): the "
        "figures then measure vibed rather than the competition for the cores",
    )
