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
