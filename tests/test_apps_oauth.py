"""The authorization server (issue 8): code + PKCE for public clients whose client_id is
their origin, the consent page, the token and revocation endpoints, grants, and what an
attacker would try against each of them."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
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
