"""A paisley-style asynchronous CouchDB 3.x client on treq.

This module owns every HTTP exchange vibed has with its CouchDB-protocol server:
URL building (each path segment percent-encoded, JSON-valued query parameters
JSON-encoded), the mapping of answers to the typed errors of
:mod:`vibed.couch.errors`, the per-request timeout, ``_find`` paging and the
continuous ``_changes`` feed with heartbeat watchdog and reconnection.

It is written against the CouchDB 3.x HTTP API. Other servers of the same
protocol (PouchDB Server on a developer machine) are tolerated by detecting what
an answer lacks, never by relying on what they do differently: ``seq`` and
``_rev`` values are opaque strings (integers are turned into strings, never
parsed), and ``filter=_selector`` is never sent.

Credentials live only in ``CouchServer.auth`` and leave the process only as an
``Authorization`` header: they are not in ``CouchServer.url``, not in any
``repr`` and not in any log event or error message.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, cast
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

from attrs import define, field
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import RESPONSES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from vibed import jsonfast
from vibed.couch.errors import (
    CouchBadRequest,
    CouchConflict,
    CouchError,
    CouchNotFound,
    CouchUnauthorized,
    CouchUnavailable,
)
from vibed.couch.wire import WirePool, WireTimeout

__all__ = ["ChangesFeed", "CouchDatabase", "CouchServer", "FindResult"]

_log = Logger(namespace="vibed.couch")

#: Failures below HTTP: the server could not be reached or the exchange broke off.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    ierror.ConnectError,  # refused, no route, TCP timeout, connecting cancelled
    ierror.DNSLookupError,
    ierror.ConnectionClosed,  # lost / done
    ierror.TimeoutError,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    RequestNotSent,
    OSError,
)

#: CouchDB database names (plus the system databases); anything else is refused
#: before a request is built, since one malformed request can take a server down.
#: Ids that quote(id, safe="") leaves as they are, but for ":" (which it makes %3A).
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.~:-]+\Z")
_DB_NAME = re.compile(r"^(?:[a-z][a-z0-9_$()+/-]*|_users|_replicator|_global_changes)$")

#: Mango's own default page size, sent explicitly so every server pages alike.
FIND_DEFAULT_LIMIT = 25

#: Prefix of the bookmarks this client synthesises for servers whose ``_find``
#: answers carry none; what follows is base64url JSON, opaque to callers.
_BOOKMARK_PREFIX = "vb1."

_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 10.0

_NOTHING: Any = object()


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _seq(value: Any) -> str:
    """An update sequence as the opaque string it is (some servers send integers)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def _db_path(name: str) -> str:
    if not isinstance(name, str) or not _DB_NAME.match(name):
        raise CouchBadRequest(
            400,
            "illegal_database_name",
            "Database names must match [a-z][a-z0-9_$()+/-]*.",
        )
    return quote(name, safe="")


def _doc_path(docid: str) -> str:
    if not isinstance(docid, str) or not docid:
        raise CouchBadRequest(400, "bad_request", "Document id must be a non-empty string.")
    for prefix in ("_design/", "_local/"):
        if docid.startswith(prefix) and len(docid) > len(prefix):
            return prefix + quote(docid[len(prefix) :], safe="")
    if docid.startswith("_"):
        # Such a path would name an endpoint (_all_docs, _find...), not a document.
        raise CouchBadRequest(
            400, "bad_request", "Only reserved document ids may start with underscore."
        )
    if _PLAIN_ID.match(docid):  # the usual stored id, "collection:id": no need for quote()
        return docid.replace(":", "%3A")
    return quote(docid, safe="")


def _query(params: Mapping[str, str]) -> str:
    return "?" + urlencode(params, quote_via=quote) if params else ""


def _error_for(status: int, body: bytes) -> CouchError:
    """The typed error for a non-2xx answer, with CouchDB's own error/reason when given."""
    error = reason = ""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = str(parsed.get("error") or "")
        reason = str(parsed.get("reason") or "")
    if not error:
        error = RESPONSES.get(status, b"").decode("ascii", "replace").lower().replace(" ", "_")
    cls: type[CouchError]
    if status == 404:
        cls = CouchNotFound
    elif status in (409, 412):
        cls = CouchConflict
    elif status in (401, 403):
        cls = CouchUnauthorized
    elif 400 <= status < 500:
        cls = CouchBadRequest
    elif status >= 500:
        cls = CouchUnavailable
    else:
        cls = CouchError
    return cls(status, error, reason)


def _transport_error(exc: BaseException) -> CouchUnavailable:
    if isinstance(exc, ierror.ConnectionRefusedError):
        return CouchUnavailable(0, "connection_refused", "connection refused")
    if isinstance(exc, ierror.DNSLookupError):
        return CouchUnavailable(0, "dns_lookup_failed", "host name did not resolve")
    return CouchUnavailable(0, "unavailable", type(exc).__name__)


def _is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancelled request, which Agent wraps once the request is sent."""
    reasons = getattr(exc, "reasons", None) or []
    return isinstance(exc, CancelledError) or any(
        isinstance(r, Failure) and r.check(CancelledError) for r in reasons
    )


class _BodyReader(Protocol):
    """Receives a response body chunk by chunk; ``done`` fires when it ends."""

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self.done: Deferred[None] = Deferred(lambda _d: self.abort())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self._on_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def abort(self) -> None:
        """Close the connection under the body; ``done`` then fails."""
        transport = cast(Any, self.transport)
        if transport is not None:
            transport.stopProducing()


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without a log line per connection opened/closed."""

    noisy = False


def quiet_pool(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """An HTTPConnectionPool whose connections do not log "Starting factory" lines."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory  # noqa: SLF001 - the documented way to quiet it
    return pool


@define
class CouchServer:
    """A CouchDB server: ``url`` (no credentials, trailing slash) reached through ``http``."""

    url: str
    http: HTTPClient
    auth: tuple[str, str] | None = field(default=None, repr=False)
    timeout: float = 10.0
    #: Schedules timeouts (a ``Clock`` in tests); the global reactor when None.
    clock: IReactorTime | None = field(default=None, repr=False)
    #: The connection pool ``close()`` empties, when the server was given one.
    pool: HTTPConnectionPool | None = field(default=None, repr=False)
    #: The bare Agent under ``http``, for streamed responses (see ``_open_stream``);
    #: without it they go through ``http`` too.
    agent: IAgent | None = field(default=None, repr=False)
    #: The lean request path (:mod:`vibed.couch.wire`) every JSON request takes when set;
    #: ``http`` (treq) otherwise, as tests that script answers with StubTreq do.
    wire: WirePool | None = field(default=None, repr=False)
    _wire_prefix: bytes = field(default=b"", init=False, repr=False)
    _wire_headers: bytes = field(default=b"", init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if "@" in urlsplit(self.url).netloc:
            # Not echoing the URL: it holds the credentials.
            raise ValueError("CouchServer.url must not hold credentials: use from_url()")
        if not self.url.endswith("/"):
            self.url += "/"
        if self.wire is not None:
            self._wire_prefix = quote(urlsplit(self.url).path, safe="/%").encode("ascii")
            headers = [f"Host: {self.wire.host_header}", "Accept: application/json"]
            if self.auth is not None:
                token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
                headers.append(f"Authorization: Basic {token}")
            self._wire_headers = ("\r\n".join(headers) + "\r\n").encode("latin-1")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 10.0,
        reactor: Any = None,
        pool: HTTPConnectionPool | None = None,
    ) -> CouchServer:
        """A server for ``http[s]://[user:password@]host:port[/prefix]/``.

        Percent-encoded credentials are decoded into ``auth``; the URL keeps
        neither them nor any query or fragment. Without ``pool``, a persistent
        connection pool of the server's own is made.
        """
        if reactor is None:
            reactor = _default_reactor()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a CouchDB URL is http(s)://[user:password@]host[:port]/")
        auth: tuple[str, str] | None = None
        userinfo, at, host = parts.netloc.rpartition("@")
        if at:
            user, _colon, password = userinfo.partition(":")
            auth = (unquote(user), unquote(password))
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        if pool is None:
            pool = quiet_pool(reactor)
            pool.maxPersistentPerHost = 32  # concurrent requests to one host are the norm
        agent = Agent(reactor, pool=pool)
        hostname = parts.hostname
        wire = WirePool(
            reactor,
            parts.scheme,
            hostname,
            parts.port or (443 if parts.scheme == "https" else 80),
            max_idle=pool.maxPersistentPerHost,
            connect_timeout=timeout,
        )
        return cls(
            url=urlunsplit((parts.scheme, host, path, "", "")),
            http=HTTPClient(agent),
            auth=auth,
            timeout=timeout,
            clock=reactor,
            pool=pool,
            agent=agent,
            wire=wire,
        )

    def _clock(self) -> IReactorTime:
        return cast(IReactorTime, self.clock or _default_reactor())

    def _headers(self, *, json_body: bool) -> Headers:
        headers = Headers({b"Accept": [b"application/json"]})
        if json_body:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
        if self.auth is not None:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode())
            headers.setRawHeaders(b"Authorization", [b"Basic " + token])
        return headers

    def _open(self, method: str, path: str, params: Mapping[str, str], body: Any) -> Deferred[Any]:
        """Start a request; the Deferred fires with the (unbuffered) response."""
        data = None if body is _NOTHING else json.dumps(body).encode("utf-8")
        return cast(
            "Deferred[Any]",
            self.http.request(
                method,
                self.url + path + _query(params),
                headers=self._headers(json_body=data is not None),
                data=data,
                unbuffered=True,
                allow_redirects=False,
            ),
        )

    def _open_stream(self, path: str, params: Mapping[str, str]) -> Deferred[Any]:
        """Start a GET whose body is a long-lived stream, sent without ``Accept-Encoding``.

        treq always offers gzip, and a server or proxy that takes the offer
        buffers the compressed stream until it ends (PouchDB Server does), so no
        change or heartbeat would arrive: streams go through the bare ``agent``.
        """
        if self.agent is None:
            return self._open("GET", path, params, _NOTHING)
        url = EncodedURL.from_text(self.url + path + _query(params)).to_uri().to_text()
        return cast(
            "Deferred[Any]",
            self.agent.request(b"GET", url.encode("ascii"), self._headers(json_body=False), None),
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = _NOTHING,
    ) -> Coroutine[Any, Any, Any]:
        """Send ``method`` to ``path`` (already encoded, relative to ``url``); the JSON answer.

        The whole exchange, body included, must end within ``timeout``
        seconds, or it is aborted with :class:`CouchUnavailable`.

        (Not a coroutine itself: it hands over the coroutine that does the work, so the
        caller's ``await`` resumes one coroutine less per answer.)
        """
        if self.wire is not None:
            return self._request_wire(self.wire, method, path, params or {}, body)
        return self._request_agent(method, path, params or {}, body)

    async def _request_agent(
        self, method: str, path: str, params: Mapping[str, str], body: Any
    ) -> Any:
        """``request`` through treq's agent (a server made without the wire pool)."""
        timed_out = False
        reader: _BodyReader | None = None
        opening = self._open(method, path, params, body)

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            if reader is None:
                opening.cancel()
            else:
                reader.abort()

        timer: IDelayedCall = self._clock().callLater(self.timeout, expire)
        try:
            response = await opening
            chunks: list[bytes] = []
            reader = _BodyReader(chunks.append)
            response.deliverBody(reader)
            await reader.done
        except CancelledError:
            if timed_out:
                raise CouchUnavailable(
                    0, "timeout", f"no answer within {self.timeout:g} s"
                ) from None
            raise
        except _TRANSPORT_ERRORS as exc:
            if timed_out:
                raise CouchUnavailable(
                    0, "timeout", f"no answer within {self.timeout:g} s"
                ) from None
            if _is_cancellation(exc):
                raise CancelledError() from exc
            raise _transport_error(exc) from None
        finally:
            if timer.active():
                timer.cancel()
        status: int = response.code
        raw = b"".join(chunks)
        if not 200 <= status < 300:
            raise _error_for(status, raw)
        if method == "HEAD" or not raw:
            return None
        try:
            return jsonfast.loads(raw)
        except ValueError:
            raise CouchUnavailable(status, "bad_response", "answer is not JSON") from None

    async def _request_wire(
        self, wire: WirePool, method: str, path: str, params: Mapping[str, str], body: Any
    ) -> Any:
        """``request`` on the lean path: the request's bytes, written whole, and its Answer."""
        target = path + _query(params) if params else path
        try:
            raw_target = target.encode("ascii")
        except UnicodeEncodeError:
            raw_target = quote(target, safe="/?&=%:@!$'()*+,;-._~").encode("ascii")
        head = method.encode("ascii") + b" " + self._wire_prefix + raw_target + b" HTTP/1.1\r\n"
        if body is _NOTHING:
            data = head + self._wire_headers + b"\r\n"
        else:
            payload = jsonfast.dumps(body).encode("utf-8")
            data = (
                head
                + self._wire_headers
                + b"Content-Type: application/json\r\nContent-Length: "
                + str(len(payload)).encode("ascii")
                + b"\r\n\r\n"
                + payload
            )
        try:
            answer = await wire.request(
                data,
                head_only=method == "HEAD",
                retry=method in ("GET", "HEAD"),
                timeout=self.timeout,
            )
        except WireTimeout:
            raise CouchUnavailable(0, "timeout", f"no answer within {self.timeout:g} s") from None
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc) from None
        status = answer.code
        raw = answer.body
        if not 200 <= status < 300:
            raise _error_for(status, raw)
        if method == "HEAD" or not raw:
            return None
        try:
            return jsonfast.loads(raw)
        except ValueError:
            raise CouchUnavailable(status, "bad_response", "answer is not JSON") from None

    async def info(self) -> dict[str, Any]:
        """``GET /``: the server's welcome (``couchdb``, ``version``, ``vendor``...)."""
        return cast(dict[str, Any], await self.request("GET", ""))

    async def create_db(self, name: str) -> bool:
        """Create database ``name``: True if created, False if it already existed."""
        try:
            await self.request("PUT", _db_path(name))
        except CouchConflict as exc:
            if exc.status == 412:
                return False
            raise
        return True

    async def delete_db(self, name: str) -> bool:
        """Delete database ``name``: True if deleted, False if it did not exist."""
        # CouchDB answers 404 for a missing database, but not every server of the
        # protocol does (PouchDB Server says ok): ask first instead of assuming.
        if not await self.db_exists(name):
            return False
        try:
            await self.request("DELETE", _db_path(name))
        except CouchNotFound:
            return False
        return True

    async def db_exists(self, name: str) -> bool:
        """``HEAD /db``: whether database ``name`` exists."""
        try:
            await self.request("HEAD", _db_path(name))
        except CouchNotFound:
            return False
        return True

    async def all_dbs(self) -> list[str]:
        """``GET /_all_dbs``: every database name."""
        return cast(list[str], await self.request("GET", "_all_dbs"))

    def database(self, name: str) -> CouchDatabase:
        """The database ``name`` (no request is made)."""
        return CouchDatabase(self, name)

    async def close(self) -> None:
        """Close the idle connections of this server's pools."""
        if self.pool is not None:
            await self.pool.closeCachedConnections()
        if self.wire is not None:
            await self.wire.close()


@define(frozen=True)
class FindResult:
    """One page of a ``_find``: pass ``bookmark`` back for the next one (None: no more)."""

    docs: list[dict[str, Any]]
    bookmark: str | None
    warning: str | None = None


def _encode_bookmark(skip: int) -> str:
    raw = json.dumps({"skip": skip}, separators=(",", ":")).encode()
    return _BOOKMARK_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_bookmark(bookmark: str) -> int:
    payload = bookmark[len(_BOOKMARK_PREFIX) :]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        skip = decoded["skip"]
    except (ValueError, TypeError, KeyError):
        skip = None
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise CouchBadRequest(400, "bad_request", "Invalid bookmark.")
    return skip


async def _raise(error: Exception) -> Any:
    """A coroutine that raises ``error`` when awaited (as the coroutine it stands for would)."""
    raise error


def _bool(value: bool) -> str:
    return "true" if value else "false"


@define
class CouchDatabase:
    """One database of ``server``; every method is one request (two for ``delete_db``)."""

    server: CouchServer
    name: str

    @property
    def _path(self) -> str:
        return _db_path(self.name)

    async def create(self) -> bool:
        """Create this database: True if created, False if it already existed."""
        return await self.server.create_db(self.name)

    async def exists(self) -> bool:
        """Whether this database exists."""
        return await self.server.db_exists(self.name)

    async def info(self) -> dict[str, Any]:
        """``GET /db``: database information; ``update_seq`` as an opaque string."""
        info = cast(dict[str, Any], await self.server.request("GET", self._path))
        for key in ("update_seq", "purge_seq"):
            if key in info:
                info[key] = _seq(info[key])
        return info

    # (The answers are annotated, not ``cast``: in Python 3.11 a cast is a function call, and
    # these run on every request.)

    # get and put are on every document read and write: not coroutines themselves, they
    # hand over the request's (see CouchServer.request), checking the id when awaited.

    def get(self, docid: str, *, rev: str | None = None) -> Coroutine[Any, Any, dict[str, Any]]:
        """The document ``docid`` (at ``rev`` if given); CouchNotFound if missing or deleted."""
        try:
            path = f"{self._path}/{_doc_path(docid)}"
        except CouchBadRequest as e:
            return _raise(e)
        params = {"rev": rev} if rev is not None else None
        return self.server.request("GET", path, params=params)

    def put(self, doc: dict[str, Any]) -> Coroutine[Any, Any, dict[str, Any]]:
        """Write ``doc`` under its ``_id`` (with ``_rev`` to update); ``{ok, id, rev}``.

        A missing or stale ``_rev`` on an existing document raises CouchConflict.
        """
        if "_id" not in doc:
            return _raise(CouchBadRequest(400, "bad_request", "Document must have an _id."))
        try:
            path = f"{self._path}/{_doc_path(doc['_id'])}"
        except CouchBadRequest as e:
            return _raise(e)
        return self.server.request("PUT", path, body=doc)

    async def post(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Create ``doc`` with a server-chosen id unless it has one; ``{ok, id, rev}``."""
        answer: dict[str, Any] = await self.server.request("POST", self._path, body=doc)
        return answer

    async def delete(self, docid: str, rev: str) -> dict[str, Any]:
        """Delete revision ``rev`` of ``docid``; ``{ok, id, rev}`` of the tombstone."""
        path = f"{self._path}/{_doc_path(docid)}"
        answer: dict[str, Any] = await self.server.request("DELETE", path, params={"rev": rev})
        return answer

    async def bulk_docs(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``POST _bulk_docs``: one result per doc, in order; per-doc errors are in them."""
        result = await self.server.request("POST", f"{self._path}/_bulk_docs", body={"docs": docs})
        return cast(list[dict[str, Any]], result)

    async def all_docs(
        self,
        *,
        startkey: str | None = None,
        endkey: str | None = None,
        keys: list[str] | None = None,
        include_docs: bool = False,
        limit: int | None = None,
        skip: int | None = None,
        descending: bool = False,
        inclusive_end: bool = True,
    ) -> dict[str, Any]:
        """``_all_docs`` over a key range, or (``keys``) exactly those ids, via POST."""
        params: dict[str, str] = {}
        if startkey is not None:
            params["startkey"] = json.dumps(startkey)
        if endkey is not None:
            params["endkey"] = json.dumps(endkey)
        if include_docs:
            params["include_docs"] = "true"
        if limit is not None:
            params["limit"] = str(int(limit))
        if skip is not None:
            params["skip"] = str(int(skip))
        if descending:
            params["descending"] = "true"
        if not inclusive_end:
            params["inclusive_end"] = "false"
        path = f"{self._path}/_all_docs"
        if keys is not None:
            result = await self.server.request("POST", path, params=params, body={"keys": keys})
        else:
            result = await self.server.request("GET", path, params=params)
        return cast(dict[str, Any], result)

    async def find(
        self,
        selector: dict[str, Any],
        *,
        fields: list[str] | None = None,
        sort: list[Any] | None = None,
        limit: int | None = None,
        bookmark: str | None = None,
        use_index: str | list[str] | None = None,
    ) -> FindResult:
        """One page of a Mango query; ``limit`` None means Mango's default of 25.

        The returned bookmark is None once a page comes back short. Servers that
        answer without a bookmark get one synthesised here, which the next call
        turns into ``skip``.
        """
        page = FIND_DEFAULT_LIMIT if limit is None else int(limit)
        body: dict[str, Any] = {"selector": selector, "limit": page}
        if fields is not None:
            body["fields"] = fields
        if sort is not None:
            body["sort"] = sort
        if use_index is not None:
            body["use_index"] = use_index
        skipped = 0
        if bookmark is not None:
            if bookmark.startswith(_BOOKMARK_PREFIX):
                skipped = body["skip"] = _decode_bookmark(bookmark)
            else:
                body["bookmark"] = bookmark
        result = cast(
            dict[str, Any], await self.server.request("POST", f"{self._path}/_find", body=body)
        )
        docs = cast(list[dict[str, Any]], result.get("docs", []))
        next_bookmark: str | None = None
        if len(docs) >= page > 0:
            server_bookmark = result.get("bookmark")
            if isinstance(server_bookmark, str) and server_bookmark:
                next_bookmark = server_bookmark
            else:
                next_bookmark = _encode_bookmark(skipped + len(docs))
        warning = result.get("warning")
        return FindResult(docs, next_bookmark, warning if isinstance(warning, str) else None)

    async def create_index(
        self,
        fields: list[Any],
        *,
        name: str,
        ddoc: str,
        partial_filter_selector: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a Mango JSON index; an identical existing one answers ``result: exists``."""
        index: dict[str, Any] = {"fields": fields}
        if partial_filter_selector is not None:
            index["partial_filter_selector"] = partial_filter_selector
        body = {"index": index, "name": name, "ddoc": ddoc, "type": "json"}
        path = f"{self._path}/_index"
        try:
            result = await self.server.request("POST", path, body=body)
        except CouchConflict:
            # Two processes creating the design doc at once: the second sees it now.
            result = await self.server.request("POST", path, body=body)
        return cast(dict[str, Any], result)

    async def changes(
        self, *, since: str = "0", include_docs: bool = False, limit: int | None = None
    ) -> dict[str, Any]:
        """The normal ``_changes`` feed after ``since``; ``last_seq`` and each ``seq`` as str."""
        params = {"since": str(since)}
        if include_docs:
            params["include_docs"] = "true"
        if limit is not None:
            params["limit"] = str(int(limit))
        result = cast(
            dict[str, Any],
            await self.server.request("GET", f"{self._path}/_changes", params=params),
        )
        for row in result.get("results", []):
            if isinstance(row, dict) and "seq" in row:
                row["seq"] = _seq(row["seq"])
        if "last_seq" in result:
            result["last_seq"] = _seq(result["last_seq"])
        return result

    def changes_feed(
        self,
        on_change: Callable[[dict[str, Any]], object],
        *,
        since: str = "now",
        include_docs: bool = True,
        heartbeat_ms: int = 10_000,
        clock: IReactorTime | None = None,
        on_connected: Callable[[], object] | None = None,
        on_error: Callable[[CouchError], object] | None = None,
    ) -> ChangesFeed:
        """A continuous ``_changes`` feed of this database (not started)."""
        return ChangesFeed(
            database=self,
            on_change=on_change,
            last_seq=str(since),
            include_docs=include_docs,
            heartbeat_ms=heartbeat_ms,
            clock=clock,
            on_connected=on_connected,
            on_error=on_error,
        )


@define(eq=False)
class ChangesFeed:
    """A continuous ``_changes`` feed that keeps itself connected.

    ``on_change(row)`` is called once per change row, in order, with
    ``row["seq"]`` as a string; ``last_seq`` follows it. The feed reconnects with
    ``since=last_seq`` after a backoff (0.5 s doubling to 10 s, back to 0.5 s after
    a connection the server accepted) when the connection drops, the server
    answers an error or cannot be reached, or nothing (not even a heartbeat)
    arrives for three heartbeat periods. ``since="now"`` is pinned to the
    database's ``update_seq`` before the first connection, so a reconnection never
    skips changes. Exceptions from the callbacks are logged, never fatal.
    ``on_connected()`` runs each time the server accepts the feed, ``on_error(e)``
    each time a connection fails or ends in error.
    """

    database: CouchDatabase
    on_change: Callable[[dict[str, Any]], object] = field(repr=False)
    last_seq: str = "now"
    include_docs: bool = True
    heartbeat_ms: int = 10_000
    clock: IReactorTime | None = field(default=None, repr=False)
    on_connected: Callable[[], object] | None = field(default=None, repr=False)
    on_error: Callable[[CouchError], object] | None = field(default=None, repr=False)

    _running: bool = field(default=False, init=False)
    _backoff: float = field(default=_BACKOFF_INITIAL, init=False)
    _session: Deferred[None] | None = field(default=None, init=False, repr=False)
    _reader: _BodyReader | None = field(default=None, init=False, repr=False)
    _opening: Deferred[Any] | None = field(default=None, init=False, repr=False)
    _watchdog: IDelayedCall | None = field(default=None, init=False, repr=False)
    _stale: bool = field(default=False, init=False, repr=False)
    _retry: IDelayedCall | None = field(default=None, init=False, repr=False)
    _buffer: bytes = field(default=b"", init=False, repr=False)
    _stopped: list[Deferred[None]] = field(factory=list, init=False, repr=False)

    @property
    def running(self) -> bool:
        """Whether the feed was started and not stopped."""
        return self._running

    def _clock(self) -> IReactorTime:
        return self.clock or self.database.server._clock()

    def start(self) -> None:
        """Connect (again and again, until ``stop()``)."""
        if self._running:
            return
        self._running = True
        self._backoff = _BACKOFF_INITIAL
        self._connect()

    def stop(self) -> Deferred[None]:
        """Stop; the Deferred fires once the connection is closed. No callbacks after this."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._session is None:
            return succeed(None)
        stopped: Deferred[None] = Deferred()
        self._stopped.append(stopped)
        if self._reader is not None:
            self._reader.abort()
        else:
            self._session.cancel()
        return stopped

    def _connect(self) -> None:
        self._retry = None
        if not self._running:
            return
        session = Deferred.fromCoroutine(self._run())
        self._session = session
        session.addErrback(
            lambda f: _log.failure("changes feed of {db}: bug", f, db=self.database.name)
        )
        session.addBoth(self._ended)

    def _ended(self, _: object) -> None:
        self._session = None
        self._reader = None
        self._opening = None
        self._disarm()
        if self._running:
            delay = self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
            _log.info(
                "changes feed of {db} reconnects in {delay} s since {since}",
                db=self.database.name,
                delay=delay,
                since=self.last_seq,
            )
            self._retry = self._clock().callLater(delay, self._connect)
            return
        waiters, self._stopped = self._stopped, []
        for waiter in waiters:
            waiter.callback(None)

    def _arm(self) -> None:
        """(Re)start the countdown to declaring the connection dead."""
        self._disarm()
        self._watchdog = self._clock().callLater(3 * self.heartbeat_ms / 1000, self._expire)

    def _disarm(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _expire(self) -> None:
        self._watchdog = None
        self._stale = True
        if self._reader is not None:
            self._reader.abort()
        elif self._opening is not None:
            self._opening.cancel()

    async def _run(self) -> None:
        """One connection: open it, read it until it ends; errors are reported, not raised."""
        self._stale = False
        self._buffer = b""
        server = self.database.server
        try:
            if self.last_seq == "now":
                self.last_seq = _seq((await self.database.info())["update_seq"])
            params = {
                "feed": "continuous",
                "since": self.last_seq,
                "heartbeat": str(int(self.heartbeat_ms)),
                "include_docs": _bool(self.include_docs),
            }
            self._arm()
            self._opening = server._open_stream(f"{self.database._path}/_changes", params)
            response = await self._opening
            self._opening = None
            self._arm()
            if response.code != 200:
                chunks: list[bytes] = []
                self._reader = _BodyReader(chunks.append)
                response.deliverBody(self._reader)
                await self._reader.done
                raise _error_for(response.code, b"".join(chunks))
            self._backoff = _BACKOFF_INITIAL
            if self.on_connected is not None and self._running:
                self._call(self.on_connected)
            self._reader = _BodyReader(self._received)
            response.deliverBody(self._reader)
            await self._reader.done
            self._received(b"\n")  # a last line without its newline
            if self._running:
                _log.info("changes feed of {db} ended by the server", db=self.database.name)
        except CancelledError:
            if self._running and self._stale:
                self._report(CouchUnavailable(0, "timeout", "no heartbeat from the server"))
            elif self._running:
                raise
        except CouchError as exc:
            self._report(exc)
        except _TRANSPORT_ERRORS as exc:
            if self._stale:
                self._report(CouchUnavailable(0, "timeout", "no heartbeat from the server"))
            else:
                self._report(_transport_error(exc))

    def _report(self, exc: CouchError) -> None:
        if not self._running:
            return
        _log.warn(
            "changes feed of {db} failed: {error}",
            db=self.database.name,
            error=str(exc),
        )
        if self.on_error is not None:
            self._call(self.on_error, exc)

    def _call(self, callback: Callable[..., object], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            _log.failure("changes feed of {db}: callback failed", db=self.database.name)

    def _received(self, data: bytes) -> None:
        self._arm()
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not self._running:
                return
            line = line.strip()
            if not line:
                continue  # heartbeat
            try:
                row = json.loads(line)
            except ValueError:
                _log.warn("changes feed of {db}: unreadable line", db=self.database.name)
                continue
            if not isinstance(row, dict):
                continue
            if "seq" in row:
                self.last_seq = row["seq"] = _seq(row["seq"])
                self._call(self.on_change, row)
            elif "last_seq" in row:
                self.last_seq = _seq(row["last_seq"])
            elif "error" in row:
                _log.warn(
                    "changes feed of {db}: server error {error}: {reason}",
                    db=self.database.name,
                    error=str(row.get("error")),
                    reason=str(row.get("reason", "")),
                )
