"""The embedded CouchDB-protocol server: a supervised PouchDB Server child process.

When vibed is not pointed at a CouchDB (``--couchdb``), it runs PouchDB Server (npm
``pouchdb-server``, LevelDB on disk under the data directory) as a real separate process and
talks to it over HTTP like to any CouchDB 3.x. This module owns that child: finding the
executable, choosing its port, spawning it, knowing when it answers, restarting it when it dies
and stopping it with the service tree.

Security: the child runs WITHOUT admin credentials (PouchDB Server 4.2.0 crashes on ``PUT /db``
when admins are configured in its ``config.json``), so it is a "party" server: anyone who can
reach its port can read and write every database. It is therefore bound to ``127.0.0.1`` only,
its data directory is created with mode 0700, and it is meant for one machine (development, a
single-user install). Production points ``--couchdb`` at Apache CouchDB 3.x with admins set.

Supervision: a single bad request can take PouchDB Server down (see docs/DESIGN.md), so an
unexpected exit is logged in one line and the child is restarted after a backoff (1 s doubling
to 30 s, back to 1 s once a child has stayed up 60 s) on the same port and data directory, so
:attr:`EmbeddedCouch.url` never changes. The child's stdout and stderr are appended to
``<data_dir>/pouchdb-server.log``; its environment is the parent's, with nothing added.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent

from vibed.couch.client import quiet_pool

_log = Logger(namespace="vibed.embedded")

_BIN = Path("node_modules") / ".bin" / "pouchdb-server"
# This file is vibed/embedded.py, so the source checkout is two levels up.
_CHECKOUT = Path(__file__).resolve().parent.parent

_INSTALL_HINT = (
    "run `make install` (npm ci; Node.js >= 18 via `apt-get install nodejs npm`) "
    "or point --couchdb at a CouchDB URL"
)

_BACKOFF_FIRST = 1.0
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 60.0
_POLL_INTERVAL = 0.1
_POLL_TIMEOUT = 1.0


class EmbeddedCouchMissing(Exception):
    """Node.js or pouchdb-server is not installed; str() is one line saying how to fix it."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}: {_INSTALL_HINT}")


class EmbeddedCouchNotReady(Exception):
    """The embedded server did not answer in time, or was stopped before it answered."""


def find_pouchdb_server(explicit: str | None = None) -> str:
    """Return the path of the pouchdb-server executable, checking that ``node`` is on PATH.

    Looks, in order, at ``explicit`` (the ``--pouchdb-server`` option; when given it is the
    only candidate), ``./node_modules/.bin/pouchdb-server``, the same path in the source
    checkout vibed runs from, and ``pouchdb-server`` on PATH.
    """
    if explicit is not None:
        found = explicit if Path(explicit).is_file() else shutil.which(explicit)
        if found is None:
            raise EmbeddedCouchMissing(f"pouchdb-server not found at {explicit!r}")
    else:
        candidates = [Path.cwd() / _BIN, _CHECKOUT / _BIN]
        found = next((str(c) for c in candidates if c.is_file()), None)
        if found is None:
            found = shutil.which("pouchdb-server")
        if found is None:
            raise EmbeddedCouchMissing(
                "pouchdb-server not found in ./node_modules/.bin, in the vibed checkout or on PATH"
            )
    # The npm bin is a `#!/usr/bin/env node` script: without node it cannot start at all.
    if shutil.which("node") is None:
        raise EmbeddedCouchMissing("Node.js (`node`) is not on PATH")
    return found


def _command(executable: str) -> list[str]:
    """The argv prefix that runs ``executable`` with node itself as the spawned process.

    Spawning node directly (rather than through the ``env`` shebang) makes the pid we hold,
    signal and wait for the pid of the node process that serves.
    """
    script = os.path.realpath(executable)
    try:
        with open(script, "rb") as f:
            first = f.readline(200)
    except OSError:
        first = b""
    node = shutil.which("node")
    if first.startswith(b"#!") and b"node" in first and node is not None:
        return [node, script]
    return [executable]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ChildProtocol(ProcessProtocol):
    """Reports the end of one child process to its :class:`EmbeddedCouch`."""

    def __init__(self, owner: EmbeddedCouch, generation: int) -> None:
        self._owner = owner
        self._generation = generation

    def processEnded(self, reason: Failure) -> None:
        self._owner._child_ended(self._generation, reason)


def pouchdb_server_args(port: int, data_dir: Path) -> list[str]:
    """PouchDB Server's arguments: loopback only, data and config under ``data_dir``."""
    return [
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--config",
        str(data_dir / "config.json"),
        "--no-stdout-logs",
    ]


class EmbeddedCouch(Service):
    """A PouchDB Server child on ``127.0.0.1:<port>``, supervised; see the module docstring."""

    #: Seconds between SIGTERM and SIGKILL in :meth:`stopService`.
    stop_grace: float = 5.0

    def __init__(
        self,
        data_dir: Path,
        *,
        executable: str | None = None,
        reactor: Any = None,
        ready_timeout: float = 60.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir / "pouchdb-server.log"
        self._explicit = executable
        self._reactor = reactor
        self.ready_timeout = ready_timeout
        # Chosen once: restarts reuse it, so the URL handed to the rest of vibed stays valid.
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.restarts = 0
        # A non-persistent pool: each poll closes its connection, none lingers after stop.
        self._http = HTTPClient(Agent(reactor, pool=quiet_pool(reactor, persistent=False)))
        self._process: IProcessTransport | None = None
        self._generation = 0
        self._stopped_generation = 0  # the child stopService asked to exit: not a crash
        self._started_at = 0.0
        self._ready = False
        self._restarting = False  # the current child is a restart nobody was told about yet
        self._backoff = _BACKOFF_FIRST
        self._restart_call: IDelayedCall | None = None
        self._kill_call: IDelayedCall | None = None
        self._poll_call: IDelayedCall | None = None
        self._poll_request: Deferred[None] | None = None
        self._ready_waiters: list[tuple[Deferred[str], IDelayedCall]] = []
        self._restart_waiters: list[Deferred[int]] = []
        self._exit_waiters: list[Deferred[None]] = []

    @property
    def pid(self) -> int | None:
        """The pid of the running child (the node process), or None."""
        if self._process is None:
            return None
        pid = self._process.pid
        return int(pid) if pid is not None else None

    def check(self) -> list[str]:
        """Return the child's command line; raise :class:`EmbeddedCouchMissing` if impossible.

        Callers run this before the reactor starts so a missing Node.js fails fast, in one line.
        """
        # setsid (util-linux) puts the child in its own session: a Ctrl-C or a SIGTERM sent
        # to the terminal's process group reaches vibed only, which then stops the child in
        # order. As the forked child is no group leader, setsid execs in place (same pid).
        setsid = shutil.which("setsid")
        return [
            *([setsid] if setsid else []),
            *_command(find_pouchdb_server(self._explicit)),
            *pouchdb_server_args(self.port, self.data_dir),
        ]

    def whenReady(self) -> Deferred[str]:
        """Fire with :attr:`url` once the current child answers ``GET /``.

        Fires at once if it answers already. Errbacks with :class:`EmbeddedCouchNotReady` if
        that does not happen within ``ready_timeout`` seconds, or if the service stops first.
        """
        if self._ready:
            return succeed(self.url)
        d: Deferred[str] = Deferred()
        timer = self._reactor.callLater(self.ready_timeout, self._ready_timed_out, d)
        self._ready_waiters.append((d, timer))
        return d

    def whenRestarted(self) -> Deferred[int]:
        """Fire with :attr:`restarts` once the next restarted child answers ``GET /``."""
        d: Deferred[int] = Deferred()
        self._restart_waiters.append(d)
        return d

    def startService(self) -> None:
        argv = self.check()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        super().startService()
        self._backoff = _BACKOFF_FIRST
        if self._process is None:
            self._spawn(argv)
        else:
            # A previous child is still exiting and holds the port: start once it is gone.
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: self._spawn(argv) if self.running else None)
            self._exit_waiters.append(d)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        self._stop_polling()
        self._fail_waiters("the embedded CouchDB server was stopped")
        if self._process is None:
            return succeed(None)
        self._stopped_generation = self._generation
        d: Deferred[None] = Deferred()
        self._exit_waiters.append(d)
        self._signal("TERM")
        if self._kill_call is None:
            self._kill_call = self._reactor.callLater(self.stop_grace, self._signal, "KILL")
        return d

    def _signal(self, name: str) -> None:
        if self._process is None:
            return
        try:
            self._process.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def _spawn(self, argv: list[str] | None = None) -> None:
        self._restart_call = None
        if not self.running:
            return
        try:
            argv = argv if argv is not None else self.check()
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.data_dir.chmod(0o700)
            log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except (EmbeddedCouchMissing, OSError) as e:
            _log.error("cannot start the embedded CouchDB server: {error}", error=str(e))
            self._schedule_restart()
            return
        null_fd = os.open(os.devnull, os.O_RDONLY)
        self._generation += 1
        try:
            self._process = self._reactor.spawnProcess(
                _ChildProtocol(self, self._generation),
                argv[0],
                argv,
                env=dict(os.environ),
                path=str(self.data_dir),  # any file it writes next to itself lands here
                childFDs={0: null_fd, 1: log_fd, 2: log_fd},
            )
        except OSError as e:
            _log.error("cannot start the embedded CouchDB server: {error}", error=str(e))
            self._schedule_restart()
            return
        finally:
            os.close(log_fd)
            os.close(null_fd)
        self._started_at = self._reactor.seconds()
        self._ready = False
        _log.info(
            "embedded CouchDB server (pid {pid}) starting on {url}", pid=self.pid, url=self.url
        )
        self._poll(self._generation)

    def _poll(self, generation: int) -> None:
        self._poll_call = None
        if generation != self._generation or self._process is None or not self.running:
            return
        d: Deferred[Any] = self._http.get(self.url).addCallback(lambda r: r.json())
        d.addTimeout(_POLL_TIMEOUT, self._reactor)

        def answered(body: Any) -> None:
            self._poll_request = None
            if not isinstance(body, dict) or not body.get("version"):
                raise ValueError("no version in GET / answer")
            self._became_ready(generation)

        def again(_: Failure) -> None:
            # Refused, timed out, not JSON yet, or cancelled by stopService: all mean "not yet".
            self._poll_request = None
            if generation == self._generation and self._process is not None and self.running:
                self._poll_call = self._reactor.callLater(_POLL_INTERVAL, self._poll, generation)

        self._poll_request = d.addCallback(answered).addErrback(again)

    def _stop_polling(self) -> None:
        if self._poll_call is not None and self._poll_call.active():
            self._poll_call.cancel()
        self._poll_call = None
        if self._poll_request is not None:
            self._poll_request.cancel()
        self._poll_request = None

    def _became_ready(self, generation: int) -> None:
        if generation != self._generation or self._process is None or not self.running:
            return
        self._ready = True
        _log.info("embedded CouchDB server answers on {url}", url=self.url)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d, timer in waiters:
            if timer.active():
                timer.cancel()
            d.callback(self.url)
        if self._restarting:
            self._restarting = False
            restarted, self._restart_waiters = self._restart_waiters, []
            for r in restarted:
                r.callback(self.restarts)

    def _ready_timed_out(self, d: Deferred[str]) -> None:
        self._ready_waiters = [(w, t) for (w, t) in self._ready_waiters if w is not d]
        d.errback(
            EmbeddedCouchNotReady(
                f"the embedded CouchDB server did not answer on {self.url} within "
                f"{self.ready_timeout:g} s (see {self.log_path})"
            )
        )

    def _fail_waiters(self, why: str) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for d, timer in waiters:
            if timer.active():
                timer.cancel()
            d.errback(EmbeddedCouchNotReady(why))
        self._restarting = False
        restarted, self._restart_waiters = self._restart_waiters, []
        for r in restarted:
            r.errback(EmbeddedCouchNotReady(why))

    def _child_ended(self, generation: int, reason: Failure) -> None:
        if generation != self._generation:
            return
        self._process = None
        self._ready = False
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        if self.running and generation != self._stopped_generation:
            uptime = self._reactor.seconds() - self._started_at
            if uptime >= _STABLE_AFTER:
                self._backoff = _BACKOFF_FIRST
            _log.warn(
                "embedded CouchDB server died ({how}) after {uptime:.1f} s; "
                "restarting in {delay:g} s (log: {log})",
                how=_describe_exit(reason),
                uptime=uptime,
                delay=self._backoff,
                log=self.log_path,
            )
            self._schedule_restart()
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(None)

    def _schedule_restart(self) -> None:
        delay, self._backoff = self._backoff, min(self._backoff * 2, _BACKOFF_MAX)
        self._restart_call = self._reactor.callLater(delay, self._respawn)

    def _respawn(self) -> None:
        self._restart_call = None
        if not self.running:
            return
        self.restarts += 1
        self._restarting = True
        self._spawn()


def _describe_exit(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"signal {value.signal}"
        return f"exit code {value.exitCode}"
    if isinstance(value, ProcessDone):
        return "exit code 0"
    return str(value)
