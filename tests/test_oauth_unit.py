"""The authorization server's pure rules (vibed/oauth.py) on arbitrary input: client ids,
redirect URIs, scopes, PKCE and the signed browser tokens."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vibed.oauth import (
    BadClient,
    OAuthError,
    Signer,
    check_redirect_uri,
    covers,
    parse_client_id,
    parse_scopes,
    pkce_challenge,
    pkce_matches,
    url_origin,
)

URLISH = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda scheme, host, port, rest: f"{scheme}://{host}{port}{rest}",
        st.sampled_from(["http", "https", "HTTP", "javascript", "ftp", ""]),
        st.one_of(
            st.sampled_from(["localhost", "127.0.0.1", "[::1]", "notes.example", "a.localhost"]),
            st.text(max_size=20),
        ),
        st.sampled_from(["", ":5173", ":443", ":80", ":0", ":99999", ":x"]),
        st.sampled_from(["", "/", "/cb", "/cb?x=1", "#f", "@evil.example", "/\\evil"]),
    ),
)


@given(URLISH)
def test_client_id_is_a_canonical_origin_or_refused(value: str) -> None:
    """Any text: either refused with BadClient, or accepted unchanged as its own origin."""
    try:
        origin = parse_client_id(value)
    except BadClient:
        return
    assert origin == value == url_origin(value)
    assert origin.startswith("https://") or origin.startswith("http://")


@given(URLISH, URLISH)
def test_redirect_uri_is_on_the_client_origin_or_refused(client: str, redirect: str) -> None:
    """An accepted redirect URI always has exactly the client's origin and no fragment."""
    try:
        client_id = parse_client_id(client)
        uri = check_redirect_uri(client_id, redirect)
    except BadClient:
        return
    assert url_origin(uri) == client_id and "#" not in uri


@given(st.text(max_size=200))
def test_scopes_parse_or_refuse_and_never_grant_identity(text: str) -> None:
    """Any scope text is refused with invalid_scope or gives known app scopes only."""
    try:
        scopes = parse_scopes(text)
    except OAuthError as e:
        assert e.error == "invalid_scope"
        return
    assert "identity" not in scopes and scopes
    for scope in scopes:
        assert scope in ("data:*", "blob:*") or scope.startswith(("data:read:", "data:write:"))


def test_write_implies_read_and_data_star_covers() -> None:
    """data:write:x is granted with data:read:x; data:* covers every data scope, not blob."""
    assert parse_scopes("data:write:notes") == ("data:read:notes", "data:write:notes")
    assert parse_scopes("data:write:notes data:*") == ("data:*",)
    assert covers(("data:*",), ("data:read:x", "data:write:y"))
    assert not covers(("data:*",), ("blob:*",))
    assert not covers(("data:read:notes",), ("data:write:notes",))


def test_pkce_s256_known_answer() -> None:
    """RFC 7636 appendix B: the verifier dBjftJeZ4CVP... gives E9Melhoa2Owv..."""
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert pkce_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
    assert not pkce_matches("short", pkce_challenge("short"))  # under 43 characters


@given(st.text(max_size=100))
def test_signer_refuses_anything_it_did_not_sign(token: str) -> None:
    """Arbitrary text never verifies; a signed token verifies for its purpose only, until
    it expires."""
    now = [1000.0]
    signer = Signer(b"k" * 32, clock=lambda: now[0])
    assert signer.verify("session", token) is None
    good = signer.sign("session", "abc", 60)
    assert signer.verify("session", good) == "abc"
    assert signer.verify("csrf", good) is None
    now[0] += 61
    assert signer.verify("session", good) is None
