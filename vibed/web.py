"""The HTTP site: request bodies are capped *while they arrive*, so no client can make the
daemon buffer more than a route allows (twisted.web would otherwise read any body whole, into
memory when it is chunked, before a route sees it).

Routes that take large bodies (the local blob store's signed PUT) register a :class:`BodyPolicy`
for their path prefix: its own limit and, optionally, a factory for the file the body streams
into (so it can land in the blob directory and be renamed into place).

No client may hold a connection without making progress (:class:`VibeChannel`): a request's
head must be complete ``header_timeout`` seconds after it starts (or after the connection
opens), a body must keep arriving at ``body_min_rate`` bytes/s over every ``body_timeout``
window, and a keep-alive connection idle for ``idle_timeout`` is closed. And no single address
may hold more than ``max_per_address`` connections at once (:class:`AddressLimit`; trusted
proxies, which carry many clients, are exempt and must enforce it themselves).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any, cast
from typing import Protocol as TypingProtocol

from attrs import define, frozen
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import FileLogObserver, Logger, formatTime, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import (
    NO_BODY_CODES,
    RESPONSES,
    HTTPChannel,
    _escape,
    _IdentityTransferDecoder,
    datetimeToString,
    unquote,
)
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder
from twisted.web.iweb import INonQueuedRequestFactory, IRequest
from twisted.web.resource import IResource, _IEncodingResource
from twisted.web.server import Request, Site

from vibed.errors import PROBLEM_BASE, PROBLEM_JSON, answer_unexpected

_log = Logger(namespace="vibed.web")

DEFAULT_BODY_LIMIT = 1024 * 1024 + 16 * 1024  # the data API's 1 MiB documents, plus slack


@define
class BodyPolicy:
    """How bodies under one path prefix are received."""

    limit: Callable[[Request], int]
    content: Callable[[Request, int | None], IO[bytes]] | None = None


#: On every response unless a route sets its own: nothing served here may be framed
#: (clickjacking), sniffed into another type, or leak the URL it came from; and a response
#: that is not a page may load nothing (pages set their own Content-Security-Policy).
BASE_HEADERS = (
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Content-Security-Policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"),
)


def _canonical(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """``headers`` with their names as twisted.web's ``Headers`` stores them."""
    probe = Headers()
    for name, value in headers:
        probe.setRawHeaders(name, [value])
    return tuple((name, values[0]) for name, values in probe.getAllRawHeaders())


def set_clean_header(request: Any, name: bytes, value: bytes) -> None:
    """``request.setHeader(name, value)`` for a ``name`` already canonical (one of the
    constants below: CONTENT_TYPE, CACHE_CONTROL, CONTENT_LENGTH, ALLOW_ORIGIN, EXPOSE) and a
    ``value`` known to hold no CR, LF or other control byte (a constant, or digits): straight
    into the response's headers, without twisted's per-call name canonicalization and value
    sanitizing. Never for a value that came from a request or from CouchDB."""
    request.responseHeaders._rawHeaders[name] = [value]


#: BASE_HEADERS and the server's name, ready to go straight into a response's headers.
_PROCESS_HEADERS = _canonical((*BASE_HEADERS, (b"Server", b"vibed")))
#: Header names as twisted.web's ``Headers`` stores them, for :func:`set_clean_header`.
CONTENT_TYPE, CACHE_CONTROL, CONTENT_LENGTH, ALLOW_ORIGIN, EXPOSE = (
    name
    for name, _ in _canonical(
        (
            (b"content-type", b""),
            (b"cache-control", b""),
            (b"content-length", b""),
            (b"access-control-allow-origin", b""),
            (b"access-control-expose-headers", b""),
        )
    )
)
_S = (b"S", b"s", "S", "s")
_date_second = -1
_date_value = b""


def http_date() -> bytes:
    """The ``Date`` header's value for now (formatted once a second, not per request)."""
    global _date_second, _date_value
    now = time.time()
    second = int(now)
    if second != _date_second:
        _date_value = datetimeToString(now)
        _date_second = second
    return _date_value


def _may_be_form(content_type: bytes) -> bool:
    """Whether twisted.web may read a POST body of this Content-Type as a form (into the
    query arguments): the word "form", or an RFC 2047 encoded word that could spell it.
    (``find``, not ``in``: a bytes ``in`` first tries its operand as an integer, and the
    TypeError it makes and drops costs more than the search.)"""
    return content_type.lower().find(b"form") >= 0 or content_type.find(b"=?") >= 0


class VibeRequest(Request):
    """A Request that refuses bodies over its route's limit as soon as it can tell, sends the
    base security headers, names no server version, and answers a URL that is not UTF-8 with
    a problem of ours (Klein's is a text/html line and a logged traceback)."""

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:  # noqa: N802
        canonical = _canonical_names.get(name)
        if (
            canonical is not None
            and canonical != b"Server"
            and value.__class__ is bytes
            and value.find(b"\r") < 0
            and value.find(b"\n") < 0
        ):
            # What setRawHeaders stores for a name seen before and a value with no line
            # break to fold, without its three calls per header.
            self.responseHeaders._rawHeaders[canonical] = [value]
            return
        if name[:1] in _S and (
            (name.encode("ascii") if isinstance(name, str) else name).lower() == b"server"
        ):
            value = b"vibed"  # twisted.web would name itself and its version
        self.responseHeaders.setRawHeaders(name, [value])

    def process(self) -> None:
        # twisted.web's Request.process, with the headers every answer carries put straight
        # into the response's headers (names canonical, values known to be clean).
        raw: dict[bytes, list[bytes]] = self.responseHeaders._rawHeaders
        for name, value in _PROCESS_HEADERS:
            raw[name] = [value]
        channel: Any = self.channel
        self.site = channel.site
        raw[b"Date"] = [http_date()]
        if not self._url_is_utf8():
            body = json.dumps(
                {
                    "type": PROBLEM_BASE + "bad-request",
                    "title": "Bad request",
                    "status": 400,
                    "detail": "The URL (path or Host) is not valid UTF-8 once percent-decoded.",
                }
            ).encode()
            self.setResponseCode(400)
            self.setHeader(b"Content-Type", PROBLEM_JSON)
            self.setHeader(b"Cache-Control", b"no-store")
            self.setHeader(b"Content-Length", str(len(body)).encode())
            self.write(body)
            self.finish()
            return
        self.prepath = []
        segments = self.path[1:].split(b"/")
        self.postpath = segments if self.path.find(b"%") < 0 else list(map(unquote, segments))
        if self.path == b"*":
            self._handleStar()
            return
        try:
            resrc = self.site.getResourceFor(self)
            if _IEncodingResource.providedBy(resrc):
                encoder = resrc.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resrc)
        except BaseException:
            self.processingFailed(Failure())

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        # twisted.web parses a POST's Content-Type with the email package (about a tenth of
        # a proxied create) only to see whether the body is a form to decode into ``args``.
        # A type that cannot name a form (a JSON body's) skips that; forms are decoded as ever.
        if command == b"POST" and self._parsePOSTFormSubmission:
            ctype = self.requestHeaders._rawHeaders.get(b"Content-Type")
            if ctype and not _may_be_form(ctype[0]):
                self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)

    def _url_is_utf8(self) -> bool:
        path = self.path
        host = self.requestHeaders._rawHeaders.get(b"Host")
        if path.isascii() and path.find(b"%") < 0 and (not host or host[-1].isascii()):
            return True  # the usual case: nothing to decode
        try:
            unquote(path).decode("utf-8")
            (self.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    _vibe_limit: int = DEFAULT_BODY_LIMIT
    _vibe_received: int = 0
    _vibe_refused: bool = False

    def _policy(self) -> BodyPolicy | None:
        site = getattr(self.channel, "site", None)
        policies: dict[bytes, BodyPolicy] = getattr(site, "body_policies", {})
        if not policies:
            return None
        path = self.uri.split(b"?", 1)[0]
        if not path.startswith(tuple(policies)):
            return None  # the usual case: no policy for this path
        for prefix, policy in policies.items():
            if path.startswith(prefix):
                return policy
        return None

    def gotLength(self, length: int | None) -> None:
        # The channel calls gotLength before requestReceived sets method and uri, but it has
        # parsed the request line already: a policy needs the path (and the method) now.
        self.method = getattr(self.channel, "_command", None) or self.method
        self.uri = getattr(self.channel, "_path", None) or self.uri
        policy = self._policy()
        self._vibe_limit = policy.limit(self) if policy else DEFAULT_BODY_LIMIT
        if length is not None and length > self._vibe_limit:
            self._refuse()
            return
        if policy is not None and policy.content is not None:
            self.content = cast(Any, policy.content(self, length))
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._vibe_refused:
            return
        self._vibe_received += len(data)
        if self._vibe_received > self._vibe_limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        """Answer 413 at once and close: the rest of the body is never read."""
        self._vibe_refused = True
        body = json.dumps(
            {
                "type": PROBLEM_BASE + "payload-too-large",
                "title": "Request body too large",
                "status": 413,
                "detail": f"The body may be at most {self._vibe_limit} bytes.",
            }
        ).encode()
        transport = self.channel.transport
        if transport is None:
            return
        from vibed.cors import allowed

        # An app on another origin must see the 413, not a network error.
        cors = b"Access-Control-Allow-Origin: *\r\n" if allowed(self.uri.split(b"?")[0]) else b""
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/problem+json\r\n" + cors + b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        transport.loseConnection()
        # Bytes may still arrive until the close is done (TLS reads on until the client's own
        # close): none of them is read, as twisted.web does for a connection not kept alive.
        channel: Any = self.channel
        channel.dataReceived = channel.lineReceived = channel.rawDataReceived = _ignore
        if self.content is not None:
            try:
                self.content.close()
            except Exception:  # noqa: S110 - best effort on a refused upload
                pass


def _ignore(*args: object) -> None:
    """What a closing channel does with more bytes."""


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but a plain TCP connection with nothing queued sends it at
    once: twisted would queue it, ask epoll to report the socket writable, send on the next
    turn of the reactor and ask epoll to stop (two system calls and a reactor turn per
    write). What the socket does not take, and anything on another transport (TLS, a test's
    StringTransport), goes through ``write`` as before, so the order of bytes is kept.

    Only wrappers that forward writes unchanged are looked through: a TLS layer is a
    ``ProtocolWrapper`` too, and bytes sent past it would leave in clear."""
    raw = transport
    while isinstance(raw, ProtocolWrapper):
        if type(raw).write is not ProtocolWrapper.write:
            transport.write(data)  # TLS (or another wrapper that changes the bytes)
            return
        raw = raw.transport
    if (
        isinstance(raw, tcp.Connection)
        and not getattr(raw, "TLS", False)
        and raw.connected
        and not raw.disconnecting
        and not raw._writeDisconnected
        and not raw._tempDataBuffer
        and raw.offset == len(raw.dataBuffer)
    ):
        try:
            sent = raw.socket.send(data)
        except OSError:  # EAGAIN, or an error the transport will meet and report itself
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


@frozen
class ConnectionLimits:
    """How long a client may take, and how many connections one address may hold."""

    header_timeout: float = 20.0  # seconds for a request's head, from its first byte
    idle_timeout: float = 60.0  # seconds a keep-alive connection may wait for a request
    body_timeout: float = 30.0  # window over which a body must reach body_min_rate
    body_min_rate: int = 512  # bytes per second, averaged over each window
    max_per_address: int = 256  # open connections (realtime sockets included) per address
    trusted: tuple[Any, ...] = ()  # networks exempt from max_per_address (proxies)


def _simple_response(transport: Any, status: bytes, detail: str, slug: str) -> None:
    """Write a whole problem+json response on ``transport`` and close it."""
    code = int(status.split(b" ", 1)[0])
    body = json.dumps(
        {
            "type": PROBLEM_BASE + slug,
            "title": status.split(b" ", 1)[1].decode("ascii"),
            "status": code,
            "detail": detail,
        }
    ).encode()
    transport.write(
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: application/problem+json\r\n"
        b"Cache-Control: no-store\r\n"
        b"Connection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    transport.loseConnection()


#: Headers the one-pass parse leaves to twisted.web's parser.
_WHOLE_REQUEST_ODD = frozenset((b"Transfer-Encoding", b"Expect"))
#: twisted.web's own cache of canonical header names (read first: a method call saved).
_canonical_names: dict[bytes | str, bytes] = _nameEncoder._canonicalHeaderCache
#: A request line twisted.web's ``_parseRequestLine`` accepts, in one regular expression
#: instead of its Python loop over every byte of the target (a fifth of the parse): a token
#: method, a target of bytes 0x21 to 0xB0, HTTP/1.1 or 1.0, one space between each. A line
#: this refuses goes to twisted.web's parser, which then decides.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\xb0]+) (HTTP/1\.[01])\Z")


class LeanRoutes(TypingProtocol):
    """What a site answers on the lean path (:class:`LeanRequest`): vibed.api.direct's."""

    def match(self, method: bytes, path: bytes) -> Any:
        """Something to hand to :meth:`start` for this request, or None: not ours."""

    def start(self, request: LeanRequest, route: Any) -> None:
        """Answer ``request`` (its ``finish`` is called once the answer is written)."""


#: The methods the lean path takes (HEAD, OPTIONS and the rest keep twisted.web's answers).
_LEAN_METHODS = frozenset((b"GET", b"POST", b"PUT", b"DELETE"))


class LeanRequest:
    """A request answered without twisted.web's ``Request``: the usual request to a document
    route, taken whole by :meth:`VibeChannel._whole_request` (HTTP/1.1, kept alive: no
    ``Connection: close``; no query string, a body within the default limit and not a form).

    twisted.web's Request builds and tears down some forty attributes, two header objects,
    a resource traversal and its own bookkeeping for every request; this is what the route
    handlers, the error answers and the access log use of it, with the same meaning, and it
    writes the same bytes (tests/test_lean_request.py compares the two on the wire).
    Everything else about the connection (timers, keep-alive, pipelined bytes, the end of
    the request) stays the channel's own code."""

    __slots__ = (
        "channel",
        "method",
        "uri",
        "path",
        "clientproto",
        "requestHeaders",
        "responseHeaders",
        "content",
        "args",
        "code",
        "code_message",
        "sentLength",
        "startedWriting",
        "finished",
        "notifications",
        "chunked",
        "_disconnected",
    )

    def __init__(
        self,
        channel: VibeChannel,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: bytes,
        answer_headers: dict[bytes, list[bytes]],
    ) -> None:
        self.channel: VibeChannel | None = channel
        self.method = method
        self.uri = self.path = path
        self.clientproto = b"HTTP/1.1"
        self.requestHeaders = headers
        self.responseHeaders = Headers.__new__(Headers)  # no __init__: the table is given
        self.responseHeaders._rawHeaders = answer_headers
        self.content: io.BytesIO | None = io.BytesIO(body)
        self.args: dict[bytes, list[bytes]] = {}
        self.code = 200
        self.code_message = b"OK"
        self.sentLength = 0
        self.startedWriting = False
        self.finished = False
        self.notifications: list[Any] = []
        self.chunked = False
        self._disconnected = False

    # -- what the handlers ask (twisted.web's Request meanings) ------------------------------

    def getHeader(self, key: bytes) -> bytes | None:  # noqa: N802 (Twisted API)
        raw = self.requestHeaders._rawHeaders
        values = raw.get(_canonical_names.get(key) or key)
        if values is None and key not in _canonical_names:
            values = raw.get(_nameEncoder.encode(key))  # a name not seen before
        return values[-1] if values else None

    def getClientAddress(self) -> Any:  # noqa: N802 (Twisted API)
        channel = self.channel
        return channel.getPeer() if channel is not None else None

    def getHost(self) -> Any:  # noqa: N802 (Twisted API)
        channel = self.channel
        return channel.getHost() if channel is not None else None

    def isSecure(self) -> bool:  # noqa: N802 (Twisted API)
        channel = self.channel
        return channel is not None and bool(channel.isSecure())

    def loseConnection(self) -> None:  # noqa: N802 (Twisted API)
        channel = self.channel
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()

    setHeader = VibeRequest.setHeader  # names no server version  # noqa: N815

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:  # noqa: N802
        self.code = code
        self.code_message = (
            message if message is not None else RESPONSES.get(code, b"Unknown Status")
        )

    def notifyFinish(self) -> Deferred[None]:  # noqa: N802 (Twisted API)
        finished: Deferred[None] = Deferred()
        self.notifications.append(finished)
        return finished

    # -- the answer ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """The head and ``data`` in one send: an answer is written once, whole (the handlers'
        ``json_response`` and problems give its Content-Length; without one it is framed
        chunked, as twisted.web frames it, and ``finish`` ends it)."""
        if self.finished:
            raise RuntimeError("LeanRequest.write after finish")
        if self._disconnected or self.channel is None:
            return
        if self.startedWriting:
            raise RuntimeError("LeanRequest answers in one write")
        raw = self.responseHeaders._rawHeaders
        self.startedWriting = True
        code = self.code
        no_body = code in NO_BODY_CODES
        length = raw.get(b"Content-Length")
        if not no_body and b"Content-Type" not in raw and not (length and length[0] == b"0"):
            raw[b"Content-Type"] = [b"text/html"]  # twisted.web's default, as it would add
        if length is None and not no_body:
            raw[b"Transfer-Encoding"] = [b"chunked"]
            self.chunked = True
        head = [b"HTTP/1.1 %d " % code, self.code_message, b"\r\n"]
        for name, values in raw.items():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        if not no_body:
            self.sentLength += len(data)
            if not self.chunked:
                head.append(data)
            elif data:
                head.extend((b"%x\r\n" % len(data), data, b"\r\n"))
        send_now(self.channel.transport, b"".join(head))

    def finish(self) -> None:
        if self._disconnected:
            raise RuntimeError("LeanRequest.finish after its connection was lost")
        if self.finished:
            return
        if not self.startedWriting:
            self.write(b"")
        channel: Any = self.channel
        assert channel is not None
        if self.chunked:
            send_now(channel.transport, b"0\r\n\r\n")
        site = channel.site
        if site is not None:
            site.log(self)
        self.finished = True
        channel.requestDone(self)
        self.channel = None
        if self.content is not None:
            self.content.close()
            self.content = None
        notifications, self.notifications = self.notifications, []
        for waiting in notifications:
            waiting.callback(None)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self._disconnected = True
        self.channel = None
        if self.content is not None:
            self.content.close()
        notifications, self.notifications = self.notifications, []
        for waiting in notifications:
            waiting.errback(reason)


class VibeChannel(HTTPChannel):
    """An HTTPChannel that closes connections which do not make progress (module docstring)."""

    _vibe_phase = "head"  # head | body | handling | idle
    _vibe_timer: IDelayedCall | None = None
    _vibe_timer_at = 0.0  # when _vibe_timer is due
    _vibe_due: Callable[[], None] | None = None  # what to call at _vibe_deadline
    _vibe_deadline = 0.0
    _vibe_body_bytes = 0
    _vibe_window_start = 0

    @functools.cached_property  # (read on every request: looked up once per connection)
    def _limits(self) -> ConnectionLimits:
        site = getattr(self, "site", None)
        return getattr(site, "limits", None) or ConnectionLimits()

    # One timer per connection, moved lazily: arming sets a deadline and leaves a timer that
    # fires no later in place; when it fires early it sleeps again until the deadline. A
    # keep-alive connection serving request after request so schedules one timer every
    # ``header_timeout`` seconds instead of two per request.

    def _arm(self, delay: float, then: Callable[[], None]) -> None:
        deadline = self._vibe_seconds() + delay
        self._vibe_due = then
        self._vibe_deadline = deadline
        timer = self._vibe_timer
        if timer is not None:
            if self._vibe_timer_at <= deadline:
                return
            timer.cancel()
        self._vibe_timer = self.callLater(delay, self._fire)
        self._vibe_timer_at = deadline  # (timer.getTime(), without its call)

    def _disarm(self) -> None:
        self._vibe_due = None

    def stop_timing(self) -> None:
        """The connection left HTTP (a WebSocket took it over): no deadline any more, and no
        timer keeping this channel in memory until it would have fired."""
        self._vibe_due = None
        timer, self._vibe_timer = self._vibe_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _vibe_seconds(self) -> float:
        """Now, on the clock ``callLater`` schedules on (the reactor, or a test's Clock)."""
        owner = getattr(self.callLater, "__self__", None)
        seconds = getattr(owner, "seconds", None)
        if seconds is None:
            from twisted.internet import reactor

            seconds = cast(Any, reactor).seconds
        self._vibe_seconds = seconds  # type: ignore[method-assign]
        return cast(float, seconds())

    def _fire(self) -> None:
        self._vibe_timer = None
        due = self._vibe_due
        if due is None:
            return
        left = self._vibe_deadline - self._vibe_seconds()
        if left > 0:
            self._vibe_timer = self.callLater(left, self._fire)
            self._vibe_timer_at = self._vibe_deadline
            return
        self._vibe_due = None
        due()

    _vibe_peer: Any = None
    _vibe_host: Any = None
    #: Set by a route about to write a whole answer (headers, one body write, finish): the
    #: head is then held back and sent with the body, in one piece, by ``send_now``.
    vibe_whole_answer = False
    _vibe_head: list[bytes] | None = None

    def writeHeaders(  # noqa: N802 (Twisted API)
        self, version: bytes, code: bytes, reason: bytes, headers: Any
    ) -> None:
        if not self.vibe_whole_answer or not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        self.vibe_whole_answer = False
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._vibe_head = head

    def _vibe_flush(self, more: list[bytes]) -> None:
        head, self._vibe_head = self._vibe_head, None
        assert head is not None
        send_now(self.transport, b"".join(head + more))

    def write(self, data: bytes) -> None:
        if self._vibe_head is not None:
            self._vibe_flush([data])
        else:
            super().write(data)

    def writeSequence(self, iovec: list[bytes]) -> None:  # noqa: N802
        if self._vibe_head is not None:
            self._vibe_flush(list(iovec))
        else:
            super().writeSequence(iovec)

    def getPeer(self) -> Any:  # noqa: N802 (Twisted API)
        # Every Request asks (twice per request with the access log); the transport would
        # build a new address object each time.
        if self._vibe_peer is None:
            self._vibe_peer = super().getPeer()
        return self._vibe_peer

    def getHost(self) -> Any:  # noqa: N802 (Twisted API)
        if self._vibe_host is None:
            self._vibe_host = super().getHost()
        return self._vibe_host

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        super().connectionMade()
        self._vibe_phase = "head"
        self._arm(self._limits.header_timeout, self._head_too_slow)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        starting = self._vibe_phase == "idle" and data
        if starting:
            self._vibe_phase = "head"
        elif self._vibe_phase == "body":
            self._vibe_body_bytes += len(data)
        if (
            self._vibe_phase == "head"
            and not getattr(self.transport, "disconnecting", True)
            and self.line_mode
            and not self._buffer
            and not self._busyReceiving
            and not self.paused
            and not self.requests
            and self.persistent
            and self._HTTPChannel__first_line == 1
            and not self._HTTPChannel__header  # type: ignore[attr-defined]
            and not self._receivedHeaderSize
            and self._whole_request(data)
        ):
            return  # the whole head is here: no deadline for it to keep
        if starting:
            # The first byte of the next request: its head has header_timeout from now.
            self._arm(self._limits.header_timeout, self._head_too_slow)
        super().dataReceived(data)

    def _whole_request(self, data: bytes) -> bool:
        """Take ``data`` as one whole request in one piece, the usual case on a keep-alive
        connection (a request head, then exactly its Content-Length of body, nothing after):
        the head is parsed in one pass instead of a LineReceiver call, a ``lineReceived`` and
        a ``headerReceived`` per line. Return False, having changed nothing, for anything
        else or anything unusual (a folded or malformed line, a bare CR or LF, NUL, too many
        or too long headers, Transfer-Encoding, Expect, a second Content-Length, a body that
        is not all here, pipelined bytes): twisted.web's own parser then takes the same bytes
        and gives its usual answer, so every check it makes still decides those."""
        end = data.find(b"\r\n\r\n")
        if end <= 0:
            return False
        head = data[:end]
        # Every CR and LF in a CRLF pair and no NUL: the CRs, LFs and NULs together are two per
        # CRLF (each CRLF holds one CR and one LF). The head's size without its line ends is
        # what twisted.web counts against totalHeadersSize.
        crlf = head.count(b"\r\n")
        size = len(head) - 2 * crlf
        if len(head.translate(None, b"\r\n\x00")) != size:
            return False
        if crlf > self.maxHeaders or size > self.totalHeadersSize:
            return False
        lines = head.split(b"\r\n")
        if max(map(len, lines)) > self.MAX_LENGTH:
            return False
        request_line = _REQUEST_LINE.match(lines[0])
        if request_line is None:
            return False
        command, path, version = request_line.groups()
        headers: dict[bytes, list[bytes]] = {}
        length = 0
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[0] in b" \t":
                return False
            known = _canonical_names.get(name)
            if known is not None:
                name = known
            else:
                try:
                    name = _nameEncoder.encode(name)
                except InvalidHeaderName:
                    return False
            value = value.strip(b" \t")
            if name in _WHOLE_REQUEST_ODD:
                return False
            if name == b"Content-Length":
                if b"Content-Length" in headers or not value.isdigit():
                    return False
                length = int(value)
            headers.setdefault(name, []).append(value)
        body = data[end + 4 :]
        if len(body) != length:
            return False
        # From here on, what lineReceived, headerReceived and the identity decoder do.
        if self.timeOut is not None:  # (resetTimeout's own test: off for VibeSite's channels)
            self.resetTimeout()
        lean = self._lean_route(command, path, version, headers, length)
        if lean is not None:
            self._answer_lean(command, path, headers, body, lean)
            return True
        factory = self.requestFactory
        if INonQueuedRequestFactory.providedBy(factory):
            request = factory(self)
        else:
            request = factory(self, 0)
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        self._command, self._path, self._version = command, path, version
        self._receivedHeaderSize = size
        self._receivedHeaderCount = crlf
        request.requestHeaders._rawHeaders.update(headers)
        self.length = length
        if length:
            self._transferDecoder = _IdentityTransferDecoder(
                length, request.handleContentChunk, self._finishRequestBody
            )
        self.allHeadersReceived()
        if not length:
            self.allContentReceived()
            return True
        # The body, as LineReceiver hands it on: in raw mode, to the identity decoder, unless
        # the connection is closing (a 413 refused the length): then it stays unread.
        self.setRawMode()
        transport: Any = self.transport
        if transport is not None and transport.disconnecting:
            self._buffer = body
            return True
        self.rawDataReceived(body)
        return True

    def _lean_route(
        self,
        command: bytes,
        path: bytes,
        version: bytes,
        headers: dict[bytes, list[bytes]],
        length: int,
    ) -> Any:
        """(routes, route) to answer this whole request on the lean path, or None (twisted.web's
        Request then takes it, as it takes anything not plain: see :class:`LeanRequest`)."""
        site: Any = getattr(self, "site", None)
        routes: LeanRoutes | None = getattr(site, "lean_routes", None)
        if (
            routes is None
            or version != b"HTTP/1.1"
            or command not in _LEAN_METHODS
            or length > DEFAULT_BODY_LIMIT
        ):
            return None
        connection = headers.get(b"Connection")
        if connection is not None and b"close" in connection[0].lower().split(b" "):
            return None  # (twisted.web's own test, checkPersistence's: it answers and closes)
        host = headers.get(b"Host")
        if host and not host[-1].isascii():
            return None  # VibeRequest's own 400 for a URL that is not UTF-8
        if command == b"POST":
            ctype = headers.get(b"Content-Type")
            if ctype and _may_be_form(ctype[0]):
                return None  # twisted.web may read it as a form, into the query arguments
        policies = site.body_policies
        if policies and path.startswith(tuple(policies)):
            return None
        route = routes.match(command, path)
        return None if route is None else (routes, route)

    def _answer_lean(
        self,
        command: bytes,
        path: bytes,
        headers: dict[bytes, list[bytes]],
        body: bytes,
        route: Any,
    ) -> None:
        """What allHeadersReceived and allContentReceived do for a request with nothing more
        to come, then the route's answer, on a :class:`LeanRequest`."""
        received = Headers.__new__(Headers)  # no __init__: its table is set just below
        received._rawHeaders = headers
        answer = {name: [value] for name, value in _PROCESS_HEADERS}
        answer[b"Date"] = [http_date()]
        request = LeanRequest(self, command, path, received, body, answer)
        self.requests.append(request)
        self.length = 0
        self._receivedHeaderCount = 0
        self._receivedHeaderSize = 0
        self._transferDecoder = None
        self._vibe_due = None  # (_disarm, inline)
        self._vibe_phase = "handling"
        if self.timeOut:
            self._savedTimeOut = self.setTimeout(None)
        self._handlingRequest = True
        self.line_mode = 0  # (setRawMode) bytes arriving meanwhile wait in _dataBuffer
        routes, matched = route
        try:
            routes.start(request, matched)
        except BaseException:
            # What twisted.web's Request.process does with a route that raises: logged, and
            # a 500 if nothing was written yet.
            self._lean_failed(request, Failure())

    def _lean_failed(self, request: LeanRequest, failure: Failure) -> None:
        try:
            if request.startedWriting or request.finished:
                _log.failure("answering {method} {path}", failure, method=request.method,
                             path=request.path)  # fmt: skip
            else:
                body = answer_unexpected(cast(IRequest, request), failure)  # logs it too
                if body:
                    request.write(body)
            if not request.finished and not request._disconnected:
                request.finish()
        except Exception:
            _log.failure("answering a failed request")
            transport: Any = self.transport
            if transport is not None:
                transport.abortConnection()

    def allHeadersReceived(self) -> None:  # noqa: N802
        self._disarm()
        self._vibe_phase = "body"
        self._vibe_body_bytes = 0
        super().allHeadersReceived()
        if self._vibe_phase == "body" and self.length != 0:
            self._arm(self._limits.body_timeout, self._check_body)

    def allContentReceived(self) -> None:  # noqa: N802
        self._disarm()
        self._vibe_phase = "handling"
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:  # noqa: N802
        self.vibe_whole_answer = False
        if self._vibe_head is not None:  # a head with no body after it (never left unsent)
            self._vibe_flush([])
        self._vibe_phase = "idle"
        # twisted.web's HTTPChannel.requestDone, inline, with setLineMode's: every request
        # ends here.
        requests = self.requests
        if request is not requests[0]:
            raise TypeError
        del requests[0]
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        if self.persistent:
            self._handlingRequest = False
            if self._savedTimeOut:
                self.setTimeout(self._savedTimeOut)
            self.line_mode = 1
            buffered = self._dataBuffer  # bytes that came while the request was handled
            if buffered:  # (a body's end leaves b"" here)
                self._dataBuffer = []
                data = b"".join(buffered)
                if data:
                    self.dataReceived(data)
        else:
            self.loseConnection()
        if self._vibe_phase != "idle":
            return
        if self._buffer:
            # Replayed pipelined bytes may have started the next head without dataReceived.
            self._vibe_phase = "head"
            self._arm(self._limits.header_timeout, self._head_too_slow)
        elif self.persistent:
            # The keep-alive wait, on the same lazily moved timer (twisted.web's own idle
            # timeout, off for this channel, cancelled and scheduled a timer per request).
            self._arm(self._limits.idle_timeout, self._idle_too_long)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._vibe_due = None
        if self._vibe_timer is not None and self._vibe_timer.active():
            self._vibe_timer.cancel()
        self._vibe_timer = None
        super().connectionLost(reason)

    def _idle_too_long(self) -> None:
        self._vibe_timer = None
        if self._vibe_phase != "idle" or self.transport is None:
            return
        self.timeoutConnection()  # twisted.web's: log, close, abort if the close hangs

    def _head_too_slow(self) -> None:
        self._vibe_timer = None
        if self._vibe_phase != "head" or self.transport is None:
            return
        _log.info("Closing a connection whose request head did not arrive in time")
        _simple_response(
            self.transport,
            b"408 Request Timeout",
            f"The request head must arrive within {self._limits.header_timeout:g} seconds.",
            "request-timeout",
        )

    def _check_body(self) -> None:
        self._vibe_timer = None
        if self._vibe_phase != "body" or self.transport is None:
            return
        limits = self._limits
        if self._vibe_body_bytes < limits.body_min_rate * limits.body_timeout:
            _log.info("Closing a connection whose request body arrived too slowly")
            request = self.requests[-1] if self.requests else None
            if request is not None and getattr(request, "content", None) is not None:
                try:
                    request.content.close()
                except Exception:  # noqa: S110 - best effort on an abandoned upload
                    pass
            _simple_response(
                self.transport,
                b"408 Request Timeout",
                f"The request body must arrive at {limits.body_min_rate} bytes per second "
                "at least.",
                "request-timeout",
            )
            return
        self._vibe_body_bytes = 0
        self._arm(limits.body_timeout, self._check_body)


class VibeSite(Site):
    """Site + body policies + connection limits; the access log never shows a query string
    (tokens may ride in one, e.g. the realtime socket's)."""

    # A plain HTTP/1.1 channel (no HTTP/2 negotiation wrapper): vibed speaks HTTP/1.1.
    protocol = VibeChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        body_policies: dict[bytes, BodyPolicy] | None = None,
        access_log: str = "-",
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.limits = limits or ConnectionLimits()
        # No twisted.web timeout: VibeChannel times every phase, the keep-alive wait
        # (limits.idle_timeout) included, on one lazily moved timer per connection.
        super().__init__(resource, requestFactory=VibeRequest, timeout=None)
        self.body_policies: dict[bytes, BodyPolicy] = dict(body_policies or {})
        self.displayTracebacks = False
        #: ``-``: one line per request in the daemon's log; ``off``; or a file path. Lines
        #: for a file, and for a daemon log that goes to standard output (``twistd -n``, a
        #: container, systemd: every way vibed is deployed), are gathered and written in
        #: chunks of whole lines once a second (:class:`AccessLines`): a log event per
        #: request cost a fifth of a proxied get's CPU, a gathered line a few microseconds.
        #: A daemon log elsewhere (a daemonized twistd's twistd.log, syslog, a test's
        #: observer) still gets one log event per request.
        self.access_log = access_log
        #: Routes answered on the lean path (:class:`LeanRequest`), if any.
        self.lean_routes: LeanRoutes | None = None
        self._lines: AccessLines | None = None
        self._prefix = ""  # before each gathered line: the daemon log's own line prefix

    def startFactory(self) -> None:  # noqa: N802
        if self.access_log == "-":
            stream = daemon_log_stream()
            if stream is not None:
                self._lines = AccessLines(stream, close=False)
        elif self.access_log != "off":
            fd = os.open(
                self.access_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
            self._lines = AccessLines(fd, close=True)
        super().startFactory()  # starts the once-a-second _updateLogDateTime

    def stopFactory(self) -> None:  # noqa: N802
        if self._lines is not None:
            self._lines.close()
            self._lines = None
        super().stopFactory()

    def _updateLogDateTime(self) -> None:  # noqa: N802 (Twisted API)
        super()._updateLogDateTime()
        if self._lines is not None:
            self._lines.flush()
            if self.access_log == "-":
                self._prefix = formatTime(self.reactor.seconds()) + " [vibed.access#info] "

    def log(self, request: Any) -> None:
        if self.access_log == "off":
            return
        line = access_line(self._logDateTime, request)
        if self._lines is not None:
            self._lines.add(f"{self._prefix}{line}\n".encode())
            return
        log_file: Any = self._logFile  # the daemon log, through twisted's LoggingFile
        if log_file is not None:
            log_file.write(line + "\n")


#: The most bytes one write of gathered access-log lines carries: PIPE_BUF, so lines from
#: several workers sharing one pipe (a container's stdout) or one file never interleave
#: inside a line.
ACCESS_LOG_CHUNK = 4096


class AccessLines:
    """Access-log lines kept in memory and written to a file descriptor in whole lines, at
    most :data:`ACCESS_LOG_CHUNK` bytes a write (a longer line is written alone), whenever
    the next line would not fit and on :meth:`flush` (once a second, and when the site
    stops). A failed write drops what it held and is reported once in the daemon log; it
    never reaches the request that logged."""

    def __init__(self, fd: int, *, close: bool) -> None:
        self.fd = fd
        self._close = close
        self._pending: list[bytes] = []
        self._size = 0
        self._failing = False
        self._cut = False  # a failed write left part of a line: start the next on a new line

    def add(self, line: bytes) -> None:
        if self._size + len(line) > ACCESS_LOG_CHUNK:
            self.flush()
        self._pending.append(line)
        self._size += len(line)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending, self._size = [], 0
        if self._cut:
            data = b"\n" + data
        whole = len(data)
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as e:
            self._cut = self._cut or 0 < whole - len(data)
            if not self._failing:
                _log.error("access log: writing failed ({error}); lines dropped", error=e)
            self._failing = True
        else:
            self._failing = self._cut = False

    def close(self) -> None:
        self.flush()
        if self._close:
            os.close(self.fd)


def daemon_log_stream() -> int | None:
    """The file descriptor the daemon log is written to when it is this process's standard
    output (twistd -n's ``textFileLogObserver(sys.stdout)``, a worker's), else None."""
    for observer in getattr(globalLogPublisher, "_observers", ()):
        out = getattr(observer, "_outFile", None)
        if isinstance(observer, FileLogObserver) and out is sys.__stdout__ and out is not None:
            try:
                return out.fileno()
            except (OSError, ValueError):  # pragma: no cover - a closed or fake stdout
                return None
    return None


#: Bytes that twisted.web's access-log escaping (``_escape``) leaves as they are.
#: (Printable ASCII but the two quotes and the backslash; ``raw.translate(None, these)`` is
#: what ``raw`` holds besides them, in one pass, cheaper than a regular expression.)
_PLAIN_LOG = bytes(b for b in range(0x20, 0x7F) if b not in b"\"'\\")


def _log_text(value: bytes | str) -> str:
    raw = value if isinstance(value, bytes) else value.encode("ascii")
    return raw.decode("ascii") if not raw.translate(None, _PLAIN_LOG) else cast(str, _escape(raw))


def access_line(timestamp: str | None, request: Any) -> str:
    """twisted.web's ``combinedLogFormatter`` line for ``request``, without the query string
    (tokens may ride in one), escaped the same way but only where a value needs it."""
    client = request.getClientAddress()
    ip = client.host if isinstance(client, (IPv4Address, IPv6Address)) else b"-"
    ip = ip.encode("ascii", "replace") if isinstance(ip, str) else ip
    raw = request.requestHeaders._rawHeaders
    referrer = raw.get(b"Referer")
    agent = raw.get(b"User-Agent")
    fields = (
        ip,
        request.method,
        request.uri.split(b"?", 1)[0],
        request.clientproto,
        (referrer[-1] if referrer else b"") or b"-",
        (agent[-1] if agent else b"") or b"-",
    )
    # The usual case, every field plain: one check over all of them (the separator is one
    # of the plain bytes, so a field's escape cannot hide at a join).
    joined = b" ".join(fields)
    if not joined.translate(None, _PLAIN_LOG) and len(joined) - 5 <= _FIELDS_PLAIN_MAX:
        # A double quote is never plain, so none is inside a field: decoded once, the
        # fields are parted again at the quotes.
        ip_t, method, path, proto, ref_t, agent_t = b'"'.join(fields).decode("ascii").split('"')
    else:
        ip_t, method, path, proto, ref_t, agent_t = (
            _capped(_log_text(f), cap) for f, cap in zip(fields, _FIELD_CAPS, strict=True)
        )
    return (
        f'"{ip_t}" - - {timestamp} "{method} {path} {proto}" '
        f'{request.code:d} {request.sentLength or "-"} "{ref_t}" "{agent_t}"'
    )


#: Characters each escaped field of an access line keeps (ip, method, path, protocol,
#: referrer, user agent); a longer one is cut and ends with "...". A whole line, with the
#: daemon log's prefix, then stays under ACCESS_LOG_CHUNK, so it is written in one piece
#: that no other worker's write can split (a client may send 16 KiB heads).
_FIELD_CAPS = (64, 32, 1024, 32, 1024, 1024)
#: Plain fields this long in all are kept whole: the line still fits in one chunk (as it
#: does when cut, the caps adding up to 3,200).
_FIELDS_PLAIN_MAX = 3000


def _capped(text: str, cap: int) -> str:
    return text if len(text) <= cap else text[: cap - 3] + "..."


class _Counted(ProtocolWrapper):
    """A connection counted against its address until it closes (realtime sockets too: the
    WebSocket protocol replaces the HTTP channel inside this wrapper, which stays)."""

    factory: AddressLimit
    address: str = ""

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.factory.release(self.address)
        super().connectionLost(reason)

    # The HTTP channel resumes its producer (this wrapper) after every request, paused or
    # not; without these, ProtocolWrapper's ``__getattr__`` would find them on the transport
    # only after an AttributeError is made and dropped, each time. A resume goes on to the
    # transport only after a pause came through here: the transport's own resume (start
    # reading: four calls down to the reactor) is a no-op for one that was never paused, and
    # most requests pause nothing.
    _paused = False

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted API)
        self._paused = True
        transport: Any = self.transport
        transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted API)
        if self._paused:
            self._paused = False
            transport: Any = self.transport
            transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802 (Twisted API)
        transport: Any = self.transport
        transport.stopProducing()


class _Refuse(Protocol):
    """Answers 503 to a connection over its address's limit, and closes it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def connectionMade(self) -> None:  # noqa: N802
        _simple_response(
            self.transport,
            b"503 Service Unavailable",
            f"Too many connections from this address (at most {self.limit}); close some.",
            "too-many-connections",
        )


class AddressLimit(WrappingFactory):
    """Caps the connections one peer address holds open at once (module docstring)."""

    protocol = _Counted

    def __init__(self, site: VibeSite) -> None:
        super().__init__(site)
        self.site = site
        self.open: dict[str, int] = {}
        self.refused = 0

    def buildProtocol(self, addr: IAddress | None) -> Any:  # noqa: N802
        peer = str(getattr(addr, "host", "") or "")
        limits = self.site.limits
        exempt = not peer or _in_networks(peer, limits.trusted)
        host = address_key(peer)
        if not exempt and self.open.get(host, 0) >= limits.max_per_address:
            self.refused += 1
            if self.refused % 1000 == 1:
                _log.warn(
                    "Refusing connections from {host}: over {limit} open",
                    host=host,
                    limit=limits.max_per_address,
                )
            return _Refuse(limits.max_per_address)
        wrapper = cast(_Counted, super().buildProtocol(addr))
        if not exempt:
            self.open[host] = self.open.get(host, 0) + 1
            wrapper.address = host
        return wrapper

    def release(self, host: str) -> None:
        if not host:
            return
        left = self.open.get(host, 0) - 1
        if left > 0:
            self.open[host] = left
        else:
            self.open.pop(host, None)


def address_key(address: str) -> str:
    """What per-address limits count for a client ``address``: an IPv4 address as it is, an
    IPv6 address as its /64 network (one subscriber is routinely given a whole /64: counting
    single addresses would give one client 2**64 of them), an IPv4-mapped IPv6 address as
    the IPv4 address it maps. Anything else (not an IP address) as it is."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def _in_networks(host: str, networks: tuple[Any, ...]) -> bool:
    import ipaddress

    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in networks)
