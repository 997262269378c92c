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
from harness import FakeClock, Vibed, VibedFactory, assert_problem
from twisted.logger import formatEvent, globalLogPublisher

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


# -- GET /me/key ---------------------------------------------------------------------------


async def _did_login(vibed: Vibed, did: str, key: Ed25519PrivateKey) -> str:
    """A first-party access token by DID challenge (as the agent gets every token)."""
    ch = (await vibed.request("GET", "/auth/challenge")).json()
    sig = key.sign(challenge_message(ch["aud"], ch["nonce"]))
    resp = await vibed.request(
        "POST",
        "/auth/response",
        {"did": did, "nonce": ch["nonce"], "signature": b64url_encode(sig)},
    )
    assert resp.code == 200, resp.content
    token: str = resp.json()["accessToken"]
    return token


async def _agent(vibed: Vibed) -> tuple[dict[str, Any], str, Ed25519PrivateKey]:
    """A new identity as the agent holds it: (identity, DID-login token, private key)."""
    signup = await vibed.signup(email())
    identity = signup.json()["identity"]
    key = await _key_from_me_key(vibed, signup.json()["accessToken"])
    return identity, await _did_login(vibed, identity["did"], key), key


async def _key_from_me_key(vibed: Vibed, token: str) -> Ed25519PrivateKey:
    """Fetch GET /me/key and unwrap it with the password, as docs/keys.md says."""
    resp = await vibed.request("GET", "/me/key", token=token)
    assert resp.code == 200, resp.content
    body = resp.json()
    seed = unwrap_seed(body["keyWrapped"], derive_wrap_key(PASSWORD, b64decode(body["salt"])))
    return Ed25519PrivateKey.from_private_bytes(seed)


@pytest_twisted.ensureDeferred
async def test_me_key_is_the_documented_wrapped_key(vibed: Vibed) -> None:
    """GET /me/key with a first-party token answers exactly {did, salt, keyWrapped, kdf} as
    docs/keys.md documents; the password unwraps it to the key of the identity's did:key, which
    then logs in by DID challenge. Never cached, never readable cross-origin (no CORS), never
    in a log line."""
    from cryptography.hazmat.primitives import serialization

    from vibed.keys import did_key_from_public

    signup = await vibed.signup(email())
    identity, token = signup.json()["identity"], signup.json()["accessToken"]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        resp = await vibed.request(
            "GET", "/me/key", token=token, headers={"Origin": "https://evil.example"}
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert resp.code == 200, resp.content
    body = resp.json()
    assert set(body) == {"did", "salt", "keyWrapped", "kdf"}
    assert body["kdf"] == {"name": "scrypt", "N": 32768, "r": 8, "p": 1, "dkLen": 32}
    assert body["did"] == identity["did"]
    assert len(b64decode(body["salt"])) == 16 and len(b64decode(body["keyWrapped"])) == 60
    assert resp.header("cache-control") == "no-store"
    assert resp.header("access-control-allow-origin") is None
    logged = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "Wrapped key fetched" in logged
    assert body["keyWrapped"] not in logged and body["salt"] not in logged
    key = await _key_from_me_key(vibed, token)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert did_key_from_public(public) == identity["did"]
    assert await _did_login(vibed, identity["did"], key)
    # A DID-login token is first-party too: it may fetch the key again.
    assert (await vibed.request("GET", "/me/key", token=token)).json() == body


@pytest_twisted.ensureDeferred
async def test_me_key_refuses_app_tokens_and_missing_tokens(vibed: Vibed) -> None:
    """No token: 401 with a Bearer challenge. An app's token (even one with data:* and
    blob:*): 403 insufficient-scope. Another identity's token gets that identity's key."""
    identity, token, _ = await _agent(vibed)
    assert_problem(await vibed.request("GET", "/me/key"), 401)
    minted = await vibed.request(
        "POST",
        "/agent/grants",
        {"origin": "https://app.example", "scopes": ["data:*", "blob:*"]},
        token=token,
    )
    app_token = minted.json()["tokens"]["access_token"]
    refused = assert_problem(await vibed.request("GET", "/me/key", token=app_token), 403)
    assert refused["type"].endswith("/insufficient-scope")
    other, other_token, _ = await _agent(vibed)
    got = await vibed.request("GET", "/me/key", token=other_token)
    assert got.json()["did"] == other["did"] != identity["did"]


@pytest_twisted.ensureDeferred
async def test_me_key_is_rate_limited_per_identity(vibed: Vibed) -> None:
    """Past the limit an identity's key requests are 429 with Retry-After; another identity
    is unaffected."""
    vibed.parts.api.agent.key_limit = 3
    first = (await vibed.signup(email())).json()["accessToken"]
    second = (await vibed.signup(email())).json()["accessToken"]
    for _ in range(3):
        assert (await vibed.request("GET", "/me/key", token=first)).code == 200
    limited = await vibed.request("GET", "/me/key", token=first)
    assert_problem(limited, 429)
    assert int(limited.header("retry-after") or 0) > 0
    assert (await vibed.request("GET", "/me/key", token=second)).code == 200


# -- POST /agent/grants --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_agent_grant_is_an_ordinary_grant(vibed: Vibed) -> None:
    """Logged in by DID challenge, the agent makes a grant for a page's origin and gets its
    app tokens: they reach only the granted collection, carry the origin and the grant but
    never the identity scope; the grant is listed by GET /me/grants (via: agent) and reused
    by the next request; its refresh token works at /auth/token for that origin only; revoked
    from /me/grants, its access token is refused within 5 s, its refresh token and the
    agent's token route answer that it is gone."""
    from oauth_client import post_form
    from test_apps_oauth import claims

    identity, token, _ = await _agent(vibed)
    origin = "http://localhost:5173"
    ask = {"origin": origin, "scopes": ["data:write:notes"], "name": "Notes"}
    made = await vibed.request("POST", "/agent/grants", ask, token=token)
    assert made.code == 201, made.content
    body = made.json()
    grant, tokens = body["grant"], body["tokens"]
    assert body["created"] is True
    assert grant["via"] == "agent" and grant["origin"] == origin and grant["name"] == "Notes"
    assert grant["scopes"] == ["data:read:notes", "data:write:notes"]
    app_token = tokens["access_token"]
    seen = claims(app_token)
    assert seen["client_id"] == origin and seen["gid"] == grant["id"]
    assert "identity" not in seen["scp"] and seen["sub"] == identity["id"]
    wrote = await vibed.request("POST", "/data/notes", {"title": "hi"}, token=app_token)
    assert wrote.code == 201, wrote.content
    assert (await vibed.request("GET", "/data/notes", token=app_token)).code == 200
    assert_problem(await vibed.request("GET", "/data/other", token=app_token), 403)
    listed = (await vibed.request("GET", "/me/grants", token=token)).json()["grants"]
    assert [g["id"] for g in listed] == [grant["id"]] and listed[0]["via"] == "agent"

    again = await vibed.request("POST", "/agent/grants", {**ask, "name": "X"}, token=token)
    assert again.code == 200 and again.json()["created"] is False
    assert again.json()["grant"]["id"] == grant["id"]
    narrower = {"origin": origin, "scopes": ["data:read:notes"]}
    assert (await vibed.request("POST", "/agent/grants", narrower, token=token)).code == 200
    assert len((await vibed.request("GET", "/me/grants", token=token)).json()["grants"]) == 1

    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    elsewhere = await post_form(vibed, "/auth/token", {**refresh, "client_id": "https://x.example"})
    assert elsewhere.code in (400, 401)
    rotated = await post_form(vibed, "/auth/token", {**refresh, "client_id": origin})
    assert rotated.code == 200, rotated.content
    more = await vibed.request(
        "POST", f"/agent/grants/{grant['id']}/tokens", {"origin": origin}, token=token
    )
    assert more.code == 200 and more.json()["grant"]["id"] == grant["id"]

    revoked = await vibed.request("DELETE", f"/me/grants/{grant['id']}", token=token)
    assert revoked.code == 204
    deadline = time.monotonic() + 5
    while (await vibed.request("GET", "/data/notes", token=app_token)).code != 401:
        assert time.monotonic() < deadline, "the app's token still works 5 s after revoking"
    after = await post_form(
        vibed,
        "/auth/token",
        {**refresh, "refresh_token": rotated.json()["refresh_token"], "client_id": origin},
    )
    assert after.code == 400 and after.json()["error"] == "invalid_grant"
    gone = await vibed.request(
        "POST", f"/agent/grants/{grant['id']}/tokens", {"origin": origin}, token=token
    )
    assert assert_problem(gone, 404)["type"].endswith("/grant-revoked")
    # Approving again makes a new grant (a revoked one is never brought back).
    anew = await vibed.request("POST", "/agent/grants", ask, token=token)
    assert anew.code == 201 and anew.json()["grant"]["id"] != grant["id"]


@pytest_twisted.ensureDeferred
async def test_app_tokens_can_never_mint_grants(vibed: Vibed) -> None:
    """An app's token, whatever it was granted (data:*, blob:*), is 403 on every agent route:
    it cannot make grants, widen its own, get tokens for another grant, or read the key. A
    grant of one identity is not found with another identity's token."""
    _, token, _ = await _agent(vibed)
    made = await vibed.request(
        "POST",
        "/agent/grants",
        {"origin": "https://app.example", "scopes": ["data:*", "blob:*"]},
        token=token,
    )
    gid = made.json()["grant"]["id"]
    app_token = made.json()["tokens"]["access_token"]
    for method, path, body in (
        ("POST", "/agent/grants", {"origin": "https://app.example", "scopes": ["data:*"]}),
        ("POST", "/agent/grants", {"origin": "https://evil.example", "scopes": ["data:*"]}),
        ("POST", f"/agent/grants/{gid}/tokens", None),
        ("GET", "/me/key", None),
        ("GET", "/me/grants", None),
    ):
        refused = await vibed.request(method, path, body, token=app_token)
        assert assert_problem(refused, 403)["type"].endswith("/insufficient-scope"), path
    assert_problem(await vibed.request("POST", "/agent/grants", {}), 401)
    _, stranger, _ = await _agent(vibed)
    mine = {"origin": "https://app.example"}
    assert_problem(
        await vibed.request("POST", f"/agent/grants/{gid}/tokens", mine, token=stranger), 404
    )


BAD_GRANT_REQUESTS: list[dict[str, Any]] = [
    {"scopes": ["data:*"]},
    {"origin": "https://app.example/path", "scopes": ["data:*"]},
    {"origin": "https://App.example", "scopes": ["data:*"]},
    {"origin": "https://app.example:443", "scopes": ["data:*"]},
    {"origin": "http://app.example", "scopes": ["data:*"]},
    {"origin": "null", "scopes": ["data:*"]},
    {"origin": "chrome-extension://abc", "scopes": ["data:*"]},
    {"origin": "https://app.example", "scopes": []},
    {"origin": "https://app.example", "scopes": "data:*"},
    {"origin": "https://app.example", "scopes": ["identity"]},
    {"origin": "https://app.example", "scopes": ["data:write:Bad"]},
    {"origin": "https://app.example", "scopes": ["data:* blob:*"]},
    {"origin": "https://app.example", "scopes": ["data:*"], "name": 5},
    {"origin": "https://app.example", "scopes": ["data:*"], "name": "x" * 201},
]


@pytest_twisted.ensureDeferred
async def test_bad_grant_requests_are_400(vibed: Vibed) -> None:
    """An origin that is not exactly a browser origin (https, or http on loopback), no or
    unknown scopes (the identity scope included) or a bad name: 400 saying what is wrong,
    and no grant is made."""
    _, token, _ = await _agent(vibed)
    for body in BAD_GRANT_REQUESTS:
        refused = await vibed.request("POST", "/agent/grants", body, token=token)
        assert assert_problem(refused, 400).get("detail"), body
    assert (await vibed.request("GET", "/me/grants", token=token)).json()["grants"] == []
    assert_problem(await vibed.request("POST", "/agent/grants/zz/tokens", token=token), 404)


@pytest_twisted.ensureDeferred
async def test_a_grant_is_gone_once_its_revocation_is_known(vibed: Vibed) -> None:
    """Revoking writes the revocation before deleting the grant's document, and sockets close
    (4004) as soon as a replica learns the revocation: from that moment a refresh, the agent's
    token route and the covering-grant lookup treat the grant as gone, even while its document
    still exists; a DELETE then still finishes the job."""
    from oauth_client import post_form

    _, token, _ = await _agent(vibed)
    origin = "https://app.example"
    ask = {"origin": origin, "scopes": ["data:write:notes"]}
    made = (await vibed.request("POST", "/agent/grants", ask, token=token)).json()
    gid = made["grant"]["id"]
    await vibed.parts.revocations.revoke_grant(gid)  # the first half of a revoke
    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": made["tokens"]["refresh_token"],
        "client_id": origin,
    }
    refused = await post_form(vibed, "/auth/token", refresh)
    assert refused.code == 400 and refused.json()["error"] == "invalid_grant"
    gone = await vibed.request("POST", f"/agent/grants/{gid}/tokens", ask, token=token)
    assert_problem(gone, 404)
    assert (await vibed.request("GET", "/me/grants", token=token)).json()["grants"] == []
    anew = await vibed.request("POST", "/agent/grants", ask, token=token)
    assert anew.code == 201 and anew.json()["grant"]["id"] != gid
    assert (await vibed.request("DELETE", f"/me/grants/{gid}", token=token)).code == 204
    assert (await vibed.request("DELETE", f"/me/grants/{gid}", token=token)).code == 404


# -- what the security review found (agent fixes) -------------------------------------------


async def _session_ids(vibed: Vibed, token: str) -> list[str]:
    resp = await vibed.request("GET", "/me/sessions", token=token)
    assert resp.code == 200, resp.content
    return [s["id"] for s in resp.json()["sessions"]]


@pytest_twisted.ensureDeferred
async def test_grant_tokens_are_only_for_the_grants_own_origin(vibed: Vibed) -> None:
    """The agent names the page it asks tokens for: a grant id of one site presented for
    another origin (a tampered site record, a compromised renderer pointing its origin at
    another site's grant) is 404, exactly like a revoked grant; no origin is 400; the grant's
    own origin gets tokens of that origin."""
    from test_apps_oauth import claims

    _, token, _ = await _agent(vibed)
    victim = "https://bank.example"
    made = await vibed.request(
        "POST", "/agent/grants", {"origin": victim, "scopes": ["data:*"]}, token=token
    )
    gid = made.json()["grant"]["id"]
    path = f"/agent/grants/{gid}/tokens"
    for origin in ("https://evil.example", "https://bank.example.evil.example"):
        stolen = await vibed.request("POST", path, {"origin": origin}, token=token)
        assert assert_problem(stolen, 404)["type"].endswith("/grant-revoked"), origin
        assert "access_token" not in stolen.content.decode()
    assert_problem(await vibed.request("POST", path, {}, token=token), 400)
    assert_problem(await vibed.request("POST", path, {"origin": "evil"}, token=token), 400)
    own = await vibed.request("POST", path, {"origin": victim}, token=token)
    assert own.code == 200, own.content
    assert own.json()["grant"]["origin"] == victim
    assert claims(own.json()["tokens"]["access_token"])["client_id"] == victim


@pytest_twisted.ensureDeferred
async def test_tokens_carry_only_the_scopes_asked_not_the_whole_reused_grant(
    vibed: Vibed,
) -> None:
    """An origin that earlier got data:* and now asks for data:read:notes (what the consent
    window listed) reuses its grant but gets tokens for data:read:notes only: it cannot write
    notes or read another collection, and refreshing keeps to that; a new session under the
    grant with the page's scopes too; scopes the grant does not cover get nothing."""
    from oauth_client import post_form
    from test_apps_oauth import claims

    _, token, _ = await _agent(vibed)
    origin = "https://notes.example"
    wide = await vibed.request(
        "POST", "/agent/grants", {"origin": origin, "scopes": ["data:*"]}, token=token
    )
    assert wide.code == 201 and wide.json()["tokens"]["scope"] == "data:*"
    gid = wide.json()["grant"]["id"]
    writer = wide.json()["tokens"]["access_token"]
    assert (await vibed.request("POST", "/data/notes", {"t": 1}, token=writer)).code == 201
    assert (await vibed.request("POST", "/data/diary", {"t": 1}, token=writer)).code == 201

    narrow = await vibed.request(
        "POST", "/agent/grants", {"origin": origin, "scopes": ["data:read:notes"]}, token=token
    )
    assert narrow.code == 200, narrow.content
    assert narrow.json()["grant"]["id"] == gid and narrow.json()["grant"]["scopes"] == ["data:*"]
    tokens = narrow.json()["tokens"]
    assert tokens["scope"] == "data:read:notes"
    reader = tokens["access_token"]
    assert claims(reader)["scp"] == ["data:read:notes"]

    async def can(access: str) -> tuple[int, int, int]:
        read = await vibed.request("GET", "/data/notes", token=access)
        write = await vibed.request("POST", "/data/notes", {"t": 2}, token=access)
        other = await vibed.request("GET", "/data/diary", token=access)
        return read.code, write.code, other.code

    assert await can(reader) == (200, 403, 403)
    refreshed = await post_form(
        vibed,
        "/auth/token",
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": origin,
        },
    )
    assert refreshed.code == 200, refreshed.content
    assert refreshed.json()["scope"] == "data:read:notes"
    assert await can(refreshed.json()["access_token"]) == (200, 403, 403)
    widen = await post_form(
        vibed,
        "/auth/token",
        {
            "grant_type": "refresh_token",
            "refresh_token": refreshed.json()["refresh_token"],
            "client_id": origin,
            "scope": "data:*",
        },
    )
    assert widen.code == 400 and widen.json()["error"] == "invalid_scope"

    path = f"/agent/grants/{gid}/tokens"
    again = await vibed.request(
        "POST", path, {"origin": origin, "scopes": ["data:read:notes"]}, token=token
    )
    assert again.code == 200 and again.json()["tokens"]["scope"] == "data:read:notes"
    beyond = await vibed.request(
        "POST", path, {"origin": origin, "scopes": ["blob:*"]}, token=token
    )
    assert_problem(beyond, 404)


@pytest_twisted.ensureDeferred
async def test_the_agents_logins_leave_no_session_behind(vibed: Vibed) -> None:
    """The agent's DID login with ``session: false`` gets a working first-party token (no
    ``sid``) and creates no refresh session: no cookie, nothing in the person's Sessions, however
    often it logs in. Its one password login it ends itself: a first-party access token
    without a cookie logs out its own session (listed no more, the token refused within
    seconds); an app's token cannot log out; ``session`` must be a boolean."""
    from test_apps_oauth import claims

    signup = await vibed.signup(email())
    identity, dashboard = signup.json()["identity"], signup.json()["accessToken"]
    key = await _key_from_me_key(vibed, dashboard)
    before = await _session_ids(vibed, dashboard)
    for _ in range(3):
        ch = (await vibed.request("GET", "/auth/challenge")).json()
        sig = key.sign(challenge_message(ch["aud"], ch["nonce"]))
        answer = {
            "did": identity["did"],
            "nonce": ch["nonce"],
            "signature": b64url_encode(sig),
            "session": False,
        }
        resp = await vibed.request("POST", "/auth/response", answer)
        assert resp.code == 200, resp.content
        assert resp.refresh_cookie is None and not resp.headers_all("set-cookie")
        agent_token = resp.json()["accessToken"]
        assert "sid" not in claims(agent_token)
        assert (await vibed.request("GET", "/me", token=agent_token)).json()["id"] == identity["id"]
    assert await _session_ids(vibed, dashboard) == before

    bad = {**answer, "session": "no"}
    assert_problem(await vibed.request("POST", "/auth/response", bad), 400)

    login = await vibed.request(
        "POST", "/auth/login", {"email": signup.json()["identity"]["email"], "password": PASSWORD}
    )
    password_token = login.json()["accessToken"]
    sid = claims(password_token)["sid"]
    assert sid in await _session_ids(vibed, dashboard)
    out = await vibed.request("POST", "/auth/logout", token=password_token)
    assert out.code == 204, out.content
    assert await _session_ids(vibed, dashboard) == before
    deadline = time.monotonic() + 5
    while (await vibed.request("GET", "/me", token=password_token)).code != 401:
        assert time.monotonic() < deadline, "a logged-out token still works after 5 s"

    made = await vibed.request(
        "POST",
        "/agent/grants",
        {"origin": "https://a.example", "scopes": ["data:*"]},
        token=agent_token,
    )
    app_token = made.json()["tokens"]["access_token"]
    refused = await vibed.request("POST", "/auth/logout", token=app_token)
    assert assert_problem(refused, 403)["type"].endswith("/insufficient-scope")
