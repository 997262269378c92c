"""The identity API end to end: a real vibed on a TCP port against a real PouchDB Server."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import EVERY_EVENT, FakeClock, Vibed, VibedFactory, assert_problem, make_config
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.logger import globalLogPublisher

from vibed.couch import CouchServer, CouchUnavailable
from vibed.identity import IdentityService
from vibed.keys import b64url_encode
from vibed.naming import IDENTITIES_DB, identity_dbs

PASSWORD = "correct horse battery"


def email() -> str:
    return f"person-{uuid.uuid4().hex[:12]}@example.org"


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed()


# -- signup, /me -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_signup_creates_identity_databases_and_logs_in(vibed: Vibed, couch_url: str) -> None:
    """Signup answers 201 with the redacted identity, an access token that works on /me, a
    hardened refresh cookie; the identity doc and its three databases exist in CouchDB."""
    address = email()
    resp = await vibed.signup(address.upper())
    assert resp.code == 201, resp.content
    body = resp.json()
    identity = body["identity"]
    assert identity["id"].startswith("idn:")
    assert identity["email"] == address  # normalised to lower case
    assert identity["did"].startswith("did:key:z6Mk")
    assert set(identity) == {"id", "email", "publicKey", "did", "createdAt"}
    assert body["tokenType"] == "Bearer" and body["expiresIn"] == 900

    cookie = next(c for c in resp.headers_all("set-cookie") if c.startswith("vibe_refresh="))
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/auth" in lowered
    assert "secure" not in lowered  # public URL is http in this test

    me = await vibed.request("GET", "/me", token=body["accessToken"])
    assert me.code == 200 and me.json() == identity

    couch = CouchServer.from_url(couch_url)
    try:
        doc = await couch.database(IDENTITIES_DB).get(identity["id"])
        assert doc["pwdHash"].startswith("$argon2id$")
        for name in identity_dbs(identity["id"]):
            assert await couch.db_exists(name), name
    finally:
        await couch.close()


@pytest_twisted.ensureDeferred
async def test_no_secret_field_in_any_response(vibed: Vibed) -> None:
    """/me, signup and login never return pwdHash, salt or keyWrapped."""
    address = email()
    signup = await vibed.signup(address)
    login = await vibed.request("POST", "/auth/login", {"email": address, "password": PASSWORD})
    me = await vibed.request("GET", "/me", token=login.json()["accessToken"])
    for resp in (signup, login, me):
        text = resp.content.decode()
        for secret in ("pwdHash", "salt", "keyWrapped", "argon2"):
            assert secret not in text


@pytest_twisted.ensureDeferred
async def test_same_email_concurrently_exactly_one_wins(vibed: Vibed) -> None:
    """Five concurrent signups of one email, in different letter cases: one 201, four 409."""
    address = email()
    variants = [address, address.upper(), address.title(), address, " " + address]
    results = await DeferredList(
        [ensureDeferred(vibed.signup(v)) for v in variants], consumeErrors=True
    )
    codes = sorted(r.code for ok, r in results)
    assert codes == [201, 409, 409, 409, 409]
    login = await vibed.request(
        "POST", "/auth/login", {"email": address.upper(), "password": PASSWORD}
    )
    assert login.code == 200


@pytest_twisted.ensureDeferred
async def test_signup_failing_halfway_does_not_block_retry(vibed: Vibed) -> None:
    """When CouchDB fails in the middle of a signup the client gets 503 and a retry of the same
    email succeeds; a claim left pending by a crashed replica stops blocking after a while."""
    identities = vibed.parts.identities
    real = identities.server

    class FlakyServer:
        """The real server, but the second database creation fails."""

        calls = 0

        def database(self, name: str) -> Any:
            return real.database(name)

        async def create_db(self, name: str) -> bool:
            FlakyServer.calls += 1
            if FlakyServer.calls == 2:
                raise CouchUnavailable(0, "down", "simulated outage")
            return await real.create_db(name)

        async def delete_db(self, name: str) -> bool:
            return await real.delete_db(name)

    address = email()
    auth = vibed.parts.api.auth
    auth.identities = IdentityService(
        server=FlakyServer(),
        pool=identities.pool,  # type: ignore[arg-type]
        clock=identities.clock,
    )
    try:
        failed = await vibed.signup(address)
    finally:
        auth.identities = identities
    assert_problem(failed, 503)
    assert FlakyServer.calls == 2
    assert await real.db_exists(identity_dbs_of_claim := "identities")  # system db untouched
    del identity_dbs_of_claim
    retry = await vibed.signup(address)
    assert retry.code == 201, retry.content

    # A crash leaves a pending claim behind: it blocks for STALE_CLAIM seconds, then not.
    crashed = email()
    db = identities.db
    await db.put(
        {
            "_id": f"email:{crashed}",
            "type": "emailClaim",
            "idn": "idn:gone",
            "state": "pending",
            "claimedAt": time.time(),
        }
    )
    assert (await vibed.signup(crashed)).code == 409
    assert isinstance(vibed.clock, FakeClock)
    vibed.clock.advance(121)
    assert (await vibed.signup(crashed)).code == 201


# -- login ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_email_and_wrong_password_look_the_same(vibed: Vibed) -> None:
    """Unknown email and wrong password: same status and body; both spend an Argon2id verify."""
    address = email()
    await vibed.signup(address)
    ran: list[str] = []
    pool = vibed.parts.identities.pool
    real_run = pool.run

    def counting_run(f: Any, *args: Any) -> Any:
        ran.append(f.__name__)
        return real_run(f, *args)

    pool.run = counting_run  # type: ignore[method-assign]
    try:
        wrong = await vibed.request(
            "POST", "/auth/login", {"email": address, "password": "wrong password!"}
        )
        verifies_wrong = ran.count("verify_password")
        unknown = await vibed.request(
            "POST", "/auth/login", {"email": email(), "password": "wrong password!"}
        )
        verifies_unknown = ran.count("verify_password") - verifies_wrong
    finally:
        pool.run = real_run  # type: ignore[method-assign]
    assert wrong.code == unknown.code == 401
    assert wrong.content == unknown.content
    assert verifies_wrong == verifies_unknown == 1


@pytest_twisted.ensureDeferred
async def test_repeated_failures_per_email_get_429(make_vibed: VibedFactory) -> None:
    """Five failed logins for one email: the sixth attempt is 429 with Retry-After, even with
    the right password, while another email from the same address still works."""
    v = await make_vibed()
    address, other = email(), email()
    await v.signup(address)
    await v.signup(other)
    for _ in range(5):
        r = await v.request("POST", "/auth/login", {"email": address, "password": "nope nope!"})
        assert r.code == 401
    limited = await v.request("POST", "/auth/login", {"email": address, "password": PASSWORD})
    body = assert_problem(limited, 429)
    retry_after = int(limited.header("retry-after") or "0")
    assert 1 <= retry_after <= v.config.login_window and body["retryAfter"] == retry_after
    ok = await v.request("POST", "/auth/login", {"email": other, "password": PASSWORD})
    assert ok.code == 200
    assert isinstance(v.clock, FakeClock)
    v.clock.advance(retry_after)
    again = await v.request("POST", "/auth/login", {"email": address, "password": PASSWORD})
    assert again.code == 200


@pytest_twisted.ensureDeferred
async def test_repeated_failures_per_address_and_forwarded_for(make_vibed: VibedFactory) -> None:
    """Per client address: X-Forwarded-For counts only from a trusted proxy; an untrusted peer
    cannot dodge the limit by inventing forwarded addresses."""
    proxy = await make_vibed(trusted_proxies="127.0.0.1", login_limit_per_address=3)
    client = f"203.0.113.{uuid.uuid4().int % 250 + 1}"
    for _ in range(3):
        r = await proxy.request(
            "POST",
            "/auth/login",
            {"email": email(), "password": "x" * 9},
            headers={"X-Forwarded-For": f"10.9.9.9, {client}"},
        )
        assert r.code == 401
    limited = await proxy.request(
        "POST",
        "/auth/login",
        {"email": email(), "password": "x" * 9},
        headers={"X-Forwarded-For": client},
    )
    assert_problem(limited, 429)
    other = await proxy.request(
        "POST",
        "/auth/login",
        {"email": email(), "password": "x" * 9},
        headers={"X-Forwarded-For": "198.51.100.7"},
    )
    assert other.code == 401

    # No trusted proxy: the peer address counts, whatever the header claims.
    direct = await make_vibed(login_limit_per_address=3)
    # A clean slate for 127.0.0.1, events dated ahead by other tests' FakeClocks included.
    await direct.parts.limiter.purge(older_than=-EVERY_EVENT)
    for i in range(3):
        r = await direct.request(
            "POST",
            "/auth/login",
            {"email": email(), "password": "x" * 9},
            headers={"X-Forwarded-For": f"192.0.2.{i}"},
        )
        assert r.code == 401
    blocked = await direct.request(
        "POST",
        "/auth/login",
        {"email": email(), "password": "x" * 9},
        headers={"X-Forwarded-For": "192.0.2.200"},
    )
    assert_problem(blocked, 429)
    await direct.parts.limiter.purge(older_than=-EVERY_EVENT)


# -- access tokens -------------------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return b64url_encode(json.dumps(data, separators=(",", ":")).encode())


@pytest_twisted.ensureDeferred
async def test_forged_and_stale_tokens_are_refused(vibed: Vibed) -> None:
    """alg none, HS256 keyed with the public key, wrong kid, expired, wrong aud, another
    key with our kid, garbage: all 401 on /me, with a problem body."""
    resp = await vibed.signup(email())
    good = resp.json()["accessToken"]
    issuer = vibed.parts.issuer
    claims = jwt.decode(good, options={"verify_signature": False})
    public = issuer.key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def hs256(secret: bytes) -> str:
        import hashlib
        import hmac

        head = _b64({"alg": "HS256", "typ": "JWT", "kid": issuer.kid})
        body = _b64(claims)
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64url_encode(sig)}"

    other_key = Ed25519PrivateKey.generate()
    forged = [
        _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(claims) + ".",
        hs256(pem),
        hs256(raw),
        jwt.encode(claims, issuer.key, algorithm="EdDSA", headers={"kid": "not-our-kid"}),
        jwt.encode(claims, issuer.key, algorithm="EdDSA"),  # no kid at all
        jwt.encode(
            {**claims, "exp": int(time.time()) - 3600, "iat": int(time.time()) - 4000},
            issuer.key,
            algorithm="EdDSA",
            headers={"kid": issuer.kid},
        ),
        jwt.encode(
            {**claims, "aud": "https://elsewhere.example"},
            issuer.key,
            algorithm="EdDSA",
            headers={"kid": issuer.kid},
        ),
        jwt.encode(claims, other_key, algorithm="EdDSA", headers={"kid": issuer.kid}),
        "not.a.jwt",
    ]
    assert (await vibed.request("GET", "/me", token=good)).code == 200
    for token in forged:
        r = await vibed.request("GET", "/me", token=token)
        assert_problem(r, 401)
        assert "WWW-Authenticate".lower() in {
            k.decode().lower() for k, _ in r.headers.getAllRawHeaders()
        }
    assert_problem(await vibed.request("GET", "/me"), 401)
    assert_problem(await vibed.request("GET", "/me", headers={"Authorization": "Basic eDp5"}), 401)


@pytest_twisted.ensureDeferred
async def test_jwks_verifies_issued_tokens(vibed: Vibed) -> None:
    """The key at /.well-known/jwks.json verifies access tokens with aud and iss set."""
    token = (await vibed.signup(email())).json()["accessToken"]
    jwks = (await vibed.request("GET", "/.well-known/jwks.json")).json()
    (entry,) = jwks["keys"]
    key = jwt.PyJWK(entry)
    claims = jwt.decode(
        token, key.key, algorithms=["EdDSA"], audience="http://vibe.test", issuer="http://vibe.test"
    )
    assert claims["scp"] == ["identity", "data:*", "blob:*"]
    assert jwt.get_unverified_header(token)["kid"] == entry["kid"]
    assert claims["exp"] - claims["iat"] == 900


# -- refresh ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refresh_rotates_with_grace_then_reuse_revokes_family(vibed: Vibed) -> None:
    """Each refresh rotates the cookie; the old one again within the grace interval gets the
    same successor (two tabs); after it, reuse is 401 and the successor dies too."""
    first = (await vibed.signup(email())).refresh_cookie
    assert first
    r1 = await vibed.request("POST", "/auth/refresh", cookie=first)
    assert r1.code == 200, r1.content
    second = r1.refresh_cookie
    assert second and second != first
    assert (await vibed.request("GET", "/me", token=r1.json()["accessToken"])).code == 200

    tab2 = await vibed.request("POST", "/auth/refresh", cookie=first)
    assert tab2.code == 200 and tab2.refresh_cookie == second

    assert isinstance(vibed.clock, FakeClock)
    vibed.clock.advance(vibed.config.refresh_grace + 1)
    reuse = await vibed.request("POST", "/auth/refresh", cookie=first)
    assert_problem(reuse, 401)
    assert "max-age=0" in (reuse.header("set-cookie") or "").lower()
    assert_problem(await vibed.request("POST", "/auth/refresh", cookie=second), 401)


@pytest_twisted.ensureDeferred
async def test_two_tabs_refresh_at_the_same_moment(vibed: Vibed) -> None:
    """Concurrent refreshes with one cookie all succeed with one successor."""
    cookie = (await vibed.signup(email())).refresh_cookie
    results = await DeferredList(
        [ensureDeferred(vibed.request("POST", "/auth/refresh", cookie=cookie)) for _ in range(4)],
        consumeErrors=True,
    )
    responses = [r for ok, r in results]
    assert [r.code for r in responses] == [200] * 4
    assert len({r.refresh_cookie for r in responses}) == 1
    successor = responses[0].refresh_cookie
    assert (await vibed.request("POST", "/auth/refresh", cookie=successor)).code == 200


@pytest_twisted.ensureDeferred
async def test_logout_ends_the_session_and_bad_cookies_fail(vibed: Vibed) -> None:
    """After logout the refresh cookie is refused; missing or invented cookies are 401."""
    cookie = (await vibed.signup(email())).refresh_cookie
    out = await vibed.request("POST", "/auth/logout", cookie=cookie)
    assert out.code == 204
    assert_problem(await vibed.request("POST", "/auth/refresh", cookie=cookie), 401)
    assert_problem(await vibed.request("POST", "/auth/refresh"), 401)
    assert cookie
    family = cookie.split(".")[1]
    invented = f"rt1.{family}.{'A' * 43}"
    assert_problem(await vibed.request("POST", "/auth/refresh", cookie=invented), 401)
    assert_problem(await vibed.request("POST", "/auth/refresh", cookie="garbage"), 401)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "ctype", "status"),
    [
        (b"{not json", "application/json", 400),
        (
            b'{"email": "a@b.co", "email": "c@d.co", "password": "12345678"}',
            "application/json",
            400,
        ),
        (b'{"email": ["a@b.co"], "password": "12345678"}', "application/json", 400),
        (b'{"email": "a@b.co", "password": 12345678}', "application/json", 400),
        (b'{"email": "not-an-email", "password": "12345678"}', "application/json", 400),
        (b'{"email": "a@b.co", "password": "short"}', "application/json", 400),  # signup only
        (b'["a@b.co", "12345678"]', "application/json", 400),
        (b'{"email": "a@b.co", "password": NaN}', "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        (b"", "application/json", 400),
        (b"[" * 100_00 + b"]" * 100_00, "application/json", 400),
        (b'{"email": "a@b.co", "password": "12345678"}', "text/plain", 415),
        (b'{"email": "a@b.co", "password": "12345678"}', "", 415),
        (b'{"email": "a@b.co", "password": "12345678"}', "application/x-www-form-urlencoded", 415),
        (b'{"email": "a@b.co", "password": "' + b"x" * 70_000 + b'"}', "application/json", 413),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_bodies_get_problem_json(
    vibed: Vibed, raw: bytes, ctype: str, status: int
) -> None:
    """Malformed JSON, duplicate keys (CVE-2017-12635), wrong types, invalid values, deep
    nesting, wrong content type and bodies over 64 KiB: 4xx problem+json, never a 500."""
    paths = ["/auth/signup", "/auth/login", "/auth/response"]
    if b'"short"' in raw:
        paths = ["/auth/signup"]  # login checks no length: a 401 there is right
    for path in paths:
        resp = await vibed.request("POST", path, raw=raw, headers={"Content-Type": ctype})
        assert_problem(resp, status)


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods_are_problems(vibed: Vibed) -> None:
    """Unknown paths are 404 and wrong methods 405, both problem+json."""
    assert_problem(await vibed.request("GET", "/nope"), 404)
    assert_problem(await vibed.request("GET", "/auth/nope"), 404)
    assert_problem(await vibed.request("GET", "/auth/login"), 405)
    assert_problem(await vibed.request("DELETE", "/me"), 405)


# -- health and contract --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_and_readiness(vibed: Vibed) -> None:
    """/healthz answers; /readyz is 200 when CouchDB is bootstrapped and 503 with a reason when
    not."""
    assert (await vibed.request("GET", "/healthz")).code == 200
    assert (await vibed.request("GET", "/readyz")).code == 200
    vibed.bootstrap.ready = False
    vibed.bootstrap.last_error = "CouchDB not reachable (CouchUnavailable)"
    body = assert_problem(await vibed.request("GET", "/readyz"), 503)
    assert "not reachable" in body["detail"]


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_when_couchdb_is_down(tmp_path: Path) -> None:
    """With CouchDB unreachable, /readyz says so with 503 and auth routes give 503, not 500."""
    from conftest import free_port

    config = make_config(tmp_path, f"http://127.0.0.1:{free_port()}/", couch_timeout="2")
    v = Vibed(config)
    v.pool.startService()
    from twisted.internet import reactor

    v.bootstrap.ready = True
    v.bootstrap.last_error = None
    v.port = reactor.listenTCP(0, v.parts.site(), interface="127.0.0.1")
    v.url = f"http://127.0.0.1:{v.port.getHost().port}"
    try:
        assert_problem(await v.request("GET", "/readyz"), 503)
        assert_problem(await v.signup(email()), 503)
        assert_problem(
            await v.request("POST", "/auth/login", {"email": email(), "password": PASSWORD}), 503
        )
        assert_problem(await v.request("GET", "/auth/challenge"), 503)
    finally:
        await v.stop()


@pytest_twisted.ensureDeferred
async def test_openapi_document_matches_routes(vibed: Vibed) -> None:
    """Every route is in /openapi.json and every documented operation is a route."""
    from vibed.api.root import routes

    doc = (await vibed.request("GET", "/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == routes(vibed.parts.api)


# -- logs ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_secret_reaches_a_log_line(vibed: Vibed) -> None:
    """Through signup, failed and good logins, refresh, reuse and logout, no log event holds
    the password, a token, a cookie, the hash or the wrapped key."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        address = email()
        signup = await vibed.signup(address)
        await vibed.request("POST", "/auth/login", {"email": address, "password": "bad password"})
        login = await vibed.request("POST", "/auth/login", {"email": address, "password": PASSWORD})
        cookie = login.refresh_cookie
        await vibed.request("POST", "/auth/refresh", cookie=cookie)
        assert isinstance(vibed.clock, FakeClock)
        vibed.clock.advance(vibed.config.refresh_grace + 5)
        await vibed.request("POST", "/auth/refresh", cookie=cookie)
        await vibed.request("POST", "/auth/logout", cookie=cookie)
    finally:
        globalLogPublisher.removeObserver(events.append)
    couch = vibed.parts.identities.db
    doc = await couch.get(signup.json()["identity"]["id"])
    secrets = [
        PASSWORD,
        "bad password",
        signup.json()["accessToken"],
        login.json()["accessToken"],
        cookie,
        doc["pwdHash"],
        doc["keyWrapped"],
        doc["salt"],
    ]
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert events, "expected some log events"
    for secret in secrets:
        assert secret and secret not in text
    assert base64.b64encode(PASSWORD.encode()).decode() not in text


@pytest_twisted.ensureDeferred
async def test_signups_are_bounded_per_address(make_vibed: VibedFactory) -> None:
    """Signup (which costs CPU) is limited per client address: past the limit, 429 with
    Retry-After; another address is unaffected."""
    v = await make_vibed(trusted_proxies="127.0.0.1", signup_limit_per_address=2)
    client = {"X-Forwarded-For": f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
    for _ in range(2):
        r = await v.request(
            "POST", "/auth/signup", {"email": email(), "password": PASSWORD}, headers=client
        )
        assert r.code == 201
    limited = await v.request(
        "POST", "/auth/signup", {"email": email(), "password": PASSWORD}, headers=client
    )
    assert_problem(limited, 429)
    assert int(limited.header("retry-after") or 0) > 0
    other = {"X-Forwarded-For": "198.51.100.99"}
    r = await v.request(
        "POST", "/auth/signup", {"email": email(), "password": PASSWORD}, headers=other
    )
    assert r.code == 201
