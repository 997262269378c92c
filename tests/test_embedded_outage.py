"""The self-hoster's worst minute: the embedded CouchDB server is SIGKILLed while an app
writes through the data API and a socket watches. The supervisor restarts it; every write the
API acknowledged reaches the socket exactly once; vibed itself is never restarted."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest_twisted
from harness import Vibed, connect_realtime, make_config
from twisted.internet import reactor
from twisted.internet.task import deferLater

from vibed.embedded import EmbeddedCouch


@pytest_twisted.ensureDeferred
async def test_embedded_server_killed_while_writing(tmp_path: Path) -> None:
    """Writes go through POST/PUT /data/notes; midway the embedded server is killed with
    SIGKILL. Writes answered 503 are retried by the app with the same id (PUT) until
    acknowledged; afterwards the socket has seen each acknowledged write exactly once."""
    embedded = EmbeddedCouch(tmp_path / "couchdb", reactor=reactor)
    embedded.startService()
    v: Vibed | None = None
    try:
        await embedded.whenReady()
        v = await Vibed(make_config(tmp_path, embedded.url, couch_timeout="2")).start()
        signup = await v.signup(f"kill-{uuid.uuid4().hex[:8]}@example.org")
        assert signup.code == 201
        token = signup.json()["accessToken"]
        client = await connect_realtime(v, token)
        client.send({"type": "subscribe", "collection": "notes"})
        assert (await client.next_of("subscribed"))["collection"] == "notes"

        acknowledged: list[str] = []
        statuses: set[int] = set()

        async def write(i: int) -> None:
            doc_id = f"n{i:03d}"
            for _attempt in range(200):
                assert v is not None
                resp = await v.request("PUT", f"/data/notes/{doc_id}", {"i": i}, token=token)
                statuses.add(resp.code)
                if resp.code in (200, 201):
                    acknowledged.append(doc_id)
                    return
                if resp.code == 409:  # committed before the kill; the answer was lost
                    acknowledged.append(doc_id)
                    return
                assert resp.code == 503, resp.content
                await deferLater(reactor, 0.1, lambda: None)
            raise AssertionError(f"write {doc_id} never acknowledged")

        for i in range(15):
            await write(i)
        restarted = embedded.whenRestarted()
        assert embedded.pid is not None
        os.kill(embedded.pid, signal.SIGKILL)
        for i in range(15, 30):
            await write(i)
        await restarted

        got = await client.changes(len(acknowledged), within=30)
        assert [c["id"] for c in got] == acknowledged
        assert len(set(acknowledged)) == 30
        assert not client.closed.called
        assert 503 in statuses, "the kill was expected to be visible as 503s"
        client.transport.loseConnection()
        await client.wait_closed()
    finally:
        if v is not None:
            await v.stop()
        await embedded.stopService()
