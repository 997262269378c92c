"""Expired auth records are purged by a timer that survives its own failures."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from harness import FakeClock, Vibed, make_config
from twisted.internet.task import Clock

from vibed.bootstrap import PurgeService
from vibed.couch import CouchNotFound


@pytest_twisted.async_yield_fixture
async def vibed(tmp_path: Path, couch_url: str) -> AsyncIterator[Vibed]:
    v = await Vibed(make_config(tmp_path, couch_url)).start()
    yield v
    await v.stop()


@pytest_twisted.ensureDeferred
async def test_expired_nonces_refresh_tokens_and_counts_are_purged(vibed: Vibed) -> None:
    """Unused nonces past their expiry, refresh tokens past theirs and rate-limit events out
    of the window are deleted; live ones stay."""
    parts = vibed.parts
    clock = vibed.clock
    assert isinstance(clock, FakeClock)
    old_nonce = await parts.nonces.issue()
    old_rotation = await parts.refresh.create_family(f"idn:{uuid.uuid4()}")
    key = f"test:{uuid.uuid4()}"
    await parts.limiter.hit(key)
    clock.advance(parts.refresh.ttl + 1)
    live_nonce = await parts.nonces.issue()
    live_rotation = await parts.refresh.create_family(f"idn:{uuid.uuid4()}")

    assert await parts.nonces.purge() >= 1
    assert await parts.refresh.purge() >= 1
    assert await parts.limiter.purge(older_than=3600) >= 1
    assert await parts.limiter.retry_after(key, 1, 10**9) is None

    nonces_db = parts.nonces.db
    try:
        await nonces_db.get(f"n:{old_nonce.nonce}")
        raise AssertionError("expired nonce still there")
    except CouchNotFound:
        pass
    assert (await nonces_db.get(f"n:{live_nonce.nonce}"))["expiresAt"] == live_nonce.expires_at
    assert await parts.nonces.consume(live_nonce.nonce) is not None
    assert (await parts.refresh.rotate(live_rotation.token)).idn == live_rotation.idn
    try:
        await parts.refresh.rotate(old_rotation.token)
        raise AssertionError("expired refresh token still accepted")
    except Exception as e:  # RefreshRejected("unknown") once purged
        assert "unknown" in str(e)


def test_purge_timer_survives_a_failing_job() -> None:
    """A job that raises is logged, and the next round still runs every job."""
    clock = Clock()
    ran: list[str] = []

    async def broken() -> int:
        ran.append("broken")
        raise RuntimeError("boom")

    async def fine() -> int:
        ran.append("fine")
        return 0

    service = PurgeService([broken, fine], interval=10, reactor=clock)
    service.startService()
    errors: list[Any] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(errors.append)
    try:
        clock.advance(10)
        clock.advance(10)
    finally:
        globalLogPublisher.removeObserver(errors.append)
        service.stopService()
    assert ran == ["broken", "fine", "broken", "fine"]
    assert any(e.get("log_failure") for e in errors)
