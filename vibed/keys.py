"""Key custody: password hashing, the wrapped identity key and did:key encoding.

At signup an identity gets an Ed25519 keypair. The server keeps only:

- ``pwd_hash``: an Argon2id PHC string of the password (login checks it);
- ``salt`` and ``key_wrapped``: the 32-byte Ed25519 seed, encrypted with AES-256-GCM under
  ``scrypt(password, salt, N=32768, r=8, p=1, 32 bytes)``; the browser agent unwraps it with
  the same password (format in ``docs/keys.md``);
- ``public_key`` and ``did``: the public half, raw and as ``did:key:z6Mk...``.

Every function here is pure and synchronous. Argon2id and scrypt cost tens of milliseconds
of CPU each: callers run :func:`make_signup_material`, :func:`hash_password`,
:func:`verify_password`, :func:`dummy_hash` and :func:`derive_wrap_key` in the CPU thread
pool, never on the reactor thread. Nothing here logs, and no secret appears in a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from attrs import field, frozen
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "ARGON2_MEMORY_COST",
    "ARGON2_PARALLELISM",
    "ARGON2_TIME_COST",
    "NONCE_LEN",
    "SALT_LEN",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "SEED_LEN",
    "WRAPPED_LEN",
    "WRAP_KEY_LEN",
    "KeyUnwrapError",
    "SignupMaterial",
    "b58decode",
    "b58encode",
    "b64decode",
    "b64encode",
    "b64url_decode",
    "b64url_encode",
    "derive_wrap_key",
    "did_key_from_public",
    "dummy_hash",
    "hash_password",
    "make_signup_material",
    "rewrap_for_password",
    "public_from_did_key",
    "unwrap_seed",
    "verify_ed25519",
    "verify_password",
    "wrap_seed",
]

# The browser derives the same key, so these are part of the stored format: changing them
# makes every existing key_wrapped unreadable.
SCRYPT_N, SCRYPT_R, SCRYPT_P, WRAP_KEY_LEN = 32768, 8, 1, 32
SALT_LEN = 16
NONCE_LEN = 12
SEED_LEN = 32
_TAG_LEN = 16
WRAPPED_LEN = NONCE_LEN + SEED_LEN + _TAG_LEN  # 60 bytes, 80 base64 characters

# Argon2id: 46 MiB, 2 passes, 1 lane. Above the OWASP minimum (46 MiB, t=1, p=1); one
# verify takes ~75-85 ms of one core on the 2-core reference machine. One lane, so concurrent
# logins spread over the thread pool instead of each one occupying every core. The
# parameters live in each PHC string, so raising them later only affects new hashes.
ARGON2_TIME_COST = 2
ARGON2_MEMORY_COST = 47104  # KiB
ARGON2_PARALLELISM = 1

_hasher = PasswordHasher(
    time_cost=ARGON2_TIME_COST,
    memory_cost=ARGON2_MEMORY_COST,
    parallelism=ARGON2_PARALLELISM,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)

# multicodec "ed25519-pub" (0xed) as an unsigned varint: 0xed 0x01.
_ED25519_PUB_MULTICODEC = b"\xed\x01"
_DID_KEY_PREFIX = "did:key:z"
# "did:key:z" + base58 of 34 bytes is at most 9 + 47 characters; anything longer is refused
# before the quadratic base58 decode sees it.
_MAX_DID_LEN = 64


class KeyUnwrapError(ValueError):
    """The wrapped key could not be decrypted: wrong password, tampering or bad format."""


@frozen
class SignupMaterial:
    """Everything signup stores for a new identity, computed in one thread-pool call."""

    pwd_hash: str = field(repr=False)
    salt: str = field(repr=False)
    key_wrapped: str = field(repr=False)
    public_key: str
    did: str


def make_signup_material(password: str) -> SignupMaterial:
    """Create a keypair for ``password``'s owner: hash, salt, wrapped seed, public key, DID.

    CPU-heavy (one Argon2id hash and one scrypt): run it in the thread pool.
    """
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes_raw()
    salt = os.urandom(SALT_LEN)
    return SignupMaterial(
        pwd_hash=hash_password(password),
        salt=b64encode(salt),
        key_wrapped=wrap_seed(seed, derive_wrap_key(password, salt)),
        public_key=b64encode(public),
        did=did_key_from_public(public),
    )


def rewrap_for_password(
    salt: str, key_wrapped: str, public_key: str, current: str, new: str
) -> SignupMaterial:
    """The same key under a new password: the seed unwrapped with ``current`` and wrapped
    again with ``new`` under a fresh salt, and a new Argon2id hash. The public key and
    ``did:key`` stay the same (checked: the unwrapped seed must give ``public_key``).

    Raises :class:`KeyUnwrapError` when ``current`` does not unwrap the key. CPU-heavy (two
    scrypt derivations and one Argon2id hash): run it in the thread pool.
    """
    seed = unwrap_seed(key_wrapped, derive_wrap_key(current, b64decode(salt)))
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    if b64encode(public) != public_key:
        raise KeyUnwrapError("the wrapped key does not belong to this identity")
    new_salt = os.urandom(SALT_LEN)
    return SignupMaterial(
        pwd_hash=hash_password(new),
        salt=b64encode(new_salt),
        key_wrapped=wrap_seed(seed, derive_wrap_key(new, new_salt)),
        public_key=public_key,
        did=did_key_from_public(public),
    )


def derive_wrap_key(password: str, salt: bytes) -> bytes:
    """The AES-256 key that wraps the seed: scrypt over the password's UTF-8 bytes.

    The password is used exactly as given (no Unicode normalisation), as the browser does.
    """
    kdf = Scrypt(salt=salt, length=WRAP_KEY_LEN, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(password.encode("utf-8"))


def wrap_seed(seed: bytes, wrap_key: bytes) -> str:
    """Encrypt ``seed``: base64 of nonce(12) || AES-256-GCM ciphertext || tag(16), no AAD."""
    if len(seed) != SEED_LEN:
        raise ValueError(f"an Ed25519 seed is {SEED_LEN} bytes")
    if len(wrap_key) != WRAP_KEY_LEN:
        raise ValueError(f"the wrap key is {WRAP_KEY_LEN} bytes")
    nonce = os.urandom(NONCE_LEN)
    return b64encode(nonce + AESGCM(wrap_key).encrypt(nonce, seed, None))


def unwrap_seed(key_wrapped: str, wrap_key: bytes) -> bytes:
    """Decrypt a :func:`wrap_seed` result back to the 32-byte seed.

    Raises :class:`KeyUnwrapError` (a ``ValueError``) for a wrong key, tampering or a value
    that is not a wrapped key at all.
    """
    if len(wrap_key) != WRAP_KEY_LEN:
        raise ValueError(f"the wrap key is {WRAP_KEY_LEN} bytes")
    try:
        blob = b64decode(key_wrapped)
    except ValueError:
        raise KeyUnwrapError("wrapped key is not valid base64") from None
    if len(blob) != WRAPPED_LEN:
        raise KeyUnwrapError("wrapped key has the wrong length")
    nonce, sealed = blob[:NONCE_LEN], blob[NONCE_LEN:]
    try:
        return AESGCM(wrap_key).decrypt(nonce, sealed, None)
    except InvalidTag:
        raise KeyUnwrapError("wrong password or damaged wrapped key") from None


def hash_password(password: str) -> str:
    """Argon2id PHC string of ``password`` with this module's parameters. Thread pool."""
    return str(_hasher.hash(password))


def verify_password(pwd_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``pwd_hash``; False for a mismatch or a malformed hash."""
    try:
        return bool(_hasher.verify(pwd_hash, password))
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def dummy_hash() -> str:
    """A hash of a random password with the same parameters, computed once.

    Login verifies against it when the email is unknown, so an unknown email costs the
    same time as a wrong password.
    """
    return hash_password(b64encode(os.urandom(32)))


def did_key_from_public(public_key: bytes) -> str:
    """``did:key:z6Mk...`` of a raw Ed25519 public key (multicodec 0xed01, base58btc)."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return _DID_KEY_PREFIX + b58encode(_ED25519_PUB_MULTICODEC + public_key)


def public_from_did_key(did: str) -> bytes:
    """The raw Ed25519 public key inside a ``did:key``; ValueError for anything else.

    Only the bare DID is accepted (no ``#fragment``, query or path).
    """
    if not isinstance(did, str) or len(did) > _MAX_DID_LEN:
        raise ValueError("not an Ed25519 did:key")
    if not did.startswith(_DID_KEY_PREFIX):
        raise ValueError("not an Ed25519 did:key")
    raw = b58decode(did[len(_DID_KEY_PREFIX) :])
    if len(raw) != 34 or not raw.startswith(_ED25519_PUB_MULTICODEC):
        raise ValueError("not an Ed25519 did:key")
    return raw[2:]


def verify_ed25519(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``.

    False (never an exception) for a bad signature or a malformed key or signature.
    """
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- encodings -------------------------------------------------------------------------

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Base58btc (Bitcoin alphabet); each leading zero byte becomes a leading '1'."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    digits = []
    while n:
        n, rem = divmod(n, 58)
        digits.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(digits))


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`; ValueError for a character outside the alphabet."""
    n = 0
    for c in text:
        digit = _B58_INDEX.get(c)
        if digit is None:
            raise ValueError("invalid base58 character")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def b64encode(b: bytes) -> str:
    """Standard, padded base64."""
    return base64.b64encode(b).decode("ascii")


def b64decode(s: str) -> bytes:
    """Strict standard padded base64: ValueError for anything :func:`b64encode` can't emit."""
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("invalid base64") from None
    # Refuses non-zero padding bits, so every value has exactly one accepted spelling.
    if b64encode(raw) != s:
        raise ValueError("invalid base64")
    return raw


_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(b: bytes) -> str:
    """Unpadded URL-safe base64 (as in JOSE)."""
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def b64url_decode(s: str) -> bytes:
    """Strict unpadded URL-safe base64: ValueError for padding or foreign characters."""
    if not _B64URL_RE.fullmatch(s) or len(s) % 4 == 1:
        raise ValueError("invalid base64url")
    raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    if b64url_encode(raw) != s:
        raise ValueError("invalid base64url")
    return raw
