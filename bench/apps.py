"""Apps benchmark: the authorization dance and the token endpoint, through a real
`twistd vibed`, in one run.

    .venv/bin/python bench/apps.py [--scale 1.0] [--couchdb pouchdb|shared|URL]
                                   [--cpus shared|pinned]

The engine is chosen as in bench/data.py; the CPU vibed and CouchDB spent over the run is
printed at the end.

1. Time from ``GET /auth/authorize`` to the first data read, sequentially:
   - first visit: authorize -> log-in page -> log in -> consent page -> allow -> token -> read
     (7 requests, one of them a password check);
   - returning: authorize (silent: session and grant exist) -> token -> read (3 requests).
2. Throughput of ``POST /auth/token`` (refresh_token and authorization_code grants) next to
   ``POST /auth/login`` (Argon2id-bound) at the same concurrency.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import sys
import time
import uuid
from html import unescape
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import treq
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    Daemon,
    Engine,
    add_engine_arguments,
    cpu_seconds,
    fmt_ms,
    percentile,
    pin,
    run_load,
)
from vibed.keys import b64url_encode  # noqa: E402

PASSWORD = "bench password 123"
APP = "http://localhost:5173"
REDIRECT = APP + "/cb"


class Session:
    """One browser: cookies by name, redirects not followed."""

    def __init__(self, base: str, pool: HTTPConnectionPool) -> None:
        self.base = base
        self.pool = pool
        self.cookies: dict[str, str] = {}

    async def go(
        self, method: str, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers: dict[bytes | str, bytes | str] = {}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        data = None
        if form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            # the default --public-url is http://localhost:<port>
            headers["Origin"] = self.base.replace("127.0.0.1", "localhost")
            data = urlencode(form).encode()
        resp = await treq.request(
            method,
            self.base + path,
            data=data,
            headers=headers,
            pool=self.pool,
            allow_redirects=False,
        )
        body = await resp.content()
        for value in resp.headers.getRawHeaders("set-cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        location = (resp.headers.getRawHeaders("location") or [""])[0]
        return resp.code, {"location": location}, body


def hidden(html: bytes) -> dict[str, str]:
    return {
        unescape(m.group(1)): unescape(m.group(2))
        for m in re.finditer(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', html.decode())
    }


def authorize_path() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = b64url_encode(hashlib.sha256(verifier.encode()).digest())
    query = {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": REDIRECT,
        "scope": "data:write:notes",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return "/auth/authorize?" + urlencode(query), verifier


def code_of(location: str) -> str:
    return parse_qs(urlsplit(location).query)["code"][0]


async def exchange(s: Session, code: str, verifier: str) -> dict[str, Any]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": APP,
        "code_verifier": verifier,
    }
    return await post_form(s, "/auth/token", form)


async def post_form(s: Session, path: str, form: dict[str, str]) -> dict[str, Any]:
    resp = await treq.post(
        s.base + path,
        data=urlencode(form).encode(),
        headers=Headers({"Content-Type": ["application/x-www-form-urlencoded"]}),
        pool=s.pool,
    )
    if resp.code != 200:
        raise RuntimeError(f"{path}: {resp.code} {await resp.content()!r}")
    body: dict[str, Any] = await resp.json()
    return body


async def read(s: Session, token: str) -> None:
    resp = await treq.get(
        s.base + "/data/notes", headers=Headers({"Authorization": [f"Bearer {token}"]}), pool=s.pool
    )
    await resp.content()
    if resp.code != 200:
        raise RuntimeError(f"read: {resp.code}")


async def first_visit(s: Session, email: str) -> float:
    t0 = time.perf_counter()
    path, verifier = authorize_path()
    code, h, _ = await s.go("GET", path)  # 1: -> /login
    _, _, page = await s.go("GET", h["location"])  # 2: the log-in page
    form = {**hidden(page), "email": email, "password": PASSWORD}
    code, h, _ = await s.go("POST", "/login", form)  # 3: log in -> back to authorize
    _, _, consent = await s.go("GET", h["location"])  # 4: the consent page
    code, h, _ = await s.go("POST", "/auth/authorize", {**hidden(consent), "decision": "allow"})
    tokens = await exchange(s, code_of(h["location"]), verifier)  # 6
    await read(s, tokens["access_token"])  # 7
    return time.perf_counter() - t0


async def returning(s: Session) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    path, verifier = authorize_path()
    _, h, _ = await s.go("GET", path)  # silent: straight back with a code
    tokens = await exchange(s, code_of(h["location"]), verifier)
    await read(s, tokens["access_token"])
    return time.perf_counter() - t0, tokens


async def main(reactor: Any, args: argparse.Namespace) -> None:
    engine = Engine(args.couchdb, args.erl_flags).start()
    daemon = Daemon("--couchdb", engine.url).start()
    if args.cpus == "pinned":
        pin(daemon.pid, "0")
        pin(engine.pid, "1")
    print(f"{engine.name} behind vibed, cpus {args.cpus}")
    v0, c0 = cpu_seconds(daemon.pid), cpu_seconds(engine.pid)
    try:
        await bench(reactor, daemon.url, args)
        print(
            f"CPU over the run: vibed {cpu_seconds(daemon.pid) - v0:.2f} s, "
            f"CouchDB {cpu_seconds(engine.pid) - c0:.2f} s"
        )
    finally:
        daemon.stop()
        engine.stop()


async def bench(reactor: Any, base: str, args: argparse.Namespace) -> None:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    n = max(3, int(10 * args.scale))
    emails = []
    for _ in range(n):
        email = f"bench-{uuid.uuid4().hex[:10]}@example.org"
        resp = await treq.post(
            base + "/auth/signup", json={"email": email, "password": PASSWORD}, pool=pool
        )
        await resp.content()
        emails.append(email)

    firsts, returns, sessions = [], [], []
    for email in emails:
        s = Session(base, pool)
        firsts.append(await first_visit(s, email))
        elapsed, _ = await returning(s)
        returns.append(elapsed)
        sessions.append(s)
    print(f"{'authorize -> first data read':<38} {'n':>4} {'p50 ms':>8} {'p99 ms':>8}")
    print(
        f"{'first visit (login + consent, 7 req)':<38} {n:>4} "
        f"{fmt_ms(percentile(firsts, 50))} {fmt_ms(percentile(firsts, 99))}"
    )
    print(
        f"{'returning (silent, 3 req)':<38} {n:>4} "
        f"{fmt_ms(percentile(returns, 50))} {fmt_ms(percentile(returns, 99))}"
    )

    # Throughput at the same concurrency: code exchanges, refreshes, password logins.
    count = max(16, int(160 * args.scale))
    concurrency = 8
    codes: list[tuple[Session, str, str]] = []
    for i in range(count):
        s = sessions[i % len(sessions)]
        path, verifier = authorize_path()
        _, h, _ = await s.go("GET", path)
        codes.append((s, code_of(h["location"]), verifier))
    refresh_tokens: list[str] = []

    async def do_exchange(i: int) -> None:
        s, code, verifier = codes[i]
        refresh_tokens.append((await exchange(s, code, verifier))["refresh_token"])

    async def do_refresh(i: int) -> None:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_tokens[i], "client_id": APP}
        await post_form(sessions[0], "/auth/token", form)

    async def do_login(i: int) -> None:
        resp = await treq.post(
            base + "/auth/login",
            json={"email": emails[i % len(emails)], "password": PASSWORD},
            pool=pool,
        )
        await resp.content()
        if resp.code != 200:
            raise RuntimeError(f"login: {resp.code}")

    print()
    print(
        f"{'endpoint (concurrency 8)':<38} {'n':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6}"
    )
    logins = max(8, count // 4)
    for label, op, total in (
        ("POST /auth/token authorization_code", do_exchange, count),
        ("POST /auth/token refresh_token", do_refresh, count),
        ("POST /auth/login (Argon2id)", do_login, logins),
    ):
        elapsed, lat, errors = await run_load(op, total, concurrency)
        print(
            f"{label:<38} {total:>4} {total / elapsed:8.1f} {fmt_ms(percentile(lat, 50))} "
            f"{fmt_ms(percentile(lat, 99))} {errors:>6}"
        )
    await pool.closeCachedConnections()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    add_engine_arguments(parser)
    ns = parser.parse_args()
    if ns.cpus == "both":
        parser.error("--cpus both: run shared and pinned one after the other")
    task.react(lambda reactor: ensureDeferred(main(reactor, ns)))
