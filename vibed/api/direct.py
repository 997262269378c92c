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

from vibed.errors import answer_failure
from vibed.web import VibeChannel

from .data import DataAPI

__all__ = ["DirectRoutes"]

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

    def render(self, request: IRequest) -> Any:
        path = request.path
        match = _ROUTE.match(path) if path.startswith(b"/data/") else None
        if match is None:
            return self.fallback.render(request)
        collection, doc_id = match.groups()
        if doc_id is None:
            handler = self._collection.get(request.method)
            args: tuple[str, ...] = (collection.decode("ascii"),)
        else:
            handler = self._document.get(request.method)
            args = (collection.decode("ascii"), doc_id.decode("ascii"))
        if handler is None:
            return self.fallback.render(request)  # HEAD, OPTIONS, 405s: Klein's answers
        return self._run(request, handler, args)

    def _run(self, request: IRequest, handler: Handler, args: tuple[str, ...]) -> Any:
        finished = False
        answering: Deferred[bytes] = Deferred.fromCoroutine(handler(request, *args))

        def gone(failure: Failure) -> None:
            nonlocal finished
            finished = True
            answering.cancel()  # the client went away: stop working for it

        def done(_: object) -> None:
            nonlocal finished
            finished = True

        cast(Any, request).notifyFinish().addCallbacks(done, gone)

        def write(body: bytes | None) -> None:
            if finished:
                return
            if body:
                channel = cast(Any, request).channel
                if isinstance(channel, VibeChannel):
                    channel.vibe_whole_answer = True  # the head goes out with the body
                request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            if finished:
                if not failure.check(CancelledError):
                    _log.failure("after the client went away", failure)
                return
            write(answer_failure(request, failure))

        answering.addCallbacks(write, failed)
        answering.addErrback(lambda f: _log.failure("writing an answer", f))
        return NOT_DONE_YET
