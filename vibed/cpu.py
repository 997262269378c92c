"""The bounded thread pool for CPU-heavy work (Argon2id, scrypt), so the reactor stays free.

A :class:`CryptoPool` is a Service: its threads start with the daemon and are joined on stop.
Tests that want determinism hand in :class:`SynchronousPool`, which runs work inline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class CPUPool(Protocol):
    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]: ...


class CryptoPool(Service):
    """A fixed-size pool; work queues when every thread is busy (bounded concurrency)."""

    def __init__(self, size: int, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=size, maxthreads=size, name="vibed-crypto")

    @property
    def size(self) -> int:
        return int(self._pool.max)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        # ThreadPool.stop joins its threads: do it off the reactor thread.
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._pool.stop)

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if not self._pool.started:
            # Before startService (e.g. a test that never starts the tree): start lazily.
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, f, *args)


class SynchronousPool:
    """Runs work inline: for unit tests only."""

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            return succeed(f(*args))
        except Exception:
            return fail()
