"""``--workers N``: N processes serving one listening socket, so vibed uses every core.

The daemon started by twistd becomes a supervisor. It opens the listening socket (any
``tcp:``, ``tcp6:`` or ``unix:`` endpoint) but never accepts on it, runs the embedded
CouchDB-protocol server when there is one, creates the JWT signing key if it is missing (so
the workers do not race to create it), then starts N worker processes
(``python -m vibed.workers``). Each worker receives the socket as file descriptor 3 and the
configuration on its standard input (never on its command line or in its environment: the
CouchDB URL and S3 keys are secrets), adopts the socket (``reactor.adoptStreamPort``) and runs
the whole service tree of a single-process vibed; the kernel hands each new connection to one
of them. A worker that dies is started again (after 1 s, doubling to 30 s while it keeps
dying); stopping the supervisor stops the workers (SIGTERM: they close their sockets with
1001 and finish their requests) and waits for them.

Nothing is shared between workers but CouchDB (and S3 or the blob directory): each has its
own realtime feeds, its own revocation list following ``vibe_revocations``, its own caches of
what cannot go stale (verified token signatures, declared indexes), and rate limits live in
CouchDB, exactly as with several replicas behind a load balancer. Workers log to the
supervisor's standard output and error: run vibed in the foreground (``twistd -n``, systemd,
a container) when using workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["AdoptedEndpoint", "WorkerSupervisor", "main"]

_log = Logger(namespace="vibed.workers")

#: The endpoint types whose listening socket a worker can adopt as it is.
ADOPTABLE = ("tcp", "tcp6", "unix")

_RESTART_FIRST, _RESTART_MAX = 1.0, 30.0
_STOP_GRACE = 20.0  # seconds a worker has to stop before SIGKILL


def adoptable(port: str) -> bool:
    """Whether workers can share the endpoint ``port`` (no TLS: they adopt a bare socket)."""
    return port.split(":", 1)[0].strip().lower() in ADOPTABLE


class _Worker(ProcessProtocol):
    """One worker process, seen from the supervisor."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.write(self.supervisor.payload(self.index))
        self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.ended.callback(None)
        self.supervisor._ended(self, reason)


class WorkerSupervisor(Service):
    """Listens, starts ``count`` workers on the socket, restarts the ones that die."""

    def __init__(
        self,
        reactor: Any,
        port: str,
        count: int,
        raw: dict[str, str | None],
        couch_url: Callable[[], str],
        ready: Callable[[], Deferred[Any]],
    ) -> None:
        self.reactor = reactor
        self.port_description = port
        self.count = count
        self.raw = raw
        self.couch_url = couch_url
        self.ready = ready
        self.port: IListeningPort | None = None
        self.workers: dict[int, _Worker] = {}
        self._delays: dict[int, float] = {}
        self._starting: Deferred[Any] | None = None
        self.family = socket.AF_INET

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        d = self.ready()
        d.addCallback(lambda _: self._listen())
        d.addErrback(self._failed)
        self._starting = d

    async def _listen_async(self) -> None:
        endpoint = serverFromString(self.reactor, self.port_description)
        factory = Factory.forProtocol(Protocol)
        factory.noisy = False
        port: Any = await endpoint.listen(factory)
        port.stopReading()  # the workers accept; this process never does
        self.port = port
        sock = port.socket
        self.family = sock.family
        _log.info(
            "vibed listening on {address} with {count} workers",
            address=port.getHost(),
            count=self.count,
        )
        for index in range(self.count):
            self._spawn(index)

    def _listen(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._listen_async())

    def _failed(self, failure: Failure) -> None:
        _log.critical("vibed cannot serve: {error}", error=failure.getErrorMessage())
        if self.reactor.running:
            self.reactor.stop()

    def payload(self, index: int) -> bytes:
        """What worker ``index`` reads on its standard input."""
        raw = dict(self.raw)
        raw["couchdb"] = self.couch_url()
        raw["workers"] = "1"
        return json.dumps({"raw": raw, "family": int(self.family), "index": index}).encode()

    def _spawn(self, index: int) -> None:
        if not self.running or self.port is None:
            return
        worker = _Worker(self, index)
        self.workers[index] = worker
        fd = self.port.fileno()  # type: ignore[attr-defined]
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "vibed.workers", str(index)],
            env=dict(os.environ),
            childFDs={0: "w", 1: 1, 2: 2, 3: fd},
        )

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if not self.running:
            return
        delay = self._delays.get(worker.index, _RESTART_FIRST)
        self._delays[worker.index] = min(delay * 2, _RESTART_MAX)
        _log.error(
            "worker {index} ended ({reason}); starting it again in {delay} s",
            index=worker.index,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self.reactor.callLater(delay, self._spawn, worker.index)

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        super().stopService()
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        ended = []
        for worker in list(self.workers.values()):
            ended.append(worker.ended)
            self._signal(worker, signal.SIGTERM)
            kill = self.reactor.callLater(_STOP_GRACE, self._signal, worker, signal.SIGKILL)

            def disarm(result: object, kill: Any = kill) -> object:
                if kill.active():
                    kill.cancel()
                return result

            worker.ended.addBoth(disarm)
        done: Deferred[Any] = DeferredList(ended, consumeErrors=True) if ended else succeed(None)

        def close(result: object) -> Any:
            port, self.port = self.port, None
            return port.stopListening() if port is not None else result

        return done.addBoth(close)

    @staticmethod
    def _signal(worker: _Worker, signum: int) -> None:
        if worker.pid is not None and not worker.ended.called:
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass


class AdoptedEndpoint:
    """A server endpoint whose ``listen`` adopts an already listening socket."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        port = self.reactor.adoptStreamPort(self.fd, socket.AddressFamily(self.family), factory)
        os.close(self.fd)  # the port holds its own copy
        return succeed(port)


def main() -> None:
    """A worker: read the configuration, adopt fd 3, run one service tree until SIGTERM."""
    index = int(sys.argv[1])
    job = json.loads(sys.stdin.buffer.read())
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from vibed import poll
    from vibed.config import Config, ConfigError
    from vibed.service import makeService, settle_memory

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    try:
        config = Config.validate(job["raw"])
    except ConfigError as e:
        raise SystemExit(f"vibed worker {index}: {e}") from None
    config = config.evolve_extra(worker=index)
    top = makeService(config, reactor, endpoint=AdoptedEndpoint(reactor, 3, job["family"]))
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    settle_memory(reactor)
    poll.install(reactor)
    reactor.run()


if __name__ == "__main__":
    main()
