"""The HTTP site: request bodies are capped *while they arrive*, so no client can make the
daemon buffer more than a route allows (twisted.web would otherwise read any body whole, into
memory when it is chunked, before a route sees it).

Routes that take large bodies (the local blob store's signed PUT) register a :class:`BodyPolicy`
for their path prefix: its own limit and, optionally, a factory for the file the body streams
into (so it can land in the blob directory and be renamed into place).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any, cast

from attrs import define
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from vibed.errors import PROBLEM_BASE

_log = Logger(namespace="vibed.web")

DEFAULT_BODY_LIMIT = 1024 * 1024 + 16 * 1024  # the data API's 1 MiB documents, plus slack
ACCESS_LOG_BUFFER = 64 * 1024


@define
class BodyPolicy:
    """How bodies under one path prefix are received."""

    limit: Callable[[Request], int]
    content: Callable[[Request, int | None], IO[bytes]] | None = None


class VibeRequest(Request):
    """A Request that refuses bodies over its route's limit as soon as it can tell."""

    _vibe_limit: int = DEFAULT_BODY_LIMIT
    _vibe_received: int = 0
    _vibe_refused: bool = False

    def _policy(self) -> BodyPolicy | None:
        site = getattr(self.channel, "site", None)
        policies: dict[bytes, BodyPolicy] = getattr(site, "body_policies", {})
        path = self.uri.split(b"?", 1)[0]
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
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/problem+json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        transport.loseConnection()
        if self.content is not None:
            try:
                self.content.close()
            except Exception:  # noqa: S110 - best effort on a refused upload
                pass


class VibeSite(Site):
    """Site + body policies; the access log never shows a query string (tokens may ride in
    one, e.g. the realtime socket's)."""

    def __init__(
        self,
        resource: IResource,
        body_policies: dict[bytes, BodyPolicy] | None = None,
        access_log: str = "-",
    ) -> None:
        super().__init__(resource, requestFactory=VibeRequest)
        self.body_policies: dict[bytes, BodyPolicy] = dict(body_policies or {})
        self.displayTracebacks = False
        #: ``-``: one line per request in the daemon's log; ``off``; or a file path, appended
        #: to through a buffer flushed every second (a log event per request costs about a
        #: tenth of a proxied request's CPU; a buffered line, a few microseconds).
        self.access_log = access_log
        if access_log not in ("-", "off"):
            self.logPath = access_log
        self._flusher: LoopingCall | None = None

    def _openLogFile(self, path: str | bytes) -> Any:  # noqa: N802 (Twisted API)
        return open(path, "a", ACCESS_LOG_BUFFER, encoding="utf-8", newline="\n")  # noqa: SIM115

    def startFactory(self) -> None:  # noqa: N802
        super().startFactory()
        if self.logPath and self._flusher is None:
            self._flusher = LoopingCall(self._flush)
            self._flusher.clock = self.reactor
            self._flusher.start(1.0, now=False)

    def stopFactory(self) -> None:  # noqa: N802
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self._flusher = None
        super().stopFactory()  # closes (and so flushes) the file

    def _flush(self) -> None:
        try:
            log_file: Any = self._logFile
            if log_file is not None:
                log_file.flush()
        except Exception:
            _log.failure("flushing the access log")

    def log(self, request: Any) -> None:
        if self.access_log == "off":
            return
        uri = request.uri
        request.uri = uri.split(b"?", 1)[0]
        try:
            super().log(request)
        finally:
            request.uri = uri
