"""A leaner turn of twisted's epoll reactor for the daemon's processes.

For every ready socket, ``EPollReactor.doPoll`` calls ``log.callWithLogger``, which asks the
socket for its log prefix, copies the current log context into a new one, pushes it through
two layers of context trackers and pops it again: about a tenth of the instructions of a
proxied request (two ready sockets per request, the client's and CouchDB's), measured with
``bench/cost.py``. :func:`install` puts in its place a loop that does the same things with
fewer calls: the same ``{"system": <log prefix>}`` log context around each socket's read or
write (so a legacy ``log.msg`` or an unhandled error still names the connection), the same
error logging, the same ``_doReadOrWrite``; and, for a TCP connection that is only readable
(most events), what ``_doReadOrWrite``, ``doRead`` and ``_dataReceived`` do, inline: one
``recv``, the bytes to the protocol, or the connection dropped as they would drop it. Its
main loop is leaner too (:func:`_main_loop`): between two polls, twisted's ``mainLoop`` runs
``runUntilCurrent`` and ``timeout`` and enters its error handler, about ten calls a turn,
though most turns have no timed call due.

Only the daemon's processes install it (``twistd vibed``, each ``--workers`` process), only
on the epoll reactor twistd picks by default, and only when that reactor still has the
attributes the loop uses: another reactor (``twistd --reactor``), or a Twisted whose reactor
has changed, runs untouched.
"""

from __future__ import annotations

import errno
import sys
import types
from select import EPOLLIN as _IN
from typing import Any, cast

from twisted.internet import base as _reactor_base
from twisted.internet import main, tcp
from twisted.logger import Logger
from twisted.python import context, log

__all__ = ["install"]

_LOG_CONTEXT = log.ILogContext
#: What the lean main loop reads of the reactor, and twisted's top-level error handler and
#: log (private to twisted.internet.base: without them, twisted's own main loop stays).
_LOOP_NEEDS = (
    "_started",
    "_pendingTimedCalls",
    "_newTimedCalls",
    "_insertNewDelayedCalls",
    "threadCallQueue",
    "_justStopped",
    "_cancellations",
    "runUntilCurrent",
    "running",
    "seconds",
)
_TOP_HANDLER: Any = getattr(_reactor_base, "_topHandler", None)
_BASE_LOG = getattr(_reactor_base, "_log", None) or Logger(namespace="twisted.internet.base")
_NEEDS = ("_poller", "_selectables", "_doReadOrWrite", "_disconnectSelectable", "doIteration")


def _do_poll(self: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll``, with ``log.callWithLogger`` done inline."""
    if timeout is None:
        timeout = -1  # wait until something is ready
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    handle = self._doReadOrWrite
    # The reactor thread's context stack (what context.call pushes onto: the same list for
    # the thread's life, found once) and the log context in force at the top of the loop
    # (context.get, inline): each socket's work runs in a copy of it with the socket's
    # "system", as callWithLogger's callWithContext makes.
    contexts = self._vibe_contexts
    if contexts is None:
        contexts = self._vibe_contexts = context.theContextTracker.currentContext().contexts
    base = None
    for frame in reversed(contexts):
        if _LOG_CONTEXT in frame:
            base = frame[_LOG_CONTEXT]
            break
    if not base:
        base = {}
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue  # removed by an earlier socket's work in this same turn
        kind = selectable.__class__
        plain = _PLAIN_TCP.get(kind)
        if plain is None:
            plain = _PLAIN_TCP[kind] = _is_plain_tcp(kind)
        if plain:
            prefix = selectable.logstr  # (what tcp.Connection.logPrefix returns)
        else:
            try:
                prefix = selectable.logPrefix()
            except KeyboardInterrupt:
                raise
            except BaseException:
                prefix = "(buggy logPrefix method)"
                log.err(system=prefix)
        contexts.append({log.ILogContext: {**base, "system": prefix}})
        try:
            if (
                plain
                and event == _IN
                and "doRead" not in selectable.__dict__  # (aborted, or still connecting)
                and selectable.fileno() != -1
            ):
                _read(self, selectable)
            else:
                handle(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(system=prefix)
        finally:
            contexts.pop()


def _read(reactor: Any, connection: Any) -> None:
    """What ``_doReadOrWrite`` does for a TCP connection that is only readable: its
    ``doRead`` (one ``recv``) and ``_dataReceived`` (the bytes to the protocol, or the end of
    the connection), inline; a failure is logged and drops the connection, as there. Only
    for a connection whose ``doRead`` is its class's: twisted replaces it on the connection
    itself while it connects and after ``abortConnection`` (when it must read nothing)."""
    try:
        try:
            data = connection.socket.recv(connection.bufferSize)
        except OSError as se:
            why: Any = None if se.args[0] == errno.EWOULDBLOCK else main.CONNECTION_LOST
        else:
            if data:
                connection.protocol.dataReceived(data)
                return
            why = main.CONNECTION_DONE
    except BaseException:
        why = sys.exc_info()[1]
        log.err()
    if why:
        reactor._disconnectSelectable(connection, why, True)


#: Whether a selectable class reads, and names itself in the log, as tcp.Connection does
#: (its server and client connections, TLS or not: TLS is a protocol of theirs); asked once
#: per class. A class that changes any of it goes through ``_doReadOrWrite`` as before.
_PLAIN_TCP: dict[type, bool] = {}


def _is_plain_tcp(kind: type) -> bool:
    return (
        issubclass(kind, tcp.Connection)
        and getattr(kind, "doRead", None) is tcp.Connection.doRead
        and getattr(kind, "_dataReceived", None) is tcp.Connection._dataReceived
        and getattr(kind, "logPrefix", None) is tcp.Connection.logPrefix
    )


def _main_loop(self: Any) -> None:
    """``ReactorBase.mainLoop``, each turn leaner: ``runUntilCurrent`` is called only when it
    has something to do (a call from another thread, a timed call new or due, cancelled calls
    to sweep, a stop to announce), ``timeout`` is worked out inline, and twisted's top-level
    error handler is entered once around the turns rather than once per turn (an error is
    logged the same way, and the loop goes on, as there)."""
    while self._started:
        with _TOP_HANDLER:
            seconds = self.seconds
            while self._started:
                pending = self._pendingTimedCalls
                if (
                    self.threadCallQueue
                    or self._newTimedCalls
                    or self._justStopped
                    or self._cancellations > 50
                    or (pending and pending[0].time <= seconds())
                ):
                    self.runUntilCurrent()
                # timeout(): the new timed calls in, then how long until the first is due.
                if self._newTimedCalls:
                    self._insertNewDelayedCalls()
                pending = self._pendingTimedCalls
                wait = max(0, min(2147483, pending[0].time - seconds())) if pending else None
                self.doIteration(self.running and wait)
    _BASE_LOG.info("Main loop terminated.")


def install(reactor: Any) -> bool:
    """Give ``reactor`` the leaner loop if it is twisted's epoll reactor; whether it did."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor or not all(hasattr(reactor, n) for n in _NEEDS):
        return False
    if not isinstance(getattr(context.theContextTracker.currentContext(), "contexts", None), list):
        return False  # twisted's context tracker is not what this loop expects
    cast(Any, reactor)._vibe_contexts = None  # the reactor thread's, on its first turn
    cast(Any, reactor).doIteration = types.MethodType(_do_poll, reactor)
    if _TOP_HANDLER is not None and all(hasattr(reactor, n) for n in _LOOP_NEEDS):
        cast(Any, reactor).mainLoop = types.MethodType(_main_loop, reactor)
    return True
