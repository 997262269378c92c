"""An in-process vibed on a real TCP port against a real CouchDB-protocol server, for tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import reactor

from vibed.bootstrap import BootstrapService, bootstrap
from vibed.config import Config
from vibed.couch import CouchServer
from vibed.cpu import CryptoPool
from vibed.service import Components, build


class FakeClock:
    """Wall time plus an offset the test moves forward."""

    def __init__(self) -> None:
        import time

        self._time = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self._time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def make_config(tmp_path: Path, couch_url: str, **overrides: Any) -> Config:
    from vibed.config import OPTIONS

    raw: dict[str, str | None] = {name: default for name, default, _ in OPTIONS}
    raw |= {
        "port": "tcp:0:interface=127.0.0.1",
        "couchdb": couch_url,
        "data-dir": str(tmp_path / "data"),
        "public-url": "http://vibe.test",
        "jwt-key-file": None,
        "crypto-threads": "2",
        "trusted-proxies": "",
        "pouchdb-server": None,
        "couch-timeout": "10",
    }
    # Tests sign up many identities from 127.0.0.1; tests of these limits set their own.
    overrides.setdefault("signup_limit_per_address", 1_000_000)
    overrides.setdefault("challenge_limit_per_address", 1_000_000)
    for key in list(overrides):
        if key.replace("_", "-") in raw:
            raw[key.replace("_", "-")] = overrides.pop(key)
    config = Config.validate(raw)
    return attrs.evolve(config, **overrides)


class Vibed:
    """A running vibed API; ``url`` is its base URL."""

    def __init__(self, config: Config, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.clock = clock or FakeClock()
        self.couch = CouchServer.from_url(config.couchdb, reactor=reactor)
        self.pool = CryptoPool(config.crypto_threads, reactor)
        self.bootstrap = BootstrapService(self.couch, reactor)
        self.parts: Components = build(
            config, reactor, self.couch, self.pool, self.bootstrap, clock=self.clock
        )
        self.port: Any = None
        self.url = ""

    async def start(self) -> Vibed:
        self.pool.startService()
        await bootstrap(self.couch)
        self.bootstrap.ready = True
        self.bootstrap.last_error = None
        for service in self.parts.services:
            service.startService()
        self.port = reactor.listenTCP(0, self.parts.site(), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        for service in reversed(self.parts.services):
            if service.running:
                stopped = service.stopService()
                if stopped is not None:
                    await stopped
        await self.pool.stopService()
        await self.couch.close()

    # -- client helpers --------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        cookie: str | None = None,
    ) -> Response:
        hdrs = {"Content-Type": "application/json"}
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        if cookie:
            hdrs["Cookie"] = f"vibe_refresh={cookie}"
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        resp = await treq.request(
            method, self.url + path, data=data, headers=hdrs, persistent=False
        )
        content = await resp.content()
        return Response(resp.code, resp.headers, content)

    async def signup(self, email: str, password: str = "correct horse battery") -> Response:
        return await self.request("POST", "/auth/signup", {"email": email, "password": password})


@attrs.define
class Response:
    code: int
    headers: Any
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def headers_all(self, name: str) -> list[str]:
        return list(self.headers.getRawHeaders(name) or [])

    @property
    def refresh_cookie(self) -> str | None:
        for value in self.headers_all("set-cookie"):
            if value.startswith("vibe_refresh="):
                return value.split(";", 1)[0].split("=", 1)[1]
        return None
