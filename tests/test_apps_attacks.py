"""What an attacker would try against the authorization server, the consent page and the app
tokens (issue 8, section 5): every attempt must fail, and fail safely (no redirect to a URL
that was not validated, no tokens, no 500)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from harness import FakeClock, Vibed, VibedFactory, connect_realtime, poll
from oauth_client import (
    APP,
    App,
    Browser,
    authorized_app,
    consent_code,
    hidden_fields,
    person,
    pkce,
    post_form,
    query_of,
)

from vibed.realtime import CLOSE_REVOKED


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed()


async def logged_in(vibed: Vibed) -> tuple[Browser, str]:
    email, token = await person(vibed)
    browser = Browser(vibed)
    assert (await browser.login(email)).code == 303
    return browser, token


# -- codes ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_code_replay_fails_and_revokes_what_the_code_issued(vibed: Vibed) -> None:
    """A code exchanged twice: the second exchange is invalid_grant, and the tokens the first
    exchange issued stop working (RFC 6749 4.1.2)."""
    browser, _ = await logged_in(vibed)
    app = App(vibed)
    code, _ = await consent_code(vibed, browser, app, "data:read:notes")
    first = await app.exchange(code)
    assert first.code == 200
    tokens = first.json()
    replay = await app.exchange(code)
    assert replay.code == 400 and replay.json()["error"] == "invalid_grant"
    assert (await vibed.request("GET", "/data/notes", token=tokens["access_token"])).code == 401
    refresh = await app.token(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert refresh.code == 400


@pytest_twisted.ensureDeferred
async def test_pkce_mismatch_and_missing_verifier_are_refused_and_burn_the_code(
    vibed: Vibed,
) -> None:
    """A wrong code_verifier (an attacker who intercepted the code) gets invalid_grant, and the
    code is spent: the right verifier afterwards gets nothing either. Without a verifier:
    invalid_request."""
    browser, _ = await logged_in(vibed)
    app = App(vibed)
    code, _ = await consent_code(vibed, browser, app, "data:read:notes")
    missing = await app.token(
        grant_type="authorization_code", code=code, redirect_uri=app.redirect_uri
    )
    assert missing.code == 400 and missing.json()["error"] == "invalid_request"
    wrong_verifier, _ = pkce()
    wrong = await app.exchange(code, verifier=wrong_verifier)
    assert wrong.code == 400 and wrong.json()["error"] == "invalid_grant"
    right = await app.exchange(code)
    assert right.code == 400 and right.json()["error"] == "invalid_grant"


@pytest_twisted.ensureDeferred
async def test_code_bound_to_client_and_redirect_uri(vibed: Vibed) -> None:
    """A code presented by another client_id, or with another redirect_uri, is refused."""
    browser, _ = await logged_in(vibed)
    app = App(vibed)
    code, _ = await consent_code(vibed, browser, app, "data:read:notes")
    evil = App(vibed, client_id="https://evil.example", redirect_uri="https://evil.example/cb")
    evil.verifier = app.verifier
    stolen = await evil.exchange(code)
    assert stolen.code == 400 and stolen.json()["error"] == "invalid_grant"

    code2, _ = await consent_code(vibed, browser, app, "data:read:notes")
    other_path = await app.token(
        grant_type="authorization_code",
        code=code2,
        redirect_uri=APP + "/elsewhere",
        code_verifier=app.verifier,
    )
    assert other_path.code == 400 and other_path.json()["error"] == "invalid_grant"


@pytest_twisted.ensureDeferred
async def test_expired_code_is_refused(vibed: Vibed) -> None:
    """A code older than 60 seconds is refused."""
    browser, _ = await logged_in(vibed)
    app = App(vibed)
    code, _ = await consent_code(vibed, browser, app, "data:read:notes")
    assert isinstance(vibed.clock, FakeClock)
    vibed.clock.advance(61)
    late = await app.exchange(code)
    assert late.code == 400 and late.json()["error"] == "invalid_grant"


@pytest_twisted.ensureDeferred
async def test_token_endpoint_input_errors(vibed: Vibed) -> None:
    """JSON bodies, repeated parameters, unknown grant types, a malformed client_id and
    garbage codes get the RFC 6749 error answers (never a 500), with no-store."""
    app = App(vibed)
    json_body = await vibed.request("POST", "/auth/token", {"grant_type": "authorization_code"})
    assert json_body.code == 400 and json_body.json()["error"] == "invalid_request"
    dup = await vibed.request(
        "POST",
        "/auth/token",
        raw=b"grant_type=refresh_token&grant_type=authorization_code&client_id=" + APP.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert dup.code == 400 and dup.json()["error"] == "invalid_request"
    unknown = await app.token(grant_type="password", username="a", password="b")
    assert unknown.code == 400 and unknown.json()["error"] == "unsupported_grant_type"
    bad_client = await post_form(
        vibed,
        "/auth/token",
        {"grant_type": "refresh_token", "client_id": "evil", "refresh_token": "x"},
    )
    assert bad_client.code == 401 and bad_client.json()["error"] == "invalid_client"
    app.verifier, _ = pkce()
    for code in ("x", "a" * 43, "../../_all_dbs", "é" * 43):
        resp = await app.exchange(code)
        assert resp.code == 400 and resp.json()["error"] == "invalid_grant", code
        assert resp.header("cache-control") == "no-store"


# -- the authorization request ---------------------------------------------------------------------


def _request(**params: str) -> str:
    _, challenge = pkce()
    base = {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": APP + "/callback",
        "scope": "data:read:notes",
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    base.update(params)
    return "/auth/authorize?" + urlencode({k: v for k, v in base.items() if v != "-"})


@pytest.mark.parametrize(
    "params",
    [
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": "http://localhost:5174/callback"},  # another port
        {"redirect_uri": "http://localhost/callback"},  # no port
        {"redirect_uri": "https://localhost:5173/callback"},  # another scheme
        {"redirect_uri": "http://localhost:5173@evil.example/"},
        {"redirect_uri": "http://localhost:5173/cb#frag"},
        {"redirect_uri": "javascript:alert(1)//localhost:5173"},
        {"redirect_uri": "-"},
        {"client_id": "http://localhost:5173/"},  # not exactly an origin
        {"client_id": "HTTP://LOCALHOST:5173"},
        {"client_id": "http://notes.example", "redirect_uri": "http://notes.example/cb"},
        {"client_id": "null"},
        {"client_id": "-"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_untrusted_client_or_redirect_gets_a_page_never_a_redirect(
    vibed: Vibed, params: dict[str, str]
) -> None:
    """A redirect_uri on another origin (host, port or scheme), with user info or a fragment,
    or a client_id that is not a canonical origin (http only on loopback): a 400 page that
    explains it, and no Location header."""
    browser, _ = await logged_in(vibed)
    resp = await browser.go("GET", _request(**params))
    assert resp.code == 400
    assert resp.header("location") is None
    assert "cannot be used" in resp.content.decode()
    assert (
        resp.header(
            "content-type",
        )
        == "text/html; charset=utf-8"
    )


@pytest_twisted.ensureDeferred
async def test_repeated_client_id_is_a_page(vibed: Vibed) -> None:
    """Two client_id parameters (parser confusion): a page, no redirect."""
    path = _request() + "&client_id=https%3A%2F%2Fevil.example"
    resp = await Browser(vibed).go("GET", path)
    assert resp.code == 400 and resp.header("location") is None


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"scope": "identity"}, "invalid_scope"),
        ({"scope": "data:read:notes identity"}, "invalid_scope"),
        ({"scope": "data:read:*"}, "invalid_scope"),
        ({"scope": "data:delete:notes"}, "invalid_scope"),
        ({"scope": "data:read:Notes"}, "invalid_scope"),
        ({"scope": "-"}, "invalid_scope"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "-"}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"prompt": "everything"}, "invalid_request"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests_redirect_with_the_oauth_error(
    vibed: Vibed, params: dict[str, str], error: str
) -> None:
    """Once client_id and redirect_uri are known good, other mistakes (unknown or first-party
    scopes, no PKCE or plain PKCE, implicit flow) go back to the app as the RFC's errors."""
    resp = await Browser(vibed).go("GET", _request(**params))
    assert resp.code == 303
    got = query_of(resp.header("location") or "")
    assert (resp.header("location") or "").startswith(APP + "/callback?")
    assert got["error"] == error and got["state"] == "s1"


# -- the consent form ------------------------------------------------------------------------------


async def consent_form(vibed: Vibed, browser: Browser, **extra: str) -> tuple[App, dict[str, str]]:
    app = App(vibed)
    page = await browser.go("GET", app.authorize_path("data:read:notes", **extra))
    assert page.code == 200
    return app, hidden_fields(page.content.decode())


@pytest_twisted.ensureDeferred
async def test_consent_post_from_another_origin_is_refused(vibed: Vibed) -> None:
    """A consent form POSTed by another site (Origin not ours) makes no grant and no code."""
    browser, token = await logged_in(vibed)
    _, fields = await consent_form(vibed, browser)
    browser.origin = "https://evil.example"
    resp = await browser.go("POST", "/auth/authorize", {**fields, "decision": "allow"})
    assert resp.code == 403 and resp.header("location") is None
    assert (await vibed.request("GET", "/me/grants", token=token)).json() == {"grants": []}


@pytest_twisted.ensureDeferred
async def test_consent_post_without_the_session_or_token_is_refused(vibed: Vibed) -> None:
    """CSRF: without the session cookie (a cross-site POST carries no Lax cookie), without the
    csrf field, or with a token minted for another person's session: 403, no grant."""
    browser, token = await logged_in(vibed)
    _, fields = await consent_form(vibed, browser)
    stranger = Browser(vibed)
    no_session = await stranger.go("POST", "/auth/authorize", {**fields, "decision": "allow"})
    assert no_session.code == 403
    no_token = {k: v for k, v in fields.items() if k != "csrf"}
    missing = await browser.go("POST", "/auth/authorize", {**no_token, "decision": "allow"})
    assert missing.code == 403
    attacker, _ = await logged_in(vibed)
    _, attacker_fields = await consent_form(vibed, attacker)
    crossed = await browser.go(
        "POST", "/auth/authorize", {**fields, "csrf": attacker_fields["csrf"], "decision": "allow"}
    )
    assert crossed.code == 403
    assert (await vibed.request("GET", "/me/grants", token=token)).json() == {"grants": []}


@pytest.mark.parametrize(
    "change",
    [
        {"state": "tampered"},
        {"scope": "data:*"},
        {"redirect_uri": APP + "/other"},
        {"client_name": "Trusted Bank"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_consent_form_fields_cannot_be_changed(vibed: Vibed, change: dict[str, str]) -> None:
    """The consent token is bound to every parameter the person saw: changing state, scope,
    redirect_uri or the name in the form is refused."""
    browser, token = await logged_in(vibed)
    _, fields = await consent_form(vibed, browser)
    resp = await browser.go("POST", "/auth/authorize", {**fields, **change, "decision": "allow"})
    assert resp.code == 403
    assert (await vibed.request("GET", "/me/grants", token=token)).json() == {"grants": []}


@pytest_twisted.ensureDeferred
async def test_login_form_csrf_and_open_redirect(vibed: Vibed) -> None:
    """The log-in form refuses a POST without its CSRF cookie and token (login CSRF), and
    ``next`` only ever leads to a path on this server."""
    email, _ = await person(vibed)
    blind = await Browser(vibed).go(
        "POST", "/login", {"email": email, "password": "correct horse battery", "next": "/"}
    )
    assert blind.code == 403 and blind.header("set-cookie") is None
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:x"):
        browser = Browser(vibed)
        resp = await browser.login(email, next_url=target)
        assert resp.code == 303 and resp.header("location") == "/dashboard", target


@pytest_twisted.ensureDeferred
async def test_wrong_password_on_the_page_says_so(vibed: Vibed) -> None:
    """A wrong password shows the form again with a message (401), sets no session."""
    email, _ = await person(vibed)
    browser = Browser(vibed)
    resp = await browser.login(email, password="not the password")
    assert resp.code == 401
    assert "The email or password is not right." in resp.content.decode()
    assert "vibe_session" not in browser.cookies


@pytest_twisted.ensureDeferred
async def test_too_many_wrong_passwords_on_the_page_say_how_long_to_wait(vibed: Vibed) -> None:
    """Wrong passwords on the log-in page end in a 429 page that says, in words, how long to
    wait (and a Retry-After header); the right password is refused too until then."""
    email, _ = await person(vibed)
    browser = Browser(vibed)
    for _attempt in range(20):
        resp = await browser.login(email, password="not the password")
        if resp.code == 429:
            break
        assert resp.code == 401
    assert resp.code == 429
    text = resp.content.decode()
    assert "Too many attempts. Wait about" in text and "then try again" in text, text
    assert int(resp.header("retry-after") or "0") > 0
    assert resp.header("content-type") == "text/html; charset=utf-8"
    again = await browser.login(email)
    assert again.code == 429 and "vibe_session" not in browser.cookies


@pytest_twisted.ensureDeferred
async def test_log_in_page_during_an_outage_says_to_try_again(
    make_vibed: VibedFactory, own_couch: Any
) -> None:
    """CouchDB down while a person logs in on the page: a 503 form that says the server cannot
    reach its database and to try again (no traceback); once it is back, the login works."""
    vibed = await make_vibed(couch_url=own_couch.url)
    email, _ = await person(vibed)
    browser = Browser(vibed)
    await browser.go("GET", "/login")  # the form's CSRF cookie, while CouchDB is up
    own_couch.stop()
    try:
        down = await browser.login(email)
        assert down.code == 503, down.content
        text = down.content.decode()
        assert "cannot reach its database" in text and "try again" in text
        assert "Traceback" not in text and "vibe_session" not in browser.cookies
    finally:
        own_couch.start()
    back = await browser.login(email)
    assert back.code == 303 and "vibe_session" in browser.cookies


# -- tokens on other routes and replicas ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revoked_grant_closes_its_realtime_socket(vibed: Vibed) -> None:
    """An app's open realtime socket closes with 4004 when the person revokes the grant."""
    app, tokens, _, _ = await authorized_app(vibed, "data:read:notes")
    client = await connect_realtime(vibed, tokens["access_token"])
    client.send({"type": "subscribe", "collection": "notes"})
    assert (await client.next_of("subscribed"))["collection"] == "notes"
    token_claims = vibed.parts.issuer.verify_access(tokens["access_token"])
    assert token_claims.gid is not None
    assert await vibed.parts.apps.grants.revoke(token_claims.sub, token_claims.gid)
    assert await client.wait_closed() == CLOSE_REVOKED


@pytest_twisted.ensureDeferred
async def test_revoked_grant_token_refused_on_another_replica_within_5s(
    replicas: tuple[Vibed, Vibed],
) -> None:
    """The person revokes the grant on replica A; the app's access token, still unexpired,
    is refused by replica B within 5 seconds, and B refuses its refresh token at once."""
    a, b = replicas
    app, tokens, _, email = await authorized_app(a, "data:write:notes")
    access = tokens["access_token"]
    assert (await b.request("GET", "/data/notes", token=access)).code == 200
    login = await a.request(
        "POST", "/auth/login", {"email": email, "password": "correct horse battery"}
    )
    first_party = login.json()["accessToken"]
    gid = (await a.request("GET", "/me/grants", token=first_party)).json()["grants"][0]["id"]
    assert (await a.request("DELETE", f"/me/grants/{gid}", token=first_party)).code == 204

    async def refused() -> bool:
        return (await b.request("GET", "/data/notes", token=access)).code == 401

    await poll(refused, within=5.0)
    app_b = App(b, client_id=app.client_id, redirect_uri=app.redirect_uri)
    refresh = await app_b.token(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert refresh.code == 400


# -- CORS ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cors_preflight_and_headers(vibed: Vibed) -> None:
    """The bearer API and the token endpoint answer preflights from any origin (Authorization
    and If-Match allowed, no credentials) and expose ETag and Location; cookie routes and
    pages answer no CORS header at all."""
    for path, method in (
        ("/data/notes", "POST"),
        ("/auth/token", "POST"),
        ("/me", "GET"),
        ("/data/notes/x", "PUT"),
        ("/blob/upload-url", "POST"),
    ):
        pre = await vibed.request(
            "OPTIONS",
            path,
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "authorization, content-type, if-match",
            },
        )
        assert pre.code == 204, path
        assert pre.header("access-control-allow-origin") == "*"
        assert method in (pre.header("access-control-allow-methods") or "")
        allowed = (pre.header("access-control-allow-headers") or "").lower()
        assert "authorization" in allowed and "if-match" in allowed
        assert pre.header("access-control-allow-credentials") is None
    _, token = await person(vibed)
    created = await vibed.request(
        "POST", "/data/notes", {"a": 1}, token=token, headers={"Origin": APP}
    )
    assert created.header("access-control-allow-origin") == "*"
    exposed = (created.header("access-control-expose-headers") or "").lower()
    assert "etag" in exposed and "location" in exposed
    unauth = await vibed.request("GET", "/data/notes", headers={"Origin": APP})
    assert unauth.code == 401 and unauth.header("access-control-allow-origin") == "*"
    for path in ("/auth/refresh", "/auth/logout", "/auth/login", "/auth/authorize", "/login"):
        pre = await vibed.request(
            "OPTIONS", path, headers={"Origin": APP, "Access-Control-Request-Method": "POST"}
        )
        assert pre.header("access-control-allow-origin") is None, path
        post = await vibed.request("POST", path, headers={"Origin": APP})
        assert post.header("access-control-allow-origin") is None, path


@pytest_twisted.ensureDeferred
async def test_database_outage_shows_the_person_a_page_and_recovers(
    make_vibed: VibedFactory, own_couch: Any
) -> None:
    """CouchDB down while a person is sent to authorize: a 503 page that says to try again
    (HTML, not JSON, no traceback); once it is back, the consent page, without a restart."""
    vibed = await make_vibed(couch_url=own_couch.url)
    browser, _ = await logged_in(vibed)
    path = App(vibed).authorize_path("data:read:notes")
    own_couch.stop()
    try:
        down = await browser.go("GET", path)
        assert down.code == 503
        assert down.header("content-type") == "text/html; charset=utf-8"
        assert "try again" in down.content.decode()
    finally:
        own_couch.start()
    back = await browser.go("GET", path)
    assert back.code == 200 and "Allow this app" in back.content.decode()
