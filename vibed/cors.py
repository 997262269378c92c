"""CORS: which routes a web app on another origin may call, and how.

Callable from any origin (``Access-Control-Allow-Origin: *``, never with credentials, so a
browser sends no cookie and exposes nothing a cookie would have earned):

- the bearer-token API: ``/data``, ``/blob``, ``/me``, ``/realtime``;
- the OAuth endpoints an app's page calls: ``/auth/token``, ``/auth/revoke``, and the
  metadata and keys under ``/.well-known/``;
- the SDK's files under ``/sdk/`` (a module script from another origin needs CORS).

Everything else, in particular the cookie routes (``/auth/refresh``, ``/auth/logout``,
``/auth/login``, ``/auth/signup``, the consent form), answers no CORS header at all and stays
same-origin. Preflights (``OPTIONS`` with ``Access-Control-Request-Method``) on the allowed
paths are answered here, before routing, with ``Authorization``, ``Content-Type`` and
``If-Match`` allowed and ``ETag``, ``Location``, ``Retry-After`` and ``WWW-Authenticate``
exposed. The local blob store's signed URLs (``/blob/local/``) answer their own CORS;
``/me/key`` (the wrapped key) answers none.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from vibed.web import ALLOW_ORIGIN, EXPOSE, set_clean_header

PREFIXES = (b"/data/", b"/blob/", b"/me/", b"/sdk/", b"/.well-known/")
EXACT = (b"/data", b"/blob", b"/me", b"/realtime", b"/auth/token", b"/auth/revoke")
# Signed URLs: their route sets its own CORS headers. The wrapped key: only the agent (an
# extension with host access) and vibed's own pages read it, never a page of another origin.
EXCLUDED = (b"/blob/local/", b"/me/key")

ALLOW_METHODS = b"GET, POST, PUT, DELETE"
ALLOW_HEADERS = b"Authorization, Content-Type, If-Match, If-None-Match"
EXPOSE_HEADERS = b"ETag, Location, Retry-After, WWW-Authenticate, Content-Length"
MAX_AGE = b"600"


def allowed(path: bytes) -> bool:
    """Whether ``path`` (no query, as sent) may be called from any origin. Decided on the
    percent-decoded path, the one the router matches: ``/me/%6Bey`` is ``/me/key``."""
    if path.find(b"%") >= 0:  # (not ``in``: see vibed.web's requestReceived)
        path = unquote_to_bytes(path)
    if path.startswith(EXCLUDED):
        return False
    return path in EXACT or path.startswith(PREFIXES)


@implementer(IResource)
class CORSResource:
    """Wraps the API's root resource (a leaf: Klein routes everything itself)."""

    isLeaf = True

    def __init__(self, wrapped: IResource) -> None:
        self.wrapped = wrapped

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:  # noqa: N802
        return self.wrapped.getChildWithDefault(name, request)

    def putChild(self, path: bytes, child: IResource) -> None:  # noqa: N802
        self.wrapped.putChild(path, child)

    def render(self, request: IRequest) -> Any:
        path = request.uri.split(b"?", 1)[0]
        if not allowed(path):
            return self.wrapped.render(request)
        set_clean_header(request, ALLOW_ORIGIN, b"*")
        if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
            request.setResponseCode(204)
            request.setHeader(b"Access-Control-Allow-Methods", ALLOW_METHODS)
            request.setHeader(b"Access-Control-Allow-Headers", ALLOW_HEADERS)
            request.setHeader(b"Access-Control-Max-Age", MAX_AGE)
            request.setHeader(b"Content-Length", b"0")
            return b""
        set_clean_header(request, EXPOSE, EXPOSE_HEADERS)
        return self.wrapped.render(request)
