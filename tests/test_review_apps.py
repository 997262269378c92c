"""Regressions for what the security review of the apps surface (issue 8: authorization
server, CORS, the agent's routes) and of the connection limits found, one test per behaviour;
each failed before its fix."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest_twisted
from harness import Vibed, VibedFactory, new_person

APP = "https://notes.example"


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed()


def email() -> str:
    return f"rv-{uuid.uuid4().hex[:12]}@example.org"


# -- CORS is decided on the path the router sees ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_wrapped_key_answers_no_cors_even_when_its_path_is_percent_encoded(
    vibed: Vibed,
) -> None:
    """``/me/key`` (the wrapped key) must answer no CORS header to another origin. The router
    decodes ``%6B`` to ``k``, so ``/me/%6Bey`` reaches the same route: it must not earn
    ``Access-Control-Allow-Origin: *`` (nor a preflight) by spelling the path differently."""
    person = await new_person(vibed)
    for path in ("/me/key", "/me/%6Bey", "/me/%6bey", "/%6De/key", "/me%2Fkey"):
        got = await person.call("GET", path, headers={"Origin": APP})
        assert got.code == 200, (path, got.code)
        assert "keyWrapped" in got.json(), path
        assert got.header("access-control-allow-origin") is None, path
        pre = await vibed.request(
            "OPTIONS",
            path,
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert pre.header("access-control-allow-origin") is None, path
    # The bearer API keeps its CORS whichever way its path is spelled.
    for path in ("/me", "/me/grants", "/me/%67rants", "/%64ata/notes"):
        got = await person.call("GET", path, headers={"Origin": APP})
        assert got.header("access-control-allow-origin") == "*", (path, got.code)


# -- per-address limits count an IPv6 client by its /64 -----------------------------------


def random_slash64() -> str:
    """A documentation-range /64 prefix of its own (rate-limit windows live in the shared
    CouchDB, so each test run counts in fresh networks)."""
    n = uuid.uuid4().int
    return f"2001:db8:{n % 0xFFFF:x}:{(n >> 16) % 0xFFFF:x}"


@pytest_twisted.ensureDeferred
async def test_an_ipv6_client_cannot_dodge_the_signup_limit_by_changing_its_interface_id(
    make_vibed: VibedFactory,
) -> None:
    """A client behind the trusted proxy with an IPv6 address holds (at least) its whole /64:
    2**64 addresses. Each signup costs an Argon2id hash and a scrypt derivation, so the
    per-address limit must count the /64, not each address in it; another /64 is another
    client, and an IPv4-mapped address counts as its IPv4 address."""
    v = await make_vibed(trusted_proxies="127.0.0.1", signup_limit_per_address=2)
    net = random_slash64()
    answers = []
    for host in (":1", ":2", "3:4:5:6", "ffff:ffff:ffff:ffff"):
        answers.append(
            await v.request(
                "POST",
                "/auth/signup",
                {"email": email(), "password": "correct horse battery"},
                headers={"X-Forwarded-For": f"{net}:{host}"},
            )
        )
    assert [a.code for a in answers] == [201, 201, 429, 429], [a.content for a in answers]
    other = await v.request(
        "POST",
        "/auth/signup",
        {"email": email(), "password": "correct horse battery"},
        headers={"X-Forwarded-For": f"{random_slash64()}::1"},
    )
    assert other.code == 201, other.content
    v4 = f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
    codes = []
    for spelled in (v4, f"::ffff:{v4}", v4):
        r = await v.request(
            "POST",
            "/auth/signup",
            {"email": email(), "password": "correct horse battery"},
            headers={"X-Forwarded-For": spelled},
        )
        codes.append(r.code)
    assert codes == [201, 201, 429], codes


def test_the_connection_cap_counts_an_ipv6_slash_64_as_one_address() -> None:
    """--max-connections-per-address holds for a client that opens each connection from
    another address of its /64; other networks and IPv4 peers count on their own."""
    from twisted.internet.address import IPv4Address, IPv6Address
    from twisted.web.resource import Resource

    from vibed.web import AddressLimit, ConnectionLimits, VibeSite, _Refuse

    limit = AddressLimit(VibeSite(Resource(), limits=ConnectionLimits(max_per_address=2)))

    def refused(peer: object) -> bool:
        return isinstance(limit.buildProtocol(peer), _Refuse)  # type: ignore[arg-type]

    assert not refused(IPv6Address("TCP", "2001:db8:1:2::1", 1000))
    assert not refused(IPv6Address("TCP", "2001:db8:1:2::2", 1000))
    assert refused(IPv6Address("TCP", "2001:db8:1:2:aaaa::9", 1000))
    assert not refused(IPv6Address("TCP", "2001:db8:1:3::1", 1000))
    assert not refused(IPv4Address("TCP", "192.0.2.1", 1000))
    assert not refused(IPv6Address("TCP", "::ffff:192.0.2.1", 1000))
    assert refused(IPv4Address("TCP", "192.0.2.1", 1000))


# -- a password change ends every other session, however many the identity had ------------


@pytest_twisted.ensureDeferred
async def test_a_password_change_ends_every_other_session_however_many_came_before(
    vibed: Vibed,
) -> None:
    """Every login leaves a family document (logged-out ones stay as tombstones), so a long-
    lived identity (or an intruder who logged in a thousand times first: successful logins
    are not limited) has more than a page of them. Changing the password, and "log out
    everywhere else", must still end the newest sessions (the intruder's), not only those
    among the oldest thousand; the session list must show them."""
    address = email()
    signup = await vibed.request(
        "POST", "/auth/signup", {"email": address, "password": "correct horse battery"}
    )
    assert signup.code == 201
    idn = signup.json()["identity"]["id"]
    # A thousand logged-out sessions from the past (tombstones, as logouts leave them).
    old = int(vibed.clock()) - 100_000
    await vibed.parts.refresh.db.bulk_docs(
        [
            {
                "_id": f"fam:{uuid.uuid4().hex}",
                "idn": idn,
                "revoked": True,
                "createdAt": old + i,
                "lastUsedAt": old + i,
            }
            for i in range(1000)
        ]
    )

    async def login() -> tuple[str, str]:
        resp = await vibed.request(
            "POST", "/auth/login", {"email": address, "password": "correct horse battery"}
        )
        assert resp.code == 200, resp.content
        assert resp.refresh_cookie is not None
        return resp.json()["accessToken"], resp.refresh_cookie

    intruder_token, intruder_cookie = await login()
    mine, _ = await login()
    listed = await vibed.request("GET", "/me/sessions", token=mine)
    assert listed.code == 200
    assert len(listed.json()["sessions"]) == 3, listed.json()  # signup, intruder, mine
    changed = await vibed.request(
        "POST",
        "/me/password",
        {"currentPassword": "correct horse battery", "newPassword": "a brand new passphrase"},
        token=mine,
    )
    assert changed.code == 200, changed.content
    assert changed.json()["revokedSessions"] == 2
    assert (await vibed.request("GET", "/me", token=intruder_token)).code == 401
    refreshed = await vibed.request("POST", "/auth/refresh", cookie=intruder_cookie)
    assert refreshed.code == 401
    assert (await vibed.request("GET", "/me", token=mine)).code == 200
