"""The data API end to end: a real vibed on a TCP port against a real PouchDB Server.

The tests an attacker and an unlucky operator would run: one identity never reaches another's
documents, a collection never reaches another collection, scopes hold, revisions are checked,
paging returns each document once, and bad input of every kind is a 4xx problem, never a 500.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import attrs
import pytest
import pytest_twisted
from harness import Response, Vibed, make_config
from twisted.internet.defer import DeferredList, ensureDeferred

from vibed.couch import CouchServer
from vibed.couch.client import CouchDatabase
from vibed.layout import INDEX_DDOC_PREFIX, TAG
from vibed.naming import identity_db


@attrs.define
class Person:
    """An identity and an access token with every data scope."""

    idn: str
    token: str


@pytest_twisted.async_yield_fixture(scope="module")
async def vibed(tmp_path_factory: pytest.TempPathFactory, couch_url: str) -> AsyncIterator[Vibed]:
    v = Vibed(make_config(tmp_path_factory.mktemp("data"), couch_url))
    await v.start()
    yield v
    await v.stop()


async def person(v: Vibed) -> Person:
    resp = await v.signup(f"data-{uuid.uuid4().hex[:12]}@example.org")
    assert resp.code == 201, resp.content
    body = resp.json()
    return Person(body["identity"]["id"], body["accessToken"])


@pytest_twisted.async_yield_fixture(scope="module")
async def alice(vibed: Vibed) -> AsyncIterator[Person]:
    yield await person(vibed)


@pytest_twisted.async_yield_fixture(scope="module")
async def bob(vibed: Vibed) -> AsyncIterator[Person]:
    yield await person(vibed)


def token(v: Vibed, who: Person, *scopes: str) -> str:
    return v.parts.issuer.issue_access(who.idn, list(scopes))[0]


def coll() -> str:
    """A fresh collection name, so tests sharing an identity never see each other's docs."""
    return f"c{uuid.uuid4().hex[:10]}"


def url(collection: str, doc_id: str | None = None, **params: Any) -> str:
    path = f"/data/{collection}" + (f"/{doc_id}" if doc_id is not None else "")
    if params:
        encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        path += "?" + urlencode(encoded)
    return path


def assert_problem(resp: Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert resp.code == status, resp.content
    assert resp.header("content-type") == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["title"]
    if slug is not None:
        assert body["type"].endswith("/" + slug), body
    assert "Traceback" not in resp.content.decode()
    return body


async def create(v: Vibed, who: Person, collection: str, body: dict[str, Any]) -> str:
    resp = await v.request("POST", url(collection), body, token=who.token)
    assert resp.code == 201, resp.content
    doc_id: str = resp.json()["id"]
    return doc_id


async def put(v: Vibed, who: Person, collection: str, doc_id: str, body: dict[str, Any]) -> str:
    resp = await v.request("PUT", url(collection, doc_id), body, token=who.token)
    assert resp.code in (200, 201), resp.content
    rev: str = resp.json()["rev"]
    return rev


async def all_pages(
    v: Vibed, tok: str, collection: str, **params: Any
) -> tuple[list[dict[str, Any]], int]:
    """Every doc of a listing or query, following bookmarks; and how many pages it took."""
    docs: list[dict[str, Any]] = []
    bookmark: str | None = None
    pages = 0
    while True:
        extra = dict(params)
        if bookmark is not None:
            extra["bookmark"] = bookmark
        resp = await v.request("GET", url(collection, **extra), token=tok)
        assert resp.code == 200, resp.content
        page = resp.json()
        pages += 1
        docs += page["docs"]
        bookmark = page["bookmark"]
        if bookmark is None:
            return docs, pages
        assert pages < 50


# -- documents ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_crud_round_trip(vibed: Vibed, alice: Person, couch_url: str) -> None:
    """POST creates with a server id (201, Location, ETag); GET returns the app's view (its own
    _id, _rev, no storage tag); PUT with the rev updates; DELETE with the rev removes it and a
    GET is then 404. In CouchDB the doc is <collection>:<id>, tagged."""
    c = coll()
    resp = await vibed.request("POST", url(c), {"title": "hello", "n": 1}, token=alice.token)
    assert resp.code == 201
    created = resp.json()
    doc_id, rev = created["id"], created["rev"]
    assert len(doc_id) == 32 and int(doc_id, 16) >= 0
    assert resp.header("location") == f"/data/{c}/{doc_id}"
    assert resp.header("etag") == f'"{rev}"'

    got = await vibed.request("GET", url(c, doc_id), token=alice.token)
    assert got.code == 200
    assert got.json() == {"_id": doc_id, "_rev": rev, "title": "hello", "n": 1}
    assert got.header("etag") == f'"{rev}"'

    couch = CouchServer.from_url(couch_url)
    try:
        stored = await couch.database(identity_db(alice.idn, "data")).get(f"{c}:{doc_id}")
    finally:
        await couch.close()
    assert stored[TAG] == c

    upd = await vibed.request(
        "PUT", url(c, doc_id), {"_rev": rev, "title": "changed"}, token=alice.token
    )
    assert upd.code == 200, upd.content
    rev2 = upd.json()["rev"]
    assert rev2 != rev and upd.json()["id"] == doc_id
    got = (await vibed.request("GET", url(c, doc_id), token=alice.token)).json()
    assert got == {"_id": doc_id, "_rev": rev2, "title": "changed"}

    gone = await vibed.request("DELETE", url(c, doc_id, rev=rev2), token=alice.token)
    assert gone.code == 200, gone.content
    assert gone.json()["deleted"] is True and gone.json()["id"] == doc_id
    assert_problem(await vibed.request("GET", url(c, doc_id), token=alice.token), 404)
    listing = await vibed.request("GET", url(c), token=alice.token)
    assert listing.json() == {"docs": [], "bookmark": None}


@pytest_twisted.ensureDeferred
async def test_put_with_client_id_and_revisions(vibed: Vibed, alice: Person) -> None:
    """PUT without a rev creates (201) and, once the doc exists, is 409; updates take the rev in
    the body or If-Match; a stale rev is 409 on PUT and DELETE; DELETE of a missing doc is 404;
    two different revs at once are 400; the body's _id must match the URL's."""
    c, doc_id = coll(), "my-note.1"
    first = await vibed.request("PUT", url(c, doc_id), {"_id": doc_id, "a": 1}, token=alice.token)
    assert first.code == 201, first.content
    rev1 = first.json()["rev"]
    assert_problem(
        await vibed.request("PUT", url(c, doc_id), {"a": 2}, token=alice.token), 409, "conflict"
    )
    by_header = await vibed.request(
        "PUT", url(c, doc_id), {"a": 2}, token=alice.token, headers={"If-Match": f'"{rev1}"'}
    )
    assert by_header.code == 200, by_header.content
    rev2 = by_header.json()["rev"]
    assert_problem(
        await vibed.request("PUT", url(c, doc_id), {"_rev": rev1, "a": 3}, token=alice.token),
        409,
    )
    assert_problem(
        await vibed.request(
            "PUT", url(c, doc_id), {"a": 3}, token=alice.token, headers={"If-Match": rev1}
        ),
        409,
    )
    assert_problem(
        await vibed.request(
            "PUT",
            url(c, doc_id),
            {"_rev": rev2, "a": 3},
            token=alice.token,
            headers={"If-Match": f'"{rev1}"'},
        ),
        400,
    )
    assert_problem(
        await vibed.request("PUT", url(c, doc_id), {"_id": "other", "a": 3}, token=alice.token),
        400,
        "id-mismatch",
    )
    assert_problem(await vibed.request("DELETE", url(c, doc_id, rev=rev1), token=alice.token), 409)
    assert_problem(await vibed.request("DELETE", url(c, doc_id), token=alice.token), 400)
    assert (await vibed.request("GET", url(c, doc_id), token=alice.token)).json()["a"] == 2
    deleted = await vibed.request(
        "DELETE", url(c, doc_id), token=alice.token, headers={"If-Match": f'"{rev2}"'}
    )
    assert deleted.code == 200, deleted.content
    assert_problem(
        await vibed.request("DELETE", url(c, "never-was", rev=rev2), token=alice.token), 404
    )
    assert_problem(
        await vibed.request("DELETE", url(c, doc_id, rev=deleted.json()["rev"]), token=alice.token),
        404,
    )
    # A deleted id can be used again.
    again = await vibed.request("PUT", url(c, doc_id), {"a": 9}, token=alice.token)
    assert again.code == 201, again.content


@pytest_twisted.ensureDeferred
async def test_concurrent_updates_with_the_same_rev_exactly_one_wins(
    vibed: Vibed, alice: Person
) -> None:
    """Five updates carrying the same rev at once: one 200, four 409, and the stored doc is the
    winner's. Five creates of one client id at once: one 201, four 409. Five deletes: one."""
    c = coll()
    rev = await put(vibed, alice, c, "shared", {"v": 0})

    async def update(i: int) -> Response:
        return await vibed.request(
            "PUT", url(c, "shared"), {"_rev": rev, "v": i}, token=alice.token
        )

    results = await DeferredList([ensureDeferred(update(i)) for i in range(1, 6)])
    codes = sorted(r.code for _ok, r in results)
    assert codes == [200, 409, 409, 409, 409]
    winner = next(i for i, (_ok, r) in enumerate(results, 1) if r.code == 200)
    doc = (await vibed.request("GET", url(c, "shared"), token=alice.token)).json()
    assert doc["v"] == winner

    async def create_same(i: int) -> Response:
        return await vibed.request("PUT", url(c, "once"), {"v": i}, token=alice.token)

    results = await DeferredList([ensureDeferred(create_same(i)) for i in range(5)])
    assert sorted(r.code for _ok, r in results) == [201, 409, 409, 409, 409]

    current = doc["_rev"]

    async def delete(_: int) -> Response:
        return await vibed.request("DELETE", url(c, "shared", rev=current), token=alice.token)

    results = await DeferredList([ensureDeferred(delete(i)) for i in range(5)])
    codes = sorted(r.code for _ok, r in results)
    assert codes.count(200) == 1 and all(code in (404, 409) for code in codes[1:]), codes


# -- isolation ----------------------------------------------------------------------------

HOSTILE_SELECTORS: list[Any] = [
    {},
    {"_id": {"$gt": ""}},
    {"_id": {"$lt": "\uffff"}},
    {"_id": {"$ne": "x"}},
    {"_id": {"$exists": True}},
    {"$or": [{"_id": {"$gt": ""}}, {"secret": {"$exists": True}}]},
    {"$or": [{"_id": {"$gt": "a"}}, {"_id": {"$lt": "a"}}]},
    {"$nor": [{"_id": "nothing"}]},
    {"$not": {"_id": "nothing"}},
    {"$and": [{"_id": {"$gte": ""}}, {"_id": {"$lte": "\uffff"}}]},
    {"secret": {"$exists": True}},
    {"_rev": {"$exists": True}},
]

REFUSED_SELECTORS: list[Any] = [
    {TAG: "notes"},
    {TAG: {"$ne": "x"}},
    {"$or": [{TAG: {"$gt": None}}, {"_id": {"$gt": ""}}]},
    {"_id": {"$regex": ".*"}},
    {"_id": {"$regex": "^"}},
    {"_id": {"$gt": 0}},
    {"_id": {"$gt": None}},
    {"_id": {"$in": [1]}},
    {"_id.x": 1},
    {"_deleted": True},
    {"_conflicts": {"$exists": True}},
    {"$where": "1"},
    {"$text": "x"},
    {"secret": {"$keyMapMatch": {"a": 1}}},
]


@pytest_twisted.ensureDeferred
async def test_identities_never_reach_each_other(vibed: Vibed, alice: Person, bob: Person) -> None:
    """Bob's token never reads, lists, queries, updates or deletes Alice's documents: not by
    id, not by any selector (on _id, $or tricks, the storage tag, regex on _id), not with her
    bookmark; a PUT of her id writes Bob's own document and leaves hers untouched."""
    c = "notes"
    a_id = await create(vibed, alice, c, {"secret": "alice's", "n": 1})
    a_rev = (await vibed.request("GET", url(c, a_id), token=alice.token)).json()["_rev"]
    for i in range(30):
        await create(vibed, alice, c, {"secret": f"alice {i}"})
    await create(vibed, alice, "todos", {"secret": "alice todo"})

    assert_problem(await vibed.request("GET", url(c, a_id), token=bob.token), 404)
    listing = await vibed.request("GET", url(c), token=bob.token)
    assert "alice" not in listing.content.decode()
    for selector in HOSTILE_SELECTORS:
        resp = await vibed.request("GET", url(c, q=selector, limit=1000), token=bob.token)
        assert resp.code == 200, (selector, resp.content)
        assert "alice" not in resp.content.decode(), selector
    for selector in [*HOSTILE_SELECTORS[1:], {"_id": a_id}, {"_id": {"$in": [a_id]}}]:
        # And Alice's own query of these reaches only her own collection.
        resp = await vibed.request("GET", url("todos", q=selector), token=alice.token)
        assert "alice's" not in resp.content.decode()
    for selector in REFUSED_SELECTORS:
        assert_problem(await vibed.request("GET", url(c, q=selector), token=bob.token), 400)

    # Alice's bookmark is not Bob's.
    page = (await vibed.request("GET", url(c, limit=5), token=alice.token)).json()
    assert page["bookmark"]
    stolen = await vibed.request("GET", url(c, limit=5, bookmark=page["bookmark"]), token=bob.token)
    assert_problem(stolen, 400, "bad-bookmark")

    assert_problem(await vibed.request("DELETE", url(c, a_id, rev=a_rev), token=bob.token), 404)
    assert_problem(
        await vibed.request("PUT", url(c, a_id), {"_rev": a_rev, "x": 1}, token=bob.token), 409
    )
    own = await vibed.request("PUT", url(c, a_id), {"bob": True}, token=bob.token)
    assert own.code == 201
    hers = (await vibed.request("GET", url(c, a_id), token=alice.token)).json()
    assert hers == {"_id": a_id, "_rev": a_rev, "secret": "alice's", "n": 1}
    assert (await vibed.request("GET", url(c, a_id), token=bob.token)).json()["bob"] is True
    # Index lists are per identity too.
    await vibed.request("POST", url(c, "_index"), {"fields": ["secret"]}, token=alice.token)
    bobs = (await vibed.request("GET", url(c, "_index"), token=bob.token)).json()
    assert bobs == {"indexes": []}


@pytest_twisted.ensureDeferred
async def test_a_query_never_leaves_its_collection(vibed: Vibed, alice: Person) -> None:
    """Within one identity, a query on one collection never returns another's documents, even
    with selectors on _id (which mean the app's ids: "abc", not "todos:abc"), $in of the other
    collection's ids, $or tricks, or ids made to look like storage ids; the tag is refused."""
    notes, todos = coll(), coll()
    note = await create(vibed, alice, notes, {"kind": "note"})
    todo_ids = [await create(vibed, alice, todos, {"kind": "todo"}) for _ in range(3)]
    await put(vibed, alice, todos, note, {"kind": "todo with the note's id"})
    selectors: list[Any] = [
        *HOSTILE_SELECTORS,
        {"_id": todo_ids[0]},
        {"_id": f"{todos}:{todo_ids[0]}"},
        {"_id": {"$in": todo_ids + [f"{todos}:{t}" for t in todo_ids]}},
        {"$or": [{"_id": todo_ids[1]}, {"kind": "todo"}]},
        {"kind": {"$regex": "^todo"}},
        {"_id": {"$gte": f"{todos}:", "$lte": f"{todos}:\ufff0"}},
    ]
    for selector in selectors:
        resp = await vibed.request("GET", url(notes, q=selector), token=alice.token)
        assert resp.code == 200, (selector, resp.content)
        assert "todo" not in resp.content.decode(), selector
    hit = await vibed.request("GET", url(notes, q={"_id": note}), token=alice.token)
    assert [d["_id"] for d in hit.json()["docs"]] == [note]
    both = await vibed.request("GET", url(todos, q={"_id": {"$in": todo_ids}}), token=alice.token)
    assert sorted(d["_id"] for d in both.json()["docs"]) == sorted(todo_ids)
    assert_problem(await vibed.request("GET", url(notes, todo_ids[0]), token=alice.token), 404)
    sorted_by_id = await vibed.request("GET", url(notes, sort=["_id"]), token=alice.token)
    assert [d["kind"] for d in sorted_by_id.json()["docs"]] == ["note"]


@pytest_twisted.ensureDeferred
async def test_a_field_query_is_served_by_the_declared_index(
    vibed: Vibed,
    alice: Person,
    couch_url: str,
    couch_engine: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A query on a field the app declared an index for (sorted or not) is answered from that
    index, not by reading the collection's whole key range: given exactly the ``_find`` vibed
    sent (captured on its way out), the engine's own ``_explain`` picks the collection's
    declared index (the one on ``[tag, field]``); on Apache CouchDB it reads the index from
    ``[collection, value]`` and ``execution_stats`` show that only the matching keys were
    examined. Another collection with the same field and its own index, and a second index
    of the collection, are there to be picked wrongly."""
    c, other = coll(), coll()
    for i in range(12):
        await create(vibed, alice, c, {"group": i % 3, "n": i})
        await create(vibed, alice, other, {"group": 1, "n": i})
    names = {}
    for collection, fields in ((c, ["group"]), (c, ["n"]), (other, ["group"])):
        made = await vibed.request(
            "POST", url(collection, "_index"), {"fields": fields}, token=alice.token
        )
        assert made.code == 201, made.content
        names[collection, fields[0]] = made.json()["name"]

    sent: list[dict[str, Any]] = []
    real_find = CouchDatabase.find

    async def find(self: CouchDatabase, selector: dict[str, Any], **kwargs: Any) -> Any:
        body = {"selector": selector, "limit": kwargs["limit"]}
        body.update({k: kwargs[k] for k in ("sort", "use_index") if kwargs.get(k) is not None})
        sent.append(body)
        return await real_find(self, selector, **kwargs)

    monkeypatch.setattr(CouchDatabase, "find", find)
    queries = [
        ({"q": {"group": 1}}, "group", [1, 4, 7, 10]),
        ({"q": {"group": 1}, "sort": ["n"]}, "n", [1, 4, 7, 10]),
    ]
    couch = CouchServer.from_url(couch_url)
    db = quote(identity_db(alice.idn, "data"), safe="")
    try:
        for params, field, expected in queries:
            resp = await vibed.request("GET", url(c, **params), token=alice.token)
            assert resp.code == 200, resp.content
            assert sorted(d["n"] for d in resp.json()["docs"]) == expected
            body = sent.pop()
            explain = await couch.request("POST", f"{db}/_explain", body=body)
            # The same fields declared in two collections make identical indexes (one on
            # disk): either design doc serves, the key range keeps to the collection.
            picked = explain["index"]
            assert picked["name"] == names[c, field], (params, picked)
            assert picked["ddoc"].startswith(f"_design/{INDEX_DDOC_PREFIX}"), picked
            columns = [next(iter(f)) if isinstance(f, dict) else f for f in picked["def"]["fields"]]
            assert columns == [TAG, field], picked
            if couch_engine != "couchdb":
                continue
            if field == "group":
                assert explain["mrargs"]["start_key"] == [c, 1], explain["mrargs"]
            else:
                assert explain["mrargs"]["start_key"] == [c], explain["mrargs"]
            found = await couch.request(
                "POST", f"{db}/_find", body={**body, "execution_stats": True}
            )
            examined = found["execution_stats"]["total_keys_examined"]
            # The whole collection (12) when sorting by n, only the 4 matches otherwise;
            # never the other collection's 12.
            assert examined == (4 if field == "group" else 12), found["execution_stats"]
    finally:
        await couch.close()


# -- scopes -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_scopes_are_enforced(vibed: Vibed, alice: Person) -> None:
    """A data:read:notes token reads notes (a doc, listings, queries, the index list) but
    writes nothing there (403) and touches nothing in todos (403); data:write:notes writes but
    does not read; a token without data scopes gets 403 everywhere, no token 401."""
    doc_id = await create(vibed, alice, "notes", {"title": "scoped"})
    rev = (await vibed.request("GET", url("notes", doc_id), token=alice.token)).json()["_rev"]
    await create(vibed, alice, "todos", {"title": "scoped todo"})
    reader = token(vibed, alice, "data:read:notes")
    writer = token(vibed, alice, "data:write:notes")
    nothing = token(vibed, alice, "blob:*", "data:read:notesx", "data:read:*")

    reads = [
        ("GET", url("notes", doc_id), None),
        ("GET", url("notes"), None),
        ("GET", url("notes", q={"title": "scoped"}), None),
        ("GET", url("notes", "_index"), None),
    ]
    writes = [
        ("POST", url("notes"), {"x": 1}),
        ("PUT", url("notes", doc_id), {"_rev": rev, "x": 1}),
        ("PUT", url("notes", "new-one"), {"x": 1}),
        ("DELETE", url("notes", doc_id, rev=rev), None),
        ("POST", url("notes", "_index"), {"fields": ["title"]}),
    ]
    for method, path, body in reads:
        assert (await vibed.request(method, path, body, token=reader)).code == 200, path
        other = path.replace("/data/notes", "/data/todos")
        assert_problem(await vibed.request(method, other, body, token=reader), 403)
        assert_problem(await vibed.request(method, path, body, token=writer), 403)
        assert_problem(await vibed.request(method, path, body, token=nothing), 403)
        assert_problem(await vibed.request(method, path, body), 401)
    for method, path, body in writes:
        resp = await vibed.request(method, path, body, token=reader)
        body_out = assert_problem(resp, 403, "insufficient-scope")
        assert "data:write:notes" in body_out["detail"]
        assert_problem(await vibed.request(method, path, body, token=nothing), 403)
    for method, path, body in writes:
        other = path.replace("/data/notes", "/data/todos")
        assert_problem(await vibed.request(method, other, body, token=writer), 403)
    assert (await vibed.request("GET", url("notes", doc_id), token=alice.token)).json()[
        "_rev"
    ] == rev
    made = await vibed.request("POST", url("notes"), {"by": "writer"}, token=writer)
    assert made.code == 201
    assert (await vibed.request("DELETE", url("notes", doc_id, rev=rev), token=writer)).code == 200


# -- paging, queries, sorting -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_paging_returns_every_document_once(vibed: Vibed, alice: Person) -> None:
    """60 documents, pages of 25: the plain listing (id order) and a q query both return each
    matching document exactly once across their pages, then bookmark null; documents of other
    collections and non-matching ones never appear. fields trims each document."""
    c, other = coll(), coll()
    ids = set()
    for i in range(60):
        ids.add(await create(vibed, alice, c, {"n": i, "even": i % 2 == 0, "deep": {"x": i}}))
    for i in range(5):
        await create(vibed, alice, other, {"n": i})
    docs, pages = await all_pages(vibed, alice.token, c, limit=25)
    assert pages == 3
    assert [d["_id"] for d in docs] == sorted(ids)
    docs, pages = await all_pages(vibed, alice.token, c, q={"n": {"$gte": 0}}, limit=25)
    assert sorted(d["_id"] for d in docs) == sorted(ids) and len(docs) == 60
    assert pages in (3, 4)  # a server may only learn it is done on an empty page
    evens, _ = await all_pages(vibed, alice.token, c, q={"even": True}, limit=7)
    assert sorted(d["n"] for d in evens) == list(range(0, 60, 2))
    trimmed, _ = await all_pages(vibed, alice.token, c, limit=25, fields="_id,deep.x")
    assert all(set(d) == {"_id", "deep"} and set(d["deep"]) == {"x"} for d in trimmed)
    trimmed, _ = await all_pages(
        vibed, alice.token, c, q={"n": {"$lt": 3}}, fields=json.dumps(["n"])
    )
    assert sorted(trimmed, key=lambda d: d["n"]) == [{"n": 0}, {"n": 1}, {"n": 2}]
    default = (await vibed.request("GET", url(c), token=alice.token)).json()
    assert len(default["docs"]) == 25 and default["bookmark"]
    # A bookmark of one query does not continue another.
    page = (await vibed.request("GET", url(c, q={"even": True}), token=alice.token)).json()
    other_query = url(c, q={"even": False}, bookmark=page["bookmark"])
    assert_problem(await vibed.request("GET", other_query, token=alice.token), 400, "bad-bookmark")
    assert_problem(
        await vibed.request("GET", url(c, bookmark=page["bookmark"]), token=alice.token), 400
    )
    assert_problem(
        await vibed.request("GET", url(other, bookmark=default["bookmark"]), token=alice.token),
        400,
    )


@pytest_twisted.ensureDeferred
async def test_sorting_needs_a_declared_index(vibed: Vibed, alice: Person) -> None:
    """Sorting on a field without an index is a 400 naming the missing index and how to declare
    it; after POST /data/<c>/_index it sorts both ways and pages; declaring it again says it
    exists; the index list shows it (for this collection only)."""
    c = coll()
    for i, title in enumerate(["pear", "apple", "fig", "kiwi", "date", "lime", "plum"]):
        await create(vibed, alice, c, {"title": title, "n": i})
    await create(vibed, alice, c, {"untitled": True})
    missing = await vibed.request("GET", url(c, sort=["title"]), token=alice.token)
    body = assert_problem(missing, 400, "no-usable-index")
    assert '["title"]' in body["detail"] and f"/data/{c}/_index" in body["detail"]
    assert body["missingIndex"] == {"collection": c, "fields": ["title"]}

    made = await vibed.request("POST", url(c, "_index"), {"fields": ["title"]}, token=alice.token)
    assert made.code == 201, made.content
    assert made.json()["fields"] == ["title"] and made.json()["result"] == "created"
    again = await vibed.request("POST", url(c, "_index"), {"fields": ["title"]}, token=alice.token)
    assert again.code == 200 and again.json()["result"] == "exists"
    listed = (await vibed.request("GET", url(c, "_index"), token=alice.token)).json()
    assert listed == {"indexes": [{"name": made.json()["name"], "fields": ["title"]}]}
    assert (await vibed.request("GET", url(coll(), "_index"), token=alice.token)).json() == {
        "indexes": []
    }

    up = await vibed.request("GET", url(c, sort=["title"]), token=alice.token)
    assert up.code == 200, up.content
    titles = sorted(["pear", "apple", "fig", "kiwi", "date", "lime", "plum"])
    assert [d["title"] for d in up.json()["docs"]] == titles
    down = await vibed.request("GET", url(c, sort=[{"title": "desc"}]), token=alice.token)
    assert [d["title"] for d in down.json()["docs"]] == titles[::-1]
    paged, _ = await all_pages(vibed, alice.token, c, sort=["title"], limit=3)
    assert [d["title"] for d in paged] == titles
    filtered = await vibed.request(
        "GET", url(c, sort=["title"], q={"n": {"$gte": 3}}), token=alice.token
    )
    assert [d["title"] for d in filtered.json()["docs"]] == ["date", "kiwi", "lime", "plum"]
    assert_problem(await vibed.request("GET", url(c, sort=["n"]), token=alice.token), 400)
    # Another collection does not get this one's index.
    other = coll()
    await create(vibed, alice, other, {"title": "x"})
    assert_problem(await vibed.request("GET", url(other, sort=["title"]), token=alice.token), 400)


@pytest_twisted.ensureDeferred
async def test_mango_operators_answer_as_documented(vibed: Vibed, alice: Person) -> None:
    """Each supported operator, through the API against the real server, selects exactly the
    documents Mango says it does (nested fields, arrays, $elemMatch, $regex, $type...)."""
    c = coll()
    await put(
        vibed,
        alice,
        c,
        "a",
        {
            "tags": ["x", "y"],
            "n": 3,
            "s": "hello",
            "o": {"k": 1},
            "items": [{"name": "p", "q": 1}, {"name": "r", "q": 5}],
        },
    )
    await put(
        vibed,
        alice,
        c,
        "b",
        {
            "tags": ["z"],
            "n": 8,
            "s": "world",
            "o": {"k": 2},
            "items": [{"name": "p", "q": 9}],
            "nul": None,
        },
    )
    cases: list[tuple[Any, list[str]]] = [
        ({"n": 3}, ["a"]),
        ({"n": {"$gt": 1, "$lt": 5}}, ["a"]),
        ({"n": {"$ne": 3}}, ["b"]),
        ({"n": {"$in": [3, 8]}}, ["a", "b"]),
        ({"n": {"$nin": [3]}}, ["b"]),
        ({"n": {"$mod": [2, 0]}}, ["b"]),
        ({"o": {"k": 1}}, ["a"]),
        ({"o.k": {"$gte": 2}}, ["b"]),
        ({"o": {"$eq": {"k": 2}}}, ["b"]),
        ({"tags": ["x", "y"]}, ["a"]),
        ({"tags": {"$all": ["x", "y"]}}, ["a"]),
        ({"tags": {"$size": 1}}, ["b"]),
        ({"tags": {"$elemMatch": {"$eq": "z"}}}, ["b"]),
        ({"items": {"$elemMatch": {"name": "p", "q": {"$gt": 3}}}}, ["b"]),
        ({"items": {"$allMatch": {"q": {"$gt": 0}}}}, ["a", "b"]),
        ({"s": {"$regex": "^h"}}, ["a"]),
        ({"s": {"$regex": "orl"}}, ["b"]),
        ({"nul": None}, ["b"]),
        ({"nul": {"$type": "null"}}, ["b"]),
        ({"nul": {"$exists": False}}, ["a"]),
        ({"$or": [{"n": 3}, {"s": "world"}]}, ["a", "b"]),
        ({"$nor": [{"n": 3}]}, ["b"]),
        ({"$not": {"n": {"$gt": 5}}}, ["a"]),
        ({"$and": [{"n": {"$gt": 1}}, {"s": {"$regex": "^w"}}]}, ["b"]),
        ({"_id": "a"}, ["a"]),
        ({"_id": {"$gt": "a"}}, ["b"]),
        ({"_id": {"$in": ["a", "b", "c"]}}, ["a", "b"]),
    ]
    for selector, expected in cases:
        resp = await vibed.request("GET", url(c, q=selector), token=alice.token)
        assert resp.code == 200, (selector, resp.content)
        assert sorted(d["_id"] for d in resp.json()["docs"]) == expected, selector


# -- bad input ----------------------------------------------------------------------------

BAD_COLLECTIONS = ["Notes", "_users", "1abc", "a" * 65, "a:b", "a.b", "n%C3%B6tes", "a%00", "-a"]
BAD_IDS = ["_design", "_all_docs", "a:b", "a" * 201, ".hidden", "%20x", "a%2Fb", "x%00"]
BAD_QUERIES: list[dict[str, str]] = [
    {"q": "not json"},
    {"q": "[1]"},
    {"q": '"x"'},
    {"q": '{"a": 1, "a": 2}'},
    {"q": '{"a": NaN}'},
    {"q": '{"a": {"$foo": 1}}'},
    {"q": '{"$where": "x"}'},
    {"q": '{"a": {"$regex": "("}}'},
    {"q": '{"a": {"$regex": "(a+)+$"}}'},
    {"q": '{"a": {"$regex": "a.*b"}}'},
    {"q": '{"a": {"$regex": "^(?i)a"}}'},
    {"q": '{"a": {"$regex": "^(a)\\\\1"}}'},
    {"q": '{"a": {"$regex": 5}}'},
    {"q": '{"a": {"$in": 5}}'},
    {"q": '{"a": {"$mod": [0, 1]}}'},
    {"q": '{"a": {"$size": -1}}'},
    {"q": '{"a": {"$type": "date"}}'},
    {"q": '{"a": {"$exists": "yes"}}'},
    {"q": '{"$and": []}'},
    {"q": '{"$or": {}}'},
    {"q": '{"$and": [5]}'},
    {"q": '{"a": {"$ne": [null]}}'},
    {"q": '{"a": {"$gt": 1, "b": 2}}'},
    {"q": '{"a": {}}'},
    {"q": '{"": 1}'},
    {"q": '{"a..b": 1}'},
    {"q": "{" + '"a":{"$not":' * 40 + "{}" + "}" * 40 + "}"},
    {"q": json.dumps({"a": {"$in": list(range(1001))}})},
    {"q": '{"a": 1}', "qq": "1"},
    {"sort": "title"},
    {"sort": '["title", {"n": "desc"}]'},
    {"sort": '[{"title": "up"}]'},
    {"sort": '[{"a": "asc", "b": "asc"}]'},
    {"sort": f'["{TAG}"]'},
    {"sort": '["_id", "title"]'},
    {"sort": '["_deleted"]'},
    {"limit": "0"},
    {"limit": "1001"},
    {"limit": "-1"},
    {"limit": "ten"},
    {"limit": ""},
    {"limit": "٣"},
    {"bookmark": "garbage"},
    {"bookmark": "eyJtIjoibGlzdCJ9.AAAA"},
    {"bookmark": ""},
    {"fields": ""},
    {"fields": "a,,b"},
    {"fields": "_deleted"},
    {"fields": TAG},
    {"fields": "[1]"},
    {"fields": '{"a": 1}'},
]


@pytest_twisted.ensureDeferred
async def test_bad_input_to_every_route_is_a_4xx_problem(vibed: Vibed, alice: Person) -> None:
    """Invalid collection names and ids, reserved fields, the storage tag, malformed or
    non-object JSON, duplicate keys, and every malformed q/sort/limit/bookmark/fields: a 4xx
    problem+json for each route, never a 500, and the server still answers afterwards."""
    c = coll()
    doc_id = await create(vibed, alice, c, {"ok": True})
    tok = alice.token
    for name in BAD_COLLECTIONS:
        for method, path in [
            ("GET", f"/data/{name}"),
            ("POST", f"/data/{name}"),
            ("GET", f"/data/{name}/x"),
            ("PUT", f"/data/{name}/x"),
            ("DELETE", f"/data/{name}/x?rev=1-abc"),
            ("GET", f"/data/{name}/_index"),
            ("POST", f"/data/{name}/_index"),
        ]:
            resp = await vibed.request(method, path, {"fields": ["a"]}, token=tok)
            assert 400 <= resp.code < 500, (method, path, resp.code)
            assert_problem(resp, resp.code)
    for bad_id in BAD_IDS:
        for method in ("GET", "PUT", "DELETE"):
            resp = await vibed.request(method, f"/data/{c}/{bad_id}?rev=1-a", {"a": 1}, token=tok)
            assert resp.code in (400, 404), (method, bad_id, resp.code)
            assert_problem(resp, resp.code)

    bodies: list[tuple[bytes, int, str | None]] = [
        (b'{"_attachments": {}}', 400, "reserved-field"),
        (b'{"_deleted": true}', 400, "reserved-field"),
        (b'{"_conflicts": []}', 400, "reserved-field"),
        (b'{"_local_seq": 1}', 400, "reserved-field"),
        (b'{"_x": 1}', 400, "reserved-field"),
        (json.dumps({TAG: c}).encode(), 400, "reserved-field"),
        (json.dumps({TAG: "other"}).encode(), 400, "reserved-field"),
        (b'{"_rev": "nonsense"}', 400, "invalid-rev"),
        (b'{"_rev": 5}', 400, "invalid-rev"),
        (b'{"_id": 5}', 400, "id-mismatch"),
        (b"[1, 2]", 400, "invalid-json"),
        (b'"text"', 400, "invalid-json"),
        (b"", 400, "invalid-json"),
        (b"{", 400, "invalid-json"),
        (b'{"a": 1, "a": 2}', 400, "invalid-json"),
        (b'{"a": NaN}', 400, "invalid-json"),
        (b'{"a": "\xff"}', 400, "invalid-json"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid-json"),
        (b'{"a": ' + b"[" * 900 + b"]" * 900 + b"}", 400, "too-deep"),
    ]
    for raw, status, slug in bodies:
        for method, path in [("POST", f"/data/{c}"), ("PUT", f"/data/{c}/new-{uuid.uuid4().hex}")]:
            resp = await vibed.request(method, path, raw=raw, token=tok)
            assert_problem(resp, status, slug)
    assert_problem(
        await vibed.request("POST", f"/data/{c}", {"_id": "chosen"}, token=tok), 400, "id-mismatch"
    )
    assert_problem(
        await vibed.request("POST", f"/data/{c}", {"_rev": "1-abc"}, token=tok), 400, "invalid-rev"
    )
    wrong_type = await vibed.request(
        "POST", f"/data/{c}", raw=b"{}", token=tok, headers={"Content-Type": "text/plain"}
    )
    assert_problem(wrong_type, 415)

    for params in BAD_QUERIES:
        resp = await vibed.request("GET", f"/data/{c}?" + urlencode(params), token=tok)
        assert_problem(resp, 400)
    assert_problem(await vibed.request("GET", f"/data/{c}?limit=1&limit=2", token=tok), 400)
    assert_problem(await vibed.request("GET", f"/data/{c}?q=%FF", token=tok), 400)
    assert_problem(await vibed.request("GET", f"/data/{c}/{doc_id}?x=1", token=tok), 400)
    for rev in ["", "abc", "1-", "1-a b", "*", 'W/"1-abc"', "1-" + "a" * 200]:
        resp = await vibed.request("DELETE", f"/data/{c}/{doc_id}?rev={quote(rev)}", token=tok)
        assert_problem(resp, 400)
        resp = await vibed.request(
            "PUT", f"/data/{c}/{doc_id}", {"a": 1}, token=tok, headers={"If-Match": rev}
        )
        assert_problem(resp, 400)
    for index_body in [
        {},
        {"fields": []},
        {"fields": "title"},
        {"fields": [1]},
        {"fields": ["_id"]},
        {"fields": [TAG]},
        {"fields": ["a", "a"]},
        {"fields": [f"f{i}" for i in range(9)]},
        {"fields": ["a"], "partial_filter_selector": {}},
        {"fields": [{"a": "desc"}]},
    ]:
        resp = await vibed.request("POST", f"/data/{c}/_index", index_body, token=tok)
        assert_problem(resp, 400)
    assert_problem(await vibed.request("PATCH", f"/data/{c}/{doc_id}", {}, token=tok), 405)
    assert_problem(await vibed.request("PUT", f"/data/{c}", {}, token=tok), 405)
    assert (await vibed.request("GET", f"/data/{c}/{doc_id}", token=tok)).code == 200


@pytest_twisted.ensureDeferred
async def test_bodies_over_one_mib_are_413(vibed: Vibed, alice: Person) -> None:
    """A document body of exactly 1 MiB is stored; one byte more is 413 (POST and PUT), and a
    much larger body is refused while it arrives."""
    c = coll()

    def body_of(size: int) -> bytes:
        raw = b'{"pad": "' + b"x" * (size - 11) + b'"}'
        assert len(raw) == size
        return raw

    fits = await vibed.request("POST", f"/data/{c}", raw=body_of(1024 * 1024), token=alice.token)
    assert fits.code == 201, fits.content[:200]
    for method, path in [("POST", f"/data/{c}"), ("PUT", f"/data/{c}/big")]:
        over = await vibed.request(method, path, raw=body_of(1024 * 1024 + 1), token=alice.token)
        assert_problem(over, 413)
    huge = await vibed.request(
        "PUT", f"/data/{c}/big", raw=body_of(3 * 1024 * 1024), token=alice.token
    )
    assert huge.code == 413
    assert_problem(await vibed.request("GET", f"/data/{c}/big", token=alice.token), 404)


# -- operations ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_data_database_is_recreated_for_a_live_identity(
    vibed: Vibed, couch_url: str
) -> None:
    """An identity whose data database is gone (made before the data API, or lost) reads an
    empty collection and gets the database back on its first write; a token of an identity
    that no longer exists cannot bring one back."""
    who = await person(vibed)
    couch = CouchServer.from_url(couch_url)
    try:
        name = identity_db(who.idn, "data")
        assert await couch.delete_db(name)
        empty = await vibed.request("GET", url("notes"), token=who.token)
        assert empty.json() == {"docs": [], "bookmark": None}
        assert (await vibed.request("GET", url("notes", q={"a": 1}), token=who.token)).code == 200
        assert (await vibed.request("GET", url("notes", "_index"), token=who.token)).code == 200
        assert_problem(await vibed.request("GET", url("notes", "x"), token=who.token), 404)
        assert (await vibed.request("POST", url("notes"), {"a": 1}, token=who.token)).code == 201
        assert await couch.db_exists(name)
        assert await couch.delete_db(name)  # and a PUT brings it back too
        put = await vibed.request("PUT", url("notes", "y"), {"b": 2}, token=who.token)
        assert put.code == 201
        assert await couch.db_exists(name)

        ghost = "idn:" + str(uuid.uuid4())
        ghost_token = vibed.parts.issuer.issue_access(ghost, ["data:*"])[0]
        assert_problem(await vibed.request("POST", url("notes"), {"a": 1}, token=ghost_token), 404)
        assert not await couch.db_exists(identity_db(ghost, "data"))
    finally:
        await couch.close()


@pytest_twisted.ensureDeferred
async def test_data_routes_are_503_when_couchdb_is_down(tmp_path: Path) -> None:
    """With CouchDB unreachable every data route answers 503 problem+json, never 500."""
    from conftest import free_port
    from twisted.internet import reactor

    config = make_config(tmp_path, f"http://127.0.0.1:{free_port()}/", couch_timeout="2")
    v = Vibed(config)
    v.pool.startService()
    v.bootstrap.ready = True
    v.port = reactor.listenTCP(0, v.parts.site(), interface="127.0.0.1")
    v.url = f"http://127.0.0.1:{v.port.getHost().port}"
    tok = v.parts.issuer.issue_access(f"idn:{uuid.uuid4()}", ["data:*"])[0]
    try:
        for method, path, body in [
            ("GET", "/data/notes", None),
            ("GET", "/data/notes?" + urlencode({"q": '{"a": 1}'}), None),
            ("GET", "/data/notes?" + urlencode({"sort": '["a"]'}), None),
            ("POST", "/data/notes", {"a": 1}),
            ("GET", "/data/notes/x", None),
            ("PUT", "/data/notes/x", {"a": 1}),
            ("DELETE", "/data/notes/x?rev=1-abc", None),
            ("GET", "/data/notes/_index", None),
            ("POST", "/data/notes/_index", {"fields": ["a"]}),
        ]:
            assert_problem(await v.request(method, path, body, token=tok), 503)
    finally:
        await v.stop()


@pytest_twisted.ensureDeferred
async def test_nested_field_conditions_work_next_to_null_values(
    vibed: Vibed, alice: Person
) -> None:
    """{"a": {"b": 1}} matches documents whose a.b is 1, even when other documents of the
    collection have a: null (PouchDB Server fails on the nested form; vibed sends a.b), and
    combines with a dotted condition on the same field."""
    c = coll()
    await create(vibed, alice, c, {"a": None, "n": 0})
    await create(vibed, alice, c, {"a": {"b": 1}, "n": 1})
    await create(vibed, alice, c, {"a": {"b": 2, "c.d": {"e": 5}}, "n": 2})
    cases = [
        ({"a": {"b": 1}}, [1]),
        ({"a": {"b": {"$gt": 1}}}, [2]),
        ({"a": {"b": {"$gte": 1}}, "a.b": {"$lt": 2}}, [1]),
        ({"a": {"c\\.d": {"e": 5}}}, [2]),
        ({"$or": [{"a": {"b": 1}}, {"n": 0}]}, [0, 1]),
    ]
    for selector, expected in cases:
        resp = await vibed.request("GET", url(c, q=selector), token=alice.token)
        assert resp.code == 200, (selector, resp.content)
        assert sorted(d["n"] for d in resp.json()["docs"]) == expected, selector


@pytest_twisted.ensureDeferred
async def test_direct_routes_answer_as_klein_does(vibed: Vibed, alice: Person) -> None:
    """The document routes served outside Klein (vibed.api.direct) and the paths left to
    Klein answer alike: escaped and odd paths, other methods, HEAD, a missing token and an
    unknown document each get the same problem+json they always did."""
    name = coll()
    made = await vibed.request("PUT", url(name, "a1"), {"x": 1}, token=alice.token)
    assert made.code == 201
    escaped = await vibed.request("GET", f"/data/{name[0]}%{ord(name[1]):02x}{name[2:]}/a1",
                                  token=alice.token)  # fmt: skip
    assert escaped.code == 200 and escaped.json()["x"] == 1  # Klein decodes, same document
    head = await vibed.request("HEAD", url(name, "a1"), token=alice.token)
    assert head.code == 200 and head.content == b""
    patch = await vibed.request("PATCH", url(name, "a1"), {"x": 2}, token=alice.token)
    assert patch.code == 405 and "PUT" in (patch.header("allow") or "")
    for path, code in [
        (url(name, "missing"), 404),
        (f"/data/{name.upper()}/a1", 400),
        (url(name, "_index"), 200),
        (f"/data/{name}/a1/extra", 404),
    ]:
        resp = await vibed.request("GET", path, token=alice.token)
        assert resp.code == code, (path, resp.content)
        if code >= 400:
            assert resp.header("content-type") == "application/problem+json", path
    anonymous = await vibed.request("GET", url(name, "a1"))
    assert anonymous.code == 401
    assert anonymous.header("www-authenticate") == 'Bearer realm="vibe"'
