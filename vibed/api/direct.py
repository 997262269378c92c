"""The data API's document routes, answered without Klein's routing.

``GET/POST /data/{collection}`` and ``GET/PUT/DELETE /data/{collection}/{id}`` are most of
what apps send. Klein reaches them through two nested apps, each building a werkzeug
environment, binding a URL map and matching rules (about a quarter of vibed's CPU per proxied
request, measured with py-spy). These paths are simple: a collection and a document id are
URL-safe by construction (:mod:`vibed.layout`), so one regular expression over the raw path
recognises them, and the same :class:`~vibed.api.data.DataAPI` methods answer, with the same
error mapping (:func:`vibed.errors.answer_failure`) and the same cancellation when the client
goes away. Everything else, including any path with a percent-escape, goes to Klein as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from vibed.cors import EXPOSE_HEADERS
from vibed.couch.wire import Pending
from vibed.errors import ServiceUnavailable, answer_failure, write_problem
from vibed.web import ALLOW_ORIGIN, EXPOSE, LeanRequest, VibeChannel

from .data import DataAPI

__all__ = ["DirectRoutes", "LeanDirectRoutes"]

_log = Logger(namespace="vibed.api.direct")

#: ``/data/<collection>[/<id>]``, in the characters layout allows (no escapes, no "_index").
_ROUTE = re.compile(rb"/data/([a-z][a-z0-9_-]{0,63})(?:/([A-Za-z0-9][A-Za-z0-9._~-]{0,199}))?\Z")

Handler = Callable[..., Coroutine[Any, Any, bytes]]


@implementer(IResource)
class DirectRoutes:
    """In front of the API's Klein resource: serves the document routes, passes the rest."""

    isLeaf = True

    def __init__(self, data: DataAPI, fallback: IResource) -> None:
        self.fallback = fallback
        self._collection: dict[bytes, Handler] = {
            b"GET": data.list_documents,
            b"POST": data.create_document,
        }
        self._document: dict[bytes, Handler] = {
            b"GET": data.get_document,
            b"PUT": data.put_document,
            b"DELETE": data.delete_document,
        }

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:  # noqa: N802
        return self.fallback.getChildWithDefault(name, request)

    def putChild(self, path: bytes, child: IResource) -> None:  # noqa: N802
        self.fallback.putChild(path, child)

    def route(self, method: bytes, path: bytes) -> tuple[Handler, tuple[str, ...]] | None:
        """The handler of ``method`` on ``path`` and its arguments, or None: not ours."""
        match = _ROUTE.match(path) if path.startswith(b"/data/") else None
        if match is None:
            return None
        collection, doc_id = match.groups()
        if doc_id is None:
            handler = self._collection.get(method)
            args: tuple[str, ...] = (collection.decode("ascii"),)
        else:
            handler = self._document.get(method)
            args = (collection.decode("ascii"), doc_id.decode("ascii"))
        return None if handler is None else (handler, args)

    def render(self, request: IRequest) -> Any:
        found = self.route(request.method, request.path)
        if found is None:
            return self.fallback.render(request)  # HEAD, OPTIONS, 405s: Klein's answers
        handler, args = found
        return self._run(request, handler, args)

    def _run(self, request: IRequest, handler: Handler, args: tuple[str, ...]) -> Any:
        _Answer(request, handler(request, *args))
        return NOT_DONE_YET


class LeanDirectRoutes:
    """The same routes for the channel's lean path (:class:`vibed.web.LeanRequest`): a whole
    request the channel parsed, answered without twisted.web's Request. ``cors``: the site
    puts these routes behind :class:`vibed.cors.CORSResource`, whose headers every answer
    then carries first, as it would add them."""

    def __init__(self, routes: DirectRoutes, *, cors: bool) -> None:
        self.routes = routes
        self.cors = cors
        #: ``match(method, path)``: DirectRoutes.route itself (no call in between).
        self.match: Callable[[bytes, bytes], tuple[Handler, tuple[str, ...]] | None]
        self.match = routes.route

    def start(self, request: LeanRequest, route: tuple[Handler, tuple[str, ...]]) -> None:
        # Every path a route matched is plain /data/... (no '%': _ROUTE), which
        # vibed.cors.allowed always allows.
        if self.cors:  # (set_clean_header's store, inline)
            raw = request.responseHeaders._rawHeaders
            raw[ALLOW_ORIGIN] = [b"*"]
            raw[EXPOSE] = [EXPOSE_HEADERS]
        handler, args = route
        _Answer(request, handler(request, *args))  # type: ignore[arg-type]


class _Answer:
    """One request's answer on a document route.

    It drives the handler's coroutine itself, where ``Deferred.fromCoroutine`` would wrap it
    in a Deferred, copy a context and run a Deferred's callback chain for each await; and it
    is told of the request's end by being one of the request's notifications, where
    ``notifyFinish`` would make another Deferred. The handlers await only Deferreds (the
    CouchDB client's answers): each one awaited is resumed from by one callback, or, for the
    wire client's ``Pending``, by its ``resume`` without a callback chain. When the
    client goes away first, the Deferred being awaited is cancelled (the handler meets
    ``CancelledError``) and whatever it answers is dropped, as before."""

    __slots__ = ("request", "coro", "waiting", "finished")

    def __init__(self, request: IRequest, coro: Coroutine[Any, Any, bytes]) -> None:
        self.request = request
        self.coro = coro
        self.waiting: Deferred[Any] | None = None
        self.finished = False
        notifications = getattr(request, "notifications", None)
        if isinstance(notifications, list):  # twisted.web's Request: told on its end
            notifications.append(self)
        else:
            cast(Any, request).notifyFinish().addCallbacks(self.callback, self.errback)
        self.step()

    # -- what the request tells its notifications (a Deferred's callback and errback) ----

    def callback(self, _: object) -> None:
        """The answer went out."""
        self.finished = True

    def errback(self, _: object) -> None:
        """The connection was lost first: stop working for the client."""
        self.finished = True
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            try:
                waiting.cancel()
            except Exception:  # never out of the channel's connectionLost
                _log.failure("cancelling for a client that went away")

    # -- the handler ---------------------------------------------------------------------

    def step(self, result: object = None) -> None:
        """Run the handler to its next await, or to its end: the awaited Deferred's result
        is what its ``await`` returns, its failure what it raises (as ``inlineCallbacks``
        does: thrown in, since the Deferred is still running its callbacks)."""
        self.waiting = None
        try:
            if isinstance(result, Failure):
                awaited = result.throwExceptionIntoGenerator(cast(Any, self.coro))
            else:
                awaited = self.coro.send(result)
        except StopIteration as done:
            self.write(done.value)
            return None
        except BaseException:
            self.failed(Failure())
            return None
        self.waiting = awaited
        if type(awaited) is Pending:  # CouchDB's answer, handed to step as it comes
            awaited.resume = self.step
        elif isinstance(awaited, Deferred):
            awaited.addBoth(self.step)  # returns None: the result was the handler's to take
        else:
            self.waiting = None
            self.coro.close()
            self.failed(Failure(TypeError(f"a document route awaited {type(awaited)!r}")))
        return None

    def write(self, body: bytes | None) -> None:
        if self.finished:
            return
        request: Any = self.request
        try:
            if body:
                channel = request.channel
                if isinstance(channel, VibeChannel) and not isinstance(request, LeanRequest):
                    channel.vibe_whole_answer = True  # the head goes out with the body
                request.write(body)
            request.finish()
        except Exception:
            _log.failure("writing an answer")
            self._abort()

    def failed(self, failure: Failure) -> None:
        if self.finished:
            if not failure.check(CancelledError):
                _log.failure("after the client went away", failure)
            return
        try:
            if failure.check(CancelledError):
                # Cancelled while the client is still here (not by its leaving): a 503 to
                # retry, not an empty 200.
                answer: bytes | None = write_problem(
                    self.request,
                    ServiceUnavailable("The request was cancelled; try again shortly."),
                )
            else:
                answer = answer_failure(self.request, failure)
        except Exception:
            _log.failure("answering a failure")
            self._abort()
            return
        self.write(answer)

    def _abort(self) -> None:
        """No answer can be written: drop the connection rather than leave it waiting."""
        self.finished = True
        channel = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None:
            abort = getattr(transport, "abortConnection", None) or transport.loseConnection
            abort()
