"""Tests for vibed.keys: wrapped seeds, password hashes, did:key and the base encodings."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from vibed import keys
from vibed.keys import KeyUnwrapError

# These tests are about the hashing itself: vibed's production Argon2id parameters.
pytestmark = pytest.mark.real_argon2

# The worked example of docs/keys.md.
DOC_PASSWORD = "Tr0ub4dor&3 caf\u00e9"
DOC_SALT = bytes(range(16))
DOC_SALT_B64 = "AAECAwQFBgcICQoLDA0ODw=="
DOC_WRAP_KEY = bytes.fromhex("999390558906bf0c9ef4c1a0132f528e5db2d22f106b50c516cb12b401513f92")
DOC_SEED = bytes(32)
DOC_NONCE = bytes(range(0x10, 0x1C))
DOC_SEALED = bytes.fromhex(
    "783cffa0d419c2ea3fb6a667e40606caae2eaae2a320cd749269bd3a956c964d"
    "255fea937100e1fecad395f360e225e2"
)
DOC_KEY_WRAPPED = "EBESExQVFhcYGRobeDz/oNQZwuo/tqZn5AYGyq4uquKjIM10kmm9OpVslk0lX+qTcQDh/srTlfNg4iXi"
DOC_PUBLIC_B64 = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik="
DOC_DID = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"

# w3c-ccg/did-method-key test-vectors/ed25519-x25519.json: (seed, did, publicKeyBase58).
DID_KEY_VECTORS = [
    (
        0,
        "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp",
        "4zvwRjXUKGfvwnParsHAS3HuSVzV5cA4McphgmoCtajS",
    ),
    (
        1,
        "did:key:z6MkjchhfUsD6mmvni8mCdXHw216Xrm9bQe2mBH1P5RDjVJG",
        "6ASf5EcmmEHTgDJ4X4ZT5vT6iHVJBXPg5AN5YoTCpGWt",
    ),
    (
        2,
        "did:key:z6MknGc3ocHs3zdPiJbnaaqDi58NGb4pk1Sp9WxWufuXSdxf",
        "8pM1DN3RiT8vbom5u1sNryaNT1nyL8CTTW3b5PwWXRBH",
    ),
    (
        3,
        "did:key:z6MkvqoYXQfDDJRv8L4wKzxYeuKyVZBfi9Qo6Ro8MiLH3kDQ",
        "HPYVwAQmskwT1qEEeRzhoomyfyupJGASQQtCXSNG8XS2",
    ),
    (
        4,
        "did:key:z6MkwW6aqMnjgrhJXFUko3NnZPGzVpkNzhYK7yEhnsibmLwL",
        "J3qYF7YJMKCqQke47UQwiHizgFUXapHxRxKmxbkar89x",
    ),
]


def _public_of_seed(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


# -- the wrapped seed ------------------------------------------------------------------


def test_documented_wrap_vector() -> None:
    """The worked example in docs/keys.md is what the code computes, step by step."""
    assert keys.b64encode(DOC_SALT) == DOC_SALT_B64
    assert keys.derive_wrap_key(DOC_PASSWORD, DOC_SALT) == DOC_WRAP_KEY
    assert AESGCM(DOC_WRAP_KEY).encrypt(DOC_NONCE, DOC_SEED, None) == DOC_SEALED
    assert keys.b64encode(DOC_NONCE + DOC_SEALED) == DOC_KEY_WRAPPED
    assert keys.unwrap_seed(DOC_KEY_WRAPPED, DOC_WRAP_KEY) == DOC_SEED
    public = _public_of_seed(DOC_SEED)
    assert keys.b64encode(public) == DOC_PUBLIC_B64
    assert keys.did_key_from_public(public) == DOC_DID


def test_wrap_key_is_scrypt_of_utf8_password() -> None:
    """The wrap key is plain scrypt(N=32768, r=8, p=1) of the UTF-8 password, as in a browser."""
    import hashlib

    expected = hashlib.scrypt(
        DOC_PASSWORD.encode("utf-8"), salt=DOC_SALT, n=32768, r=8, p=1, maxmem=2**26, dklen=32
    )
    assert keys.derive_wrap_key(DOC_PASSWORD, DOC_SALT) == expected


def test_wrap_unwrap_round_trip() -> None:
    """A seed wrapped under a key unwraps to the same seed; two wraps use different nonces."""
    seed = bytes(range(32))
    wrap_key = bytes(range(100, 132))
    wrapped = keys.wrap_seed(seed, wrap_key)
    assert len(keys.b64decode(wrapped)) == keys.WRAPPED_LEN
    assert keys.unwrap_seed(wrapped, wrap_key) == seed
    assert keys.wrap_seed(seed, wrap_key) != wrapped


def test_signup_material_unwraps_with_the_password() -> None:
    """Signup material: the password verifies, unwraps the seed, and the seed matches the DID."""
    password = "hunter2 is not a good password"
    material = keys.make_signup_material(password)
    assert keys.verify_password(material.pwd_hash, password)
    assert material.pwd_hash.startswith("$argon2id$")
    salt = keys.b64decode(material.salt)
    assert len(salt) == keys.SALT_LEN
    seed = keys.unwrap_seed(material.key_wrapped, keys.derive_wrap_key(password, salt))
    public = _public_of_seed(seed)
    assert keys.b64encode(public) == material.public_key
    assert keys.did_key_from_public(public) == material.did
    assert keys.public_from_did_key(material.did) == public
    with pytest.raises(KeyUnwrapError):
        keys.unwrap_seed(material.key_wrapped, keys.derive_wrap_key("wrong", salt))


def test_signup_material_repr_hides_secrets() -> None:
    """The repr of signup material shows the public key and DID but no hash or wrapped key."""
    material = keys.SignupMaterial(
        pwd_hash="$argon2id$SECRETHASH",
        salt="SECRETSALT",
        key_wrapped="SECRETWRAPPED",
        public_key="PUB",
        did="did:key:z6Mk",
    )
    text = repr(material)
    assert "SECRET" not in text
    assert "PUB" in text


def test_wrong_password_is_key_unwrap_error() -> None:
    """Unwrapping with a key derived from another password raises KeyUnwrapError."""
    wrong = keys.derive_wrap_key("Tr0ub4dor&3 cafe", DOC_SALT)  # e without the accent
    with pytest.raises(KeyUnwrapError):
        keys.unwrap_seed(DOC_KEY_WRAPPED, wrong)


@pytest.mark.parametrize("position", [0, 11, 12, 43, 44, 59])
def test_tampered_wrapped_key_is_refused(position: int) -> None:
    """Flipping one bit anywhere (nonce, ciphertext or tag) makes unwrapping fail."""
    blob = bytearray(keys.b64decode(DOC_KEY_WRAPPED))
    blob[position] ^= 0x01
    with pytest.raises(KeyUnwrapError):
        keys.unwrap_seed(keys.b64encode(bytes(blob)), DOC_WRAP_KEY)


@pytest.mark.parametrize(
    "value",
    ["", "not base64!", DOC_KEY_WRAPPED[:-4], DOC_KEY_WRAPPED + "AAAA", DOC_KEY_WRAPPED.lower()],
)
def test_malformed_wrapped_key_is_key_unwrap_error(value: str) -> None:
    """Values that are not a 60-byte base64 blob are refused with KeyUnwrapError."""
    with pytest.raises(KeyUnwrapError):
        keys.unwrap_seed(value, DOC_WRAP_KEY)


def test_key_unwrap_error_is_a_value_error() -> None:
    """Callers that catch ValueError also catch unwrap failures."""
    assert issubclass(KeyUnwrapError, ValueError)


def test_wrap_refuses_wrong_sizes() -> None:
    """Wrapping needs a 32-byte seed and a 32-byte key; anything else is a ValueError."""
    with pytest.raises(ValueError):
        keys.wrap_seed(bytes(31), bytes(32))
    with pytest.raises(ValueError):
        keys.wrap_seed(bytes(32), bytes(16))
    with pytest.raises(ValueError):
        keys.unwrap_seed(DOC_KEY_WRAPPED, bytes(16))


@settings(max_examples=300)
@given(garbage=st.text(max_size=120), wrap_key=st.binary(min_size=32, max_size=32))
def test_unwrap_of_garbage_text_only_raises_value_errors(garbage: str, wrap_key: bytes) -> None:
    """Arbitrary text given as a wrapped key fails with KeyUnwrapError, nothing else."""
    with pytest.raises(KeyUnwrapError):
        keys.unwrap_seed(garbage, wrap_key)


@settings(max_examples=300)
@given(blob=st.binary(max_size=80), wrap_key=st.binary(min_size=32, max_size=32))
def test_unwrap_of_random_bytes_only_raises_key_unwrap_error(blob: bytes, wrap_key: bytes) -> None:
    """Well-formed base64 of random bytes (including 60-byte ones) never unwraps."""
    with pytest.raises(KeyUnwrapError):
        keys.unwrap_seed(keys.b64encode(blob), wrap_key)


# -- password hashes -------------------------------------------------------------------


def test_verify_password() -> None:
    """The right password verifies; a wrong one or an empty one does not."""
    pwd_hash = keys.hash_password("correct horse")
    assert keys.verify_password(pwd_hash, "correct horse")
    assert not keys.verify_password(pwd_hash, "correct horse ")
    assert not keys.verify_password(pwd_hash, "")


def test_password_hash_uses_documented_parameters() -> None:
    """Hashes are Argon2id with the parameters docs/keys.md states, salted per hash."""
    pwd_hash = keys.hash_password("x")
    assert pwd_hash.startswith("$argon2id$v=19$m=47104,t=2,p=1$")
    assert keys.hash_password("x") != pwd_hash


@pytest.mark.parametrize(
    "bad_hash",
    [
        "",
        "not a hash",
        "$argon2id$v=19$m=47104,t=2,p=1$",
        "$argon2id$v=19$m=47104,t=2,p=1$AAAA$BBBB",
        "$2b$12$abcdefghijklmnopqrstuuNsmT3xfA1ZymXGBgp2IMfn7cbHOt3FQC",
    ],
)
def test_verify_password_malformed_hash_is_false(bad_hash: str) -> None:
    """A malformed or foreign stored hash makes verification False, never an exception."""
    assert keys.verify_password(bad_hash, "anything") is False


def test_dummy_hash_is_cached_and_matches_nothing_obvious() -> None:
    """dummy_hash() is computed once, has the same parameters, and rejects ordinary input."""
    first = keys.dummy_hash()
    assert keys.dummy_hash() is first
    assert first.startswith("$argon2id$v=19$m=47104,t=2,p=1$")
    assert not keys.verify_password(first, "")
    assert not keys.verify_password(first, "password")


# -- did:key and signatures ------------------------------------------------------------


@pytest.mark.parametrize(("seed_byte", "did", "public_b58"), DID_KEY_VECTORS)
def test_did_key_spec_vectors(seed_byte: int, did: str, public_b58: str) -> None:
    """The did:key specification's Ed25519 vectors: seed -> public key -> DID and back."""
    public = _public_of_seed(bytes(31) + bytes([seed_byte]))
    assert keys.b58encode(public) == public_b58
    assert keys.did_key_from_public(public) == did
    assert keys.public_from_did_key(did) == public


@pytest.mark.parametrize(
    "value",
    [
        "",
        "did:key:",
        "did:key:z",
        "did:web:example.com",
        # The X25519 key-agreement key of the first spec vector: a did:key, not Ed25519.
        "did:key:z6LShs9GGnqk85isEBzzshkuVWrVKsRp24GnDuHk8QWkARMW",
        # P-256 did:key from the spec.
        "did:key:zDnaerDaTF5BXEavCrfRZEk316dpbLsfPDZ3WJ5hRTPFU2169",
        DOC_DID + "#" + DOC_DID[8:],
        DOC_DID[:-1],
        DOC_DID + "1",
        DOC_DID.replace("did:key:z", "did:key:f"),
        DOC_DID.replace("did:key:", "DID:KEY:"),
        DOC_DID + "0",  # '0' is not in the base58 alphabet
        " " + DOC_DID,
    ],
)
def test_public_from_did_key_refuses_non_ed25519(value: str) -> None:
    """Anything but a bare Ed25519 did:key is a ValueError."""
    with pytest.raises(ValueError):
        keys.public_from_did_key(value)


@given(public=st.binary(min_size=32, max_size=32))
def test_did_key_round_trip(public: bytes) -> None:
    """Every 32-byte public key survives did_key_from_public -> public_from_did_key."""
    did = keys.did_key_from_public(public)
    assert did.startswith("did:key:z6Mk")
    assert len(did) == 56
    assert keys.public_from_did_key(did) == public


@given(text=st.text(max_size=80))
def test_public_from_did_key_never_raises_other_errors(text: str) -> None:
    """Parsing arbitrary text either yields 32 bytes or raises ValueError."""
    try:
        public = keys.public_from_did_key(text)
    except ValueError:
        return
    assert len(public) == 32
    assert keys.did_key_from_public(public) == text


@given(text=st.text(alphabet="did:key:z6Mk123456789ABCabcxyz", max_size=70))
def test_public_from_did_key_near_misses(text: str) -> None:
    """Strings made of did:key characters parse only if they re-encode to themselves."""
    try:
        public = keys.public_from_did_key(text)
    except ValueError:
        return
    assert keys.did_key_from_public(public) == text


def test_verify_ed25519() -> None:
    """A signature verifies for its message and key only; malformed inputs are False."""
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    public = private.public_key().public_bytes_raw()
    signature = private.sign(b"nonce+aud")
    assert keys.verify_ed25519(public, b"nonce+aud", signature)
    assert not keys.verify_ed25519(public, b"nonce+aud!", signature)
    assert not keys.verify_ed25519(_public_of_seed(bytes(32)), b"nonce+aud", signature)
    assert not keys.verify_ed25519(public, b"nonce+aud", signature[:-1])
    assert not keys.verify_ed25519(public, b"nonce+aud", bytes(64))
    assert not keys.verify_ed25519(public[:31], b"nonce+aud", signature)
    assert not keys.verify_ed25519(b"", b"", b"")


# -- base encodings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        (b"", ""),
        (b"\0", "1"),
        (b"\0\0\x01", "112"),
        (b"hello world", "StV1DL6CwTryKyV"),
        (
            bytes.fromhex("00eb15231dfceb60925886b67d065299925915aeb172c06647"),
            "1NS17iag9jJgTHD1VXjvLCEnZuQ3rJDE9L",
        ),
    ],
)
def test_base58_known_values(raw: bytes, encoded: str) -> None:
    """base58btc matches known encodings, including leading zero bytes as '1'."""
    assert keys.b58encode(raw) == encoded
    assert keys.b58decode(encoded) == raw


@given(raw=st.binary(max_size=64))
def test_base58_round_trip(raw: bytes) -> None:
    """Any bytes survive base58btc encoding and decoding."""
    assert keys.b58decode(keys.b58encode(raw)) == raw


@given(text=st.text(max_size=60))
def test_base58_decode_only_raises_value_error(text: str) -> None:
    """Decoding arbitrary text yields bytes that re-encode to it, or raises ValueError."""
    try:
        raw = keys.b58decode(text)
    except ValueError:
        return
    assert keys.b58encode(raw) == text


@given(raw=st.binary(max_size=100))
def test_b64_round_trips(raw: bytes) -> None:
    """Both base64 flavours round-trip and match the standard library's encoders."""
    assert keys.b64decode(keys.b64encode(raw)) == raw
    assert keys.b64encode(raw) == base64.b64encode(raw).decode()
    url = keys.b64url_encode(raw)
    assert "=" not in url
    assert keys.b64url_decode(url) == raw
    assert url == base64.urlsafe_b64encode(raw).decode().rstrip("=")


@given(text=st.text(max_size=60))
def test_b64decode_is_strict(text: str) -> None:
    """b64decode accepts exactly the strings b64encode produces; others are ValueError."""
    try:
        raw = keys.b64decode(text)
    except ValueError:
        return
    assert keys.b64encode(raw) == text


@given(text=st.text(max_size=60))
def test_b64url_decode_is_strict(text: str) -> None:
    """b64url_decode accepts exactly the strings b64url_encode produces; others ValueError."""
    try:
        raw = keys.b64url_decode(text)
    except ValueError:
        return
    assert keys.b64url_encode(raw) == text


@pytest.mark.parametrize("value", ["QQ", "QR==", "Q===", "QQ==\n", " QQ==", "Q-==", "QQ=="[:3]])
def test_b64decode_refuses_sloppy_input(value: str) -> None:
    """Missing padding, non-zero pad bits, whitespace and url-safe characters are refused."""
    with pytest.raises(ValueError):
        keys.b64decode(value)


@pytest.mark.parametrize("value", ["QQ==", "QR", "Q", "Q+", "Q/", "QQ\n", "é"])
def test_b64url_decode_refuses_sloppy_input(value: str) -> None:
    """Padding, non-zero pad bits, impossible lengths and standard-alphabet chars are refused."""
    with pytest.raises(ValueError):
        keys.b64url_decode(value)
