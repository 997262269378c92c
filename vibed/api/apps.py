"""Apps: the OAuth 2.1 authorization server's HTTP side, the log-in pages it needs, the
person's grants, and the browser SDK's files.

Routes (mounted by :mod:`vibed.api.root`)::

    GET  /auth/authorize      validate, then log in -> consent -> redirect with a code
    POST /auth/authorize      the consent form (CSRF token bound to the session and request)
    POST /auth/token          authorization_code (+ PKCE) and refresh_token; form-encoded
    POST /auth/revoke         RFC 7009
    GET  /.well-known/oauth-authorization-server     RFC 8414 metadata
    GET|POST /login, /signup  server-rendered forms; on success back to ``next``
    GET  /me/grants           the identity's grants (first-party token: scope ``identity``)
    DELETE /me/grants/{id}    revoke one
    GET  /sdk/..., /static/...  the SDK's modules, the React hooks, page styles

Cookies: ``vibe_session`` (HttpOnly, ``SameSite=Lax``, ``Path=/auth``) marks the person as
logged in for the authorization endpoint. It is Lax, where the refresh cookie is Strict,
because the authorization request arrives as a top-level navigation from the app's site,
which a Strict cookie would not accompany; it names the first-party session (refresh family)
and dies with it (logout, reuse). All it can do is show the consent page and, for a grant the
person already gave, redirect a code to that app's own origin. The forms carry CSRF tokens:
the log-in form one bound to a ``vibe_csrf`` cookie (Strict), the consent form one bound to
the session and to every parameter of the request being approved; POSTs from another
``Origin`` are refused.
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
import secrets
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, quote

from attrs import define, field
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from vibed.authorization import AppAuthority
from vibed.config import Config
from vibed.couch import CouchNotFound, CouchUnavailable
from vibed.errors import NotFound, Problem, ServiceUnavailable, TooManyRequests
from vibed.grants import GID_RE, GrantStore
from vibed.identity import IdentityService, check_password, normalise_email
from vibed.oauth import (
    AuthorizationRequest,
    BadClient,
    OAuthError,
    RedirectError,
    Signer,
    error_redirect,
    metadata,
    parse_authorization_request,
    url_origin,
)
from vibed.pages import consent_page, login_page, message_page
from vibed.revocation import RevocationsUnavailable
from vibed.tokens import TokenIssuer

from .auth import FIRST_PARTY_SCOPE, AuthAPI
from .http import authenticate, client_address, json_response, read_body, require_scope

_log = Logger(namespace="vibed.api.apps")

SESSION_COOKIE = b"vibe_session"
CSRF_COOKIE = b"vibe_csrf"
FORM_LIMIT = 64 * 1024
CONSENT_TTL = 600
LOGIN_FORM_TTL = 3600


class FormError(Exception):
    """A request the form parser refuses (duplicate or malformed parameters)."""


def _single(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], set[str]]:
    out: dict[str, str] = {}
    dups: set[str] = set()
    for key, value in pairs:
        if key in out:
            dups.add(key)
        out[key] = value
    return out, dups


def query_params(request: IRequest) -> tuple[dict[str, str], set[str]]:
    raw = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    try:
        text = raw.decode("ascii")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=50, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise FormError("The query string is not valid.") from None
    return _single(pairs)


def form_params(request: IRequest) -> tuple[dict[str, str], set[str]]:
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/x-www-form-urlencoded":
        raise FormError("Send the parameters as application/x-www-form-urlencoded.")
    raw = read_body(request, FORM_LIMIT)
    try:
        pairs = parse_qsl(
            raw.decode("utf-8"), keep_blank_values=True, max_num_fields=50, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise FormError("The form body is not valid.") from None
    return _single(pairs)


def _safe_next(value: str | None) -> str:
    """A same-origin path to go on to after logging in (the dashboard otherwise)."""
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value)
        or len(value) > 4096
    ):
        return "/dashboard"
    return value


def _duration(seconds: int) -> str:
    if seconds < 90:
        return f"{max(seconds, 1)} seconds"
    return f"about {round(seconds / 60)} minutes"


def _in_words(problem: Problem, signup: bool) -> str:
    """What the log-in and sign-up pages say about a refused attempt."""
    detail = problem.detail or problem.title
    if problem.slug == "email-taken":
        return "An account with this email already exists. Log in instead, or use another email."
    if "'email'" in detail:
        return "Enter a valid email address, like name@example.org."
    if "'password'" in detail:
        return (
            "Your password needs at least 8 characters (and at most 1024)."
            if signup
            else "Enter your password."
        )
    return detail


def _redirect(request: IRequest, url: str) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"Location", url.encode("utf-8"))
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Referrer-Policy", b"same-origin")
    return b""


def _oauth_json(request: IRequest, error: OAuthError) -> bytes:
    body = json_response(
        request,
        {"error": error.error, "error_description": error.description},
        error.status if error.status != 303 else 400,
    )
    request.setHeader(b"Pragma", b"no-cache")
    if error.error == "invalid_client":
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="vibe"')
    return body


@define
class StaticFiles:
    """Files under a directory, read at start, served with an ETag (the SDK, page scripts and
    styles); text files also gzipped once at start, for clients that accept it."""

    root: Path
    files: dict[str, tuple[bytes, bytes, bytes]] = field(factory=dict)
    #: name -> (gzipped bytes, their ETag), for files that shrink
    gzipped: dict[str, tuple[bytes, bytes]] = field(factory=dict)
    cache_control: bytes = b"public, max-age=300"

    TYPES = {
        ".js": b"text/javascript; charset=utf-8",
        ".mjs": b"text/javascript; charset=utf-8",
        ".ts": b"text/plain; charset=utf-8",
        ".css": b"text/css; charset=utf-8",
        ".json": b"application/json",
        ".md": b"text/markdown; charset=utf-8",
        ".svg": b"image/svg+xml",
        ".png": b"image/png",
    }
    COMPRESSIBLE = (b"text/", b"application/json", b"image/svg+xml")

    @classmethod
    def load(cls, root: Path, cache_control: bytes = b"public, max-age=300") -> StaticFiles:
        found = cls(root, cache_control=cache_control)
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                if not path.is_file() or "node_modules" in path.parts:
                    continue
                if path.name.startswith(("__init__", ".")) or path.suffix == ".pyc":
                    continue
                ctype = cls.TYPES.get(path.suffix)
                if ctype is None:
                    guessed = mimetypes.guess_type(path.name)[0]
                    if guessed is None:
                        continue
                    ctype = guessed.encode("ascii")
                data = path.read_bytes()
                etag = b'"' + hashlib.sha256(data).hexdigest()[:32].encode("ascii") + b'"'
                name = path.relative_to(root).as_posix()
                found.files[name] = (data, ctype, etag)
                if ctype.startswith(cls.COMPRESSIBLE) and len(data) > 512:
                    packed = gzip.compress(data, 9, mtime=0)
                    if len(packed) < len(data) * 0.9:
                        found.gzipped[name] = (packed, etag[:-1] + b'-gz"')
        return found

    def merged(self, prefix: str, other: StaticFiles) -> StaticFiles:
        """These files plus ``other``'s under ``prefix``."""
        self.files.update({prefix + name: entry for name, entry in other.files.items()})
        self.gzipped.update({prefix + name: entry for name, entry in other.gzipped.items()})
        return self

    def serve(self, request: IRequest, name: str) -> bytes:
        entry = self.files.get(name)
        if entry is None:
            raise NotFound("No such file.")
        data, ctype, etag = entry
        packed = self.gzipped.get(name)
        if packed is not None:
            request.setHeader(b"Vary", b"Accept-Encoding")
            accepted = (request.getHeader(b"accept-encoding") or b"").lower()
            if b"gzip" in accepted:
                data, etag = packed
                request.setHeader(b"Content-Encoding", b"gzip")
        request.setHeader(b"Content-Type", ctype)
        request.setHeader(b"ETag", etag)
        request.setHeader(b"Cache-Control", self.cache_control)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        return data


@define(slots=False)
class AppsAPI:
    config: Config
    auth: AuthAPI
    identities: IdentityService
    issuer: TokenIssuer
    authority: AppAuthority
    grants: GrantStore
    signer: Signer
    sdk: StaticFiles
    static: StaticFiles

    # -- cookies and the session -------------------------------------------------------------

    def _cookie(self, request: IRequest, name: bytes, value: bytes, **kw: Any) -> None:
        cast(Request, request).addCookie(
            name, value, httpOnly=True, secure=self.config.secure_cookies, **kw
        )

    def set_session(self, request: IRequest, family: str) -> None:
        token = self.signer.sign("session", family, self.config.refresh_ttl)
        self._cookie(
            request,
            SESSION_COOKIE,
            token.encode("ascii"),
            path=b"/auth",
            max_age=str(self.config.refresh_ttl).encode("ascii"),
            sameSite="lax",
        )

    async def session(self, request: IRequest) -> tuple[str, str] | None:
        """(idn, family) of the person logged in on this browser, if any."""
        raw = (request.getCookie(SESSION_COOKIE) or b"").decode("ascii", "replace")
        family = self.signer.verify("session", raw)
        if family is None:
            return None
        idn = await self.auth.refresh.session(family)
        return None if idn is None else (idn, family)

    def _csrf_cookie(self, request: IRequest) -> str:
        value = (request.getCookie(CSRF_COOKIE) or b"").decode("ascii", "replace")
        if len(value) != 43:
            value = secrets.token_urlsafe(32)
            self._cookie(request, CSRF_COOKIE, value.encode("ascii"), path=b"/", sameSite="strict")
        return value

    def _same_origin(self, request: IRequest) -> bool:
        """A form POST from a page of this server (browsers send Origin with every POST)."""
        origin = request.getHeader(b"origin")
        if origin is None:
            fetch_site = request.getHeader(b"sec-fetch-site")
            return fetch_site in (None, b"same-origin", b"none")
        try:
            return origin.decode("ascii") == url_origin(self.config.public_url)
        except (UnicodeDecodeError, ValueError):
            return False

    # -- log in and sign up pages -------------------------------------------------------------

    def login_form(self, request: IRequest, signup: bool = False) -> bytes:
        params, _ = self._lenient_query(request)
        next_url = _safe_next(params.get("next"))
        cookie = self._csrf_cookie(request)
        csrf = self.signer.sign("form:" + cookie, "login", LOGIN_FORM_TTL)
        return login_page(request, csrf=csrf, next_url=next_url, signup=signup)

    def _lenient_query(self, request: IRequest) -> tuple[dict[str, str], set[str]]:
        try:
            return query_params(request)
        except FormError:
            return {}, set()

    async def login_submit(self, request: IRequest, signup: bool = False) -> bytes:
        try:
            form, _ = form_params(request)
        except FormError as e:
            return message_page(request, "Cannot log in", str(e))
        next_url = _safe_next(form.get("next"))
        cookie = (request.getCookie(CSRF_COOKIE) or b"").decode("ascii", "replace")
        if (
            not self._same_origin(request)
            or not cookie
            or self.signer.verify("form:" + cookie, form.get("csrf")) != "login"
        ):
            return message_page(
                request,
                "Please try again",
                "This form expired or did not come from this site. Go back, reload the page "
                "and submit it again.",
                403,
            )
        email_text = form.get("email", "")[:300]

        def again(message: str, status: int) -> bytes:
            csrf = self.signer.sign("form:" + cookie, "login", LOGIN_FORM_TTL)
            return login_page(
                request,
                csrf=csrf,
                next_url=next_url,
                email=email_text,
                error=message,
                status=status,
                signup=signup,
            )

        try:
            email = normalise_email(email_text)
            password = form.get("password", "")
            if signup:
                doc = await self.auth.password_signup(request, email, check_password(password))
            else:
                if not password or len(password) > 1024:
                    return again("Enter your password.", 400)
                doc = await self.auth.password_login(request, email, password)
            rotation = await self.auth.start_session(request, doc["_id"])
        except (ServiceUnavailable, CouchUnavailable):
            return again(
                "The server cannot reach its database right now. Wait a moment, then try again.",
                503,
            )
        except TooManyRequests as e:
            wait = int(e.extra.get("retryAfter", 60))
            request.setHeader(b"Retry-After", str(wait).encode("ascii"))
            return again(f"Too many attempts. Wait {_duration(wait)}, then try again.", 429)
        except Problem as e:
            return again(_in_words(e, signup), e.status)
        self.set_session(request, rotation.family)
        return _redirect(request, next_url)

    # -- the authorization endpoint --------------------------------------------------------------

    def _bad_client_page(self, request: IRequest, e: OAuthError) -> bytes:
        return message_page(
            request,
            "This app's request cannot be used",
            f"The app that sent you here made a request Vibe Cloud cannot trust, so you were "
            f"not sent back to it. Tell the app's developer: {e.description}",
        )

    async def authorize(self, request: IRequest) -> bytes:
        """``GET /auth/authorize``."""
        try:
            params, dups = query_params(request)
        except FormError as e:
            return self._bad_client_page(request, BadClient(str(e)))
        return await self._page_errors(
            request, self._authorize(request, params, dups, consent_post=False)
        )

    async def authorize_post(self, request: IRequest) -> bytes:
        """``POST /auth/authorize``: the consent form."""
        try:
            params, dups = form_params(request)
        except FormError as e:
            return self._bad_client_page(request, BadClient(str(e)))
        return await self._page_errors(
            request, self._authorize(request, params, dups, consent_post=True)
        )

    async def _page_errors(self, request: IRequest, answer: Awaitable[bytes]) -> bytes:
        """A person on a page gets a page, not JSON, when the database fails."""
        try:
            return await answer
        except CouchUnavailable:
            return message_page(
                request,
                "Vibe Cloud is busy",
                "The server cannot reach its database right now. Go back and try again in a "
                "moment.",
                503,
            )
        except CouchNotFound:
            # The identity's databases are gone (deleted meanwhile): it cannot grant anything.
            return message_page(
                request,
                "This account no longer exists",
                "Log in with another account from the app.",
                404,
            )

    async def _authorize(
        self, request: IRequest, params: dict[str, str], dups: set[str], *, consent_post: bool
    ) -> bytes:
        issuer = self.issuer.issuer
        try:
            if dups & {"client_id", "redirect_uri"}:
                raise BadClient("client_id and redirect_uri may be given only once.")
            auth = parse_authorization_request(params)
            if dups:
                raise RedirectError(
                    "invalid_request",
                    "Each parameter may be given only once.",
                    auth.client_id,
                    auth.redirect_uri,
                    auth.state,
                )
        except RedirectError as e:
            return _redirect(request, error_redirect(e, e.error, e.description, issuer))
        except OAuthError as e:
            return self._bad_client_page(request, e)

        def fail(error: str, description: str) -> bytes:
            return _redirect(request, error_redirect(auth, error, description, issuer))

        try:
            session = await self.session(request)
        except RevocationsUnavailable:
            return fail("temporarily_unavailable", "Try again in a moment.")
        if consent_post:
            return await self._consent_decision(request, auth, params, session, fail)
        if session is None:
            if auth.prompt == "none":
                return fail("login_required", "The person is not logged in.")
            back = request.uri.decode("ascii", "replace")
            return _redirect(request, "/login?next=" + quote(back, safe=""))
        idn, family = session
        if auth.prompt != "consent":
            grant = await self.grants.find_covering(idn, auth.client_id, auth.scopes)
            if grant is not None:
                return _redirect(request, await self.authority.code_redirect(idn, grant, auth))
        if auth.prompt == "none":
            return fail("consent_required", "The person has not allowed these scopes yet.")
        doc = await self.identities.get(idn)
        if doc is None:
            return fail("login_required", "The person is not logged in.")
        back = request.uri.decode("ascii", "replace")
        return consent_page(
            request,
            auth=auth,
            csrf=self._consent_token(family, auth),
            email=str(doc.get("email", "")),
            switch_url="/login?next=" + quote(back, safe=""),
        )

    def _consent_token(self, family: str, auth: AuthorizationRequest) -> str:
        return self.signer.sign(f"consent:{family}:{auth.fingerprint()}", "ok", CONSENT_TTL)

    async def _consent_decision(
        self,
        request: IRequest,
        auth: AuthorizationRequest,
        params: dict[str, str],
        session: tuple[str, str] | None,
        fail: Any,
    ) -> bytes:
        if not self._same_origin(request) or session is None:
            return message_page(
                request,
                "Please try again",
                "This approval did not come from your own Vibe Cloud page (or you were logged "
                "out meanwhile). Go back to the app and start again.",
                403,
            )
        idn, family = session
        token = params.get("csrf")
        if self.signer.verify(f"consent:{family}:{auth.fingerprint()}", token) != "ok":
            return message_page(
                request,
                "Please try again",
                "This approval form expired or was changed. Go back to the app and start again.",
                403,
            )
        decision = params.get("decision")
        if decision == "deny":
            return fail("access_denied", "The person did not allow access.")
        if decision != "allow":
            return message_page(request, "Please choose", "Choose Allow or Deny.", 400)
        grant = await self.grants.create(idn, auth.client_id, auth.scopes, auth.client_name)
        return _redirect(request, await self.authority.code_redirect(idn, grant, auth))

    # -- token and revocation endpoints ----------------------------------------------------------

    async def token(self, request: IRequest) -> bytes:
        # Codes and refresh tokens are 256-bit secrets, but each attempt costs CouchDB reads:
        # failures count per client address (successes are given back), like logins.
        address = client_address(request, self.config.trusted_proxies)
        try:
            hits = await self.auth.reserve(
                [(f"token:addr:{address}", self.config.login_limit_per_address)],
                message="Too many failed token requests from this address; wait and retry.",
            )
        except TooManyRequests as e:
            body = _oauth_json(
                request, OAuthError("slow_down", e.detail or "Too many requests.", 429)
            )
            for name, value in e.headers.items():
                request.setHeader(name.encode("ascii"), value.encode("ascii"))
            return body
        try:
            answer = await self._token(request)
        except BaseException:
            await self.auth.release(hits)  # not the client's failure (CouchDB, a bug)
            raise
        if isinstance(answer, bytes):
            return answer  # an OAuth error: the attempt stays counted
        await self.auth.release(hits)
        body = json_response(request, answer)
        request.setHeader(b"Pragma", b"no-cache")
        return body

    async def _token(self, request: IRequest) -> dict[str, Any] | bytes:
        """The token answer, or the bytes of an OAuth error response already set up."""
        try:
            form, dups = form_params(request)
            if dups:
                raise OAuthError("invalid_request", "Each parameter may be given only once.")
            grant_type = form.get("grant_type")
            if grant_type == "authorization_code":
                answer = await self.authority.exchange_code(form)
            elif grant_type == "refresh_token":
                answer = await self.authority.refresh_tokens(form)
            elif not grant_type:
                raise OAuthError("invalid_request", "grant_type is required.")
            else:
                raise OAuthError(
                    "unsupported_grant_type",
                    "grant_type may be authorization_code or refresh_token.",
                )
        except FormError as e:
            return _oauth_json(request, OAuthError("invalid_request", str(e)))
        except OAuthError as e:
            return _oauth_json(request, e)
        return answer

    async def revoke(self, request: IRequest) -> bytes:
        try:
            form, dups = form_params(request)
            if dups:
                raise OAuthError("invalid_request", "Each parameter may be given only once.")
            await self.authority.revoke_token(form)
        except FormError as e:
            return _oauth_json(request, OAuthError("invalid_request", str(e)))
        except OAuthError as e:
            return _oauth_json(request, e)
        except RevocationsUnavailable:
            raise ServiceUnavailable("Tokens cannot be checked right now; try again.") from None
        request.setResponseCode(200)
        request.setHeader(b"Cache-Control", b"no-store")
        return b""

    def metadata(self, request: IRequest) -> bytes:
        body = json_response(request, metadata(self.issuer.issuer))
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return body

    # -- the person's grants -------------------------------------------------------------------

    async def list_grants(self, request: IRequest) -> bytes:
        claims = authenticate(request, self.issuer)
        require_scope(claims, FIRST_PARTY_SCOPE)
        grants = await self.grants.list_grants(claims.sub)
        return json_response(request, {"grants": [g.public() for g in grants]})

    async def delete_grant(self, request: IRequest, gid: str) -> bytes:
        claims = authenticate(request, self.issuer)
        require_scope(claims, FIRST_PARTY_SCOPE)
        if GID_RE.match(gid) is None or not await self.grants.revoke(claims.sub, gid):
            raise NotFound("No such grant.")
        request.setResponseCode(204)
        return b""


def web_dir() -> Path:
    """Where the browser files are: the installed ``vibed_web`` package (a wheel), or the
    checkout's ``web/`` (an editable install, tests)."""
    import importlib.util

    spec = importlib.util.find_spec("vibed_web")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "sdk" / "vibe.js").is_file():
                return Path(location)
    return Path(__file__).resolve().parents[2] / "web"


# -- OpenAPI -------------------------------------------------------------------------------

_FORM = "application/x-www-form-urlencoded"
_HTML = {"description": "HTML page", "content": {"text/html": {}}}
_SEE_OTHER = {"description": "Redirect (Location)"}


def _oauth_error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
    }


def _form(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            _FORM: {"schema": {"type": "object", "properties": properties, "required": required}}
        },
    }


_STR = {"type": "string"}
_PAGE_FORM = _form({"email": _STR, "password": _STR, "csrf": _STR, "next": _STR}, ["csrf"])

OPENAPI_PATHS: dict[str, Any] = {
    "/auth/authorize": {
        "get": {
            "summary": "OAuth 2.1 authorization endpoint (code + PKCE S256); see docs/apps.md",
            "security": [],
            "parameters": [
                {"name": n, "in": "query", "required": r, "schema": _STR}
                for n, r in (
                    ("response_type", True),
                    ("client_id", True),
                    ("redirect_uri", True),
                    ("scope", True),
                    ("state", False),
                    ("code_challenge", True),
                    ("code_challenge_method", True),
                    ("prompt", False),
                    ("client_name", False),
                )
            ],
            "responses": {
                "200": _HTML,
                "303": _SEE_OTHER,
                "400": {"description": "HTML page: the request cannot be trusted"},
            },
        },
        "post": {
            "summary": "The consent form (same-origin, CSRF-protected)",
            "security": [],
            "requestBody": _form({"decision": {"enum": ["allow", "deny"]}, "csrf": _STR}, []),
            "responses": {
                "303": _SEE_OTHER,
                "400": _HTML,
                "403": {"description": "HTML page"},
                "429": _HTML,
                "503": _HTML,
            },
        },
    },
    "/auth/token": {
        "post": {
            "summary": "OAuth 2.1 token endpoint: authorization_code and refresh_token",
            "security": [],
            "requestBody": _form(
                {
                    "grant_type": {"enum": ["authorization_code", "refresh_token"]},
                    "client_id": _STR,
                    "code": _STR,
                    "redirect_uri": _STR,
                    "code_verifier": _STR,
                    "refresh_token": _STR,
                    "scope": _STR,
                },
                ["grant_type", "client_id"],
            ),
            "responses": {
                "200": {
                    "description": "Tokens",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/OAuthTokens"}}
                    },
                },
                "400": _oauth_error("invalid_request, invalid_grant, invalid_scope, ..."),
                "401": _oauth_error("invalid_client"),
                "429": _oauth_error("slow_down: too many requests"),
                "503": _oauth_error("temporarily_unavailable"),
            },
        }
    },
    "/auth/revoke": {
        "post": {
            "summary": "RFC 7009 token revocation (ends the app session)",
            "security": [],
            "requestBody": _form(
                {"token": _STR, "token_type_hint": _STR, "client_id": _STR},
                ["token", "client_id"],
            ),
            "responses": {
                "200": {"description": "Revoked (or unknown)"},
                "400": _oauth_error("invalid_request"),
                "401": _oauth_error("invalid_client"),
                "503": _oauth_error("temporarily_unavailable"),
            },
        }
    },
    "/.well-known/oauth-authorization-server": {
        "get": {
            "summary": "RFC 8414 authorization server metadata",
            "security": [],
            "responses": {"200": {"description": "Metadata", "content": {"application/json": {}}}},
        }
    },
    "/login": {
        "get": {"summary": "Log-in page", "security": [], "responses": {"200": _HTML}},
        "post": {
            "summary": "Log-in form",
            "security": [],
            "requestBody": _PAGE_FORM,
            "responses": {
                "303": _SEE_OTHER,
                "400": _HTML,
                "401": _HTML,
                "403": _HTML,
                "429": _HTML,
                "503": _HTML,
            },
        },
    },
    "/signup": {
        "get": {"summary": "Create-your-account page", "security": [], "responses": {"200": _HTML}},
        "post": {
            "summary": "Create-your-account form",
            "security": [],
            "requestBody": _PAGE_FORM,
            "responses": {
                "303": _SEE_OTHER,
                "400": _HTML,
                "403": _HTML,
                "409": _HTML,
                "429": _HTML,
                "503": _HTML,
            },
        },
    },
    "/me/grants": {
        "get": {
            "summary": "The apps the person allowed (needs the first-party 'identity' scope)",
            "responses": {
                "200": {
                    "description": "Grants, newest first",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "grants": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Grant"},
                                    }
                                },
                            }
                        }
                    },
                },
                "401": {"description": "Missing, invalid or revoked token"},
                "403": {"description": "Not a first-party token"},
                "503": {"description": "CouchDB or the revocation list unavailable"},
            },
        }
    },
    "/me/grants/{gid}": {
        "delete": {
            "summary": "Revoke a grant: its tokens stop on every replica within seconds",
            "parameters": [{"name": "gid", "in": "path", "required": True, "schema": _STR}],
            "responses": {
                "204": {"description": "Revoked"},
                "400": {"description": "Malformed grant id"},
                "401": {"description": "Missing, invalid or revoked token"},
                "403": {"description": "Not a first-party token"},
                "404": {"description": "No such grant"},
                "503": {"description": "CouchDB or the revocation list unavailable"},
            },
        }
    },
    "/sdk/{name}": {
        "get": {
            "summary": "The browser SDK (ES modules, .d.ts) and React hooks (under react/)",
            "security": [],
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": _STR}],
            "responses": {"200": {"description": "File"}, "404": {"description": "No such"}},
        }
    },
    "/static/{name}": {
        "get": {
            "summary": "Page assets (styles)",
            "security": [],
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": _STR}],
            "responses": {"200": {"description": "File"}, "404": {"description": "No such"}},
        }
    },
}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "OAuthError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": _STR, "error_description": _STR},
    },
    "OAuthTokens": {
        "type": "object",
        "properties": {
            "access_token": _STR,
            "token_type": {"const": "Bearer"},
            "expires_in": {"type": "integer"},
            "refresh_token": _STR,
            "scope": _STR,
        },
    },
    "Grant": {
        "type": "object",
        "properties": {
            "id": _STR,
            "origin": _STR,
            "scopes": {"type": "array", "items": _STR},
            "name": {"type": ["string", "null"]},
            "via": {"enum": ["consent", "agent"]},
            "createdAt": {"type": "string", "format": "date-time"},
            "lastUsedAt": {"type": ["string", "null"], "format": "date-time"},
        },
    },
}


def make_apps(
    config: Config,
    couch: Any,
    auth: AuthAPI,
    identities: IdentityService,
    issuer: TokenIssuer,
    refresh: Any,
    revocations: Any,
    clock: Any,
) -> AppsAPI:
    """The authorization server, grants and browser files, wired."""
    from vibed.naming import NONCES_DB
    from vibed.oauth import CodeStore

    grants = GrantStore(server=couch, clock=clock, revocations=revocations)
    # Codes are single-use secrets that live a minute, like challenge nonces: same database.
    codes = CodeStore(db=couch.database(NONCES_DB), clock=clock)
    authority = AppAuthority(
        issuer=issuer, refresh=refresh, grants=grants, codes=codes, revocations=revocations
    )
    web = web_dir()
    return AppsAPI(
        config=config,
        auth=auth,
        identities=identities,
        issuer=issuer,
        authority=authority,
        grants=grants,
        signer=Signer(issuer.derived_secret(b"vibed browser forms v1"), clock=clock),
        sdk=StaticFiles.load(web / "sdk").merged("react/", StaticFiles.load(web / "react")),
        # Page scripts and styles change with the daemon: revalidated (ETag) on every load.
        static=StaticFiles.load(web / "static", cache_control=b"no-cache"),
    )
