"""HTTP plumbing shared by the API surfaces: strict JSON bodies, responses, the bearer check
and the client address."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.web.iweb import IRequest

from vibed import jsonfast, strictjson
from vibed.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from vibed.revocation import RevocationsUnavailable
from vibed.tokens import AccessClaims, InvalidToken, TokenIssuer
from vibed.web import (
    CACHE_CONTROL,
    CONTENT_LENGTH,
    CONTENT_TYPE,
    address_key,
)

AUTH_BODY_LIMIT = 64 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_json(raw: bytes) -> Any:
    """Parse strict JSON (see :mod:`vibed.strictjson`); a 400 ``invalid-json`` otherwise."""
    try:
        return strictjson.loads(raw)
    except strictjson.JSONError as e:
        raise BadRequest(str(e), slug="invalid-json") from None


def read_body(request: IRequest, limit: int) -> bytes:
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"The body may be at most {limit} bytes.")
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    raw: bytes = content.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"The body may be at most {limit} bytes.")
    return raw


def read_json_object(request: IRequest, limit: int = AUTH_BODY_LIMIT) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx Problem saying what is wrong."""
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    raw = read_body(request, limit)
    if not raw.strip():
        raise BadRequest("A JSON object body is required.", slug="invalid-json")
    # A JSON content type is required: it cannot be sent cross-site without a CORS
    # preflight, so a foreign page cannot post forms or no-cors requests here.
    if ctype != b"application/json" and not ctype.endswith(b"+json"):
        raise UnsupportedMediaType("Send the body as application/json.")
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.", slug="invalid-json")
    return body


def require_str(body: dict[str, Any], name: str, max_len: int = 4096) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{name}' is required and must be a non-empty string.")
    if len(value) > max_len:
        raise BadRequest(f"'{name}' may be at most {max_len} characters.")
    return value


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    encoded = jsonfast.dumps(body).encode("utf-8")
    # set_clean_header's store, three times in one (this is every data answer's): constant
    # values, and the length known up front (the answer goes out in one piece, not chunked).
    raw = request.responseHeaders._rawHeaders
    raw[CONTENT_TYPE] = [b"application/json"]
    raw[CACHE_CONTROL] = [b"no-store"]
    raw[CONTENT_LENGTH] = [b"%d" % len(encoded)]
    return encoded


def authenticate(request: IRequest, issuer: TokenIssuer) -> AccessClaims:
    """The verified access-token claims of ``request``, or 401."""
    header = request.getHeader(b"authorization")
    challenge = {"WWW-Authenticate": 'Bearer realm="vibe"'}
    if header is None:
        raise Unauthorized(
            "An 'Authorization: Bearer <token>' header is required.", headers=challenge
        )
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Use 'Authorization: Bearer <token>'.", headers=challenge)
    try:
        return issuer.verify_access(token.strip())
    except InvalidToken as e:
        raise Unauthorized(
            f"The access token was refused: {e}.",
            slug="invalid-token",
            headers={"WWW-Authenticate": 'Bearer realm="vibe", error="invalid_token"'},
        ) from None
    except RevocationsUnavailable:
        # Not a verdict on the token: the client should retry, not log the person out.
        raise ServiceUnavailable(
            "Access tokens cannot be checked right now; try again shortly.",
            headers={"Retry-After": "2"},
        ) from None


def require_scope(claims: AccessClaims, scope: str) -> None:
    """403 (RFC 6750 ``insufficient_scope``) unless the token carries ``scope``."""
    if scope not in claims.scp:
        raise Forbidden(
            f"This needs the {scope!r} scope, which this access token does not carry.",
            slug="insufficient-scope",
            headers={
                "WWW-Authenticate": f'Bearer realm="vibe", error="insufficient_scope", '
                f'scope="{scope}"'
            },
        )


def client_address(request: IRequest, trusted: Sequence[Network]) -> str:
    """The client, as per-address limits count it (:func:`vibed.web.address_key`: an IPv6
    client is its /64): the peer's address; ``X-Forwarded-For`` is believed only when the
    peer is a trusted proxy, and then the right-most address that is not itself a trusted
    proxy is the client."""
    peer = getattr(request.getClientAddress(), "host", None) or "unknown"
    header = request.getHeader(b"x-forwarded-for")
    return resolve_client(str(peer), header.decode("latin-1") if header else None, trusted)


def resolve_client(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """:func:`client_address` from the peer's address and the ``X-Forwarded-For`` value."""
    return address_key(_resolve_client(peer, forwarded_for, trusted))


def _resolve_client(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    if not trusted or not _in(peer, trusted) or not forwarded_for:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # garbage in the header: do not trust any of it
        if not _in(hop, trusted):
            return hop
    return peer


def _in(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
