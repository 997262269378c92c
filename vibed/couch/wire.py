"""The request path to CouchDB: HTTP/1.1 over a pool of persistent connections, nothing more.

Every proxied request pays for this path twice (the request out, the answer in), so it is
kept to what a JSON exchange with CouchDB needs: one request line and four headers written in
one ``write``; the answer's status line, ``Content-Length`` or ``chunked`` body read by slicing
bytes. treq and ``twisted.web.client.Agent`` cost about as much CPU per request as the whole
rest of a proxied ``GET`` (URL objects, header objects, a producer per body, a parser state
machine); they remain for the long-lived ``_changes`` streams, which are few.

One request at a time per connection (no pipelining). A connection goes back to the pool
when its answer is complete and the server did not ask to close; idle connections older than
``idle_timeout`` are dropped rather than reused, since servers close idle keep-alive
connections on their own timers (Node's default, PouchDB Server's, is 5 s) and a request sent
into a connection the server is closing is lost. A ``GET``/``HEAD`` that fails on a reused
connection before any byte of the answer arrived is sent once more on a new connection, as
``Agent`` does; other methods are not repeated (the first may have been applied).

Cancelling the Deferred of a request aborts its connection.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet import endpoints
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from vibed.web import send_now

__all__ = ["Answer", "Pending", "WirePool", "WireTimeout"]

_MAX_HEAD = 64 * 1024  # status line and headers
_MAX_BODY = 256 * 1024 * 1024
# chunked-body states (``_chunk_left`` when not a count of bytes left in a chunk)
_CHUNK_SIZE, _CHUNK_END, _TRAILERS = -1, -2, -3
#: A framing header's name and value, in a lowered head: a line's start (never the status
#: line's, nor a folded line's: that continues another header's value), optional blanks
#: before the colon (as a lenient reader takes them), the value, and then anything that makes
#: the line malformed: a bare CR or LF in the value, or a folded line continuing it. (Only
#: these lines decide how the answer is framed; a wrong framing would leave the next request
#: on the connection reading the rest of this answer.)
_FRAMING = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection)[ \t]*:([^\r\n]*)(\r\n[ \t]|\r(?!\n)|\n)?"
)


class Answer(NamedTuple):
    """A complete answer: ``code`` and the ``body`` bytes."""

    code: int
    body: bytes


_log = Logger()
#: twisted's endpoint wrapper, which a pool connection's TCP connection can do without (a
#: private name: if it ever goes, connections keep it).
_WRAPPER: Any = getattr(endpoints, "_WrappingProtocol", None)
_new_answer = tuple.__new__  # (an Answer made without NamedTuple's Python-level __new__)


class Pending(Deferred[Answer]):
    """The Deferred of one request's answer, which its one waiter may take without a
    callback chain.

    A driver that awaits it directly (``vibed.api.direct``, resuming a coroutine that
    yielded it) sets ``resume``: the result (the Answer, or a Failure) is then handed to that
    one function as the Deferred fires, with ``called`` and ``result`` set first (the
    coroutine's ``await``, resumed, reads ``result`` as it does for any Deferred), and
    ``result`` let go of afterwards (as the driver's callback returning None did). That is
    one call where ``callback`` runs ``_startRunCallbacks`` and ``_runCallbacks`` and the
    driver's ``addBoth`` has added a callback before. If anything else added callbacks, or
    it is paused, ``resume`` runs first in the chain, where that ``addBoth`` would have put
    it. Without ``resume`` it is an ordinary Deferred."""

    resume: Callable[[Any], object] | None = None

    def callback(self, result: Any) -> None:
        resume = self.resume
        if resume is not None and not self.called:
            self.resume = None
            if not (self.paused or self._callbacks):
                self.called = True
                self._canceller = None
                self.result = result
                try:
                    resume(result)
                except BaseException:  # (a callback's error would stay in its Deferred)
                    _log.failure("resuming the request waiting for CouchDB's answer")
                # Read by now; a Failure kept here would hold the frames it was thrown into.
                self.result = None
                return
            call: Any = (resume, (), {})
            self._callbacks.insert(0, (call, call))
        self._startRunCallbacks(result)

    def errback(self, fail: Failure | BaseException | None = None) -> None:
        if fail is None:
            fail = Failure()
        elif not isinstance(fail, Failure):
            fail = Failure(fail)
        self.callback(fail)


class BadAnswer(ierror.ConnectionLost):
    """The server's bytes are not an HTTP/1.1 answer this client understands."""


class WireTimeout(Exception):
    """No complete answer by the request's deadline (the connection was aborted)."""


class _Connection(Protocol):
    """One persistent connection; ``send`` one request, then the next after its answer."""

    def __init__(self, pool: WirePool) -> None:
        self.pool = pool
        self.waiting: Deferred[Answer] | None = None
        self.head_only = False
        self.received_any = False
        # ``retry``: the request being answered may be sent once more, on a new connection,
        # if this one fails before any byte of the answer (WirePool.request); ``again``: the
        # Deferred of that second try, which the first one's Deferred now waits for.
        self.retry: bytes | None = None
        self.again: Deferred[Answer] | None = None
        self.idle_since = 0.0
        self.closed = False
        self.lost: Deferred[None] = Deferred()
        # The answer being waited for must be complete by ``deadline``. One timer per
        # connection, moved lazily: a request whose deadline is no sooner than the pending
        # timer leaves it in place, and the timer sleeps again when it fires early.
        self.deadline: float | None = None
        self._timer: Any = None
        self._timer_at = 0.0  # when _timer is due
        self._reset()

    def _reset(self) -> None:
        self._buffer = b""
        self._code = 0
        self._length: int | None = None  # Content-Length; None: chunked or until close
        self._chunked = False
        self._keep = True
        self._in_body = False
        self._chunks: list[bytes] = []
        self._got = 0
        self._chunk_left = _CHUNK_SIZE  # chunked: bytes left in the chunk, or a state

    def send(
        self, data: bytes, head_only: bool, deadline: float | None = None, retry: bool = False
    ) -> Deferred[Answer]:
        # The reading state is fresh: made new, or reset by _finish (a connection whose
        # answer failed is closed, and never sends again).
        self.head_only = head_only
        self.received_any = False
        self.retry = data if retry else None
        self.waiting = Pending(self._cancel)
        self.deadline = deadline
        if deadline is not None:
            timer = self._timer
            if timer is None or self._timer_at > deadline:
                if timer is not None:
                    timer.cancel()
                reactor = self.pool.reactor
                self._timer = reactor.callLater(
                    max(0.0, deadline - reactor.seconds()), self._check_deadline
                )
                self._timer_at = deadline  # (timer.getTime(), without its call)
        assert self.transport is not None
        send_now(self.transport, data)
        return self.waiting

    def _check_deadline(self) -> None:
        self._timer = None
        if self.waiting is None or self.deadline is None:
            return  # idle, or the request has no deadline: no timer until the next one
        left = self.deadline - self.pool.reactor.seconds()
        if left > 0:
            self._timer = self.pool.reactor.callLater(left, self._check_deadline)
            self._timer_at = self.deadline
            return
        waiting, self.waiting = self.waiting, None
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        waiting.errback(WireTimeout())

    def _cancel(self, _: Deferred[Answer]) -> None:
        again, self.again = self.again, None
        if again is not None:  # the second try is under way: cancelling it fails ours
            again.cancel()
            return
        self.waiting = None
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- reading --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.waiting is None:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self._drop()
            return
        self.received_any = True
        try:
            if not self._in_body:
                self._buffer += data
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > _MAX_HEAD:
                        raise BadAnswer("answer headers too long")
                    return
                head, data = self._buffer[:end], self._buffer[end + 4 :]
                self._buffer = b""
                self._head(head)
                if self._code == 100:  # Continue: the real answer follows
                    self._reset()
                    if data:
                        self.dataReceived(data)
                    return
                self._in_body = True
                if self.head_only or self._code in (204, 304) or self._length == 0:
                    self._finish()
                    return
            if self._chunked:
                self._read_chunked(data)
                return
            # A plain body (inline: the usual answer arrives whole, in one read).
            if data:
                self._chunks.append(data)
                self._got += len(data)
            if self._length is None:
                if self._got > _MAX_BODY:
                    raise BadAnswer("answer too large")
                return
            if self._got >= self._length:
                if self._got > self._length:
                    raise BadAnswer("more bytes than Content-Length")
                self._finish()
        except BadAnswer as exc:
            self._fail(Failure(exc))
            self._drop()

    def _head(self, head: bytes) -> None:
        status = head.partition(b"\r\n")[0].split(b" ", 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/1."):
            raise BadAnswer("not an HTTP/1.x answer")
        try:
            self._code = int(status[1])
        except ValueError:
            raise BadAnswer("bad status code") from None
        if status[0] == b"HTTP/1.0":
            self._keep = False
        # Only the framing headers matter here.
        for name, value, malformed in _FRAMING.findall(head.lower()):
            if malformed:
                raise BadAnswer("malformed framing header")
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise BadAnswer("bad Content-Length") from None
                if not 0 <= length <= _MAX_BODY:
                    raise BadAnswer("Content-Length out of range")
                if self._length is not None and length != self._length:
                    raise BadAnswer("two different Content-Lengths")
                self._length = length
            elif name == b"transfer-encoding":
                self._chunked = value.strip() == b"chunked"
            else:  # connection
                token = value.strip()
                if token == b"close":
                    self._keep = False
                elif token == b"keep-alive":
                    self._keep = True
        if self._chunked:
            if self._length is not None:
                self._keep = False  # chunked wins over Content-Length; never reuse (RFC 9112)
            self._length = None
        elif self._length is None:
            self._keep = False  # the body ends when the connection does

    def _read_chunked(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        pos, n = 0, len(buffer)
        while True:
            left = self._chunk_left
            if left > 0:  # inside a chunk's data
                take = min(left, n - pos)
                if take == 0:
                    break
                self._chunks.append(buffer[pos : pos + take])
                pos += take
                self._chunk_left = left - take or _CHUNK_END
            elif left == _CHUNK_SIZE:
                eol = buffer.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        raise BadAnswer("chunk size line too long")
                    break
                try:
                    size = int(buffer[pos:eol].split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BadAnswer("bad chunk size") from None
                pos = eol + 2
                if size < 0:
                    raise BadAnswer("bad chunk size")
                self._got += size
                if self._got > _MAX_BODY:
                    raise BadAnswer("answer too large")
                self._chunk_left = size if size else _TRAILERS
            elif left == _CHUNK_END:  # the CRLF after a chunk's data
                if n - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise BadAnswer("chunk not followed by CRLF")
                pos += 2
                self._chunk_left = _CHUNK_SIZE
            else:  # after the last chunk: trailer lines until an empty one
                eol = buffer.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > _MAX_HEAD:
                        raise BadAnswer("trailers too long")
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    if pos != n:
                        raise BadAnswer("bytes after the answer")
                    self._buffer = b""
                    self._finish()
                    return
        self._buffer = buffer[pos:]

    def _finish(self) -> None:
        waiting, self.waiting = self.waiting, None
        answer = _new_answer(Answer, (self._code, b"".join(self._chunks)))
        keep = self._keep and not self.closed
        self._reset()
        if keep:
            self.pool._release(self)
        else:
            self._drop()
        if waiting is not None:
            waiting.callback(answer)

    def _fail(self, failure: Failure) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is None:
            return
        data, self.retry = self.retry, None
        if data is not None and not self.received_any:
            # A reused connection failed before any byte of the answer (a server closing
            # it as it idled): send again on a new one, once. ``waiting`` gets that answer.
            again = self.again = self.pool._again(data, self.head_only, self.deadline)
            again.addBoth(self._answer_again, waiting)
            return
        waiting.errback(failure)

    def _answer_again(self, result: Answer | Failure, waiting: Deferred[Answer]) -> None:
        self.again = None
        if not waiting.called:
            waiting.callback(result)  # (a Failure fails it, as errback would)

    def _drop(self) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.closed = True
        self.pool._forget(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.lost.called:
            self.lost.callback(None)
        if self.waiting is None:
            return
        if self._in_body and not self._chunked and self._length is None:
            self._finish()  # a body delimited by the end of the connection
            return
        if not reason.check(ierror.ConnectionClosed):
            reason = Failure(ierror.ConnectionLost(reason.getErrorMessage()))
        self._fail(reason)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: WirePool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> _Connection:  # noqa: N802 (Twisted API)
        return _Connection(self.pool)


class WirePool:
    """Persistent connections to one CouchDB (``scheme://host:port``); ``request`` sends."""

    def __init__(
        self,
        reactor: Any,
        scheme: str,
        host: str,
        port: int,
        *,
        max_idle: int = 32,
        idle_timeout: float = 4.0,
        connect_timeout: float = 10.0,
        tls_options: Callable[[], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        endpoint: Any
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(reactor, host.encode("idna"), port, connect_timeout)
        else:
            kind = TCP6ClientEndpoint if literal.version == 6 else TCP4ClientEndpoint
            endpoint = kind(reactor, host, port, connect_timeout)
        if scheme == "https":
            from twisted.internet.ssl import optionsForClientTLS

            options = tls_options() if tls_options else optionsForClientTLS(host)
            endpoint = wrapClientTLS(options, endpoint)
        self._endpoint = endpoint
        self._factory = _ConnectionFactory(self)
        bracketed = f"[{host}]" if ":" in host else host
        self.host_header = bracketed if port in (80, 443) else f"{bracketed}:{port}"

    def request(
        self, data: bytes, *, head_only: bool, retry: bool, timeout: float | None = None
    ) -> Deferred[Answer]:
        """Send the bytes of one whole request; the Deferred fires with the Answer.

        ``retry``: the request may be sent again on a new connection if a reused one fails
        before any byte of the answer arrived (safe methods only). ``timeout``: seconds for
        the whole exchange (connecting included), after which the Deferred fails with
        :class:`WireTimeout` and the connection is aborted."""
        now = self.reactor.seconds()
        deadline = now + timeout if timeout is not None else None
        idle = self._idle
        while idle:  # the newest idle connection still fresh enough to reuse
            connection = idle.pop()
            if connection.closed or now - connection.idle_since > self.idle_timeout:
                connection._drop()
                continue
            return connection.send(data, head_only, deadline, retry)
        return Deferred.fromCoroutine(self._fresh(data, head_only, deadline))

    def _again(self, data: bytes, head_only: bool, deadline: float | None) -> Deferred[Answer]:
        """The second try of a request whose reused connection failed (see ``request``)."""
        return Deferred.fromCoroutine(self._fresh(data, head_only, deadline))

    async def _fresh(self, data: bytes, head_only: bool, deadline: float | None) -> Answer:
        connection = await self._connect()
        if deadline is not None and self.reactor.seconds() >= deadline:
            self._release(connection)
            raise WireTimeout()
        return await connection.send(data, head_only, deadline)

    async def _connect(self) -> _Connection:
        connection: _Connection = await self._endpoint.connect(self._factory)
        self._all.add(connection)
        # The endpoint's wrapper only passes every call on once connected: the TCP
        # connection may hand its bytes and its end to ours directly (over TLS it is the
        # TLS protocol's, which stays).
        transport: Any = connection.transport
        wrapper: Any = getattr(transport, "protocol", None)
        if type(wrapper) is _WRAPPER and wrapper._wrappedProtocol is connection:
            transport.protocol = connection
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed:
            return
        if len(self._idle) >= self.max_idle:
            connection._drop()
            return
        connection.idle_since = self.reactor.seconds()
        self._idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    async def close(self) -> None:
        """Close every idle connection; wait until they are gone."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection._drop()
        for connection in idle:
            await connection.lost
