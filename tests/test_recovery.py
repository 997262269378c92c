"""CouchDB failing under a running vibed: clear 503s while it is down, and service resumes by
itself when it is back, with nothing lost and no restart of vibed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest_twisted
from conftest import CouchProcess
from harness import Vibed, make_config

from vibed.bootstrap import bootstrap


@pytest_twisted.ensureDeferred
async def test_couchdb_restart_gives_503_then_recovers(
    tmp_path: Path, own_couch: CouchProcess
) -> None:
    """With CouchDB stopped, signup, login, /readyz and the data API answer 503 problem+json
    (never 500); once it is back, the same vibed serves them again, and what was committed
    before the outage is still there."""
    v = await Vibed(make_config(tmp_path, own_couch.url, couch_timeout="3")).start()
    try:
        address = f"rec-{uuid.uuid4().hex[:10]}@example.org"
        signup = await v.signup(address)
        assert signup.code == 201
        token = signup.json()["accessToken"]
        made = await v.request("POST", "/data/notes", {"text": "before"}, token=token)
        assert made.code == 201

        own_couch.stop()
        for method, path, body in [
            ("POST", "/auth/signup", {"email": f"x{address}", "password": "long enough pw"}),
            ("POST", "/auth/login", {"email": address, "password": "correct horse battery"}),
            ("GET", "/readyz", None),
            ("GET", "/data/notes", None),
            ("POST", "/data/notes", {"text": "during"}),
        ]:
            resp = await v.request(method, path, body, token=token)
            assert resp.code == 503, (path, resp.content)
            assert resp.header("content-type") == "application/problem+json"

        own_couch.start()
        assert (await v.request("GET", "/readyz")).code == 200
        login = await v.request(
            "POST", "/auth/login", {"email": address, "password": "correct horse battery"}
        )
        assert login.code == 200
        listed = await v.request("GET", "/data/notes", token=token)
        assert listed.code == 200
        assert [d["text"] for d in listed.json()["docs"]] == ["before"]
        again = await v.request("POST", "/data/notes", {"text": "after"}, token=token)
        assert again.code == 201
        await bootstrap(v.couch)  # still idempotent after the restart
    finally:
        await v.stop()
