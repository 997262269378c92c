"""Attacks from the security review of the identity and data surfaces, each against a real
vibed on a TCP port and a real PouchDB Server. Each test names the attack in its docstring and
holds the behaviour that defeats it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest_twisted
from harness import Response, Vibed, VibedSet
from twisted.internet.defer import DeferredList, ensureDeferred

PASSWORD = "correct horse battery"
VibedFactory = Callable[..., Awaitable[Vibed]]


def email() -> str:
    return f"review-{uuid.uuid4().hex[:12]}@example.org"


def client() -> dict[str, str]:
    """A client address of its own (through the trusted proxy 127.0.0.1), so limits counted
    per address in the shared rate-limit database start from zero."""
    return {"X-Forwarded-For": f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"}


@pytest_twisted.async_yield_fixture
async def make_vibed(tmp_path: Path, couch_url: str) -> AsyncIterator[VibedFactory]:
    vibeds = VibedSet(tmp_path, couch_url, trusted_proxies="127.0.0.1")
    yield vibeds.start
    await vibeds.stop()


def assert_problem(resp: Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert resp.code == status, resp.content
    assert resp.header("content-type") == "application/problem+json"
    body: dict[str, Any] = resp.json()
    if slug is not None:
        assert body["type"].endswith("/" + slug), body
    return body


async def at_once(*calls: Awaitable[Response]) -> list[Response]:
    """Send every request before any answer comes back."""
    results = await DeferredList([ensureDeferred(c) for c in calls], consumeErrors=True)
    out = []
    for ok, value in results:
        assert ok, value
        out.append(value)
    return out


async def login(v: Vibed, address: str, password: str, headers: dict[str, str]) -> Response:
    return await v.request(
        "POST", "/auth/login", {"email": address, "password": password}, headers=headers
    )


# -- rate limits ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_burst_of_concurrent_guesses_cannot_outrun_the_login_limit(
    make_vibed: VibedFactory,
) -> None:
    """Attack: fire many wrong-password logins for one email at the same moment. A limiter
    that checks the count, verifies the password, and only then records the failure lets the
    whole burst through (every request checks before any failure is recorded): 30 guesses
    against a limit of 5. Expected: at most the limit's worth of guesses reach the password
    check; the rest are 429, and then even the right password is 429."""
    v = await make_vibed(login_limit_per_email=3, login_limit_per_address=1000)
    address = email()
    assert (await v.signup(address)).code == 201
    headers = client()
    answers = await at_once(*(login(v, address, f"wrong guess {i}", headers) for i in range(12)))
    codes = sorted(r.code for r in answers)
    assert set(codes) <= {401, 429}, codes
    # Keep guessing one at a time: the burst and these together reach the password check
    # at most three times.
    for _ in range(3):
        codes.append((await login(v, address, "one more guess", headers)).code)
    assert codes.count(401) <= 3, codes
    assert_problem(await login(v, address, PASSWORD, headers), 429, "too-many-requests")


@pytest_twisted.ensureDeferred
async def test_a_burst_from_one_address_cannot_outrun_the_address_limit(
    make_vibed: VibedFactory,
) -> None:
    """Attack: spray concurrent guesses at many emails from one address (credential stuffing).
    Expected: the per-address limit holds for the burst as it does for one-at-a-time tries."""
    v = await make_vibed(login_limit_per_address=4)
    headers = client()
    answers = await at_once(*(login(v, email(), "not the password", headers) for _ in range(12)))
    codes = sorted(r.code for r in answers)
    assert codes.count(401) <= 4, codes
    assert set(codes) <= {401, 429}, codes


@pytest_twisted.ensureDeferred
async def test_a_burst_of_signups_cannot_outrun_the_signup_limit(
    make_vibed: VibedFactory,
) -> None:
    """Attack: each signup costs an Argon2id hash and a scrypt derivation; sending them all at
    once slipped every one past a check-then-count limiter (a CPU exhaustion amplifier).
    Expected: at most the limit's worth of concurrent signups from one address succeed."""
    v = await make_vibed(signup_limit_per_address=2)
    headers = client()
    answers = await at_once(
        *(
            v.request(
                "POST", "/auth/signup", {"email": email(), "password": PASSWORD}, headers=headers
            )
            for _ in range(8)
        )
    )
    codes = sorted(r.code for r in answers)
    assert codes.count(201) <= 2, codes
    assert set(codes) <= {201, 429}, codes


@pytest_twisted.ensureDeferred
async def test_successful_logins_do_not_count_against_the_limit(make_vibed: VibedFactory) -> None:
    """Counting an attempt before checking it must not turn successful logins into failures:
    a person who logs in often is never locked out, and only failures use up the limit."""
    v = await make_vibed(login_limit_per_email=2, login_limit_per_address=1000)
    address = email()
    assert (await v.signup(address)).code == 201
    headers = client()
    assert (await login(v, address, "not the password", headers)).code == 401
    for _ in range(4):
        assert (await login(v, address, PASSWORD, headers)).code == 200
    assert (await login(v, address, "not the password", headers)).code == 401
    assert_problem(await login(v, address, PASSWORD, headers), 429, "too-many-requests")


# -- the data API's input ------------------------------------------------------------------


async def data_person(v: Vibed) -> str:
    resp = await v.request(
        "POST", "/auth/signup", {"email": email(), "password": PASSWORD}, headers=client()
    )
    assert resp.code == 201, resp.content
    token: str = resp.json()["accessToken"]
    return token


def query(collection: str, **params: Any) -> str:
    encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
    return f"/data/{collection}?" + urlencode(encoded)


@pytest_twisted.ensureDeferred
async def test_type_operator_with_a_non_string_operand_is_400(make_vibed: VibedFactory) -> None:
    """Attack: ``{"a": {"$type": []}}`` (or ``{}``) in ``q``. The membership test against the set
    of type names raised TypeError (unhashable) and the answer was a 500 with the traceback in
    the log. Expected: 400 bad-query naming what $type takes."""
    v = await make_vibed()
    token = await data_person(v)
    for operand in ([], {}, ["string"], 1, None):
        resp = await v.request("GET", query("notes", q={"a": {"$type": operand}}), token=token)
        body = assert_problem(resp, 400, "bad-query")
        assert "$type" in body["detail"]


@pytest_twisted.ensureDeferred
async def test_numbers_beyond_the_double_range_are_400_not_forwarded(
    make_vibed: VibedFactory,
) -> None:
    """Attack: ``1e400`` in a document or a selector. Python reads it as inf and sent CouchDB
    ``Infinity``, which is not JSON (the database, not vibed, refused it); an integer with 400
    digits was stored and came back as ``null`` from the embedded server. Expected: vibed
    refuses both itself, 400 invalid-json (body) or bad-query (``q``), before any request to
    the database is built."""
    v = await make_vibed()
    token = await data_person(v)
    for raw in (b'{"a": 1e400}', b'{"a": -1e400}', b'{"a": ' + b"9" * 400 + b"}"):
        resp = await v.request("POST", "/data/notes", raw=raw, token=token)
        assert_problem(resp, 400, "invalid-json")
        resp = await v.request("PUT", "/data/notes/big", raw=raw, token=token)
        assert_problem(resp, 400, "invalid-json")
    resp = await v.request("GET", "/data/notes?q=" + "%7B%22a%22%3A1e400%7D", token=token)
    assert_problem(resp, 400, "bad-query")
    # Ordinary large and small numbers still pass.
    ok = await v.request("POST", "/data/notes", raw=b'{"a": 1e308, "b": -5e-324}', token=token)
    assert ok.code == 201, ok.content


# Each of these passed the $regex checker, and each backtracks exponentially in JavaScript
# (the embedded server's engine, one thread for every identity): against a 40-character value
# the first took 20 s of PouchDB Server's only thread, the second 24 s at 28 characters.
CATASTROPHIC_REGEXES = [
    "(?:x{1,2}){1,300}y",  # a bounded quantifier nested in a bounded one: 600 "ways" on paper
    "(?:a|[a-z]){0,30}y",  # Python folds the alternation into one class; JavaScript does not
    "^(?:a|[a-z])+y",  # the same, hidden inside the one allowed unbounded quantifier
    "(?:a|[a-z])" * 20 + "y",  # 2**20 paths per position, no quantifier at all
    "[]|(?:a|\\w){0,30}y]",  # one class to Python; an empty class, then an alternation, to JS
    "(?:x{0,30}){0,30}y",
    "(?:x|xx){0,30}y",
]


@pytest_twisted.ensureDeferred
async def test_regexes_that_backtrack_exponentially_in_javascript_are_400(
    make_vibed: VibedFactory,
) -> None:
    """Attack: store one document with a 40-character string and query it with a `$regex`
    that passes the linear-time checker but backtracks exponentially in JavaScript; the
    embedded PouchDB Server evaluates it on its only thread, stalling every identity's
    requests for minutes (vibed's request times out, the server keeps computing). Expected:
    400 bad-regex before anything reaches the database; the documented portable patterns
    still work."""
    v = await make_vibed()
    token = await data_person(v)
    assert (await v.request("POST", "/data/notes", {"s": "x" * 40}, token=token)).code == 201
    for pattern in CATASTROPHIC_REGEXES:
        resp = await v.request("GET", query("notes", q={"s": {"$regex": pattern}}), token=token)
        assert_problem(resp, 400, "bad-regex")
    for pattern in ("^x+$", "x{2,5}", "(?:ab|cd)", "^(?:xx)+$", "colou?r", "[\\]x]"):
        resp = await v.request("GET", query("notes", q={"s": {"$regex": pattern}}), token=token)
        assert resp.code == 200, (pattern, resp.content)
