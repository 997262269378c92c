"""A scripted browser and app for the authorization server's tests: a cookie jar, the log-in
and consent forms filled in as a person would, and an OAuth client doing code + PKCE."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from html import unescape
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import attrs
import treq
from harness import Response, Vibed

from vibed.keys import b64url_encode

APP = "http://localhost:5173"
REDIRECT = APP + "/callback"
PASSWORD = "correct horse battery"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = b64url_encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge


def hidden_fields(html: str) -> dict[str, str]:
    """The hidden inputs of the page's form."""
    return {
        unescape(m.group(1)): unescape(m.group(2))
        for m in re.finditer(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', html)
    }


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@attrs.define
class Browser:
    """Cookies per name (the server's paths are few; tests do not need path matching)."""

    vibed: Vibed
    cookies: dict[str, str] = attrs.field(factory=dict)
    origin: str | None = None  # what the browser sends as Origin on POSTs (None: public URL)

    async def go(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        hdrs: dict[str, str] = {}
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        data = None
        if form is not None:
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
            hdrs["Origin"] = self.origin or self.vibed.config.public_url
            data = urlencode(form).encode()
        hdrs.update(headers or {})
        resp = await treq.request(
            method,
            self.vibed.url + path,
            data=data,
            headers=hdrs,
            persistent=False,
            allow_redirects=False,
        )
        content = await resp.content()
        for value in resp.headers.getRawHeaders("set-cookie") or []:
            name, _, rest = value.partition("=")
            cookie_value = rest.split(";", 1)[0]
            if "Max-Age=0" in value or not cookie_value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = cookie_value
        return Response(resp.code, resp.headers, content)

    async def login(self, email: str, password: str = PASSWORD, next_url: str = "/") -> Response:
        page = await self.go("GET", "/login?" + urlencode({"next": next_url}))
        assert page.code == 200, page.content
        fields = hidden_fields(page.content.decode())
        return await self.go("POST", "/login", {**fields, "email": email, "password": password})


def local_path(location: str) -> str:
    assert location.startswith("/"), location
    return location


@attrs.define
class App:
    """An OAuth public client at ``client_id`` (an origin)."""

    vibed: Vibed
    client_id: str = APP
    redirect_uri: str = REDIRECT
    verifier: str = ""
    state: str = ""

    def authorize_path(self, scope: str, **extra: str) -> str:
        self.verifier, challenge = pkce()
        self.state = secrets.token_urlsafe(12)
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": scope,
            "state": self.state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **extra,
        }
        return "/auth/authorize?" + urlencode(params)

    async def token(self, **form: str) -> Response:
        return await post_form(self.vibed, "/auth/token", {"client_id": self.client_id, **form})

    async def exchange(self, code: str, verifier: str | None = None) -> Response:
        return await self.token(
            grant_type="authorization_code",
            code=code,
            redirect_uri=self.redirect_uri,
            code_verifier=verifier or self.verifier,
        )


async def post_form(vibed: Vibed, path: str, form: dict[str, str]) -> Response:
    resp = await treq.request(
        "POST",
        vibed.url + path,
        data=urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        persistent=False,
    )
    return Response(resp.code, resp.headers, await resp.content())


async def person(vibed: Vibed) -> tuple[str, str]:
    """A new identity: (email, first-party access token)."""
    email = f"app-{uuid.uuid4().hex[:12]}@example.org"
    resp = await vibed.signup(email)
    assert resp.code == 201, resp.content
    return email, resp.json()["accessToken"]


async def consent_code(
    vibed: Vibed, browser: Browser, app: App, scope: str, **extra: str
) -> tuple[str, Response]:
    """Through authorize -> (consent, allowed): the code and the final redirect."""
    page = await browser.go("GET", app.authorize_path(scope, **extra))
    if page.code == 200:
        fields = hidden_fields(page.content.decode())
        page = await browser.go("POST", "/auth/authorize", {**fields, "decision": "allow"})
    assert page.code == 303, page.content
    location = page.header("location") or ""
    assert location.startswith(app.redirect_uri), location
    got = query_of(location)
    assert got.get("state") == app.state
    return got["code"], page


async def authorized_app(
    vibed: Vibed, scope: str = "data:write:notes", client_id: str = APP
) -> tuple[App, dict[str, Any], Browser, str]:
    """A person logged in on a browser who approved an app: (app, tokens, browser, email)."""
    email, _ = await person(vibed)
    browser = Browser(vibed)
    login = await browser.login(email)
    assert login.code == 303, login.content
    app = App(vibed, client_id=client_id, redirect_uri=client_id + "/callback")
    code, _ = await consent_code(vibed, browser, app, scope)
    tokens = await app.exchange(code)
    assert tokens.code == 200, tokens.content
    return app, tokens.json(), browser, email
