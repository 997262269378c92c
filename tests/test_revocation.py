"""Revocation is prompt (issue 7, finding 4): a logged-out session's, a reused family's or a
deleted identity's access tokens stop working on every replica within seconds, not at ``exp``."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from harness import FakeClock, Vibed, VibedFactory, connect_realtime, make_config, poll
from twisted.internet import reactor

from vibed.api.http import authenticate
from vibed.errors import ServiceUnavailable
from vibed.naming import REVOCATIONS_DB
from vibed.realtime import CLOSE_REVOKED
from vibed.revocation import RevocationList, RevocationsUnavailable

PASSWORD = "correct horse battery"


def email() -> str:
    return f"rev-{uuid.uuid4().hex[:12]}@example.org"


@pytest_twisted.ensureDeferred
async def test_access_token_stops_working_after_logout(make_vibed: VibedFactory) -> None:
    """After POST /auth/logout the session's access token is refused by /me and /data (401,
    'token revoked'), although it has not expired."""
    vibed = await make_vibed()
    signup = await vibed.signup(email())
    token = signup.json()["accessToken"]
    assert (await vibed.request("GET", "/me", token=token)).code == 200
    assert (await vibed.request("GET", "/data/notes", token=token)).code == 200
    out = await vibed.request("POST", "/auth/logout", cookie=signup.refresh_cookie)
    assert out.code == 204
    for path in ("/me", "/data/notes", "/blob"):
        resp = await vibed.request("GET", path, token=token)
        assert resp.code == 401, (path, resp.content)
        assert "revoked" in resp.json()["detail"]


@pytest_twisted.ensureDeferred
async def test_logout_on_one_replica_stops_the_token_on_the_other_within_seconds(
    replicas: tuple[Vibed, Vibed],
) -> None:
    """Logout on replica A: replica B refuses the access token within 5 s (it follows the
    revocations feed); another session of the same identity keeps working."""
    a, b = replicas
    address = email()
    signup = await a.signup(address)
    token = signup.json()["accessToken"]
    other = await b.request("POST", "/auth/login", {"email": address, "password": PASSWORD})
    assert (await b.request("GET", "/me", token=token)).code == 200
    assert (await a.request("POST", "/auth/logout", cookie=signup.refresh_cookie)).code == 204

    async def refused_on_b() -> bool:
        return (await b.request("GET", "/me", token=token)).code == 401

    await poll(refused_on_b, within=5.0)
    assert (await b.request("GET", "/me", token=other.json()["accessToken"])).code == 200


@pytest_twisted.ensureDeferred
async def test_a_replica_started_after_the_logout_refuses_the_token(
    tmp_path: Path, couch_url: str
) -> None:
    """A replica that starts later loads the revocations already written."""
    key = str(tmp_path / "jwt.pem")
    a = await Vibed(make_config(tmp_path / "a", couch_url, jwt_key_file=key)).start()
    try:
        signup = await a.signup(email())
        token = signup.json()["accessToken"]
        assert (await a.request("POST", "/auth/logout", cookie=signup.refresh_cookie)).code == 204
        b = await Vibed(make_config(tmp_path / "b", couch_url, jwt_key_file=key)).start()
        try:
            assert (await b.request("GET", "/me", token=token)).code == 401
        finally:
            await b.stop()
    finally:
        await a.stop()


@pytest_twisted.ensureDeferred
async def test_refresh_reuse_revokes_the_family_access_tokens(make_vibed: VibedFactory) -> None:
    """A rotated refresh token presented after the grace interval revokes its family: every
    access token of that session is refused from then on."""
    clock = FakeClock()
    vibed = await make_vibed(clock=clock)
    signup = await vibed.signup(email())
    first_access = signup.json()["accessToken"]
    rotated = await vibed.request("POST", "/auth/refresh", cookie=signup.refresh_cookie)
    second_access = rotated.json()["accessToken"]
    assert (await vibed.request("GET", "/me", token=second_access)).code == 200
    clock.advance(vibed.config.refresh_grace + 1)
    reuse = await vibed.request("POST", "/auth/refresh", cookie=signup.refresh_cookie)
    assert reuse.code == 401
    for token in (first_access, second_access):
        assert (await vibed.request("GET", "/me", token=token)).code == 401


@pytest_twisted.ensureDeferred
async def test_realtime_socket_of_a_logged_out_session_closes_with_4004(
    replicas: tuple[Vibed, Vibed],
) -> None:
    """A socket on replica B authenticated with the session's token is closed with 4004
    within seconds of a logout on replica A; a new socket with that token is refused (4001)."""
    a, b = replicas
    signup = await a.signup(email())
    token = signup.json()["accessToken"]
    client = await connect_realtime(b, token)
    assert (await a.request("POST", "/auth/logout", cookie=signup.refresh_cookie)).code == 204
    assert await client.wait_closed(within=5.0) == CLOSE_REVOKED
    again = await connect_realtime(b, token, auth=False)
    assert await again.wait_closed(within=5.0) == 4001


@pytest_twisted.ensureDeferred
async def test_revoked_identity_refuses_tokens_issued_before(make_vibed: VibedFactory) -> None:
    """revoke_identity stops the identity's tokens issued until then, not later ones."""
    clock = FakeClock()
    vibed = await make_vibed(clock=clock)
    signup = await vibed.signup(email())
    idn = signup.json()["identity"]["id"]
    old = signup.json()["accessToken"]
    await vibed.parts.revocations.revoke_identity(idn)
    assert (await vibed.request("GET", "/me", token=old)).code == 401
    clock.advance(2)
    fresh, _ = vibed.parts.issuer.issue_access(idn, ["identity"])
    assert (await vibed.request("GET", "/me", token=fresh)).code == 200


@pytest_twisted.ensureDeferred
async def test_revocations_expire_with_the_tokens_and_are_purged(
    tmp_path: Path, couch_url: str
) -> None:
    """A revocation is kept as long as a token it stops could live, then purged from CouchDB."""
    from vibed.couch import CouchServer

    couch = CouchServer.from_url(couch_url)
    db_name = f"revtest{uuid.uuid4().hex[:10]}"
    await couch.create_db(db_name)
    now = [1_000_000.0]
    revocations = RevocationList(
        couch.database(db_name), ttl=100, reactor=reactor, clock=lambda: now[0]
    )
    revocations.startService()
    try:
        await revocations.when_ready()
        await revocations.revoke_session("fam1")
        assert revocations.is_revoked("idn:x", 0, "fam1", None)
        now[0] += 101
        assert not revocations.is_revoked("idn:x", 0, "fam1", None)
        assert await revocations.purge() == 1
        assert (await couch.database(db_name).all_docs()).get("rows") == []
    finally:
        await revocations.stopService()
        await couch.delete_db(db_name)
        await couch.close()


@pytest_twisted.ensureDeferred
async def test_tokens_get_503_not_401_while_revocations_cannot_be_checked(
    make_vibed: VibedFactory,
) -> None:
    """Until the revocation list is loaded (or when its feed has been down too long) a valid
    token gets 503 with Retry-After: a client must retry, not log the person out."""
    vibed = await make_vibed()
    token, _ = vibed.parts.issuer.issue_access("idn:" + str(uuid.uuid4()), ["identity"])
    unloaded = RevocationList(
        vibed.couch.database(REVOCATIONS_DB), ttl=100, reactor=reactor, clock=time.time
    )
    with pytest.raises(RevocationsUnavailable):
        unloaded.is_revoked("idn:x", 0, None, None)
    vibed.parts.issuer.revocations = unloaded
    try:
        resp = await vibed.request("GET", "/me", token=token)
        assert resp.code == 503 and resp.header("retry-after")
    finally:
        vibed.parts.issuer.revocations = vibed.parts.revocations

    class Request:
        def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802
            return b"Bearer " + token.encode() if name == b"authorization" else None

    live = vibed.parts.revocations
    live._down_since = time.time() - live.max_stale - 1
    try:
        with pytest.raises(ServiceUnavailable):
            authenticate(Request(), vibed.parts.issuer)  # type: ignore[arg-type]
    finally:
        live._down_since = None
