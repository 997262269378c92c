"""``/blob/*``: presigned uploads and downloads (issue 4); see docs/blobs.md.

Every route needs ``Authorization: Bearer`` with the ``blob:*`` scope, except the local
store's signed URLs (``/blob/local/<key>``), whose query string is the credential. A blob
that is not the caller's answers exactly as one that does not exist (404).
"""

from __future__ import annotations

from typing import Any

from attrs import define
from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.routing import BaseConverter

from vibed.blobs import _UUID4, KEY_RE
from vibed.blobs.local import CORS_HEADERS, LocalStore
from vibed.blobs.service import LIST_DEFAULT, LIST_MAX, META_MAX_BYTES, BlobService, check_blob_id
from vibed.errors import BadRequest, Forbidden, NotFound, install_error_handlers
from vibed.naming import is_idn
from vibed.tokens import TokenIssuer

from .http import authenticate, json_response, read_json_object
from .openapi import _json, _problem, _ref  # the shared OpenAPI helpers

SCOPE = "blob:*"


class BlobIdSegment(BaseConverter):
    """A blob id in a path: any segment but the routes' own words, so that, e.g.,
    ``DELETE /blob/upload-url`` is a 405 of that route (with an honest ``Allow``) rather than
    a malformed blob id (ids are checked, with a clear message, by the handlers)."""

    regex = r"(?!upload-url$|finalize-upload$|download-url$|local$|usage$)[^/]+"


@define(slots=False)
class BlobAPI:
    issuer: TokenIssuer
    blobs: BlobService
    local: LocalStore | None = None

    app = Klein()
    app.url_map.converters["blobid"] = BlobIdSegment
    install_error_handlers(app)

    def _idn(self, request: IRequest) -> str:
        """The caller's identity, if its token carries the blob scope."""
        claims = authenticate(request, self.issuer)
        if SCOPE not in claims.scp:
            raise Forbidden(
                f"This access token lacks the '{SCOPE}' scope.",
                slug="insufficient-scope",
                headers={
                    "WWW-Authenticate": f'Bearer realm="vibe", error="insufficient_scope", '
                    f'scope="{SCOPE}"'
                },
            )
        if not is_idn(claims.sub):
            raise Forbidden("This access token is not an identity's.", slug="insufficient-scope")
        return claims.sub

    def _local(self) -> LocalStore:
        if self.local is None:
            raise NotFound("This server keeps blobs in S3; there are no local blob URLs.")
        return self.local

    # -- the API -----------------------------------------------------------------------------

    @app.route("/upload-url", methods=["POST"])
    async def upload_url(self, request: IRequest) -> bytes:
        idn = self._idn(request)
        body = read_json_object(request)
        result = await self.blobs.create_upload(idn, body.get("mime"), body.get("size"))
        return json_response(request, result)

    @app.route("/finalize-upload", methods=["POST"])
    async def finalize_upload(self, request: IRequest) -> bytes:
        idn = self._idn(request)
        body = read_json_object(request)
        if "id" not in body:
            raise BadRequest("'id' is required: the id upload-url returned.")
        record = await self.blobs.finalize(idn, body.get("id"), body.get("meta"))
        return json_response(request, record, 201)

    @app.route("/download-url/<id>", methods=["GET"])
    async def download_url(self, request: IRequest, id: str) -> bytes:
        idn = self._idn(request)
        url, expires_at = await self.blobs.download_url(idn, id)
        # A browser's fetch cannot read a redirect's target; one that asks for JSON alone
        # gets the URL as a plain answer (the SDK's files.url).
        if request.getHeader(b"accept") == b"application/json":
            return json_response(request, {"url": url, "expiresAt": expires_at})
        body = json_response(request, {"url": url, "expiresAt": expires_at}, 302)
        request.setHeader(b"Location", url.encode("ascii"))
        return body

    @app.route("/", methods=["GET"])
    async def list_blobs(self, request: IRequest) -> bytes:
        idn = self._idn(request)
        args: dict[bytes, list[bytes]] = getattr(request, "args", {}) or {}
        limit = LIST_DEFAULT
        raw_limit = args.get(b"limit")
        if raw_limit:
            text = raw_limit[0].decode("ascii", "replace")
            if len(raw_limit) > 1 or not text.isdigit() or not 1 <= int(text) <= LIST_MAX:
                raise BadRequest(f"'limit' must be a whole number from 1 to {LIST_MAX}.")
            limit = int(text)
        after: str | None = None
        raw_after = args.get(b"after")
        if raw_after:
            if len(raw_after) > 1:
                raise BadRequest("'after' may be given once.")
            after = check_blob_id(raw_after[0].decode("ascii", "replace"))
        return json_response(request, await self.blobs.list_page(idn, limit, after))

    @app.route("/usage", methods=["GET"])
    async def usage(self, request: IRequest) -> bytes:
        idn = self._idn(request)
        used, pending = await self.blobs.usage(idn)
        return json_response(
            request,
            {
                "used": used,
                "pending": pending,
                "quota": self.blobs.quota or None,
                "maxSize": self.blobs.max_size,
            },
        )

    @app.route("/<blobid:id>", methods=["DELETE"])
    async def delete_blob(self, request: IRequest, id: str) -> bytes:
        idn = self._idn(request)
        await self.blobs.delete(idn, id)
        request.setResponseCode(204)
        return b""

    # -- the local store's signed URLs (no bearer: the signature is the credential) -----------

    def _cors(self, request: IRequest) -> None:
        for name, value in CORS_HEADERS.items():
            request.setHeader(name, value)

    @app.route("/local/<owner>/<name>", methods=["PUT"])
    async def local_put(self, request: IRequest, owner: str, name: str) -> bytes:
        store = self._local()
        self._cors(request)
        key = f"{owner}/{name}"
        if not KEY_RE.match(key):
            raise NotFound("There is no such object URL.")
        await store.receive(request, key)
        request.setResponseCode(200)
        return b""

    @app.route("/local/<owner>/<name>", methods=["GET"])
    def local_get(self, request: IRequest, owner: str, name: str) -> IResource:
        store = self._local()
        self._cors(request)
        key = f"{owner}/{name}"
        if not KEY_RE.match(key):
            raise NotFound("There is no such object URL.")
        return store.download(request, key)

    @app.route("/local/<owner>/<name>", methods=["OPTIONS"])
    def local_preflight(self, request: IRequest, owner: str, name: str) -> bytes:
        self._local()
        self._cors(request)
        request.setHeader(b"Access-Control-Allow-Methods", b"GET, HEAD, PUT")
        request.setHeader(b"Access-Control-Allow-Headers", b"Content-Type, Range")
        request.setHeader(b"Access-Control-Max-Age", b"600")
        request.setResponseCode(204)
        return b""


# -- OpenAPI -------------------------------------------------------------------------------


_AUTH = {
    "401": _problem("Missing or invalid access token"),
    "403": _problem("The token lacks the blob:* scope"),
}
_UNAVAILABLE = {"503": _problem("CouchDB or the blob store is not reachable")}
_ID = {"name": "id", "in": "path", "required": True, "schema": _ref("BlobId")}
_OBJECT = [
    {"name": "owner", "in": "path", "required": True, "schema": _ref("BlobId")},
    {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": f"^{_UUID4}\\.[a-z0-9]{{1,8}}$"},
    },
    {"name": "exp", "in": "query", "required": True, "schema": {"type": "integer"}},
    {"name": "type", "in": "query", "required": True, "schema": {"type": "string"}},
    {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}},
]

OPENAPI_PATHS: dict[str, Any] = {
    "/blob/usage": {
        "get": {
            "summary": "Bytes the identity's files take, next to its quota",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["used", "pending", "quota", "maxSize"],
                        "properties": {
                            "used": {"type": "integer", "minimum": 0},
                            "pending": {"type": "integer", "minimum": 0},
                            "quota": {"type": ["integer", "null"], "minimum": 1},
                            "maxSize": {"type": "integer", "minimum": 0},
                        },
                    },
                    "used: finalized files; pending: uploads not finalized yet; quota: null "
                    "when there is none",
                ),
                **_AUTH,
                "404": _problem("The identity no longer exists"),
                **_UNAVAILABLE,
            },
        }
    },
    "/blob/upload-url": {
        "post": {
            "summary": "Sign an upload: PUT the bytes to url with exactly the given headers",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("UploadRequest")}},
            },
            "responses": {
                "200": _json(_ref("Upload"), "The signed upload"),
                "400": _problem("Malformed body, mime or size"),
                **_AUTH,
                "403": _problem("No blob:* scope, or the identity's quota would be exceeded"),
                "413": _problem("size is over the largest blob allowed"),
                "415": _problem("mime is not an allowed type (or the body is not JSON)"),
                **_UNAVAILABLE,
            },
        }
    },
    "/blob/finalize-upload": {
        "post": {
            "summary": "Check the uploaded object and record the blob",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("FinalizeRequest")}},
            },
            "responses": {
                "201": _json(_ref("Blob"), "The blob"),
                "400": _problem("Malformed body, id or meta"),
                **_AUTH,
                "404": _problem("No such upload of the caller's (or it was cleaned up)"),
                "409": _problem(
                    "Already finalized, nothing uploaded yet, or the object does not match"
                ),
                "410": _problem("The upload expired before it was finalized"),
                **_UNAVAILABLE,
            },
        }
    },
    "/blob/download-url/{id}": {
        "get": {
            "summary": "Redirect to a short-lived signed download URL",
            "parameters": [_ID],
            "responses": {
                "200": {"description": "With Accept: application/json: {url, expiresAt}"},
                "302": {
                    "description": "Location: the signed URL (also in the body)",
                    "headers": {"Location": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": _ref("DownloadUrl")}},
                },
                "400": _problem("Malformed id"),
                **_AUTH,
                "404": _problem("No such blob of the caller's"),
                **_UNAVAILABLE,
            },
        }
    },
    "/blob": {
        "get": {
            "summary": "The caller's finalized blobs, a page at a time (id order)",
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": LIST_MAX},
                },
                {"name": "after", "in": "query", "schema": _ref("BlobId")},
            ],
            "responses": {
                "200": _json(_ref("BlobPage"), "One page; pass next as after for the next"),
                "400": _problem("Malformed limit or after"),
                **_AUTH,
                **_UNAVAILABLE,
            },
        }
    },
    "/blob/{id}": {
        "delete": {
            "summary": "Delete the object and its record",
            "parameters": [_ID],
            "responses": {
                "204": {"description": "Deleted"},
                "400": _problem("Malformed id"),
                **_AUTH,
                "404": _problem("No such blob of the caller's"),
                **_UNAVAILABLE,
            },
        }
    },
    "/blob/local/{owner}/{name}": {
        "put": {
            "summary": "Local store: the signed upload (URL from upload-url)",
            "security": [],
            "parameters": [
                *_OBJECT,
                {"name": "size", "in": "query", "required": True, "schema": {"type": "integer"}},
            ],
            "requestBody": {"required": True, "content": {"*/*": {}}},
            "responses": {
                "200": {"description": "Stored"},
                "400": _problem("Content-Length or body length differ from the signed size"),
                "403": _problem("Signature tampered with, for another object, or expired"),
                "404": _problem("Not an object URL of this server (or blobs are in S3)"),
                "409": _problem("Something was already uploaded with this URL"),
                "413": _problem("Body longer than the signed size"),
                "415": _problem("Content-Type differs from the signed type"),
            },
        },
        "get": {
            "summary": "Local store: the signed download (Range requests supported)",
            "security": [],
            "parameters": _OBJECT,
            "responses": {
                "200": {"description": "The bytes, typed as finalized"},
                "206": {"description": "The requested range"},
                "403": _problem("Signature tampered with, for another object, or expired"),
                "404": _problem("The object is gone"),
            },
        },
    },
}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "BlobId": {"type": "string", "format": "uuid", "pattern": f"^{_UUID4}$"},
    "UploadRequest": {
        "type": "object",
        "required": ["mime", "size"],
        "properties": {
            "mime": {"type": "string", "examples": ["image/png"]},
            "size": {"type": "integer", "minimum": 0},
        },
    },
    "Upload": {
        "type": "object",
        "properties": {
            "id": _ref("BlobId"),
            "url": {"type": "string"},
            "method": {"const": "PUT"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "expiresAt": {"type": "integer", "description": "epoch seconds"},
        },
    },
    "FinalizeRequest": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": _ref("BlobId"),
            "meta": {"type": "object", "description": f"at most {META_MAX_BYTES} bytes of JSON"},
        },
    },
    "Blob": {
        "type": "object",
        "properties": {
            "id": _ref("BlobId"),
            "key": {"type": "string"},
            "mime": {"type": "string"},
            "size": {"type": "integer"},
            "meta": {"type": "object"},
            "createdAt": {"type": "string", "format": "date-time"},
        },
    },
    "BlobPage": {
        "type": "object",
        "properties": {
            "blobs": {"type": "array", "items": _ref("Blob")},
            "next": {"oneOf": [_ref("BlobId"), {"type": "null"}]},
        },
    },
    "DownloadUrl": {
        "type": "object",
        "properties": {"url": {"type": "string"}, "expiresAt": {"type": "integer"}},
    },
}
