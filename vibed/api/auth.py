"""``/auth/*``: signup, login, refresh and logout.

Responses that log someone in carry the access token in the JSON body and the refresh token in
an httpOnly, SameSite=Strict cookie scoped to ``/auth`` (Secure when the public URL is https).
The agent's DID challenge (``/auth/challenge``, ``/auth/response``) lives in
:mod:`agent_bridge.api` and logs in through :meth:`AuthAPI.login_response`.
"""

from __future__ import annotations

from typing import Any, cast

from attrs import define
from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from vibed.config import Config
from vibed.errors import (
    BadRequest,
    Forbidden,
    TooManyRequests,
    Unauthorized,
    install_error_handlers,
)
from vibed.identity import (
    IdentityService,
    LoginFailed,
    check_password,
    normalise_email,
    redact,
)
from vibed.ratelimit import Hit, RateLimiter
from vibed.sessions import RefreshRejected, RefreshStore, Rotation
from vibed.tokens import TokenIssuer

from .http import authenticate, client_address, json_response, read_json_object

_log = Logger(namespace="vibed.api.auth")

COOKIE = b"vibe_refresh"
#: Carried only by first-party tokens (password or DID login), never by an app's: the routes
#: that manage the identity itself (grants, keys, password, export, delete) require it.
FIRST_PARTY_SCOPE = "identity"
SCOPES = (FIRST_PARTY_SCOPE, "data:*", "blob:*")
LOGIN_FAILED = "The email or password is not right."


def user_agent(request: IRequest) -> str | None:
    """The client's User-Agent (what its session is listed as), if it sent one."""
    raw = request.getHeader(b"user-agent")
    return raw.decode("latin-1")[:1024] if raw else None


@define(slots=False)
class AuthAPI:
    config: Config
    identities: IdentityService
    issuer: TokenIssuer
    refresh: RefreshStore
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

    async def login_response(
        self, request: IRequest, doc: dict[str, Any], status: int = 200, *, session: bool = True
    ) -> bytes:
        """Log ``doc``'s identity in: a new session, the refresh cookie, the tokens' body.
        Every way of logging in ends here (password, signup, the agent's DID challenge).

        ``session=False`` (the agent's DID login, which holds a key rather than a session):
        an access token alone, no refresh session, no cookie; nothing is listed among the
        person's sessions or left behind (docs/auth.md)."""
        if not session:
            token, exp = self.issuer.issue_access(doc["_id"], SCOPES)
            body = {
                "identity": redact(doc),
                "accessToken": token,
                "tokenType": "Bearer",
                "expiresIn": self.issuer.ttl,
                "expiresAt": exp,
            }
            return json_response(request, body, status)
        rotation = await self.refresh.create_family(doc["_id"], user_agent=user_agent(request))
        body = {"identity": redact(doc), **self._tokens(request, doc["_id"], rotation)}
        return json_response(request, body, status)

    async def reserve(
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

    async def release(self, hits: list[Hit]) -> None:
        for hit in hits:
            await self.limiter.release(hit)

    async def password_signup(self, request: IRequest, email: str, password: str) -> dict[str, Any]:
        """Create an identity (rate-limited per address); its document. Shared by the API
        and the signup page."""
        # Each signup costs an Argon2id hash and a scrypt derivation: bound it per address.
        address = client_address(request, self.config.trusted_proxies)
        key = f"signup:addr:{address}"
        await self.reserve(
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
        hits = await self.reserve(keys)
        try:
            doc = await self.identities.login(email, password)
        except LoginFailed:
            raise Unauthorized(LOGIN_FAILED, slug="login-failed") from None
        except BaseException:
            await self.release(hits)
            raise
        await self.release(hits)
        _log.info("Password login: {idn}", idn=doc["_id"])
        return doc

    async def start_session(self, request: IRequest, idn: str) -> Rotation:
        """A new first-party session (refresh family) for ``idn``; sets the refresh cookie."""
        rotation = await self.refresh.create_family(idn, user_agent=user_agent(request))
        self._set_cookie(request, rotation)
        return rotation

    # -- routes --------------------------------------------------------------------------

    @app.route("/signup", methods=["POST"])
    async def signup(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        email = normalise_email(body.get("email"))
        password = check_password(body.get("password"))
        doc = await self.password_signup(request, email, password)
        return await self.login_response(request, doc, 201)

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        email = normalise_email(body.get("email"))
        password = body.get("password")
        if not isinstance(password, str) or not password or len(password) > 1024:
            raise BadRequest("'password' is required and must be a string.")
        doc = await self.password_login(request, email, password)
        return await self.login_response(request, doc)

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
        elif request.getHeader(b"authorization"):
            # No cookie (a client that keeps none, like the agent after its one password
            # login): a first-party access token ends its own session.
            claims = authenticate(request, self.issuer)
            if claims.client_id is not None or FIRST_PARTY_SCOPE not in claims.scp:
                raise Forbidden(
                    "Only a first-party token can log out; an app ends its session at "
                    "/auth/revoke.",
                    slug="insufficient-scope",
                )
            if claims.sid:
                await self.refresh.revoke_family(claims.sid)
        self._clear_cookie(request)
        request.setResponseCode(204)
        return b""
