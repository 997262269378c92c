"""Two vibed replicas against one CouchDB behave as one (DESIGN.md, Stateless replicas)."""

from __future__ import annotations

import uuid

import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import Vibed

from agent_bridge.protocol import challenge_message
from vibed.keys import b64decode, b64url_encode, derive_wrap_key, unwrap_seed

PASSWORD = "correct horse battery"


@pytest_twisted.ensureDeferred
async def test_replicas_share_identities_tokens_and_sessions(replicas: tuple[Vibed, Vibed]) -> None:
    """Signup on A, login and /me on B; a refresh cookie rotated on A and presented again on B
    within the grace interval yields the same successor; after logout on B, A refuses it."""
    a, b = replicas
    address = f"r-{uuid.uuid4().hex[:10]}@example.org"
    signup = await a.signup(address)
    assert signup.code == 201
    assert (
        await b.request("POST", "/auth/signup", {"email": address, "password": PASSWORD})
    ).code == 409
    login = await b.request("POST", "/auth/login", {"email": address, "password": PASSWORD})
    assert login.code == 200
    me = await a.request("GET", "/me", token=login.json()["accessToken"])
    assert me.json()["email"] == address

    cookie = login.refresh_cookie
    on_a = await a.request("POST", "/auth/refresh", cookie=cookie)
    on_b = await b.request("POST", "/auth/refresh", cookie=cookie)
    assert on_a.code == on_b.code == 200
    assert on_a.refresh_cookie == on_b.refresh_cookie
    assert (await b.request("POST", "/auth/logout", cookie=on_a.refresh_cookie)).code == 204
    assert (await a.request("POST", "/auth/refresh", cookie=on_a.refresh_cookie)).code == 401


@pytest_twisted.ensureDeferred
async def test_a_nonce_is_single_use_across_replicas(replicas: tuple[Vibed, Vibed]) -> None:
    """A challenge issued by A is answered once on B; the same answer on A is then 401."""
    a, b = replicas
    identity = (await a.signup(f"n-{uuid.uuid4().hex[:10]}@example.org")).json()["identity"]
    doc = await a.parts.identities.db.get(identity["id"])
    seed = unwrap_seed(doc["keyWrapped"], derive_wrap_key(PASSWORD, b64decode(doc["salt"])))
    key = Ed25519PrivateKey.from_private_bytes(seed)
    challenge = (await a.request("GET", "/auth/challenge")).json()
    answer = {
        "did": identity["did"],
        "nonce": challenge["nonce"],
        "signature": b64url_encode(
            key.sign(challenge_message(challenge["aud"], challenge["nonce"]))
        ),
    }
    assert (await b.request("POST", "/auth/response", answer)).code == 200
    assert (await a.request("POST", "/auth/response", answer)).code == 401
