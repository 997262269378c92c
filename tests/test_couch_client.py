"""Integration tests of vibed.couch.client against real servers: PouchDB Server and Apache
CouchDB 3.5 (each test runs on both; see conftest.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import uuid4

import pytest
import pytest_twisted
from conftest import CouchProcess, free_port
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from vibed.couch import (
    CouchConflict,
    CouchDatabase,
    CouchNotFound,
    CouchServer,
    CouchUnavailable,
)

WAIT = 15.0  # upper bound for any wait; the happy path takes well under a second


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid4().hex}"


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate: Callable[[], bool], what: str, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.02)


@pytest_twisted.async_yield_fixture
async def server(couch_url: str) -> AsyncIterator[CouchServer]:
    couch = CouchServer.from_url(couch_url, reactor=reactor)
    yield couch
    await couch.close()


@pytest_twisted.async_yield_fixture
async def db(server: CouchServer) -> AsyncIterator[CouchDatabase]:
    database = server.database(unique())
    assert await database.create() is True
    yield database
    await server.delete_db(database.name)


@pytest_twisted.ensureDeferred
async def test_database_lifecycle_is_idempotent(server: CouchServer) -> None:
    """create/delete answer True then False; exists follows; names with $()+-/ work."""
    for name in [unique(), unique("t") + "_$(x)+y-z", unique("t") + "/sub"]:
        assert await server.db_exists(name) is False
        assert await server.create_db(name) is True
        assert await server.create_db(name) is False
        assert await server.db_exists(name) is True
        assert await server.database(name).exists() is True
        assert await server.delete_db(name) is True
        assert await server.delete_db(name) is False
        assert await server.db_exists(name) is False


@pytest_twisted.ensureDeferred
async def test_all_dbs_and_info(server: CouchServer) -> None:
    """all_dbs lists a created database; info() answers the welcome with a version."""
    name = unique()
    await server.create_db(name)
    try:
        assert name in await server.all_dbs()
        assert "version" in await server.info()
    finally:
        await server.delete_db(name)


@pytest_twisted.ensureDeferred
async def test_put_get_and_conflict_on_stale_rev(db: CouchDatabase) -> None:
    """put returns ok/id/rev; an update with a stale or no _rev raises CouchConflict."""
    first = await db.put({"_id": "notes:1", "text": "a"})
    assert first["ok"] is True and first["id"] == "notes:1"
    assert isinstance(first["rev"], str)
    doc = await db.get("notes:1")
    assert (doc["text"], doc["_rev"]) == ("a", first["rev"])
    second = await db.put({**doc, "text": "b"})
    assert second["rev"] != first["rev"]
    with pytest.raises(CouchConflict) as info:
        await db.put({**doc, "text": "stale"})
    assert info.value.status == 409
    with pytest.raises(CouchConflict):
        await db.put({"_id": "notes:1", "text": "no rev"})
    assert (await db.get("notes:1"))["text"] == "b"
    assert (await db.get("notes:1", rev=first["rev"]))["text"] == "a"


@pytest_twisted.ensureDeferred
async def test_post_assigns_an_id(db: CouchDatabase) -> None:
    """post of a doc without _id creates it under a server-chosen id."""
    result = await db.post({"n": 1})
    assert (await db.get(result["id"]))["n"] == 1


@pytest_twisted.ensureDeferred
async def test_delete_then_get_is_not_found(db: CouchDatabase) -> None:
    """delete removes the doc (get -> CouchNotFound); deleting with a stale rev conflicts."""
    rev1 = (await db.put({"_id": "x"}))["rev"]
    rev2 = (await db.put({"_id": "x", "_rev": rev1, "v": 2}))["rev"]
    with pytest.raises(CouchConflict):
        await db.delete("x", rev1)
    deleted = await db.delete("x", rev2)
    assert deleted["ok"] is True
    with pytest.raises(CouchNotFound):
        await db.get("x")


@pytest_twisted.ensureDeferred
async def test_missing_doc_and_missing_db_are_not_found(server: CouchServer) -> None:
    """get of a missing doc, or in a missing database, raises CouchNotFound (status 404)."""
    with pytest.raises(CouchNotFound) as info:
        await server.database(unique()).get("nope")
    assert info.value.status == 404
    name = unique()
    await server.create_db(name)
    try:
        with pytest.raises(CouchNotFound):
            await server.database(name).get("nope")
    finally:
        await server.delete_db(name)


AWKWARD_IDS = [
    "a/b",
    "a/../../_all_dbs",
    "q?x=1&y=2",
    "h#frag",
    "üñí ☃ 日本",
    "with space",
    "pct%2F%25",
    "plus+sign",
    "semi;colon:comma,",
    'quote"back\\slash',
    "_design/x/y?z",
    "_local/l#1",
]


@pytest_twisted.ensureDeferred
async def test_awkward_ids_round_trip(db: CouchDatabase) -> None:
    """Doc ids with / ? # % + unicode and spaces are stored and read back under that exact id."""
    revs = {}
    for docid in AWKWARD_IDS:
        result = await db.put({"_id": docid, "v": docid})
        assert result["id"] == docid
        revs[docid] = result["rev"]
    for docid in AWKWARD_IDS:
        doc = await db.get(docid)
        assert (doc["_id"], doc["v"]) == (docid, docid)
    plain = [i for i in AWKWARD_IDS if not i.startswith("_local/")]
    listed = await db.all_docs(keys=plain)
    assert [row["id"] for row in listed["rows"]] == plain
    for docid in plain:
        await db.delete(docid, revs[docid])
        with pytest.raises(CouchNotFound):
            await db.get(docid)


@pytest_twisted.ensureDeferred
async def test_bulk_docs_reports_per_doc_conflict(db: CouchDatabase) -> None:
    """bulk_docs returns one result per doc; a conflicting doc's error is returned, not raised."""
    await db.put({"_id": "b:1"})
    results = await db.bulk_docs([{"_id": "b:0"}, {"_id": "b:1", "v": "new"}, {"_id": "b:2"}])
    assert [r["id"] for r in results] == ["b:0", "b:1", "b:2"]
    assert results[0]["ok"] is True and results[2]["ok"] is True
    assert results[1]["error"] == "conflict"
    assert "v" not in await db.get("b:1")


@pytest_twisted.ensureDeferred
async def test_all_docs_key_range_and_keys(db: CouchDatabase) -> None:
    """A collection is the "a:" to "a:\\ufff0" range; limit/skip/descending/keys= work."""
    ids = ["a", "a:1", "a:2", "a:3", "a:z", "a;", "b:1", "notes:1"]
    await db.bulk_docs([{"_id": i, "n": n} for n, i in enumerate(ids)])
    rng = await db.all_docs(startkey="a:", endkey="a:\ufff0", include_docs=True)
    assert [r["id"] for r in rng["rows"]] == ["a:1", "a:2", "a:3", "a:z"]
    assert [r["doc"]["n"] for r in rng["rows"]] == [1, 2, 3, 4]
    page = await db.all_docs(startkey="a:", endkey="a:\ufff0", limit=2, skip=1)
    assert [r["id"] for r in page["rows"]] == ["a:2", "a:3"]
    assert "doc" not in page["rows"][0]
    back = await db.all_docs(startkey="a:\ufff0", endkey="a:", descending=True)
    assert [r["id"] for r in back["rows"]] == ["a:z", "a:3", "a:2", "a:1"]
    excl = await db.all_docs(startkey="a:1", endkey="a:3", inclusive_end=False)
    assert [r["id"] for r in excl["rows"]] == ["a:1", "a:2"]
    picked = await db.all_docs(keys=["b:1", "missing", "a:2"], include_docs=True)
    rows = picked["rows"]
    assert [r.get("id") for r in rows] == ["b:1", None, "a:2"]
    assert rows[1]["error"] == "not_found" and rows[2]["doc"]["n"] == 2


@pytest_twisted.ensureDeferred
async def test_find_pages_through_three_pages(db: CouchDatabase) -> None:
    """find with limit 3 over 7 matches: pages of 3, 3, 1; bookmark None only on the last."""
    await db.create_index(["n"], name="byN", ddoc="q")
    docs = [{"_id": f"c:{n}", "n": n} for n in range(7)] + [{"_id": "other", "n": -1}]
    await db.bulk_docs(docs)
    selector = {"n": {"$gte": 0}}
    seen: list[int] = []
    bookmark: str | None = None
    sizes = []
    for _ in range(5):
        page = await db.find(selector, sort=[{"n": "asc"}], limit=3, bookmark=bookmark)
        sizes.append(len(page.docs))
        seen.extend(d["n"] for d in page.docs)
        bookmark = page.bookmark
        if bookmark is None:
            break
    assert sizes == [3, 3, 1]
    assert seen == list(range(7))
    exact = await db.find(selector, sort=[{"n": "asc"}], limit=7, fields=["_id"])
    assert exact.bookmark is not None and set(exact.docs[0]) == {"_id"}
    after = await db.find(selector, sort=[{"n": "asc"}], limit=7, bookmark=exact.bookmark)
    assert (after.docs, after.bookmark) == ([], None)


@pytest_twisted.ensureDeferred
async def test_create_index_is_idempotent(db: CouchDatabase) -> None:
    """create_index twice with the same definition: created, then exists; it can be used."""
    first = await db.create_index(["email"], name="byEmail", ddoc="identities")
    second = await db.create_index(["email"], name="byEmail", ddoc="identities")
    assert (first["result"], second["result"]) == ("created", "exists")
    await db.put({"_id": "idn:1", "email": "a@example.com"})
    found = await db.find({"email": "a@example.com"}, use_index=["identities", "byEmail"])
    assert [d["_id"] for d in found.docs] == ["idn:1"]
    assert found.bookmark is None


@pytest_twisted.ensureDeferred
async def test_changes_normal_feed_has_string_seqs(db: CouchDatabase) -> None:
    """changes() lists writes in order with str seq/last_seq; since= resumes after a seq."""
    for i in range(3):
        await db.put({"_id": f"d{i}"})
    everything = await db.changes(include_docs=True)
    rows = everything["results"]
    assert [r["id"] for r in rows] == ["d0", "d1", "d2"]
    assert all(isinstance(r["seq"], str) for r in rows)
    assert isinstance(everything["last_seq"], str)
    assert rows[0]["doc"]["_id"] == "d0"
    rest = await db.changes(since=rows[0]["seq"])
    assert [r["id"] for r in rest["results"]] == ["d1", "d2"]
    one = await db.changes(limit=1)
    assert [r["id"] for r in one["results"]] == ["d0"]
    assert isinstance((await db.info())["update_seq"], str)


@pytest_twisted.ensureDeferred
async def test_what_the_engines_do_differently_is_detected(
    db: CouchDatabase, couch_engine: str
) -> None:
    """The differences the client detects rather than assumes, seen on the engine itself:
    Apache CouchDB pages ``_find`` with its own bookmarks and has opaque ``N-...`` seqs;
    PouchDB Server sends no bookmark (the client synthesises one) and integer seqs. Either
    way the caller gets a bookmark that pages on and string seqs that resume."""
    await db.bulk_docs([{"_id": f"k{i}", "n": i} for i in range(4)])
    page = await db.find({"n": {"$gte": 0}}, limit=2)
    assert page.bookmark is not None
    synthesised = page.bookmark.startswith("vb1.")
    rest = await db.find({"n": {"$gte": 0}}, limit=2, bookmark=page.bookmark)
    assert sorted(d["n"] for d in page.docs + rest.docs) == [0, 1, 2, 3]
    seq = (await db.info())["update_seq"]
    assert isinstance(seq, str)
    if couch_engine == "couchdb":
        assert not synthesised, "CouchDB's own bookmark should be passed through"
        assert not seq.isdigit() and seq.split("-", 1)[0].isdigit()
    else:
        assert synthesised, "PouchDB Server sends no bookmark: the client makes one"
        assert seq.isdigit()
    resumed = await db.changes(since=seq)
    assert resumed["results"] == []


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_unavailable_quickly() -> None:
    """A port nothing listens on: CouchUnavailable with status 0 within a second."""
    couch = CouchServer.from_url(f"http://127.0.0.1:{free_port()}/", reactor=reactor)
    started = time.monotonic()
    with pytest.raises(CouchUnavailable) as info:
        await couch.database("x").get("y")
    assert info.value.status == 0
    assert time.monotonic() - started < 1.0
    await couch.close()


@pytest_twisted.ensureDeferred
async def test_continuous_feed_delivers_writes_in_order(db: CouchDatabase) -> None:
    """The continuous feed calls on_change once per write, in order, seq as str; none after stop."""
    rows: list[dict[str, Any]] = []
    since = (await db.info())["update_seq"]
    feed = db.changes_feed(rows.append, since=since, heartbeat_ms=500)
    feed.start()
    try:
        ids = [f"f:{i}" for i in range(8)]
        for docid in ids:
            await db.put({"_id": docid})
        await wait_for(lambda: len(rows) >= len(ids), "8 changes")
        assert [r["id"] for r in rows] == ids
        assert all(isinstance(r["seq"], str) and r["doc"]["_id"] == r["id"] for r in rows)
        assert feed.last_seq == rows[-1]["seq"]
    finally:
        await feed.stop()
    await db.put({"_id": "after-stop"})
    await sleep(0.2)
    assert [r["id"] for r in rows] == ids


@pytest_twisted.ensureDeferred
async def test_continuous_feed_since_now_sees_only_new_writes(db: CouchDatabase) -> None:
    """since='now' (the default) is pinned at start: only later writes are delivered."""
    await db.put({"_id": "old"})
    rows: list[dict[str, Any]] = []
    connected: list[bool] = []
    feed = db.changes_feed(
        rows.append,
        include_docs=False,
        heartbeat_ms=300,
        on_connected=lambda: connected.append(True),
    )
    feed.start()
    try:
        await wait_for(lambda: feed.last_seq != "now", "since=now to be pinned")
        await db.put({"_id": "new"})
        await wait_for(lambda: len(rows) >= 1, "the new change")
        await sleep(0.1)
        assert [r["id"] for r in rows] == ["new"]
        assert "doc" not in rows[0]
        assert connected == [True]
    finally:
        await feed.stop()


@pytest_twisted.ensureDeferred
async def test_continuous_feed_survives_server_restart(own_couch: CouchProcess) -> None:
    """Server killed mid-stream during writes, then restarted: each change delivered once."""
    couch = CouchServer.from_url(own_couch.url, reactor=reactor, timeout=2.0)
    db = couch.database(unique())
    await db.create()
    since = (await db.info())["update_seq"]
    delivered: list[str] = []
    connections: list[float] = []
    feed = db.changes_feed(
        lambda row: delivered.append(row["id"]),
        since=since,
        heartbeat_ms=1000,
        on_connected=lambda: connections.append(time.monotonic()),
    )
    attempted: list[str] = []
    acknowledged: list[str] = []

    async def write(docid: str) -> None:
        attempted.append(docid)
        try:
            await db.put({"_id": docid})
        except CouchUnavailable:
            return
        acknowledged.append(docid)

    writing = True

    async def keep_writing() -> None:
        n = 0
        while writing:
            await write(f"during:{n}")
            n += 1
            await sleep(0.01)

    feed.start()
    try:
        for i in range(5):
            await write(f"before:{i}")
        await wait_for(lambda: len(delivered) >= 5, "changes before the kill")
        writer = Deferred.fromCoroutine(keep_writing())
        await sleep(0.2)
        own_couch.stop()  # SIGKILL while writes are in flight
        await sleep(0.3)
        await deferToThread(own_couch.start)
        await sleep(0.2)
        writing = False
        await writer
        for i in range(5):
            await write(f"after:{i}")
        await wait_for(
            lambda: set(acknowledged) <= set(delivered), "every acknowledged write", 20.0
        )
        await sleep(0.3)  # room for a duplicate to show up
    finally:
        await feed.stop()
        await couch.close()
    assert len(connections) >= 2, "the feed never reconnected"
    assert any(d.startswith("during:") for d in acknowledged)
    assert all(f"after:{i}" in acknowledged for i in range(5))
    assert len(delivered) == len(set(delivered)), "a change was delivered twice"
    assert set(delivered) <= set(attempted)
    assert set(acknowledged) <= set(delivered)
