"""The agent bridge (agent_bridge/): the DID challenge login, the wrapped key (GET /me/key)
and agent-minted grants (POST /agent/grants), on a real vibed against a real CouchDB-protocol
server."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import FakeClock, Vibed, VibedFactory

from agent_bridge.protocol import challenge_message
from vibed.couch import CouchServer
from vibed.keys import b64decode, b64url_encode, derive_wrap_key, unwrap_seed
from vibed.naming import IDENTITIES_DB

PASSWORD = "correct horse battery"


def email() -> str:
    return f"agent-{uuid.uuid4().hex[:12]}@example.org"


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed()


def assert_problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.code == status, resp.content
    assert resp.header("content-type") == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["type"].startswith("https://") and body["title"]
    assert "Traceback" not in resp.content.decode()
    return body


# -- the DID challenge ---------------------------------------------------------------------


async def _identity_key(vibed: Vibed, couch_url: str, idn: str) -> Ed25519PrivateKey:
    """Unwrap the identity's private key the way the agent does (password + keyWrapped)."""
    couch = CouchServer.from_url(couch_url)
    try:
        doc = await couch.database(IDENTITIES_DB).get(idn)
    finally:
        await couch.close()
    seed = unwrap_seed(doc["keyWrapped"], derive_wrap_key(PASSWORD, b64decode(doc["salt"])))
    return Ed25519PrivateKey.from_private_bytes(seed)


@pytest_twisted.ensureDeferred
async def test_challenge_response_logs_the_agent_in(vibed: Vibed, couch_url: str) -> None:
    """The agent unwraps its key, signs the documented message, and gets tokens; the same
    nonce again is 401."""
    identity = (await vibed.signup(email())).json()["identity"]
    key = await _identity_key(vibed, couch_url, identity["id"])
    challenge = (await vibed.request("GET", "/auth/challenge")).json()
    assert challenge["aud"] == "http://vibe.test"
    assert challenge["expiresAt"] - time.time() == pytest.approx(60, abs=5)
    signature = key.sign(challenge_message(challenge["aud"], challenge["nonce"]))
    answer = {
        "did": identity["did"],
        "nonce": challenge["nonce"],
        "signature": b64url_encode(signature),
    }
    resp = await vibed.request("POST", "/auth/response", answer)
    assert resp.code == 200, resp.content
    assert resp.json()["identity"]["id"] == identity["id"]
    assert resp.refresh_cookie
    me = await vibed.request("GET", "/me", token=resp.json()["accessToken"])
    assert me.json()["id"] == identity["id"]
    assert_problem(await vibed.request("POST", "/auth/response", answer), 401)


@pytest_twisted.ensureDeferred
async def test_challenge_attacks_are_refused(vibed: Vibed, couch_url: str) -> None:
    """Expired nonce, a signature by another key, a signature for another audience, an
    invented nonce: all 401; malformed dids and signatures 400."""
    identity = (await vibed.signup(email())).json()["identity"]
    key = await _identity_key(vibed, couch_url, identity["id"])

    async def answer(signer: Ed25519PrivateKey, aud: str | None = None, advance: float = 0) -> Any:
        ch = (await vibed.request("GET", "/auth/challenge")).json()
        assert isinstance(vibed.clock, FakeClock)
        vibed.clock.advance(advance)
        sig = signer.sign(challenge_message(aud or ch["aud"], ch["nonce"]))
        return await vibed.request(
            "POST",
            "/auth/response",
            {"did": identity["did"], "nonce": ch["nonce"], "signature": b64url_encode(sig)},
        )

    assert_problem(await answer(key, advance=61), 401)
    assert_problem(await answer(Ed25519PrivateKey.generate()), 401)
    assert_problem(await answer(key, aud="https://other-server.example"), 401)
    invented = {
        "did": identity["did"],
        "nonce": b64url_encode(b"x" * 32),
        "signature": b64url_encode(key.sign(b"whatever")),
    }
    assert_problem(await vibed.request("POST", "/auth/response", invented), 401)
    for bad in (
        {"did": "did:web:example.com", "nonce": "n", "signature": "s"},
        {"did": identity["did"], "nonce": "n", "signature": "***"},
        {"did": identity["did"], "nonce": 5, "signature": "s"},
    ):
        assert_problem(await vibed.request("POST", "/auth/response", bad), 400)
    # And the right key still works afterwards.
    assert (await answer(key)).code == 200


@pytest_twisted.ensureDeferred
async def test_challenges_are_bounded_per_address(make_vibed: VibedFactory) -> None:
    """Challenge issuance (which writes a document) is limited per client address: past the
    limit, 429 with Retry-After; another address is unaffected."""
    v = await make_vibed(trusted_proxies="127.0.0.1", challenge_limit_per_address=3)
    client = {"X-Forwarded-For": f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
    for _ in range(3):
        assert (await v.request("GET", "/auth/challenge", headers=client)).code == 200
    limited = await v.request("GET", "/auth/challenge", headers=client)
    assert_problem(limited, 429)
    assert int(limited.header("retry-after") or 0) > 0
    other = {"X-Forwarded-For": "198.51.100.99"}
    assert (await v.request("GET", "/auth/challenge", headers=other)).code == 200
