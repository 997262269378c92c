"""OAuth 2.1 for public clients, the parts that are pure rules: who a client is, where it may
be sent back, what it may ask for, PKCE, authorization codes, and signed browser tokens.

- ``client_id`` is the app's **origin** (``https://notes.example``, ``http://localhost:5173``):
  no registration. It must be written canonically (lower case, no default port, no path, no
  trailing slash). Plain ``http`` is accepted only for loopback hosts (``localhost``,
  ``*.localhost``, ``127.0.0.0/8``, ``[::1]``), as OAuth 2.1 allows for development.
- ``redirect_uri`` must have exactly the client's origin (scheme, host and port) and no
  fragment; its path and query are the app's.
- Scopes an app may ask for: ``data:read:<collection>``, ``data:write:<collection>``,
  ``data:*``, ``blob:*``. Writing implies reading the same collection, so a requested
  ``data:write:notes`` is granted as ``data:read:notes data:write:notes``. The first-party
  scope ``identity`` is never granted to an app.
- PKCE ``S256`` only: ``code_challenge`` = base64url(SHA-256(``code_verifier``)), 43
  characters; the verifier is 43 to 128 characters of ``[A-Za-z0-9._~-]`` (RFC 7636).
- Codes are single-use across replicas and live 60 s (:class:`CodeStore`): consuming one is a
  conditional update in CouchDB, so of any number of concurrent exchanges exactly one wins,
  and the session it will create is written into the code first, so that presenting the
  code again can revoke what it issued (RFC 6749 section 4.1.2).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode, urlsplit

from attrs import define, field, frozen

from vibed.api.auth import FIRST_PARTY_SCOPE
from vibed.couch import CouchConflict, CouchDatabase, CouchNotFound
from vibed.keys import b64url_decode, b64url_encode
from vibed.layout import COLLECTION_RE
from vibed.sessions import purge_expired

__all__ = ["FIRST_PARTY_SCOPE", "AuthorizationRequest", "CodeStore", "OAuthError", "Signer"]

CODE_TTL = 60
MAX_SCOPES = 32
MAX_STATE = 1024
MAX_REDIRECT_URI = 2048
MAX_CLIENT_NAME = 60

_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}\Z")
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")
_CODE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\Z")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class OAuthError(Exception):
    """An OAuth error response (RFC 6749 section 5.2 / 4.1.2.1): ``error`` is the code,
    ``description`` a sentence for the developer (and, on a page, the person)."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


class BadClient(OAuthError):
    """The client or its redirect URI cannot be trusted: never redirect, show a page."""

    def __init__(self, description: str) -> None:
        super().__init__("invalid_request", description)


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of an absolute http(s) URL, or ValueError."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("http", "https"):
        raise ValueError("not an http(s) URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("user information is not allowed")
    host = parts.hostname or ""
    port = parts.port  # ValueError for a bad port
    if not host:
        raise ValueError("no host")
    if ":" in host:
        ipaddress.IPv6Address(host)  # ValueError unless a real IPv6 literal
        host = f"[{host}]"
    elif not _HOST.match(host):
        raise ValueError("not a valid host name")
    if port is not None and port == _DEFAULT_PORTS[scheme]:
        port = None
    return scheme, host, port


def _serialize(scheme: str, host: str, port: int | None) -> str:
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def url_origin(url: str) -> str:
    """The serialized origin of an absolute http(s) URL (ValueError otherwise)."""
    return _serialize(*_origin_of(url))


def parse_client_id(value: object) -> str:
    """The client's origin, exactly as given when it is a canonical http(s) origin; else
    :class:`BadClient` naming what is wrong."""
    if not isinstance(value, str) or not value:
        raise BadClient("client_id is required: the app's origin, e.g. https://notes.example.")
    if len(value) > 300:
        raise BadClient("client_id is too long to be an origin.")
    try:
        scheme, host, port = _origin_of(value)
    except ValueError as e:
        raise BadClient(
            f"client_id must be the app's origin, like https://notes.example ({e})."
        ) from None
    origin = _serialize(scheme, host, port)
    if value != origin:
        raise BadClient(
            f"client_id must be exactly the app's origin, written as {origin!r} "
            "(lower case, no path, no trailing slash, no default port)."
        )
    if scheme == "http" and not _is_loopback(host.strip("[]")):
        raise BadClient("An app served over plain http is only accepted on localhost; use https.")
    return origin


def check_redirect_uri(client_id: str, value: object) -> str:
    """``value`` when it is an absolute URL on exactly the client's origin; else BadClient."""
    if not isinstance(value, str) or not value:
        raise BadClient("redirect_uri is required.")
    if len(value) > MAX_REDIRECT_URI:
        raise BadClient("redirect_uri is too long.")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise BadClient("redirect_uri may not contain spaces or control characters.")
    try:
        origin = _serialize(*_origin_of(value))
    except ValueError as e:
        raise BadClient(f"redirect_uri is not a usable URL ({e}).") from None
    if origin != client_id:
        raise BadClient(
            f"redirect_uri must be on the app's own origin {client_id} (it is on {origin})."
        )
    if "#" in value:
        raise BadClient("redirect_uri may not have a fragment.")
    return value


def _valid_scope(scope: str) -> bool:
    if scope in ("data:*", "blob:*"):
        return True
    kind, _, collection = scope.partition(":")
    action, _, name = collection.partition(":")
    return kind == "data" and action in ("read", "write") and bool(COLLECTION_RE.match(name))


def normalise_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Sorted, without duplicates, write implying read, ``data:*`` absorbing the rest."""
    out = set(scopes)
    for scope in list(out):
        if scope.startswith("data:write:"):
            out.add("data:read:" + scope[len("data:write:") :])
    if "data:*" in out:
        out = {s for s in out if not s.startswith("data:")} | {"data:*"}
    return tuple(sorted(out))


def parse_scopes(text: object) -> tuple[str, ...]:
    """The scopes of a ``scope`` parameter (space-delimited), normalised; ``invalid_scope``
    for an empty list, an unknown scope or the first-party one."""
    if not isinstance(text, str) or not text.strip():
        raise OAuthError("invalid_scope", "Ask for at least one scope, e.g. 'data:write:notes'.")
    items = [s for s in text.split(" ") if s]
    if len(items) > MAX_SCOPES:
        raise OAuthError("invalid_scope", f"Ask for at most {MAX_SCOPES} scopes.")
    for scope in items:
        if scope == FIRST_PARTY_SCOPE:
            raise OAuthError("invalid_scope", "The 'identity' scope is never granted to an app.")
        if not _valid_scope(scope):
            raise OAuthError(
                "invalid_scope",
                f"Unknown scope {scope[:80]!r}: apps may ask for data:read:<collection>, "
                "data:write:<collection>, data:* and blob:*.",
            )
    return normalise_scopes(items)


def covers(granted: Iterable[str], requested: Iterable[str]) -> bool:
    """Whether a grant of ``granted`` allows everything in ``requested``."""
    have = set(granted)
    for scope in requested:
        if scope in have:
            continue
        if scope.startswith("data:") and "data:*" in have:
            continue
        return False
    return True


def describe_scope(scope: str) -> tuple[str, str | None]:
    """(sentence, collection) of a normalised scope, for the consent page."""
    if scope == "data:*":
        return "Read, change and delete everything in all your collections", None
    if scope == "blob:*":
        return "Upload, download and delete your files", None
    if scope.startswith("data:write:"):
        return "Read and change your", scope[len("data:write:") :]
    return "Read your", scope[len("data:read:") :]


def describe_scopes(scopes: Iterable[str]) -> list[tuple[str, str | None]]:
    """One line per thing the person allows: a write scope's implied read is not repeated."""
    scopes = tuple(scopes)
    written = {s[len("data:write:") :] for s in scopes if s.startswith("data:write:")}
    return [
        describe_scope(s)
        for s in scopes
        if not (s.startswith("data:read:") and s[len("data:read:") :] in written)
    ]


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of ``verifier``."""
    return b64url_encode(hashlib.sha256(verifier.encode("ascii")).digest())


def pkce_matches(verifier: object, challenge: str) -> bool:
    if not isinstance(verifier, str) or _VERIFIER.match(verifier) is None:
        return False
    return hmac.compare_digest(pkce_challenge(verifier), challenge)


@frozen
class AuthorizationRequest:
    """A validated ``GET /auth/authorize`` request."""

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    code_challenge: str
    prompt: str | None
    client_name: str | None

    def params(self) -> dict[str, str]:
        """The request as query parameters (the consent form posts them back)."""
        out = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.scopes),
            "code_challenge": self.code_challenge,
            "code_challenge_method": "S256",
        }
        if self.state is not None:
            out["state"] = self.state
        if self.client_name:
            out["client_name"] = self.client_name
        return out

    def fingerprint(self) -> str:
        """A digest of everything the person approves (binds a consent form to it)."""
        canonical = "\n".join(f"{k}={v}" for k, v in sorted(self.params().items()))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def redirect_to(redirect_uri: str, params: dict[str, str]) -> str:
    """``redirect_uri`` with ``params`` added to its query (RFC 6749 section 4.1.2)."""
    sep = "&" if "?" in redirect_uri else "?"
    return redirect_uri + sep + urlencode(params)


def clean_client_name(value: str | None) -> str | None:
    """A display name the app sent: untrusted text, printable, bounded, or None."""
    if value is None:
        return None
    text = "".join(c for c in value if c.isprintable()).strip()
    return text[:MAX_CLIENT_NAME] or None


def parse_authorization_request(params: dict[str, str]) -> AuthorizationRequest:
    """Validate the parameters of an authorization request.

    :class:`BadClient` (never redirect) for a bad ``client_id`` or ``redirect_uri``; for
    anything else :class:`OAuthError`, whose ``redirect_uri`` is by then known to be safe.
    """
    client_id = parse_client_id(params.get("client_id"))
    redirect_uri = check_redirect_uri(client_id, params.get("redirect_uri"))
    state = params.get("state")
    if state is not None and len(state) > MAX_STATE:
        raise BadClient("state is too long.")
    request_error = _RedirectableError(client_id, redirect_uri, state)
    if params.get("response_type") != "code":
        raise request_error("unsupported_response_type", "Only response_type=code is supported.")
    if params.get("code_challenge_method") != "S256":
        raise request_error(
            "invalid_request", "PKCE is required: code_challenge_method must be S256."
        )
    challenge = params.get("code_challenge") or ""
    if _CHALLENGE.match(challenge) is None:
        raise request_error(
            "invalid_request", "code_challenge must be the base64url SHA-256 of the verifier."
        )
    prompt = params.get("prompt")
    if prompt is not None and prompt not in ("none", "consent", "login", "select_account"):
        raise request_error("invalid_request", "prompt may be none or consent.")
    try:
        scopes = parse_scopes(params.get("scope"))
    except OAuthError as e:
        raise request_error(e.error, e.description) from None
    return AuthorizationRequest(
        client_id=client_id,
        redirect_uri=redirect_uri,
        scopes=scopes,
        state=state,
        code_challenge=challenge,
        prompt=prompt,
        client_name=clean_client_name(params.get("client_name")),
    )


class RedirectError(OAuthError):
    """An error to send back to the (validated) ``redirect_uri``."""

    def __init__(
        self, error: str, description: str, client_id: str, redirect_uri: str, state: str | None
    ) -> None:
        super().__init__(error, description, status=303)
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.state = state


@define
class _RedirectableError:
    client_id: str
    redirect_uri: str
    state: str | None

    def __call__(self, error: str, description: str) -> RedirectError:
        return RedirectError(error, description, self.client_id, self.redirect_uri, self.state)


def error_redirect(
    request: AuthorizationRequest | RedirectError, error: str, description: str, issuer: str
) -> str:
    params = {"error": error, "error_description": description}
    if request.state is not None:
        params["state"] = request.state
    params["iss"] = issuer
    return redirect_to(request.redirect_uri, params)


# -- authorization codes --------------------------------------------------------------------


class CodeRejected(Exception):
    """The code is unknown, expired, already used or does not match; ``reason`` for logs.
    ``revoke`` names the session a replayed code had created (to revoke it)."""

    def __init__(self, reason: str, revoke: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.revoke = revoke


@frozen
class IssuedCode:
    idn: str
    gid: str
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    challenge: str
    family: str  # the refresh family the exchange creates


def _code_id(code: str) -> str:
    return "code:" + hashlib.sha256(code.encode("ascii")).hexdigest()


@define
class CodeStore:
    """Authorization codes, hashed, in a CouchDB database shared by every replica."""

    db: CouchDatabase
    clock: Callable[[], float] = field(default=time.time, repr=False)
    ttl: int = CODE_TTL

    async def issue(
        self,
        *,
        idn: str,
        gid: str,
        client_id: str,
        redirect_uri: str,
        scopes: tuple[str, ...],
        challenge: str,
    ) -> str:
        code = secrets.token_urlsafe(32)
        await self.db.put(
            {
                "_id": _code_id(code),
                "idn": idn,
                "gid": gid,
                "clientId": client_id,
                "redirectUri": redirect_uri,
                "scopes": list(scopes),
                "challenge": challenge,
                "expiresAt": int(self.clock()) + self.ttl,
                "usedAt": None,
                "family": None,
            }
        )
        return code

    async def consume(self, code: object) -> IssuedCode:
        """Spend ``code`` (once, on any replica) and return what it was issued for.

        The code is spent before anything else is checked: a wrong verifier burns it too.
        Presenting a spent code raises :class:`CodeRejected` with ``revoke`` set to the
        session the first exchange created.
        """
        if not isinstance(code, str) or _CODE.match(code) is None:
            raise CodeRejected("malformed")
        family = secrets.token_hex(16)
        try:
            doc = await self.db.get(_code_id(code))
        except CouchNotFound:
            raise CodeRejected("unknown") from None
        if doc.get("usedAt") is not None:
            raise CodeRejected("replayed", revoke=doc.get("family"))
        now = self.clock()
        doc["usedAt"] = now
        doc["family"] = family
        try:
            await self.db.put(doc)
        except (CouchConflict, CouchNotFound):
            # Another exchange won the race: this one is the replay.
            try:
                current = await self.db.get(doc["_id"])
            except CouchNotFound:
                raise CodeRejected("replayed") from None
            raise CodeRejected("replayed", revoke=current.get("family")) from None
        if now > doc["expiresAt"]:
            raise CodeRejected("expired")
        return IssuedCode(
            idn=doc["idn"],
            gid=doc["gid"],
            client_id=doc["clientId"],
            redirect_uri=doc["redirectUri"],
            scopes=tuple(doc["scopes"]),
            challenge=doc["challenge"],
            family=family,
        )

    async def purge(self) -> int:
        """Delete codes past their lifetime (used or not)."""
        return await purge_expired(self.db, "code:", self.clock() - self.ttl)


# -- signed browser tokens (session cookie, CSRF) -------------------------------------------


@define
class Signer:
    """HMAC-SHA256 tokens ``<payload>.<expiry>.<mac>`` for one purpose each, with a secret
    every replica derives from the shared signing key."""

    secret: bytes = field(repr=False)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def _mac(self, purpose: str, body: str) -> str:
        message = f"{purpose}\n{body}".encode()
        return b64url_encode(hmac.new(self.secret, message, hashlib.sha256).digest())

    def sign(self, purpose: str, payload: str, ttl: int) -> str:
        if "." in payload:
            raise ValueError("payload may not contain '.'")
        body = f"{payload}.{int(self.clock()) + ttl}"
        return f"{body}.{self._mac(purpose, body)}"

    def verify(self, purpose: str, token: object) -> str | None:
        """The payload of a valid, unexpired token for ``purpose``; None otherwise."""
        if not isinstance(token, str) or len(token) > 1024 or token.count(".") != 2:
            return None
        if not token.isascii():  # ours are; compare_digest refuses non-ASCII text (TypeError)
            return None
        payload, expiry, mac = token.split(".")
        if not hmac.compare_digest(self._mac(purpose, f"{payload}.{expiry}"), mac):
            return None
        if not expiry.isdigit() or int(expiry) < self.clock():
            return None
        return payload


def b64_ok(value: str) -> bool:
    try:
        b64url_decode(value)
    except ValueError:
        return False
    return True


def metadata(issuer: str) -> dict[str, Any]:
    """RFC 8414 authorization server metadata."""
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/auth/authorize",
        "token_endpoint": f"{issuer}/auth/token",
        "revocation_endpoint": f"{issuer}/auth/revoke",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": ["data:*", "blob:*"],
        "authorization_response_iss_parameter_supported": True,
        "prompt_values_supported": ["none", "consent"],
        "service_documentation": f"{issuer}/sdk/README.md",
    }
