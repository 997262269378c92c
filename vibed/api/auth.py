"""``/auth/*``: signup, login, refresh, logout and the agent's DID challenge-response.

Responses that log someone in carry the access token in the JSON body and the refresh token in
an httpOnly, SameSite=Strict cookie scoped to ``/auth`` (Secure when the public URL is https).

The challenge message the agent signs (Ed25519, signature sent as base64url) is exactly the
UTF-8 bytes of::

    vibe-auth-v1\\naud:<aud>\\nnonce:<nonce>

with ``aud`` and ``nonce`` as ``GET /auth/challenge`` returned them (see docs/auth.md).
"""

from __future__ import annotations

from typing import Any, cast

from attrs import define
from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from vibed.config import Config
from vibed.errors import BadRequest, TooManyRequests, Unauthorized, install_error_handlers
from vibed.identity import (
    IdentityService,
    LoginFailed,
    check_password,
    normalise_email,
    redact,
)
from vibed.keys import b64url_decode, public_from_did_key, verify_ed25519
from vibed.ratelimit import Hit, RateLimiter
from vibed.sessions import NonceStore, RefreshRejected, RefreshStore, Rotation
from vibed.tokens import TokenIssuer

from .http import client_address, json_response, read_json_object, require_str

_log = Logger(namespace="vibed.api.auth")

COOKIE = b"vibe_refresh"
#: Carried only by first-party tokens (password or DID login), never by an app's: the routes
#: that manage the identity itself (grants, keys, password, export, delete) require it.
FIRST_PARTY_SCOPE = "identity"
SCOPES = (FIRST_PARTY_SCOPE, "data:*", "blob:*")
LOGIN_FAILED = "The email or password is not right."


def challenge_message(aud: str, nonce: str) -> bytes:
    """The exact bytes an agent signs to answer a challenge."""
    return f"vibe-auth-v1\naud:{aud}\nnonce:{nonce}".encode()


@define(slots=False)
class AuthAPI:
    config: Config
    identities: IdentityService
    issuer: TokenIssuer
    refresh: RefreshStore
    nonces: NonceStore
    limiter: RateLimiter

    app = Klein()
    install_error_handlers(app)

    # -- helpers -------------------------------------------------------------------------

    def _set_cookie(self, request: IRequest, rotation: Rotation) -> None:
        cast(Request, request).addCookie(
            COOKIE,
            rotation.token.encode("ascii"),
            path=b"/auth",
            max_age=str(self.config.refresh_ttl).encode("ascii"),
            httpOnly=True,
            secure=self.config.secure_cookies,
            sameSite="strict",
        )

    def _clear_cookie(self, request: IRequest) -> None:
        cast(Request, request).addCookie(
            COOKIE,
            b"",
            path=b"/auth",
            max_age=b"0",
            httpOnly=True,
            secure=self.config.secure_cookies,
            sameSite="strict",
        )

    def _tokens(self, request: IRequest, idn: str, rotation: Rotation) -> dict[str, Any]:
        token, exp = self.issuer.issue_access(idn, SCOPES, sid=rotation.family)
        self._set_cookie(request, rotation)
        return {
            "accessToken": token,
            "tokenType": "Bearer",
            "expiresIn": self.issuer.ttl,
            "expiresAt": exp,
        }

    async def _login_response(
        self, request: IRequest, doc: dict[str, Any], status: int = 200
    ) -> bytes:
        rotation = await self.refresh.create_family(doc["_id"])
        body = {"identity": redact(doc), **self._tokens(request, doc["_id"], rotation)}
        return json_response(request, body, status)

    async def _reserve(
        self,
        keys: list[tuple[str, int]],
        window: int | None = None,
        message: str = "Too many failed attempts; wait before trying again.",
    ) -> list[Hit]:
        """Count this attempt against each ``(key, limit)``, or 429. Counting first and then
        checking (not check, act, count) is what stops a burst of concurrent requests from
        all passing a check that none of them has been counted in yet."""
        hits, wait = await self.limiter.reserve(keys, window or self.config.login_window)
        if wait:
            raise TooManyRequests(message, retry_after=wait)
        return hits

    async def _release(self, hits: list[Hit]) -> None:
        for hit in hits:
            await self.limiter.release(hit)

    async def password_signup(self, request: IRequest, email: str, password: str) -> dict[str, Any]:
        """Create an identity (rate-limited per address); its document. Shared by the API
        and the signup page."""
        # Each signup costs an Argon2id hash and a scrypt derivation: bound it per address.
        address = client_address(request, self.config.trusted_proxies)
        key = f"signup:addr:{address}"
        await self._reserve(
            [(key, self.config.signup_limit_per_address)],
            window=self.config.signup_window,
            message="Too many signups from this address; wait before trying again.",
        )
        doc = await self.identities.signup(email, password)
        _log.info("Identity created: {idn}", idn=doc["_id"])
        return doc

    async def password_login(self, request: IRequest, email: str, password: str) -> dict[str, Any]:
        """The identity document for a right email and password (rate-limited per email and
        address), or Unauthorized / TooManyRequests. Shared by the API and the login page."""
        address = client_address(request, self.config.trusted_proxies)
        keys = [
            (f"login:email:{email}", self.config.login_limit_per_email),
            (f"login:addr:{address}", self.config.login_limit_per_address),
        ]
        # The attempt counts as a failure until it is known not to be one.
        hits = await self._reserve(keys)
        try:
            doc = await self.identities.login(email, password)
        except LoginFailed:
            raise Unauthorized(LOGIN_FAILED, slug="login-failed") from None
        except BaseException:
            await self._release(hits)
            raise
        await self._release(hits)
        return doc

    async def start_session(self, request: IRequest, idn: str) -> Rotation:
        """A new first-party session (refresh family) for ``idn``; sets the refresh cookie."""
        rotation = await self.refresh.create_family(idn)
        self._set_cookie(request, rotation)
        return rotation

    # -- routes --------------------------------------------------------------------------

    @app.route("/signup", methods=["POST"])
    async def signup(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        email = normalise_email(body.get("email"))
        password = check_password(body.get("password"))
        doc = await self.password_signup(request, email, password)
        return await self._login_response(request, doc, 201)

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        email = normalise_email(body.get("email"))
        password = body.get("password")
        if not isinstance(password, str) or not password or len(password) > 1024:
            raise BadRequest("'password' is required and must be a string.")
        doc = await self.password_login(request, email, password)
        return await self._login_response(request, doc)

    @app.route("/refresh", methods=["POST"])
    async def refresh_token(self, request: IRequest) -> bytes:
        token = (request.getCookie(COOKIE) or b"").decode("ascii", "replace")
        if not token:
            raise Unauthorized("No refresh cookie; log in again.", slug="refresh-failed")
        try:
            rotation = await self.refresh.rotate(token)
        except RefreshRejected as e:
            _log.info("Refresh refused: {reason}", reason=e.reason)
            self._clear_cookie(request)
            raise Unauthorized(
                "The session has ended; log in again.", slug="refresh-failed"
            ) from None
        return json_response(request, self._tokens(request, rotation.idn, rotation))

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: IRequest) -> bytes:
        token = (request.getCookie(COOKIE) or b"").decode("ascii", "replace")
        if token:
            await self.refresh.revoke(token)
        self._clear_cookie(request)
        request.setResponseCode(204)
        return b""

    @app.route("/challenge", methods=["GET"])
    async def challenge(self, request: IRequest) -> bytes:
        # Unauthenticated and it writes a document: bound it per address.
        address = client_address(request, self.config.trusted_proxies)
        key = f"challenge:issue:{address}"
        await self._reserve(
            [(key, self.config.challenge_limit_per_address)],
            window=60,
            message="Too many challenges from this address; wait before asking again.",
        )
        issued = await self.nonces.issue()
        return json_response(
            request,
            {"nonce": issued.nonce, "aud": self.config.public_url, "expiresAt": issued.expires_at},
        )

    @app.route("/response", methods=["POST"])
    async def response(self, request: IRequest) -> bytes:
        body = read_json_object(request)
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
        address = client_address(request, self.config.trusted_proxies)
        key = f"challenge:addr:{address}"
        hits = await self._reserve([(key, self.config.login_limit_per_address)])
        refused = Unauthorized("The challenge response was not accepted.", slug="challenge-failed")
        # Spend the nonce first: whatever happens next, it can never be used again.
        try:
            spent = await self.nonces.consume(nonce)
            if spent is None:
                raise refused
            message = challenge_message(self.config.public_url, nonce)
            doc = await self.identities.by_did(did)
            if doc is None or not verify_ed25519(public_key, message, signature):
                raise refused
        except Unauthorized:
            raise  # a failure: it stays counted
        except BaseException:
            await self._release(hits)
            raise
        await self._release(hits)
        return await self._login_response(request, doc)
