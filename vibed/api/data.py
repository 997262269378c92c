"""``/data/*``: an identity's collections of JSON documents (issue 3); see docs/data.md.

Every route needs ``Authorization: Bearer`` with a data scope: ``data:*``, or
``data:read:<collection>`` for reads (a document, listings and queries, the index list) and
``data:write:<collection>`` for writes (create, update, delete, declare an index). The
collection name and document id are checked before anything else reaches CouchDB
(:mod:`vibed.data` owns every check and every CouchDB exchange).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from attrs import define
from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.routing import BaseConverter

from vibed import layout
from vibed.config import Config
from vibed.couch import CouchBadRequest, CouchConflict, CouchNotFound, CouchServer
from vibed.couch.errors import CouchUnauthorized
from vibed.data import (
    MAX_DOC_BYTES,
    MAX_FIELD_CHARS,
    MAX_INDEX_FIELDS,
    MAX_LIMIT,
    MAX_NESTING,
    Action,
    BookmarkCodec,
    DataService,
    check_body,
    check_collection,
    check_doc_id,
    check_rev,
    parse_fields,
    parse_index_fields,
    parse_limit,
    parse_selector,
    parse_sort,
    scope_allows,
)
from vibed.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    install_error_handlers,
)
from vibed.naming import is_idn
from vibed.tokens import TokenIssuer

from .http import authenticate, json_response, read_json_object
from .openapi import _json, _problem, _ref  # the shared OpenAPI helpers

_log = Logger(namespace="vibed.api.data")

T = TypeVar("T")

LIST_PARAMS = ("q", "limit", "bookmark", "sort", "fields")


def _params(request: IRequest, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once, all known, all UTF-8."""
    args: dict[bytes, list[bytes]] = getattr(request, "args", None) or {}
    out: dict[str, str] = {}
    for raw_name, values in args.items():
        name = raw_name.decode("utf-8", "replace")
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "none"
            raise BadRequest(
                f"Unknown query parameter {name[:40]!r} (this route takes: {takes}).",
                slug="bad-query",
            )
        if len(values) != 1:
            raise BadRequest(f"Give {name!r} once.", slug="bad-query")
        try:
            out[name] = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{name!r} is not valid UTF-8.", slug="bad-query") from None
    return out


def _if_match(request: IRequest) -> str | None:
    raw = request.getHeader(b"if-match")
    if raw is None:
        return None
    value = raw.decode("latin-1").strip()
    if value.startswith("W/"):
        raise BadRequest("If-Match takes the strong ETag of the document.", slug="invalid-rev")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return check_rev(value)


def _one_rev(*candidates: str | None) -> str | None:
    given = {c for c in candidates if c is not None}
    if len(given) > 1:
        raise BadRequest("Two different revisions were given; send one.", slug="invalid-rev")
    return given.pop() if given else None


#: CouchDB answers the checks did not foresee; :func:`_problem_for` says what each becomes.
_REFUSALS = (CouchBadRequest, CouchConflict, CouchNotFound, CouchUnauthorized)


def _problem_for(refusal: Exception) -> Exception:
    """The problem a client gets for one of the ``_REFUSALS``."""
    if isinstance(refusal, CouchBadRequest):
        _log.info("CouchDB refused a data request: {error}", error=refusal.error)
        return BadRequest("The database refused the request.", slug="refused")
    if isinstance(refusal, CouchConflict):
        return Conflict("A concurrent change got there first; try again.")
    if isinstance(refusal, CouchNotFound):
        return NotFound("Not found.")
    _log.error("CouchDB refused vibed's credentials")
    return ServiceUnavailable("The database refused this server's credentials.")


async def _couch(call: Awaitable[T]) -> T:
    """Await a service call; CouchDB's refusals become problems (:func:`_problem_for`).

    The document routes, on every request, catch ``_REFUSALS`` themselves rather than await
    through this: each coroutine between a handler and CouchDB's answer is one more to
    resume."""
    try:
        return await call
    except _REFUSALS as e:
        raise _problem_for(e) from None


class DocIdSegment(BaseConverter):
    """A document id in a path: any segment but ``_index``, so that ``PUT /data/c/_index``
    is a 405 of the index route rather than a bad document id (ids are checked, with a
    clear message, by the handlers)."""

    regex = r"(?!_index$)[^/]+"


@define(slots=False)
class DataAPI:
    issuer: TokenIssuer
    service: DataService

    app = Klein()
    app.url_map.converters["docid"] = DocIdSegment
    install_error_handlers(app)

    def _authorize(self, request: IRequest, collection: str, action: Action) -> tuple[str, str]:
        """(idn, collection) of a caller allowed to ``action`` the collection; else 4xx."""
        claims = authenticate(request, self.issuer)
        name = check_collection(collection)
        if not is_idn(claims.sub):
            raise Forbidden("This access token is not an identity's.", slug="insufficient-scope")
        if not scope_allows(claims.scp, action, name):
            scope = f"data:{action}:{name}"
            raise Forbidden(
                f"This access token may not {action} collection {name!r}: it needs the "
                f"scope '{scope}' or 'data:*'.",
                slug="insufficient-scope",
                headers={
                    "WWW-Authenticate": f'Bearer realm="vibe", error="insufficient_scope", '
                    f'scope="{scope}"'
                },
            )
        return claims.sub, name

    # -- a collection ------------------------------------------------------------------

    @app.route("/<collection>", methods=["GET"])
    async def list_documents(self, request: IRequest, collection: str) -> bytes:
        idn, name = self._authorize(request, collection, "read")
        params = _params(request, LIST_PARAMS)
        selector = parse_selector(params.get("q"), name)
        sort = parse_sort(params.get("sort"))
        fields = parse_fields(params.get("fields"))
        limit = parse_limit(params.get("limit"))
        bookmark = params.get("bookmark")
        try:
            if not selector and sort is None:
                page = await self.service.list_page(
                    idn, name, limit=limit, bookmark=bookmark, fields=fields
                )
            else:
                page = await self.service.query(
                    idn,
                    name,
                    selector=selector,
                    sort=sort,
                    limit=limit,
                    bookmark=bookmark,
                    fields=fields,
                )
        except _REFUSALS as e:
            raise _problem_for(e) from None
        return json_response(request, {"docs": page.docs, "bookmark": page.bookmark})

    @app.route("/<collection>", methods=["POST"])
    async def create_document(self, request: IRequest, collection: str) -> bytes:
        idn, name = self._authorize(request, collection, "write")
        if getattr(request, "args", None):  # (the usual request has none: no call)
            _params(request, ())
        body = check_body(read_json_object(request, MAX_DOC_BYTES), url_id=None)
        if "_rev" in body:
            raise BadRequest("A new document has no '_rev'.", slug="invalid-rev")
        try:
            result = await self.service.create(idn, name, body)
        except _REFUSALS as e:
            raise _problem_for(e) from None
        # (A checked collection name and an id of ours: set_clean_header's kind of value.)
        request.responseHeaders._rawHeaders[b"Location"] = [
            f"/data/{name}/{result['id']}".encode("ascii")
        ]
        request.setHeader(b"ETag", f'"{result["rev"]}"'.encode("ascii"))
        return json_response(request, result, 201)

    # -- indexes -------------------------------------------------------------------------

    @app.route("/<collection>/_index", methods=["GET"])
    async def list_indexes(self, request: IRequest, collection: str) -> bytes:
        idn, name = self._authorize(request, collection, "read")
        _params(request, ())
        indexes = await _couch(self.service.list_indexes(idn, name))
        return json_response(request, {"indexes": indexes})

    @app.route("/<collection>/_index", methods=["POST"])
    async def create_index(self, request: IRequest, collection: str) -> bytes:
        idn, name = self._authorize(request, collection, "write")
        _params(request, ())
        fields = parse_index_fields(read_json_object(request))
        result = await _couch(self.service.create_index(idn, name, fields))
        return json_response(request, result, 201 if result["result"] == "created" else 200)

    # -- a document ----------------------------------------------------------------------

    @app.route("/<collection>/<docid:id>", methods=["GET"])
    async def get_document(self, request: IRequest, collection: str, id: str) -> bytes:
        idn, name = self._authorize(request, collection, "read")
        doc_id = check_doc_id(id)
        if getattr(request, "args", None):  # (the usual request has none: no call)
            _params(request, ())
        try:
            doc = await self.service.get(idn, name, doc_id)
        except _REFUSALS as e:
            raise _problem_for(e) from None
        request.setHeader(b"ETag", f'"{doc["_rev"]}"'.encode("ascii"))
        return json_response(request, doc)

    @app.route("/<collection>/<docid:id>", methods=["PUT"])
    async def put_document(self, request: IRequest, collection: str, id: str) -> bytes:
        idn, name = self._authorize(request, collection, "write")
        doc_id = check_doc_id(id)
        if getattr(request, "args", None):  # (the usual request has none: no call)
            _params(request, ())
        header_rev = _if_match(request)
        body = check_body(read_json_object(request, MAX_DOC_BYTES), url_id=doc_id)
        rev = _one_rev(body.get("_rev"), header_rev)
        try:
            result = await self.service.put(idn, name, doc_id, body, rev)
        except _REFUSALS as e:
            raise _problem_for(e) from None
        request.setHeader(b"ETag", f'"{result["rev"]}"'.encode("ascii"))
        return json_response(request, result, 200 if rev is not None else 201)

    @app.route("/<collection>/<docid:id>", methods=["DELETE"])
    async def delete_document(self, request: IRequest, collection: str, id: str) -> bytes:
        idn, name = self._authorize(request, collection, "write")
        doc_id = check_doc_id(id)
        params = _params(request, ("rev",))
        query_rev = check_rev(params["rev"]) if "rev" in params else None
        rev = _one_rev(query_rev, _if_match(request))
        if rev is None:
            raise BadRequest(
                "Deleting needs the document's current revision: '?rev=' or If-Match.",
                slug="invalid-rev",
            )
        try:
            result = await self.service.delete(idn, name, doc_id, rev)
        except _REFUSALS as e:
            raise _problem_for(e) from None
        return json_response(request, {**result, "deleted": True})


def make_data_api(config: Config, couch: CouchServer, issuer: TokenIssuer) -> DataAPI:
    secret = issuer.derived_secret(b"vibed data bookmark v1")
    service = DataService(couch=couch, bookmarks=BookmarkCodec(secret))
    return DataAPI(issuer=issuer, service=service)


# -- OpenAPI -------------------------------------------------------------------------------


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_AUTH = {
    "401": _problem("Missing or invalid access token"),
    "403": _problem("The token lacks data:* or the collection's read/write scope"),
}
_UNAVAILABLE = {"503": _problem("CouchDB is not reachable")}
_COLLECTION = {
    "name": "collection",
    "in": "path",
    "required": True,
    "schema": _ref("CollectionName"),
}
_ID = {"name": "id", "in": "path", "required": True, "schema": _ref("DocumentId")}
_REV_PATTERN = "^[0-9]{1,10}-[0-9A-Za-z]{1,128}$"
# One part of a dotted field path: no control character; "\\x" escapes one character.
_PART = r"(?:[^.\\\x00-\x1f]|\\[^\x00-\x1f]?)+"
# A field an index may name: parts joined by dots, the first not starting with _ or $.
_FIELD_PATTERN = rf"^(?![_$]|\\\$){_PART}(?:\.{_PART})*$"
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "description": "The current revision as an ETag (instead of _rev / ?rev=)",
    "schema": {"type": "string", "pattern": '^"?[0-9]{1,10}-[0-9A-Za-z]{1,128}"?$'},
}
_ETAG = {"ETag": {"description": "The revision, quoted", "schema": {"type": "string"}}}
_WRITE_BAD = {
    "400": _problem("Bad collection, id, revision, JSON, reserved field or storage tag"),
    "413": _problem("Body over 1 MiB"),
    "415": _problem("Body is not application/json"),
}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


OPENAPI_PATHS: dict[str, Any] = {
    "/data/{collection}": {
        "get": {
            "summary": "List or query a collection, a page at a time",
            "parameters": [
                _COLLECTION,
                {
                    "name": "q",
                    "in": "query",
                    "description": "A Mango selector (JSON object); _id means the app's id",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                _query(
                    "sort",
                    'Mango sort (JSON array, e.g. [{"title":"desc"}]); needs an index',
                    {"type": "string"},
                ),
                _query(
                    "fields",
                    "Fields to return: comma-separated or a JSON array",
                    {"type": "string"},
                ),
                _query(
                    "limit",
                    "Page size",
                    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 25},
                ),
                _query("bookmark", "The previous page's bookmark", {"type": "string"}),
            ],
            "responses": {
                "200": _json(_ref("DocumentPage"), "One page; bookmark null at the end"),
                "400": _problem(
                    "Bad collection, q, sort, fields, limit or bookmark; or no index for sort"
                ),
                **_AUTH,
                **_UNAVAILABLE,
            },
        },
        "post": {
            "summary": "Create a document (the server picks its id)",
            "parameters": [_COLLECTION],
            "requestBody": _body(_ref("NewDocument")),
            "responses": {
                "201": {
                    **_json(_ref("WriteResult"), "Created"),
                    "headers": {**_ETAG, "Location": {"schema": {"type": "string"}}},
                },
                **_WRITE_BAD,
                **_AUTH,
                "404": _problem("The identity no longer exists"),
                **_UNAVAILABLE,
            },
        },
    },
    "/data/{collection}/_index": {
        "get": {
            "summary": "The indexes declared for a collection",
            "parameters": [_COLLECTION],
            "responses": {
                "200": _json(_ref("IndexList"), "Declared indexes"),
                "400": _problem("Bad collection"),
                **_AUTH,
                **_UNAVAILABLE,
            },
        },
        "post": {
            "summary": "Declare an index (needed to sort on its fields); idempotent",
            "parameters": [_COLLECTION],
            "requestBody": _body(_ref("IndexRequest")),
            "responses": {
                "201": _json(_ref("Index"), "Created"),
                "200": _json(_ref("Index"), "It already existed"),
                "400": _problem("Bad collection or fields"),
                **_AUTH,
                "409": _problem("The collection has the most indexes allowed"),
                **_UNAVAILABLE,
            },
        },
    },
    "/data/{collection}/{id}": {
        "get": {
            "summary": "Read a document",
            "parameters": [_COLLECTION, _ID],
            "responses": {
                "200": {**_json(_ref("Document"), "The document"), "headers": _ETAG},
                "400": _problem("Bad collection or id"),
                **_AUTH,
                "404": _problem("No such document"),
                **_UNAVAILABLE,
            },
        },
        "put": {
            "summary": "Create a document with this id (no rev) or update it (current rev)",
            "parameters": [_COLLECTION, _ID, _IF_MATCH],
            "requestBody": _body(_ref("DocumentBody")),
            "responses": {
                "200": {**_json(_ref("WriteResult"), "Updated"), "headers": _ETAG},
                "201": {**_json(_ref("WriteResult"), "Created"), "headers": _ETAG},
                **_WRITE_BAD,
                **_AUTH,
                "404": _problem("The identity no longer exists"),
                "409": _problem("Exists (no rev given) or the rev is not the current one"),
                **_UNAVAILABLE,
            },
        },
        "delete": {
            "summary": "Delete a document (its current rev in ?rev= or If-Match)",
            "parameters": [
                _COLLECTION,
                _ID,
                _query("rev", "The current revision", _ref("Rev")),
                _IF_MATCH,
            ],
            "responses": {
                "200": _json(_ref("DeleteResult"), "Deleted"),
                "400": _problem("Bad collection, id or rev, or no rev (or two different revs)"),
                **_AUTH,
                "404": _problem("No such document"),
                "409": _problem("The rev is not the current one"),
                **_UNAVAILABLE,
            },
        },
    },
}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "CollectionName": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"},
    "DocumentId": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._~-]{0,199}$"},
    "Rev": {"type": "string", "pattern": _REV_PATTERN},
    "Document": {
        "type": "object",
        "description": "A stored document: the app's fields, its _id and its _rev",
        "properties": {"_id": _ref("DocumentId"), "_rev": _ref("Rev")},
    },
    "NewDocument": {
        "type": "object",
        "description": "Any JSON object of at most 1 MiB, nested at most "
        f"{MAX_NESTING} levels; top-level names starting with '_' and 'vibe:collection' "
        "are reserved (the server picks the _id)",
        "propertyNames": {"not": {"anyOf": [{"pattern": "^_"}, {"const": layout.TAG}]}},
        "maxProperties": 1000,
    },
    "DocumentBody": {
        "type": "object",
        "description": "Any JSON object of at most 1 MiB, nested at most "
        f"{MAX_NESTING} levels; _rev (the current revision) to update; an _id, if sent, "
        "must equal the URL's; other top-level names starting with '_' and "
        "'vibe:collection' are reserved",
        "properties": {"_rev": _ref("Rev")},
        "propertyNames": {
            "anyOf": [
                {"const": "_rev"},
                {"not": {"anyOf": [{"pattern": "^_"}, {"const": layout.TAG}]}},
            ]
        },
        "maxProperties": 1000,
    },
    "WriteResult": {
        "type": "object",
        "properties": {"id": _ref("DocumentId"), "rev": {"type": "string"}},
    },
    "DeleteResult": {
        "type": "object",
        "properties": {
            "id": _ref("DocumentId"),
            "rev": {"type": "string", "description": "The revision of the deletion"},
            "deleted": {"const": True},
        },
    },
    "DocumentPage": {
        "type": "object",
        "properties": {
            "docs": {"type": "array", "items": _ref("Document")},
            "bookmark": {"type": ["string", "null"]},
        },
    },
    "IndexRequest": {
        "type": "object",
        "required": ["fields"],
        "additionalProperties": False,
        "properties": {
            "fields": {
                "type": "array",
                "items": {
                    "type": "string",
                    "description": "A field: a dotted path (\\. is a literal dot); not "
                    "_id, _rev, another name starting with '_' or '$', nor 'vibe:collection'",
                    "maxLength": MAX_FIELD_CHARS,
                    "pattern": _FIELD_PATTERN,
                    "not": {"pattern": "^vibe:collection(\\.|$)"},
                },
                "minItems": 1,
                "maxItems": MAX_INDEX_FIELDS,
                "uniqueItems": True,
            }
        },
    },
    "Index": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "fields": {"type": "array", "items": {"type": "string"}},
            "result": {"enum": ["created", "exists"]},
        },
    },
    "IndexList": {
        "type": "object",
        "properties": {"indexes": {"type": "array", "items": _ref("Index")}},
    },
}
