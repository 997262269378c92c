"""The authorization server (issue 8): code + PKCE for public clients whose client_id is
their origin, the consent page, the token and revocation endpoints, grants, and what an
attacker would try against each of them."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest_twisted
from harness import Vibed, VibedFactory
from oauth_client import (
    APP,
    App,
    Browser,
    authorized_app,
    consent_code,
    hidden_fields,
    person,
    post_form,
    query_of,
)


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed()


def claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest_twisted.ensureDeferred
async def test_login_consent_code_token_and_data(vibed: Vibed) -> None:
    """A person logs in on the page, approves the app on the consent page, the app exchanges
    the code (with its PKCE verifier) for tokens that read and write only its collection and
    carry client_id and the grant id but never the identity scope."""
    app, tokens, _browser, _email = await authorized_app(vibed, "data:write:notes")
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == "data:read:notes data:write:notes"
    assert tokens["refresh_token"].startswith("rt1.")
    access = tokens["access_token"]
    c = claims(access)
    assert c["client_id"] == APP and isinstance(c["gid"], str) and len(c["gid"]) == 32
    assert "identity" not in c["scp"]
    auth = {"Authorization": f"Bearer {access}"}
    created = await vibed.request("POST", "/data/notes", {"t": "hi"}, headers=auth)
    assert created.code == 201, created.content
    listed = await vibed.request("GET", "/data/notes", headers=auth)
    assert [d["t"] for d in listed.json()["docs"]] == ["hi"]
    other = await vibed.request("GET", "/data/todos", headers=auth)
    assert other.code == 403
    blobs = await vibed.request("GET", "/blob", headers=auth)
    assert blobs.code == 403


# -- the flow ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_not_logged_in_goes_to_the_login_page_and_back(vibed: Vibed) -> None:
    """Without a session the authorization request sends the person to /login with the request
    as ``next``; after logging in they land back on it and see the consent page."""
    email, _ = await person(vibed)
    browser = Browser(vibed)
    app = App(vibed)
    path = app.authorize_path("data:read:notes")
    first = await browser.go("GET", path)
    assert first.code == 303
    location = first.header("location") or ""
    assert location.startswith("/login?next=")
    login_page = await browser.go("GET", location)
    fields = hidden_fields(login_page.content.decode())
    assert fields["next"] == path
    logged_in = await browser.go(
        "POST", "/login", {**fields, "email": email, "password": "correct horse battery"}
    )
    assert logged_in.code == 303 and logged_in.header("location") == path
    consent = await browser.go("GET", path)
    assert consent.code == 200
    assert "Allow this app to use your data?" in consent.content.decode()


@pytest_twisted.ensureDeferred
async def test_existing_grant_is_silent_and_more_scopes_ask_again(vibed: Vibed) -> None:
    """A second authorization for scopes an existing grant covers redirects with a code at
    once (no page), whose tokens carry only the scopes asked this time; asking for more
    shows the consent page, and approving makes a new grant; prompt=consent always shows
    the page."""
    app, _tokens, browser, _ = await authorized_app(vibed, "data:write:notes")
    silent = await browser.go("GET", app.authorize_path("data:read:notes"))
    assert silent.code == 303
    assert "code" in query_of(silent.header("location") or "")
    # The silent code's tokens carry what was asked now, not all the grant allows.
    narrow = (await app.exchange(query_of(silent.header("location") or "")["code"])).json()
    assert narrow["scope"] == "data:read:notes"
    wrote = await vibed.request("POST", "/data/notes", {"t": 1}, token=narrow["access_token"])
    assert wrote.code == 403
    forced = await browser.go("GET", app.authorize_path("data:read:notes", prompt="consent"))
    assert forced.code == 200
    more = await browser.go("GET", app.authorize_path("data:write:notes blob:*"))
    assert more.code == 200
    assert "Upload, download and delete your files" in more.content.decode()
    code, _ = await consent_code(vibed, browser, app, "data:write:notes blob:*")
    tokens = (await app.exchange(code)).json()
    assert tokens["scope"] == "blob:* data:read:notes data:write:notes"


@pytest_twisted.ensureDeferred
async def test_prompt_none_never_shows_a_page(vibed: Vibed) -> None:
    """prompt=none redirects with login_required without a session, consent_required without
    a covering grant, and a code when a grant covers the request."""
    app = App(vibed)
    anonymous = await Browser(vibed).go("GET", app.authorize_path("data:read:notes", prompt="none"))
    got = query_of(anonymous.header("location") or "")
    assert anonymous.code == 303 and got["error"] == "login_required"
    assert got["state"] == app.state and got["iss"] == vibed.config.public_url

    email, _ = await person(vibed)
    browser = Browser(vibed)
    await browser.login(email)
    no_grant = await browser.go("GET", app.authorize_path("data:read:notes", prompt="none"))
    assert query_of(no_grant.header("location") or "")["error"] == "consent_required"
    await consent_code(vibed, browser, app, "data:read:notes")
    granted = await browser.go("GET", app.authorize_path("data:read:notes", prompt="none"))
    assert "code" in query_of(granted.header("location") or "")


@pytest_twisted.ensureDeferred
async def test_deny_redirects_access_denied_with_state(vibed: Vibed) -> None:
    """Deny on the consent page sends the person back with error=access_denied and the
    app's state; no grant is made."""
    email, token = await person(vibed)
    browser = Browser(vibed)
    await browser.login(email)
    app = App(vibed)
    page = await browser.go("GET", app.authorize_path("data:read:notes"))
    fields = hidden_fields(page.content.decode())
    denied = await browser.go("POST", "/auth/authorize", {**fields, "decision": "deny"})
    got = query_of(denied.header("location") or "")
    assert denied.code == 303 and got["error"] == "access_denied" and got["state"] == app.state
    grants = await vibed.request("GET", "/me/grants", token=token)
    assert grants.json() == {"grants": []}


@pytest_twisted.ensureDeferred
async def test_consent_page_shows_origin_and_escapes_the_app_name(vibed: Vibed) -> None:
    """The consent page names the origin, shows the app's own name as untrusted escaped text,
    describes each scope in words (write includes read), and cannot be framed or run
    scripts; its form may only go to this server and the app's origin."""
    email, _ = await person(vibed)
    browser = Browser(vibed)
    await browser.login(email)
    app = App(vibed)
    page = await browser.go(
        "GET",
        app.authorize_path(
            "data:write:notes data:read:photos", client_name='<script>alert("x")</script>Notes'
        ),
    )
    html = page.content.decode()
    assert page.code == 200
    assert '<strong class="origin" id="origin">http://localhost:5173</strong>' in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Read and change your <strong>notes</strong>" in html
    assert "Read your <strong>photos</strong>" in html
    assert "Read your <strong>notes</strong>" not in html  # implied by write, not repeated
    assert "Changing a collection includes reading it" in html
    assert email in html
    csp = page.header("content-security-policy") or ""
    assert "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert "default-src 'none'" in csp
    assert "form-action 'self' http://localhost:5173" in csp
    assert page.header("x-frame-options") == "DENY"
    assert page.header("referrer-policy") == "same-origin"


@pytest_twisted.ensureDeferred
async def test_metadata_document(vibed: Vibed) -> None:
    """RFC 8414 metadata names this server's endpoints, S256 only, public clients only, and
    may be read from any origin."""
    resp = await vibed.request(
        "GET", "/.well-known/oauth-authorization-server", headers={"Origin": APP}
    )
    doc = resp.json()
    base = vibed.config.public_url
    assert doc["issuer"] == base
    assert doc["authorization_endpoint"] == base + "/auth/authorize"
    assert doc["token_endpoint"] == base + "/auth/token"
    assert doc["revocation_endpoint"] == base + "/auth/revoke"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["token_endpoint_auth_methods_supported"] == ["none"]
    assert doc["response_types_supported"] == ["code"]
    assert resp.header("access-control-allow-origin") == "*"


# -- refresh and revoke -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refresh_rotates_and_may_narrow_but_never_widen(vibed: Vibed) -> None:
    """A refresh answers new tokens and a new refresh token; ``scope`` may narrow the access
    token, a scope outside the grant is invalid_scope; the rotated token presented after the
    grace interval revokes the session."""
    app, tokens, _, _ = await authorized_app(vibed, "data:write:notes")
    first = tokens["refresh_token"]
    narrowed = await app.token(
        grant_type="refresh_token", refresh_token=first, scope="data:read:notes"
    )
    assert narrowed.code == 200, narrowed.content
    body = narrowed.json()
    assert body["scope"] == "data:read:notes" and body["refresh_token"] != first
    assert claims(body["access_token"])["scp"] == ["data:read:notes"]
    second = body["refresh_token"]
    for scope in ("data:write:todos", "data:*", "identity", "data:write:notes blob:*"):
        wider = await app.token(grant_type="refresh_token", refresh_token=second, scope=scope)
        assert wider.code == 400 and wider.json()["error"] == "invalid_scope", scope
    again = await app.token(grant_type="refresh_token", refresh_token=second)
    assert again.code == 200 and again.json()["scope"] == "data:read:notes data:write:notes"
    vibed.clock.advance(vibed.config.refresh_grace + 5)  # type: ignore[attr-defined]
    reused = await app.token(grant_type="refresh_token", refresh_token=first)
    assert reused.code == 400 and reused.json()["error"] == "invalid_grant"
    latest = again.json()
    dead = await app.token(grant_type="refresh_token", refresh_token=latest["refresh_token"])
    assert dead.code == 400
    me = await vibed.request("GET", "/data/notes", token=latest["access_token"])
    assert me.code == 401


@pytest_twisted.ensureDeferred
async def test_app_and_first_party_refresh_tokens_do_not_cross(vibed: Vibed) -> None:
    """An app's refresh token in the first-party cookie is refused (and not rotated), a
    first-party refresh token at the token endpoint is refused, and another client cannot use
    an app's refresh token."""
    app, tokens, _, email = await authorized_app(vibed)
    rt = tokens["refresh_token"]
    as_cookie = await vibed.request("POST", "/auth/refresh", cookie=rt)
    assert as_cookie.code == 401
    still = await app.token(grant_type="refresh_token", refresh_token=rt)
    assert still.code == 200
    login = await vibed.request(
        "POST", "/auth/login", {"email": email, "password": "correct horse battery"}
    )
    first_party = login.refresh_cookie or ""
    at_endpoint = await app.token(grant_type="refresh_token", refresh_token=first_party)
    assert at_endpoint.code == 400 and at_endpoint.json()["error"] == "invalid_grant"
    thief = App(vibed, client_id="https://evil.example", redirect_uri="https://evil.example/cb")
    stolen = await thief.token(
        grant_type="refresh_token", refresh_token=still.json()["refresh_token"]
    )
    assert stolen.code == 400 and stolen.json()["error"] == "invalid_grant"


@pytest_twisted.ensureDeferred
async def test_revoke_endpoint_ends_the_app_session(vibed: Vibed) -> None:
    """POST /auth/revoke with the refresh token: the refresh token and the session's access
    tokens stop working; an unknown token is 200 (RFC 7009); another client's is refused."""
    app, tokens, _, _ = await authorized_app(vibed)
    other = App(vibed, client_id="https://other.example", redirect_uri="https://other.example/")
    refused = await post_form(
        vibed, "/auth/revoke", {"token": tokens["refresh_token"], "client_id": other.client_id}
    )
    assert refused.code == 401 and refused.json()["error"] == "invalid_client"
    ok = await post_form(
        vibed, "/auth/revoke", {"token": tokens["refresh_token"], "client_id": app.client_id}
    )
    assert ok.code == 200
    assert (await vibed.request("GET", "/data/notes", token=tokens["access_token"])).code == 401
    refresh = await app.token(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert refresh.code == 400
    unknown = await post_form(vibed, "/auth/revoke", {"token": "nonsense", "client_id": APP})
    assert unknown.code == 200


@pytest_twisted.ensureDeferred
async def test_revoke_with_the_access_token(vibed: Vibed) -> None:
    """Revoking an app's access token ends its session: the refresh token dies with it."""
    app, tokens, _, _ = await authorized_app(vibed)
    ok = await post_form(
        vibed,
        "/auth/revoke",
        {
            "token": tokens["access_token"],
            "client_id": app.client_id,
            "token_type_hint": "access_token",
        },
    )
    assert ok.code == 200
    refresh = await app.token(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert refresh.code == 400


# -- grants --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_grants_listed_and_revoked(vibed: Vibed) -> None:
    """GET /me/grants lists the approved app with its origin, scopes, name and times;
    DELETE /me/grants/{id} ends its refresh tokens and access tokens at once and a later
    authorization needs consent again (a new grant)."""
    email, first_party = await person(vibed)
    browser = Browser(vibed)
    await browser.login(email)
    app = App(vibed)
    code, _ = await consent_code(vibed, browser, app, "data:write:notes", client_name="My Notes")
    tokens = (await app.exchange(code)).json()
    listed = (await vibed.request("GET", "/me/grants", token=first_party)).json()["grants"]
    assert len(listed) == 1
    grant = listed[0]
    assert grant["origin"] == APP and grant["name"] == "My Notes" and grant["via"] == "consent"
    assert grant["scopes"] == ["data:read:notes", "data:write:notes"]
    assert grant["createdAt"].endswith("Z") and grant["lastUsedAt"]
    assert grant["id"] == claims(tokens["access_token"])["gid"]

    gone = await vibed.request("DELETE", f"/me/grants/{grant['id']}", token=first_party)
    assert gone.code == 204
    assert (await vibed.request("GET", "/data/notes", token=tokens["access_token"])).code == 401
    refresh = await app.token(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert refresh.code == 400 and refresh.json()["error"] == "invalid_grant"
    assert (await vibed.request("GET", "/me/grants", token=first_party)).json() == {"grants": []}
    again = await browser.go("GET", app.authorize_path("data:write:notes"))
    assert again.code == 200  # consent again
    missing = await vibed.request("DELETE", f"/me/grants/{grant['id']}", token=first_party)
    assert missing.code == 404
    bad = await vibed.request("DELETE", "/me/grants/..%2Fidentities", token=first_party)
    assert bad.code == 404


@pytest_twisted.ensureDeferred
async def test_a_code_for_a_grant_revoked_before_the_exchange_is_refused(vibed: Vibed) -> None:
    """The person revokes the grant between approving and the app's exchange: no tokens."""
    email, first_party = await person(vibed)
    browser = Browser(vibed)
    await browser.login(email)
    app = App(vibed)
    code, _ = await consent_code(vibed, browser, app, "data:read:notes")
    gid = (await vibed.request("GET", "/me/grants", token=first_party)).json()["grants"][0]["id"]
    await vibed.request("DELETE", f"/me/grants/{gid}", token=first_party)
    resp = await app.exchange(code)
    assert resp.code == 400 and resp.json()["error"] == "invalid_grant"


@pytest_twisted.ensureDeferred
async def test_app_tokens_cannot_manage_the_identity(vibed: Vibed) -> None:
    """An app's token, even with data:* and blob:*, is refused (403 insufficient-scope) on
    /me/grants (list and delete), and /me shows it no email."""
    app, tokens, _, email = await authorized_app(vibed, "data:* blob:*")
    access = tokens["access_token"]
    listed = await vibed.request("GET", "/me/grants", token=access)
    assert listed.code == 403 and listed.json()["type"].endswith("insufficient-scope")
    gid = claims(access)["gid"]
    deleted = await vibed.request("DELETE", f"/me/grants/{gid}", token=access)
    assert deleted.code == 403
    me = await vibed.request("GET", "/me", token=access)
    assert me.code == 200 and "email" not in me.json() and email not in me.content.decode()


@pytest_twisted.ensureDeferred
async def test_signup_page_creates_the_account_and_goes_on(vibed: Vibed) -> None:
    """The create-your-account page makes an identity, logs the person in (session cookie)
    and goes on to ``next``; a short password or a taken email shows the form again with
    the reason."""
    app = App(vibed)
    path = app.authorize_path("data:read:notes")
    browser = Browser(vibed)
    page = await browser.go("GET", "/signup?" + urlencode({"next": path}))
    assert page.code == 200 and "Create your account" in page.content.decode()
    fields = hidden_fields(page.content.decode())
    short = await browser.go(
        "POST", "/signup", {**fields, "email": "s@example.org", "password": "x"}
    )
    assert short.code == 400 and "at least 8 characters" in short.content.decode()
    email = f"page-{secrets.token_hex(6)}@example.org"
    created = await browser.go(
        "POST", "/signup", {**fields, "email": email, "password": "a long passphrase"}
    )
    assert created.code == 303 and created.header("location") == path
    assert "vibe_session" in browser.cookies and "vibe_refresh" in browser.cookies
    consent = await browser.go("GET", path)
    assert consent.code == 200 and email in consent.content.decode()
    again = await Browser(vibed).go("GET", "/signup")
    taken = await Browser(vibed, cookies=dict(again_cookies(again))).go(
        "POST",
        "/signup",
        {**hidden_fields(again.content.decode()), "email": email, "password": "another one!"},
    )
    assert taken.code == 409 and "already exists" in taken.content.decode()


def again_cookies(resp: Any) -> list[tuple[str, str]]:
    out = []
    for value in resp.headers_all("set-cookie"):
        name, _, rest = value.partition("=")
        out.append((name, rest.split(";", 1)[0]))
    return out
