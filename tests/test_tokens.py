"""Tests for vibed.tokens: the signing key file, access JWT issue/verify and the JWKS."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from vibed.keys import b64url_decode, b64url_encode
from vibed.tokens import (
    AccessClaims,
    InvalidToken,
    TokenIssuer,
    key_id,
    load_or_create_signing_key,
)

ISSUER = "https://vibe.example"
AUDIENCE = "https://vibe.example"
T0 = 1_800_000_000.0


class FakeClock:
    """A settable clock for TokenIssuer."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer(clock: FakeClock) -> TokenIssuer:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    return TokenIssuer(key=key, issuer=ISSUER, audience=AUDIENCE, clock=clock)


def _b64url_json(value: dict[str, Any]) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":")).encode())


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64url_json(header)}.{_b64url_json(claims)}.{b64url_encode(signature)}"


def _good_claims(now: float = T0) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "idn-1",
        "scp": ["data:*"],
        "iat": int(now),
        "exp": int(now) + 900,
        "jti": "j1",
    }


def _sign_with(key: Ed25519PrivateKey, claims: dict[str, Any], kid: str) -> str:
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def _hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    # Forged by hand: PyJWT itself refuses to use PEM/raw public keys as HMAC secrets.
    signing_input = f"{_b64url_json(header)}.{_b64url_json(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


# -- signing key file ------------------------------------------------------------------


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    """A missing key file is created (dir 0700, file 0600) and the same key loads next time."""
    path = tmp_path / "secrets" / "signing.pem"
    first = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    second = load_or_create_signing_key(path)
    assert second.private_bytes_raw() == first.private_bytes_raw()
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing.pem"]


def test_key_file_shared_by_replicas(tmp_path: Path) -> None:
    """Two issuers loading one key file have the same kid and accept each other's tokens."""
    path = tmp_path / "signing.pem"
    a = TokenIssuer(key=load_or_create_signing_key(path), issuer=ISSUER, audience=AUDIENCE)
    b = TokenIssuer(key=load_or_create_signing_key(path), issuer=ISSUER, audience=AUDIENCE)
    assert a.kid == b.kid
    token, _ = a.issue_access("idn-1", ["data:*"])
    assert b.verify_access(token).sub == "idn-1"
    assert a.derived_secret(b"refresh") == b.derived_secret(b"refresh")


def test_concurrent_first_loads_agree_on_one_key(tmp_path: Path) -> None:
    """Replicas starting at once against an empty directory all end up with the same key."""
    path = tmp_path / "keys" / "signing.pem"
    barrier = threading.Barrier(8)

    def load() -> bytes:
        barrier.wait()
        return load_or_create_signing_key(path).private_bytes_raw()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: load(), range(8)))
    assert len(set(results)) == 1
    assert load_or_create_signing_key(path).private_bytes_raw() == results[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing.pem"]


def test_existing_ed25519_key_file_is_loaded(tmp_path: Path) -> None:
    """An Ed25519 PKCS#8 PEM written by someone else is loaded as is."""
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "k.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert load_or_create_signing_key(path).private_bytes_raw() == key.private_bytes_raw()


def test_non_ed25519_key_file_refused(tmp_path: Path) -> None:
    """A PEM holding an EC key is refused with a message naming the file and Ed25519."""
    path = tmp_path / "ec.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519 private key") as info:
        load_or_create_signing_key(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_garbage_key_file_refused_and_kept(tmp_path: Path, content: bytes) -> None:
    """A file that is not a PEM key is a ValueError and is left untouched."""
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_or_create_signing_key(path)
    assert path.read_bytes() == content


def test_encrypted_key_file_refused(tmp_path: Path) -> None:
    """A passphrase-protected Ed25519 key is refused (the daemon has no passphrase)."""
    path = tmp_path / "enc.pem"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass"),
        )
    )
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_or_create_signing_key(path)


def test_key_file_created_despite_permissive_umask(tmp_path: Path) -> None:
    """Even with umask 000 the new key file is 0600, never group/world readable."""
    old = os.umask(0)
    try:
        path = tmp_path / "k.pem"
        load_or_create_signing_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- kid and JWKS ----------------------------------------------------------------------


def test_key_id_rfc8037_vector() -> None:
    """key_id is the RFC 7638 thumbprint; RFC 8037 appendix A.3 gives its value for A.1's key."""
    public = Ed25519PublicKey.from_public_bytes(
        b64url_decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
    )
    assert key_id(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_jwks_verifies_issued_token(issuer: TokenIssuer) -> None:
    """A client holding only the JWKS verifies an issued token with PyJWT."""
    token, _ = issuer.issue_access("idn-1", ["data:*"])
    jwks = json.loads(json.dumps(issuer.jwks()))
    (entry,) = jwks["keys"]
    assert entry == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_encode(issuer.key.public_key().public_bytes_raw()),
        "kid": issuer.kid,
        "alg": "EdDSA",
        "use": "sig",
    }
    assert jwt.get_unverified_header(token)["kid"] == entry["kid"]
    jwk = jwt.PyJWK(entry)
    claims = jwt.decode(
        token,
        jwk.key,
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["sub"] == "idn-1"


def test_repr_hides_private_key(issuer: TokenIssuer) -> None:
    """The issuer's repr names its kid and URLs but not the key."""
    text = repr(issuer)
    assert issuer.kid in text
    assert "Ed25519PrivateKey" not in text


# -- issue and verify ------------------------------------------------------------------


def test_valid_token_verifies(issuer: TokenIssuer) -> None:
    """An issued token verifies to its claims; the header is EdDSA/JWT with the kid."""
    token, exp = issuer.issue_access("idn-1", ["data:*", "blob:*"], sid="s-1")
    assert exp == int(T0) + 900
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "typ": "JWT", "kid": issuer.kid}
    claims = issuer.verify_access(token)
    assert claims == AccessClaims(
        sub="idn-1", scp=("data:*", "blob:*"), exp=exp, iat=int(T0), jti=claims.jti, sid="s-1"
    )
    assert len(claims.jti) >= 16
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iss"] == ISSUER and payload["aud"] == AUDIENCE


def test_sid_is_optional_and_jti_unique(issuer: TokenIssuer) -> None:
    """Without a sid the claim is absent (None); every token has a fresh jti."""
    token1, _ = issuer.issue_access("idn-1", [])
    token2, _ = issuer.issue_access("idn-1", [])
    claims1, claims2 = issuer.verify_access(token1), issuer.verify_access(token2)
    assert claims1.sid is None and claims1.scp == ()
    assert "sid" not in jwt.decode(token1, options={"verify_signature": False})
    assert claims1.jti != claims2.jti


def test_scopes_must_not_be_a_string(issuer: TokenIssuer) -> None:
    """Passing one scope string instead of a list is a programming error, caught early."""
    with pytest.raises(TypeError):
        issuer.issue_access("idn-1", "data:*")


def test_expiry_with_leeway(issuer: TokenIssuer, clock: FakeClock) -> None:
    """A token is accepted until 30 s after exp, then refused as expired."""
    token, exp = issuer.issue_access("idn-1", ["data:*"])
    clock.now = exp + 30
    issuer.verify_access(token)
    clock.now = exp + 31
    with pytest.raises(InvalidToken, match="expired"):
        issuer.verify_access(token)


def test_token_from_the_future_refused(issuer: TokenIssuer, clock: FakeClock) -> None:
    """A token whose iat is more than 30 s ahead of this replica's clock is refused."""
    clock.now = T0 + 120
    token, _ = issuer.issue_access("idn-1", ["data:*"])
    clock.now = T0
    with pytest.raises(InvalidToken, match="not yet valid"):
        issuer.verify_access(token)


def test_alg_none_refused(issuer: TokenIssuer) -> None:
    """An unsigned token (alg none) with the right kid is refused."""
    token = _forge({"alg": "none", "typ": "JWT", "kid": issuer.kid}, _good_claims())
    with pytest.raises(InvalidToken):
        issuer.verify_access(token)
    token = _forge({"alg": "EdDSA", "typ": "JWT", "kid": issuer.kid}, _good_claims())
    with pytest.raises(InvalidToken):
        issuer.verify_access(token)


@pytest.mark.parametrize("secret_form", ["pem", "raw", "jwk-x"])
def test_hs256_with_public_key_as_secret_refused(issuer: TokenIssuer, secret_form: str) -> None:
    """Algorithm confusion: HS256 keyed with the public key (PEM, raw, JWK x) is refused."""
    public = issuer.key.public_key()
    secret = {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "raw": public.public_bytes_raw(),
        "jwk-x": issuer.jwks()["keys"][0]["x"].encode(),
    }[secret_form]
    token = _hs256({"alg": "HS256", "typ": "JWT", "kid": issuer.kid}, _good_claims(), secret)
    with pytest.raises(InvalidToken, match="unsupported algorithm"):
        issuer.verify_access(token)
    # Even if the header lies about the algorithm, the HMAC is not an Ed25519 signature.
    forged = _hs256({"alg": "EdDSA", "typ": "JWT", "kid": issuer.kid}, _good_claims(), secret)
    with pytest.raises(InvalidToken):
        issuer.verify_access(forged)


def test_wrong_kid_refused(issuer: TokenIssuer) -> None:
    """A correctly signed token carrying another kid is refused."""
    token = _sign_with(issuer.key, _good_claims(), kid="other-kid")
    with pytest.raises(InvalidToken, match="unknown signing key"):
        issuer.verify_access(token)


def test_missing_kid_refused(issuer: TokenIssuer) -> None:
    """A correctly signed token without a kid header is refused."""
    token = jwt.encode(_good_claims(), issuer.key, algorithm="EdDSA")
    assert "kid" not in jwt.get_unverified_header(token)
    with pytest.raises(InvalidToken, match="unknown signing key"):
        issuer.verify_access(token)


def test_other_key_with_same_kid_refused(issuer: TokenIssuer) -> None:
    """A token signed by another Ed25519 key but claiming our kid fails the signature check."""
    token = _sign_with(Ed25519PrivateKey.generate(), _good_claims(), kid=issuer.kid)
    with pytest.raises(InvalidToken, match="bad signature"):
        issuer.verify_access(token)


def test_wrong_audience_refused(issuer: TokenIssuer) -> None:
    """A token of this key for another audience (another deployment) is refused."""
    other = TokenIssuer(
        key=issuer.key, issuer=ISSUER, audience="https://other.example", clock=issuer.clock
    )
    token, _ = other.issue_access("idn-1", ["data:*"])
    with pytest.raises(InvalidToken, match="audience"):
        issuer.verify_access(token)
    claims = _good_claims() | {"aud": [AUDIENCE, "https://other.example"]}
    with pytest.raises(InvalidToken):
        issuer.verify_access(_sign_with(issuer.key, claims, issuer.kid))


def test_wrong_issuer_refused(issuer: TokenIssuer) -> None:
    """A token of this key naming another issuer is refused."""
    other = TokenIssuer(
        key=issuer.key, issuer="https://evil.example", audience=AUDIENCE, clock=issuer.clock
    )
    token, _ = other.issue_access("idn-1", ["data:*"])
    with pytest.raises(InvalidToken, match="issuer"):
        issuer.verify_access(token)


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud", "iss", "jti"])
def test_missing_required_claim_refused(issuer: TokenIssuer, claim: str) -> None:
    """A signed token lacking any required claim is refused."""
    claims = _good_claims()
    del claims[claim]
    with pytest.raises(InvalidToken, match=f"missing claim {claim}"):
        issuer.verify_access(_sign_with(issuer.key, claims, issuer.kid))


@pytest.mark.parametrize(
    "change",
    [
        {"scp": "data:*"},
        {"scp": ["data:*", 3]},
        {"scp": None},
        {"sub": ""},
        {"sub": 42},
        {"exp": str(int(T0) + 900)},
        {"exp": True},
        {"iat": 1.5},
        {"sid": 7},
        {"jti": ""},
    ],
)
def test_mistyped_claims_refused(issuer: TokenIssuer, change: dict[str, Any]) -> None:
    """Signed tokens with claims of the wrong type (scp not a list of str, ...) are refused."""
    token = _sign_with(issuer.key, _good_claims() | change, issuer.kid)
    with pytest.raises(InvalidToken):
        issuer.verify_access(token)


def test_missing_scp_refused(issuer: TokenIssuer) -> None:
    """A signed token without scp is refused."""
    claims = _good_claims()
    del claims["scp"]
    with pytest.raises(InvalidToken, match="scp"):
        issuer.verify_access(_sign_with(issuer.key, claims, issuer.kid))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJFZERTQSJ9",
        "eyJhbGciOiJFZERTQSJ9.e30.",
        "x" * 5000,
        base64.urlsafe_b64encode(b"[1,2]").decode() + ".e30.AA",
    ],
)
def test_garbage_refused(issuer: TokenIssuer, token: str) -> None:
    """Text that is not a JWT is refused with InvalidToken."""
    with pytest.raises(InvalidToken):
        issuer.verify_access(token)


def test_tampered_payload_refused(issuer: TokenIssuer) -> None:
    """Changing the payload of a valid token (e.g. widening scp) breaks the signature."""
    token, _ = issuer.issue_access("idn-1", ["data:read:notes"])
    header, _payload, signature = token.split(".")
    forged = f"{header}.{_b64url_json(_good_claims() | {'scp': ['data:*']})}.{signature}"
    with pytest.raises(InvalidToken, match="bad signature"):
        issuer.verify_access(forged)


def test_reasons_never_contain_the_token(issuer: TokenIssuer, clock: FakeClock) -> None:
    """InvalidToken messages are short and do not echo the token."""
    token, exp = issuer.issue_access("idn-1", ["data:*"])
    clock.now = exp + 3600
    with pytest.raises(InvalidToken) as info:
        issuer.verify_access(token)
    reason = str(info.value)
    assert token not in reason and len(reason) < 60


@settings(max_examples=300)
@given(text=st.text(max_size=300))
def test_arbitrary_text_only_raises_invalid_token(text: str) -> None:
    """Any text given as a token is refused with InvalidToken, never another exception."""
    issuer = TokenIssuer(
        key=Ed25519PrivateKey.from_private_bytes(bytes(32)), issuer=ISSUER, audience=AUDIENCE
    )
    with pytest.raises(InvalidToken):
        issuer.verify_access(text)


@settings(max_examples=200)
@given(
    header=st.dictionaries(st.text(max_size=5), st.none() | st.integers() | st.text(max_size=8)),
    claims=st.dictionaries(st.text(max_size=5), st.none() | st.integers() | st.text(max_size=8)),
    signature=st.binary(max_size=70),
)
def test_arbitrary_jws_structures_only_raise_invalid_token(
    header: dict[str, Any], claims: dict[str, Any], signature: bytes
) -> None:
    """Well-formed but forged JWS structures are refused with InvalidToken only."""
    issuer = TokenIssuer(
        key=Ed25519PrivateKey.from_private_bytes(bytes(32)), issuer=ISSUER, audience=AUDIENCE
    )
    for h in (header, header | {"alg": "EdDSA", "kid": issuer.kid}):
        with pytest.raises(InvalidToken):
            issuer.verify_access(_forge(h, claims, signature))


# -- derived secrets -------------------------------------------------------------------


def test_derived_secret(issuer: TokenIssuer) -> None:
    """Derived secrets are 32 bytes, stable per label, distinct across labels and keys."""
    a = issuer.derived_secret(b"refresh-successor")
    assert len(a) == 32
    assert issuer.derived_secret(b"refresh-successor") == a
    assert issuer.derived_secret(b"other") != a
    other = TokenIssuer(key=Ed25519PrivateKey.generate(), issuer=ISSUER, audience=AUDIENCE)
    assert other.derived_secret(b"refresh-successor") != a
    assert a != issuer.key.private_bytes_raw()


# -- the cache of verified tokens ----------------------------------------------------------


class Revoked:
    """A revocation list that revokes whatever session it is told to."""

    def __init__(self) -> None:
        self.sids: set[str] = set()

    def is_revoked(self, sub: str, iat: int, sid: str | None, gid: str | None) -> bool:
        return sid in self.sids


def test_a_cached_token_is_still_refused_once_expired(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    """A token verified (and so remembered) a moment ago is refused once past its expiry
    plus leeway: the cache spares the signature check, never the time check."""
    token, exp = issuer.issue_access("idn:x", ["data:*"])
    assert issuer.verify_access(token).sub == "idn:x"
    assert token in issuer._verified
    clock.now = exp + 31
    with pytest.raises(InvalidToken, match="expired"):
        issuer.verify_access(token)


def test_a_cached_token_is_still_refused_once_revoked(issuer: TokenIssuer) -> None:
    """Revoking the token's session refuses it on its next use, though it was verified (and
    remembered) just before: revocation is checked on every request."""
    revoked = Revoked()
    issuer.revocations = revoked
    token, _ = issuer.issue_access("idn:x", ["data:*"], sid="s1")
    assert issuer.verify_access(token).sid == "s1"
    revoked.sids.add("s1")
    with pytest.raises(InvalidToken, match="revoked"):
        issuer.verify_access(token)


def test_the_cache_holds_only_verified_tokens_and_stays_bounded(issuer: TokenIssuer) -> None:
    """A forged token (signature changed) is refused, every time, and never remembered; a
    token for another audience likewise; the cache never grows past its bound."""
    from vibed import tokens

    token, _ = issuer.issue_access("idn:x", ["data:*"])
    issuer.verify_access(token)
    head, payload, sig = token.split(".")
    forged = f"{head}.{payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    for _ in range(2):
        with pytest.raises(InvalidToken):
            issuer.verify_access(forged)
    assert forged not in issuer._verified
    other = TokenIssuer(key=issuer.key, issuer=ISSUER, audience="https://other.example")
    foreign, _ = other.issue_access("idn:x", ["data:*"])
    with pytest.raises(InvalidToken, match="audience"):
        issuer.verify_access(foreign)
    assert foreign not in issuer._verified
    for i in range(tokens.VERIFIED_CACHE_SIZE + 10):
        issuer.verify_access(issuer.issue_access(f"idn:{i}", ["data:*"])[0])
    assert len(issuer._verified) == tokens.VERIFIED_CACHE_SIZE
