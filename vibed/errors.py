"""Domain exceptions and their RFC 9457 problem+json rendering, in one place.

Every Klein app calls :func:`install_error_handlers` on itself (errors raised in a nested Klein
app skip the parent's handlers, klein#119). A handler never lets a traceback reach a client:
unknown exceptions are logged (without request bodies) and answered with a generic 500.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import RequestRedirect

_log = Logger(namespace="vibed.errors")

PROBLEM_BASE = "https://vibe.cloud/problems/"
PROBLEM_JSON = b"application/problem+json"


class Problem(Exception):
    """An error a client can act on: status, stable type slug, human title and detail."""

    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        status: int | None = None,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        if status is not None:
            self.status = status
        if slug is not None:
            self.slug = slug
        if title is not None:
            self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            doc["detail"] = self.detail
        doc.update(self.extra)
        return doc


class BadRequest(Problem):
    status, slug, title = 400, "bad-request", "Bad request"


class Unauthorized(Problem):
    status, slug, title = 401, "unauthorized", "Not authenticated"


class Forbidden(Problem):
    status, slug, title = 403, "forbidden", "Not allowed"


class NotFound(Problem):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(Problem):
    status, slug, title = 409, "conflict", "Conflict"


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Request body too large"


class UnsupportedMediaType(Problem):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class TooManyRequests(Problem):
    status, slug, title = 429, "too-many-requests", "Too many requests"

    def __init__(self, detail: str | None = None, *, retry_after: int) -> None:
        retry_after = max(1, int(retry_after))
        super().__init__(
            detail, headers={"Retry-After": str(retry_after)}, extra={"retryAfter": retry_after}
        )


class ServiceUnavailable(Problem):
    status, slug, title = 503, "unavailable", "Service unavailable"


def write_problem(request: IRequest, problem: Problem) -> bytes:
    """Set status and headers for ``problem`` on ``request``; return the body."""
    request.setResponseCode(problem.status)
    request.setHeader(b"Content-Type", PROBLEM_JSON)
    request.setHeader(b"Cache-Control", b"no-store")
    for name, value in problem.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    body = json.dumps(problem.body()).encode("utf-8")
    # Every caller answers with exactly this body: its length goes first, so the answer is
    # not sent chunked.
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def answer_unexpected(request: IRequest, failure: Failure) -> bytes | None:
    """The answer to a failure that is not a Problem (None: the client went away)."""
    if failure.check(CancelledError):
        # The client went away; nothing to answer.
        return None
    from vibed.couch.errors import CouchUnavailable

    if failure.check(CouchUnavailable):
        _log.warn("CouchDB unavailable: {reason}", reason=str(failure.value))
        return write_problem(
            request,
            ServiceUnavailable("The database is not reachable right now; try again shortly."),
        )
    _log.failure(
        "Unhandled error answering {method} {path}",
        failure,
        method=request.method,
        path=request.path,
    )
    return write_problem(
        request,
        Problem(
            "Internal error; it has been logged.",
            status=500,
            slug="internal",
            title="Internal server error",
        ),
    )


def answer_failure(request: IRequest, failure: Failure) -> bytes | None:
    """What the handlers of :func:`install_error_handlers` answer, for routes served
    outside Klein (:mod:`vibed.api.direct`)."""
    if failure.check(Problem):
        return write_problem(request, failure.value)
    return answer_unexpected(request, failure)


def _allowed_methods(request: IRequest) -> set[str]:
    """The methods the request's path takes, as the Klein app's URL map knows them."""
    from klein.interfaces import IKleinRequest

    mapper = getattr(IKleinRequest(request), "mapper", None)
    allowed: set[str] = set()
    if mapper is None:
        return allowed
    # werkzeug's own allowed_methods() gives up on a path that would redirect: ask per method.
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        try:
            mapper.match(method=method)
        except HTTPException:
            continue
        allowed.add(method)
    return allowed


def _not_found_page(request: IRequest) -> bytes | None:
    """A friendly HTML 404 for a browser navigating to an unknown address (API clients keep
    problem+json); None when the request is not a navigation."""
    from vibed.pages import not_found_page, wants_html

    return not_found_page(request) if wants_html(request) else None


def install_error_handlers(app: Klein) -> None:
    """Map Problems, routing errors and anything unexpected to problem+json on ``app``."""

    # Handlers take *args: a class-based Klein app passes its instance first.
    def _problem(*args: Any) -> bytes:
        request, failure = args[-2], args[-1]
        if failure.value.status == 404 and failure.value.slug == "not-found":
            page = _not_found_page(request)
            if page is not None:
                return page
        return write_problem(request, failure.value)

    def _routing(*args: Any) -> bytes:
        # werkzeug's own texts ("If you entered the URL manually...") never reach a client,
        # nor its redirects: they are built from the request's Host header, which the client
        # chooses (a path like /data//notes would answer 308 to http://evil.example/...).
        request, failure = args[-2], args[-1]
        exc = failure.value
        code = exc.code or 400
        if isinstance(exc, RequestRedirect):
            # werkzeug redirects to add a slash (a branch mount) before it checks the method:
            # a method the path itself does not take is a 405, anything else a 404.
            takes = _allowed_methods(request)
            method = (request.method or b"").decode("ascii", "replace")
            if takes and method not in takes:
                exc = MethodNotAllowed(valid_methods=sorted(takes))
                code = 405
        if isinstance(exc, RequestRedirect) or code == 404:
            page = _not_found_page(request)
            if page is not None:
                return page
            problem: Problem = NotFound(
                "Nothing is served at this path; the API is described at /openapi.json."
            )
        elif code == 405 and getattr(exc, "valid_methods", None):
            allowed = ", ".join(exc.valid_methods)
            problem = Problem(
                f"Allowed methods: {allowed}.",
                status=405,
                slug="method-not-allowed",
                title="Method not allowed",
                headers={"Allow": allowed},
            )
        else:
            problem = Problem(status=code if 400 <= code < 500 else 400)
        return write_problem(request, problem)

    def _unexpected(*args: Any) -> bytes | None:
        return answer_unexpected(args[-2], args[-1])

    register: Any = app.handle_errors
    register(Problem)(_problem)
    register(HTTPException)(_routing)
    register(Exception)(_unexpected)
