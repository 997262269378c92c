"""Access tokens: the daemon's Ed25519 signing key, JWT issue and verification, the JWKS.

Access tokens are compact JWS (JWT) signed with EdDSA (Ed25519)::

    header  {"alg": "EdDSA", "typ": "JWT", "kid": <RFC 7638 thumbprint of the key>}
    claims  {"iss", "aud", "sub": identity id, "scp": [scope, ...], "iat", "exp", "jti"
             [, "sid": session (refresh family)] [, "gid": grant id, "client_id": app origin]}

Verification accepts EdDSA only, checks the ``kid`` before any signature work, and takes time
from an injected clock, so tests move time instead of sleeping. Every replica loads the same
key file, so any replica verifies what another issued, and :meth:`TokenIssuer.derived_secret`
gives them all the same derived secrets.

Everything here is pure and cheap (an Ed25519 signature is microseconds): no thread pool.
A verified token is still refused when its session, grant or identity was revoked: the
issuer asks the process's revocation list (:mod:`vibed.revocation`), a dict lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
from attrs import define, field, frozen
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vibed.keys import b64url_encode

__all__ = [
    "AccessClaims",
    "InvalidToken",
    "TokenIssuer",
    "key_id",
    "load_or_create_signing_key",
]

LEEWAY = 30  # seconds of clock skew tolerated between replicas on exp and iat
# An access token is a few hundred bytes; refusing large ones bounds the work an
# unauthenticated request can cause.
MAX_TOKEN_LEN = 4096
#: Verified tokens remembered per process (a token is a few hundred bytes).
VERIFIED_CACHE_SIZE = 4096


class InvalidToken(Exception):
    """The token is not acceptable. ``str()`` is a short reason safe to show a client."""


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the Ed25519 private key (PEM, PKCS#8) at ``path``, creating it when absent.

    A new key is written to a temporary file created with ``O_CREAT | O_EXCL`` and mode
    0600 in the same directory, then hard-linked into place: the link fails if another
    process got there first (its key is then loaded), and no reader ever sees a partly
    written file. The parent directory is created with mode 0700.

    Raises ValueError, naming the path, when the file is not an unencrypted Ed25519 PEM key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = _create_key_file(path)
    return _parse_signing_key(path, data)


def _create_key_file(path: Path) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Another replica created it between our read and our link: use theirs.
            return path.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return pem


def _parse_signing_key(path: Path, data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            f"{path} is not an unencrypted PEM private key; move it away to have a new "
            "Ed25519 signing key generated, or point the configuration at the right file"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(
            f"{path} holds a {type(key).__name__}, not an Ed25519 private key; access "
            "tokens are signed with Ed25519 (EdDSA) only"
        )
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint: base64url SHA-256 of the canonical {crv, kty, x} JSON."""
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(public_key.public_bytes_raw())},
        separators=(",", ":"),
        sort_keys=True,
    )
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


@frozen
class AccessClaims:
    """The verified content of an access token."""

    sub: str
    scp: tuple[str, ...]
    exp: int
    iat: int
    jti: str
    sid: str | None
    gid: str | None = None  # app tokens: the grant they were issued under
    client_id: str | None = None  # app tokens: the app's origin


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which is an int subclass.
    return isinstance(value, int) and not isinstance(value, bool)


@define
class TokenIssuer:
    """Issues and verifies this deployment's access tokens and publishes its JWKS."""

    key: Ed25519PrivateKey = field(repr=False)
    issuer: str
    audience: str
    ttl: int = 900
    clock: Callable[[], float] = time.time
    #: the process's RevocationList (anything with ``is_revoked(sub, iat, sid, gid)``)
    revocations: Any = field(default=None, repr=False)
    kid: str = field(init=False)
    _public_key: Ed25519PublicKey = field(init=False, repr=False)
    #: Payloads of tokens whose signature, algorithm, key, issuer and audience were verified
    #: (what never changes for a given token), by the token's text. Time claims and
    #: revocation are checked on every use, cached or not.
    #: Verified tokens: their claims and ``nbf`` (times are checked again at every use).
    _verified: dict[str, tuple[AccessClaims, int | None]] = field(
        factory=dict, init=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        self._public_key = self.key.public_key()
        self.kid = key_id(self._public_key)

    def issue_access(
        self,
        sub: str,
        scopes: Sequence[str],
        *,
        sid: str | None = None,
        gid: str | None = None,
        client_id: str | None = None,
    ) -> tuple[str, int]:
        """A signed access token for identity ``sub`` with ``scopes``; returns (jwt, exp)."""
        if isinstance(scopes, str):
            raise TypeError("scopes must be a sequence of scope strings, not one string")
        if not sub:
            raise ValueError("an access token needs a subject")
        now = int(self.clock())
        exp = now + self.ttl
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "scp": list(scopes),
            "iat": now,
            "exp": exp,
            "jti": secrets.token_urlsafe(16),
        }
        if sid is not None:
            claims["sid"] = sid
        if gid is not None:
            claims["gid"] = gid
        if client_id is not None:
            claims["client_id"] = client_id
        token = jwt.encode(
            claims, self.key, algorithm="EdDSA", headers={"typ": "JWT", "kid": self.kid}
        )
        return token, exp

    def verify_access(self, token: str) -> AccessClaims:
        """The claims of a valid access token issued by this key for this audience.

        Raises :class:`InvalidToken` for anything else: another algorithm, another or no
        ``kid``, a bad signature, wrong ``iss``/``aud``, expiry (beyond 30 s of leeway), an
        ``iat`` in the future, missing or mistyped claims, text that is not a JWT, or a
        token whose session, grant or identity was revoked. Raises
        :class:`vibed.revocation.RevocationsUnavailable` when revocation cannot be checked.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LEN:
            raise InvalidToken("malformed token")
        entry = self._verified.get(token)
        if entry is None:
            payload = self._verify_signed(token)
            claims = self._check_claims(payload)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                # Oldest first (dicts keep insertion order): old tokens expire first too.
                del self._verified[next(iter(self._verified))]
            # The claims of a signed token never change: only time and revocation do.
            entry = self._verified[token] = (claims, payload.get("nbf"))
        else:
            claims, nbf = entry
            now, exp, iat = self.clock(), claims.exp, claims.iat
            # _check_times's conditions, inline (this branch is every request's); it says why.
            if now > exp + LEEWAY or iat > now + LEEWAY or (nbf is not None and nbf > now + LEEWAY):
                self._check_times(exp, iat, nbf, now)
        if self.revocations is not None and self.revocations.is_revoked(
            claims.sub, claims.iat, claims.sid, claims.gid
        ):
            raise InvalidToken("token revoked")
        return claims

    def _verify_signed(self, token: str) -> dict[str, Any]:
        """The payload of ``token`` once its header, signature, issuer and audience check
        out (EdDSA verification: the costly part, done once per token and process)."""
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("malformed token") from None
        if header.get("alg") != "EdDSA":
            raise InvalidToken("unsupported algorithm")
        if header.get("kid") != self.kid:
            raise InvalidToken("unknown signing key")
        try:
            payload = jwt.decode(
                token,
                self._public_key,
                algorithms=["EdDSA"],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["exp", "iat", "sub", "aud", "iss", "jti"],
                    "strict_aud": True,
                    # Times are checked below against the injected clock.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token is from another issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise InvalidToken(f"missing claim {e.claim}") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("unsupported algorithm") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("malformed token") from None
        if not isinstance(payload, dict):
            raise InvalidToken("malformed token")
        return payload

    def _check_times(self, exp: int, iat: int, nbf: int | None, now: float | None = None) -> None:
        if now is None:
            now = self.clock()
        if now > exp + LEEWAY:
            raise InvalidToken("token expired")
        if iat > now + LEEWAY or (nbf is not None and nbf > now + LEEWAY):
            raise InvalidToken("token not yet valid")

    def _check_claims(self, payload: dict[str, Any]) -> AccessClaims:
        exp, iat, nbf = payload["exp"], payload["iat"], payload.get("nbf")
        if not _is_int(exp) or not _is_int(iat) or (nbf is not None and not _is_int(nbf)):
            raise InvalidToken("malformed time claim")
        self._check_times(exp, iat, nbf)
        sub, scp, jti, sid = payload["sub"], payload.get("scp"), payload["jti"], payload.get("sid")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("malformed sub claim")
        if not isinstance(scp, list) or not all(isinstance(s, str) for s in scp):
            raise InvalidToken("malformed scp claim")
        if not isinstance(jti, str) or not jti:
            raise InvalidToken("malformed jti claim")
        gid, client_id = payload.get("gid"), payload.get("client_id")
        for name, value in (("sid", sid), ("gid", gid), ("client_id", client_id)):
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidToken(f"malformed {name} claim")
        return AccessClaims(
            sub=sub,
            scp=tuple(scp),
            exp=exp,
            iat=iat,
            jti=jti,
            sid=sid,
            gid=gid,
            client_id=client_id,
        )

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JSON Web Key Set served at ``/.well-known/jwks.json``."""
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": b64url_encode(self._public_key.public_bytes_raw()),
                    "kid": self.kid,
                    "alg": "EdDSA",
                    "use": "sig",
                }
            ]
        }

    def derived_secret(self, label: bytes) -> bytes:
        """A 32-byte secret for ``label``: HKDF-SHA256 over the signing key's raw bytes.

        Every replica sharing the key file derives the same value; distinct labels give
        independent secrets (used, e.g., to name refresh-token successors).
        """
        if not label:
            raise ValueError("derived_secret needs a non-empty label")
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label)
        return hkdf.derive(self.key.private_bytes_raw())
