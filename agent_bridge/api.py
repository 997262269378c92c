"""The agent's routes, mounted by the daemon's root (:mod:`vibed.api.root`).

::

    GET  /auth/challenge   a single-use nonce and the audience to sign for
    POST /auth/response    {did, nonce, signature} -> the same tokens as a password login
    GET  /me/key           {did, salt, keyWrapped, kdf}: the wrapped key (docs/keys.md)
    POST /agent/grants     {origin, scopes, name?} -> a grant (made or reused) + app tokens
    POST /agent/grants/{gid}/tokens   a new app session under an existing grant

``/me/key`` and ``/agent/grants`` need a first-party access token (scope ``identity``, what a
password or DID login gets); an app's token is refused with 403, whatever its scopes. Both
are rate-limited per identity. Agent grants are ordinary grants (:mod:`vibed.grants`, ``via:
"agent"``): ``GET /me/grants`` lists them, ``DELETE /me/grants/{id}`` revokes them, and their
app tokens refresh at ``POST /auth/token`` like any app's.

The challenge message the agent signs (Ed25519, signature sent as base64url) is exactly the
UTF-8 bytes of::

    vibe-auth-v1\\naud:<aud>\\nnonce:<nonce>

with ``aud`` and ``nonce`` as ``GET /auth/challenge`` returned them (docs/auth.md). Binding
``aud`` means a signature made for one server is refused by every other.
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from vibed.api.auth import FIRST_PARTY_SCOPE, AuthAPI
from vibed.api.http import (
    authenticate,
    client_address,
    json_response,
    read_json_object,
    require_scope,
    require_str,
)
from vibed.api.openapi import _json, _problem, _ref  # the shared OpenAPI helpers
from vibed.authorization import AppAuthority
from vibed.errors import BadRequest, Forbidden, NotFound, Unauthorized
from vibed.grants import GID_RE, Grant, GrantStore
from vibed.keys import (
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    WRAP_KEY_LEN,
    b64url_decode,
    public_from_did_key,
    verify_ed25519,
)
from vibed.oauth import OAuthError, clean_client_name, parse_client_id, parse_scopes
from vibed.sessions import NonceStore
from vibed.tokens import AccessClaims

from .protocol import challenge_message

_log = Logger(namespace="agent_bridge.api")


#: The key derivation of the wrapped key, as ``GET /me/key`` states it (docs/keys.md).
KDF = {"name": "scrypt", "N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "dkLen": WRAP_KEY_LEN}
MAX_NAME = 200


def _scopes(scopes_in: object) -> tuple[str, ...]:
    """A JSON list of app scopes, normalised (``parse_scopes``), or 400."""
    if (
        not isinstance(scopes_in, list)
        or not scopes_in
        or not all(isinstance(s, str) and s and " " not in s for s in scopes_in)
    ):
        raise BadRequest("'scopes' must be a non-empty list of scopes, e.g. ['data:write:notes'].")
    try:
        return parse_scopes(" ".join(scopes_in))
    except OAuthError as e:
        raise BadRequest(e.description, slug="invalid-scope") from None


@define(slots=False)
class AgentBridge:
    auth: AuthAPI
    nonces: NonceStore
    grants: GrantStore
    authority: AppAuthority
    #: ``GET /me/key`` per identity: a device adds an identity once; more looks like abuse
    key_limit: int = 10
    key_window: int = 3600
    #: grant and token requests per identity per minute (each one writes documents)
    grant_limit: int = 60
    grant_window: int = 60

    # -- the DID challenge ---------------------------------------------------------------------

    async def challenge(self, request: IRequest) -> bytes:
        """``GET /auth/challenge``."""
        config = self.auth.config
        # Unauthenticated and it writes a document: bound it per address.
        address = client_address(request, config.trusted_proxies)
        await self.auth.reserve(
            [(f"challenge:issue:{address}", config.challenge_limit_per_address)],
            window=60,
            message="Too many challenges from this address; wait before asking again.",
        )
        issued = await self.nonces.issue()
        return json_response(
            request,
            {"nonce": issued.nonce, "aud": config.public_url, "expiresAt": issued.expires_at},
        )

    async def response(self, request: IRequest) -> bytes:
        """``POST /auth/response``."""
        config = self.auth.config
        body = read_json_object(request)
        session = body.get("session", True)
        if not isinstance(session, bool):
            raise BadRequest("'session' must be true or false.")
        did = require_str(body, "did", 200)
        nonce = require_str(body, "nonce", 200)
        signature_text = require_str(body, "signature", 200)
        try:
            public_key = public_from_did_key(did)
        except ValueError:
            raise BadRequest("'did' must be an Ed25519 did:key.") from None
        try:
            signature = b64url_decode(signature_text.rstrip("="))
        except ValueError:
            raise BadRequest("'signature' must be base64url.") from None
        address = client_address(request, config.trusted_proxies)
        key = f"challenge:addr:{address}"
        hits = await self.auth.reserve([(key, config.login_limit_per_address)])
        refused = Unauthorized("The challenge response was not accepted.", slug="challenge-failed")
        # Spend the nonce first: whatever happens next, it can never be used again.
        try:
            spent = await self.nonces.consume(nonce)
            if spent is None:
                raise refused
            message = challenge_message(config.public_url, nonce)
            doc = await self.auth.identities.by_did(did)
            if doc is None or not verify_ed25519(public_key, message, signature):
                raise refused
        except Unauthorized:
            raise  # a failure: it stays counted
        except BaseException:
            await self.auth.release(hits)
            raise
        await self.auth.release(hits)
        _log.info("DID challenge login: {idn}", idn=doc["_id"])
        return await self.auth.login_response(request, doc, session=session)

    # -- first-party routes --------------------------------------------------------------------

    async def _first_party(self, request: IRequest) -> AccessClaims:
        """The claims of a first-party token (scope ``identity``, no client), or 401/403."""
        claims = authenticate(request, self.auth.issuer)
        require_scope(claims, FIRST_PARTY_SCOPE)
        if claims.client_id is not None or claims.gid is not None:
            # An app's token never carries the scope; refuse one that somehow did.
            raise Forbidden("An app's token cannot do this.", slug="insufficient-scope")
        return claims

    async def _limit(self, key: str, limit: int, window: int, what: str) -> None:
        await self.auth.reserve(
            [(key, limit)], window=window, message=f"Too many {what}; wait before trying again."
        )

    async def _identity(self, idn: str) -> dict[str, Any]:
        doc = await self.auth.identities.get(idn)
        if doc is None:
            raise NotFound("This identity no longer exists.")
        return doc

    async def key(self, request: IRequest) -> bytes:
        """``GET /me/key``: what the agent needs to unwrap the identity's key locally."""
        claims = await self._first_party(request)
        await self._limit(f"key:idn:{claims.sub}", self.key_limit, self.key_window, "key requests")
        doc = await self._identity(claims.sub)
        _log.info("Wrapped key fetched: {idn}", idn=claims.sub)
        body = {"did": doc["did"], "salt": doc["salt"], "keyWrapped": doc["keyWrapped"], "kdf": KDF}
        response = json_response(request, body)
        request.setHeader(b"Pragma", b"no-cache")
        return response

    def _answer(
        self, request: IRequest, grant: Grant, tokens: dict[str, Any], status: int
    ) -> bytes:
        response = json_response(
            request, {"grant": grant.public(), "created": status == 201, "tokens": tokens}, status
        )
        request.setHeader(b"Pragma", b"no-cache")
        return response

    async def mint_grant(self, request: IRequest) -> bytes:
        """``POST /agent/grants``: the person approved ``origin`` in the agent; reuse a grant of
        that origin covering the scopes, or make one, and start an app session under it."""
        claims = await self._first_party(request)
        body = read_json_object(request)
        try:
            origin = parse_client_id(body.get("origin"))
        except OAuthError as e:
            raise BadRequest(e.description.replace("client_id", "'origin'")) from None
        scopes = _scopes(body.get("scopes"))
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
            raise BadRequest(f"'name' must be a string of at most {MAX_NAME} characters.")
        await self._limit(
            f"agent-grant:idn:{claims.sub}", self.grant_limit, self.grant_window, "grant requests"
        )
        await self._identity(claims.sub)
        grant = await self.grants.find_covering(claims.sub, origin, scopes)
        status = 200
        if grant is None:
            grant = await self.grants.create(
                claims.sub, origin, scopes, clean_client_name(name), via="agent"
            )
            status = 201
        # The tokens carry what was asked (and shown to the person), not all a reused grant allows.
        tokens = await self.authority.tokens_for(grant, scopes=scopes)
        return self._answer(request, grant, tokens, status)

    async def grant_tokens(self, request: IRequest, gid: str) -> bytes:
        """``POST /agent/grants/{gid}/tokens`` ``{origin, scopes?}``: a new app session under a
        grant the person already gave (the agent lost its tokens: a browser restart). 404
        once revoked, and 404 unless the grant is ``origin``'s: the agent says which page it
        asks for, and a grant id of another site (a tampered record) gets nothing.
        ``scopes``: the page's own (within the grant), else the grant's."""
        claims = await self._first_party(request)
        if GID_RE.match(gid) is None:
            raise NotFound("No such grant.")
        body = read_json_object(request)
        try:
            origin = parse_client_id(body.get("origin"))
        except OAuthError as e:
            raise BadRequest(e.description.replace("client_id", "'origin'")) from None
        scopes = None if body.get("scopes") is None else _scopes(body.get("scopes"))
        await self._limit(
            f"agent-grant:idn:{claims.sub}", self.grant_limit, self.grant_window, "grant requests"
        )
        grant = await self.grants.get(claims.sub, gid)
        if grant is None or grant.origin != origin:
            if grant is not None:
                _log.warn(
                    "Agent asked tokens of grant {gid} ({origin}) for another origin",
                    gid=gid,
                    origin=grant.origin,
                )
            raise NotFound("No such grant: it was revoked or never existed.", slug="grant-revoked")
        try:
            tokens = await self.authority.tokens_for(grant, scopes=scopes)
        except OAuthError:
            raise NotFound(
                "This grant does not cover these scopes: ask the person again.",
                slug="grant-revoked",
            ) from None
        return self._answer(request, grant, tokens, 200)


# -- OpenAPI -------------------------------------------------------------------------------

_STR = {"type": "string"}
_BEARER_FAILS = {
    "401": _problem("Missing, invalid, expired or revoked access token"),
    "403": _problem("Not a first-party token (an app's token never is)"),
    "429": _problem("Too many requests for this identity; see Retry-After"),
    "503": _problem("Tokens or the database cannot be checked right now"),
}
_GRANT_ANSWER = {"content": {"application/json": {"schema": _ref("AgentGrant")}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/me/key": {
        "get": {
            "summary": "The identity's wrapped key, for the agent to unwrap locally "
            "(docs/keys.md); first-party token only, rate-limited",
            "responses": {
                "200": _json(_ref("WrappedKey"), "did, scrypt salt, wrapped seed, KDF"),
                "404": _problem("The identity no longer exists"),
                **_BEARER_FAILS,
            },
        }
    },
    "/agent/grants": {
        "post": {
            "summary": "The person approved an origin in the agent: reuse a grant of that "
            "origin covering the scopes, or make one (via: agent), and start an app session",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("AgentGrantRequest")}},
            },
            "responses": {
                "200": {**_GRANT_ANSWER, "description": "An existing grant covers the scopes"},
                "201": {**_GRANT_ANSWER, "description": "A new grant"},
                "400": _problem("Not an origin, an unknown scope, a bad name"),
                "404": _problem("The identity no longer exists"),
                "413": _problem("Body larger than 64 KiB"),
                "415": _problem("Body is not application/json"),
                **_BEARER_FAILS,
            },
        }
    },
    "/agent/grants/{gid}/tokens": {
        "post": {
            "summary": "A new app session under a grant the person already gave to this origin",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("AgentGrantTokensRequest")}},
            },
            "parameters": [
                {
                    "name": "gid",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                }
            ],
            "responses": {
                "200": {**_GRANT_ANSWER, "description": "The grant and new app tokens"},
                "400": _problem("Not an origin, an unknown scope"),
                "404": _problem(
                    "No such grant (revoked, never existed, another origin's, or not "
                    "covering the scopes)"
                ),
                "413": _problem("Body larger than 64 KiB"),
                "415": _problem("Body is not application/json"),
                **_BEARER_FAILS,
            },
        }
    },
}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "WrappedKey": {
        "type": "object",
        "required": ["did", "salt", "keyWrapped", "kdf"],
        "additionalProperties": False,
        "properties": {
            "did": {"type": "string", "pattern": "^did:key:z6Mk[1-9A-HJ-NP-Za-km-z]{44}$"},
            "salt": {
                "type": "string",
                "description": "base64 (standard, padded) of the 16-byte scrypt salt",
                "pattern": "^[A-Za-z0-9+/]{22}==$",
            },
            "keyWrapped": {
                "type": "string",
                "description": "base64 (standard, padded): nonce (12) || AES-256-GCM(seed) (48)",
                "pattern": "^[A-Za-z0-9+/]{80}$",
            },
            "kdf": {
                "type": "object",
                "required": ["name", "N", "r", "p", "dkLen"],
                "additionalProperties": False,
                "properties": {
                    "name": {"const": "scrypt"},
                    "N": {"const": SCRYPT_N},
                    "r": {"const": SCRYPT_R},
                    "p": {"const": SCRYPT_P},
                    "dkLen": {"const": WRAP_KEY_LEN},
                },
            },
        },
    },
    "AgentGrantRequest": {
        "type": "object",
        "required": ["origin", "scopes"],
        "properties": {
            "origin": {
                "type": "string",
                "description": "The page's origin as the browser gives it: https, or http on "
                "a loopback host; lower case, no path, no default port",
                "maxLength": 300,
            },
            "scopes": {
                "type": "array",
                "minItems": 1,
                "maxItems": 32,
                "items": {
                    "type": "string",
                    "pattern": "^(data:\\*|blob:\\*|data:(read|write):[a-z][a-z0-9_-]{0,63})$",
                },
            },
            "name": {"type": ["string", "null"], "maxLength": MAX_NAME},
        },
    },
    "AgentGrantTokensRequest": {
        "type": "object",
        "required": ["origin"],
        "properties": {
            "origin": {
                "type": "string",
                "description": "The page the agent asks for; the grant must be this origin's",
                "maxLength": 300,
            },
            "scopes": {
                "type": ["array", "null"],
                "description": "The page's own scopes, within the grant (default: the grant's)",
                "minItems": 1,
                "maxItems": 32,
                "items": {
                    "type": "string",
                    "pattern": "^(data:\\*|blob:\\*|data:(read|write):[a-z][a-z0-9_-]{0,63})$",
                },
            },
        },
    },
    "AgentGrant": {
        "type": "object",
        "required": ["grant", "created", "tokens"],
        "properties": {
            "grant": _ref("Grant"),
            "created": {"type": "boolean"},
            "tokens": _ref("OAuthTokens"),
        },
    },
}
