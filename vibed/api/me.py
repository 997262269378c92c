"""``/me/*``: what a person manages about their own identity, from their dashboard or any
first-party client. Every route needs an access token with the first-party scope
``identity`` (a password or agent login gives it; apps never get it).

::

    GET    /me/collections        {collections: [{name, count}]}
    GET    /me/sessions           {sessions: [{id, createdAt, lastUsedAt, userAgent, current}]}
    DELETE /me/sessions           log out everywhere else: {revoked: n}
    DELETE /me/sessions/{id}      end one session (its tokens stop on every replica)
    POST   /me/password           {currentPassword, newPassword}: the key is re-wrapped, the
                                  other sessions end: {revokedSessions: n}
    POST   /me/export             a one-time link {url, expiresAt} to GET the archive
    GET    /me/export             the archive itself (bearer token), streamed
    GET    /me/export/{ticket}    the archive, with the one-time link (browsers)
    POST   /me/delete             {password}: delete the identity and everything it owns

Actions that cannot be undone or that change credentials (password, delete) ask for the
current password again, counted like login attempts (5 wrong ones per 15 minutes per
identity, then 429 with Retry-After): a stolen access token alone cannot take the account.
A wrong password is ``403 wrong-password`` (not 401: the token itself is fine).
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from vibed.account import AccountService
from vibed.config import Config
from vibed.deletion import DeletionPending, DeletionService, IdentityDeleter
from vibed.errors import BadRequest, Forbidden, NotFound, TooManyRequests
from vibed.export import Exporter, send_export
from vibed.identity import MAX_PASSWORD, MIN_PASSWORD, IdentityService, WrongPassword
from vibed.ratelimit import RateLimiter
from vibed.sessions import RefreshStore
from vibed.tokens import AccessClaims, TokenIssuer

from .auth import FIRST_PARTY_SCOPE
from .http import authenticate, client_address, json_response, read_json_object, require_scope
from .openapi import _json, _problem, _ref

_log = Logger(namespace="vibed.api.me")

_SID = r"^[0-9a-f]{32}$"


@define(slots=False)
class MeAPI:
    config: Config
    issuer: TokenIssuer
    identities: IdentityService
    refresh: RefreshStore
    limiter: RateLimiter
    account: AccountService
    exporter: Exporter
    deleter: IdentityDeleter

    def _claims(self, request: IRequest) -> AccessClaims:
        claims = authenticate(request, self.issuer)
        require_scope(claims, FIRST_PARTY_SCOPE)
        return claims

    async def _confirm(self, request: IRequest, idn: str, password: object) -> dict[str, Any]:
        """The identity document if ``password`` is the identity's (rate-limited like logins)."""
        if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD:
            raise BadRequest("Enter your current password.", slug="bad-request")
        address = client_address(request, self.config.trusted_proxies)
        keys = [
            (f"confirm:idn:{idn}", self.config.login_limit_per_email),
            (f"login:addr:{address}", self.config.login_limit_per_address),
        ]
        hits, wait = await self.limiter.reserve(keys, self.config.login_window)
        if wait:
            raise TooManyRequests(
                "Too many wrong passwords; wait before trying again.", retry_after=wait
            )
        try:
            doc = await self.identities.confirm_password(idn, password)
        except WrongPassword:
            raise Forbidden("That is not your current password.", slug="wrong-password") from None
        except BaseException:
            for hit in hits:
                await self.limiter.release(hit)
            raise
        for hit in hits:
            await self.limiter.release(hit)
        return doc

    # -- collections ---------------------------------------------------------------------------

    async def collections(self, request: IRequest) -> bytes:
        claims = self._claims(request)
        found = await self.account.collections(claims.sub)
        return json_response(
            request, {"collections": [{"name": c.name, "count": c.count} for c in found]}
        )

    # -- sessions ------------------------------------------------------------------------------

    async def sessions(self, request: IRequest) -> bytes:
        claims = self._claims(request)
        listed = await self.account.sessions(claims.sub)
        for session in listed:
            session["current"] = session["id"] == claims.sid
        return json_response(request, {"sessions": listed})

    async def revoke_session(self, request: IRequest, sid: str) -> bytes:
        claims = self._claims(request)
        if not await self.account.revoke_session(claims.sub, sid):
            raise NotFound("No such session.")
        request.setResponseCode(204)
        return b""

    async def revoke_other_sessions(self, request: IRequest) -> bytes:
        claims = self._claims(request)
        ended = await self.account.revoke_other_sessions(claims.sub, claims.sid)
        return json_response(request, {"revoked": ended})

    # -- password ------------------------------------------------------------------------------

    async def change_password(self, request: IRequest) -> bytes:
        claims = self._claims(request)
        body = read_json_object(request)
        current, new = body.get("currentPassword"), body.get("newPassword")
        if not isinstance(new, str) or not MIN_PASSWORD <= len(new) <= MAX_PASSWORD:
            raise BadRequest(
                f"The new password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long.",
                slug="weak-password",
            )
        if new == current:
            raise BadRequest(
                "Choose a password different from the current one.", slug="same-password"
            )
        await self._confirm(request, claims.sub, current)
        assert isinstance(current, str)
        try:
            await self.identities.change_password(claims.sub, current, new)
        except WrongPassword:
            raise Forbidden("That is not your current password.", slug="wrong-password") from None
        ended = await self.account.revoke_other_sessions(claims.sub, claims.sid)
        _log.info("Password changed for {idn}; {n} other sessions ended", idn=claims.sub, n=ended)
        return json_response(request, {"revokedSessions": ended})

    # -- export --------------------------------------------------------------------------------

    async def export_link(self, request: IRequest) -> bytes:
        claims = self._claims(request)
        ticket, expires = await self.account.export_ticket(claims.sub, claims.sid)
        url = f"{self.config.public_url}/me/export/{ticket}"
        return json_response(request, {"url": url, "expiresAt": expires})

    async def export(self, request: IRequest) -> bytes:
        claims = self._claims(request)
        doc = await self.identities.get(claims.sub)
        if doc is None:
            raise NotFound("This identity no longer exists.", slug="no-identity")
        return await send_export(request, self.exporter, doc)

    async def export_by_ticket(self, request: IRequest, ticket: str) -> bytes:
        spent = await self.account.redeem(ticket)
        gone = NotFound(
            "This download link was already used or has expired; start the export again "
            "from your dashboard."
        )
        if spent is None:
            raise gone
        if spent.sid is not None and await self.refresh.session(spent.sid) is None:
            raise gone  # the session that asked for it has ended since
        doc = await self.identities.get(spent.idn)
        if doc is None:
            raise gone
        return await send_export(request, self.exporter, doc)

    # -- deletion ------------------------------------------------------------------------------

    async def delete_identity(self, request: IRequest) -> bytes:
        claims = self._claims(request)
        body = read_json_object(request)
        await self._confirm(request, claims.sub, body.get("password"))
        try:
            await self.deleter.delete(claims.sub)
        except DeletionPending:
            return json_response(
                request,
                {
                    "state": "pending",
                    "detail": "The deletion has started and will finish by itself within a "
                    "few minutes; you have been logged out everywhere.",
                },
                202,
            )
        request.setResponseCode(204)
        return b""


# -- OpenAPI -------------------------------------------------------------------------------

_STR = {"type": "string"}
_FIRST_PARTY = "Not a first-party token (needs the 'identity' scope)"
_AUTH_ERRORS = {
    "401": _problem("Missing or invalid access token"),
    "403": _problem(_FIRST_PARTY),
    "503": _problem("CouchDB unreachable, or tokens cannot be checked now; retry"),
}
_CONFIRM_ERRORS = {
    "400": _problem("Malformed body, or a new password outside the rules"),
    "403": _problem(f"{_FIRST_PARTY}; or wrong-password"),
    "413": _problem("Body larger than 64 KiB"),
    "415": _problem("Body is not application/json"),
    "429": _problem("Too many wrong passwords; see Retry-After"),
}
_ZIP = {
    "description": "The archive (application/zip), streamed; see docs/dashboard.md",
    "headers": {"Content-Disposition": {"schema": _STR}},
    "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
}

OPENAPI_PATHS: dict[str, Any] = {
    "/me/collections": {
        "get": {
            "summary": "The identity's collections with their document counts",
            "responses": {
                "200": _json(_ref("Collections"), "Collections, in name order"),
                **_AUTH_ERRORS,
                "404": _problem("The identity no longer exists"),
            },
        }
    },
    "/me/sessions": {
        "get": {
            "summary": "Signed-in browsers and devices (first-party sessions)",
            "responses": {
                "200": _json(_ref("Sessions"), "Sessions, last used first"),
                **_AUTH_ERRORS,
            },
        },
        "delete": {
            "summary": "Log out everywhere else: end every session but the caller's",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["revoked"],
                        "properties": {"revoked": {"type": "integer", "minimum": 0}},
                    },
                    "How many sessions ended",
                ),
                **_AUTH_ERRORS,
            },
        },
    },
    "/me/sessions/{sid}": {
        "delete": {
            "summary": "End one session: its tokens stop on every replica within seconds",
            "parameters": [{"name": "sid", "in": "path", "required": True, "schema": _STR}],
            "responses": {
                "204": {"description": "Ended"},
                "404": _problem("No such live session of this identity"),
                **_AUTH_ERRORS,
            },
        }
    },
    "/me/password": {
        "post": {
            "summary": "Change the password: the key is re-wrapped (same did:key), other "
            "sessions end",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("PasswordChange")}},
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["revokedSessions"],
                        "properties": {"revokedSessions": {"type": "integer", "minimum": 0}},
                    },
                    "Changed",
                ),
                **_AUTH_ERRORS,
                **_CONFIRM_ERRORS,
                "409": _problem("The identity changed meanwhile; try again"),
            },
        }
    },
    "/me/export": {
        "post": {
            "summary": "A one-time link to download the export (valid two minutes)",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["url", "expiresAt"],
                        "properties": {"url": _STR, "expiresAt": {"type": "integer"}},
                    },
                    "The link",
                ),
                **_AUTH_ERRORS,
            },
        },
        "get": {
            "summary": "Everything the identity owns, as one ZIP archive, streamed",
            "responses": {
                "200": _ZIP,
                **_AUTH_ERRORS,
                "404": _problem("The identity no longer exists"),
            },
        },
    },
    "/me/export/{ticket}": {
        "get": {
            "summary": "The export, with a one-time link from POST /me/export (no token)",
            "security": [],
            "parameters": [{"name": "ticket", "in": "path", "required": True, "schema": _STR}],
            "responses": {
                "200": _ZIP,
                "404": _problem("Unknown, used or expired link"),
                "503": _problem("CouchDB unreachable; retry"),
            },
        }
    },
    "/me/delete": {
        "post": {
            "summary": "Delete the identity and everything it owns (password confirms)",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("PasswordConfirmation")}},
            },
            "responses": {
                "204": {"description": "Deleted"},
                "202": _json(
                    {
                        "type": "object",
                        "properties": {"state": {"const": "pending"}, "detail": _STR},
                    },
                    "Started; it finishes by itself (a store was unavailable)",
                ),
                **_AUTH_ERRORS,
                **_CONFIRM_ERRORS,
            },
        }
    },
}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "Collections": {
        "type": "object",
        "required": ["collections"],
        "properties": {
            "collections": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "count"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"},
                        "count": {"type": "integer", "minimum": 0},
                    },
                },
            }
        },
    },
    "Sessions": {
        "type": "object",
        "required": ["sessions"],
        "properties": {
            "sessions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "createdAt", "lastUsedAt", "current"],
                    "properties": {
                        "id": {"type": "string", "pattern": _SID},
                        "createdAt": {"type": ["string", "null"], "format": "date-time"},
                        "lastUsedAt": {"type": ["string", "null"], "format": "date-time"},
                        "userAgent": {"type": ["string", "null"]},
                        "current": {"type": "boolean"},
                    },
                },
            }
        },
    },
    "PasswordChange": {
        "type": "object",
        "required": ["currentPassword", "newPassword"],
        "properties": {
            "currentPassword": {"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD},
            "newPassword": {
                "type": "string",
                "minLength": MIN_PASSWORD,
                "maxLength": MAX_PASSWORD,
            },
        },
    },
    "PasswordConfirmation": {
        "type": "object",
        "required": ["password"],
        "properties": {"password": {"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD}},
    },
}


def make_me(
    config: Config,
    couch: Any,
    issuer: TokenIssuer,
    identities: IdentityService,
    refresh: RefreshStore,
    limiter: RateLimiter,
    revocations: Any,
    apps: Any,
    blobs: Any,
    reactor: Any,
    clock: Any,
) -> tuple[MeAPI, DeletionService]:
    """The /me routes and the service that finishes interrupted deletions, wired."""
    blob_service = getattr(blobs.api, "blobs", None)
    deleter = IdentityDeleter(
        couch=couch,
        identities=identities,
        refresh=refresh,
        revocations=revocations,
        blobs=blob_service,
        clock=clock,
    )
    api = MeAPI(
        config=config,
        issuer=issuer,
        identities=identities,
        refresh=refresh,
        limiter=limiter,
        account=AccountService(couch=couch, refresh=refresh, clock=clock),
        exporter=Exporter(couch=couch, grants=apps.grants, blobs=blob_service, clock=clock),
        deleter=deleter,
    )
    return api, DeletionService(deleter, reactor)
