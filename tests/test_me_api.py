"""The dashboard's server routes (issue 9): collections with counts, sessions, password change,
the streamed export and identity deletion, against a real vibed and PouchDB Server."""

from __future__ import annotations

import io
import json
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import (
    FakeClock,
    Person,
    Response,
    Vibed,
    VibedFactory,
    connect_realtime,
    fetch,
    make_config,
    poll,
)

from vibed.account import list_collections
from vibed.keys import b64decode, derive_wrap_key, did_key_from_public, unwrap_seed
from vibed.naming import IDENTITIES_DB, REFRESH_DB, UPLOADS_DB, identity_dbs
from vibed.realtime import CLOSE_REVOKED

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a whole new passphrase"


def email() -> str:
    return f"me-{uuid.uuid4().hex[:12]}@example.org"


async def person(vibed: Vibed, address: str | None = None, ua: str = "TestBrowser/1") -> Any:
    """Sign up; returns (Person, email, refresh cookie)."""
    address = address or email()
    resp = await vibed.request(
        "POST",
        "/auth/signup",
        {"email": address, "password": PASSWORD},
        headers={"User-Agent": ua},
    )
    assert resp.code == 201, resp.content
    body = resp.json()
    return Person(vibed, body["identity"]["id"], body["accessToken"]), address, resp.refresh_cookie


async def login(vibed: Vibed, address: str, password: str = PASSWORD, ua: str = "") -> Response:
    return await vibed.request(
        "POST",
        "/auth/login",
        {"email": address, "password": password},
        headers={"User-Agent": ua} if ua else None,
    )


def app_token(vibed: Vibed, idn: str) -> str:
    token, _ = vibed.parts.issuer.issue_access(
        idn, ["data:*", "blob:*"], client_id="https://app.example", gid="0" * 32
    )
    return token


@pytest_twisted.async_yield_fixture
async def vibed(make_vibed: VibedFactory) -> AsyncIterator[Vibed]:
    yield await make_vibed()


# -- who may call ---------------------------------------------------------------------------

ROUTES = [
    ("GET", "/me/collections", None),
    ("GET", "/me/sessions", None),
    ("DELETE", "/me/sessions", None),
    ("DELETE", "/me/sessions/" + "a" * 32, None),
    ("POST", "/me/password", {"currentPassword": PASSWORD, "newPassword": NEW_PASSWORD}),
    ("POST", "/me/export", None),
    ("GET", "/me/export", None),
    ("POST", "/me/delete", {"password": PASSWORD}),
]


@pytest_twisted.ensureDeferred
async def test_every_route_needs_a_first_party_token(vibed: Vibed) -> None:
    """Without a token every /me route is 401; with an app's token (data and blob scopes, no
    'identity') 403 insufficient-scope; a forged token 401. Nothing was changed by them."""
    me, address, _ = await person(vibed)
    app = app_token(vibed, me.idn)
    for method, path, body in ROUTES:
        anonymous = await vibed.request(method, path, body)
        assert anonymous.code == 401, (method, path, anonymous.content)
        forged = await vibed.request(method, path, body, token=me.token[:-4] + "AAAA")
        assert forged.code == 401, (method, path)
        as_app = await vibed.request(method, path, body, token=app)
        assert as_app.code == 403, (method, path, as_app.content)
        assert as_app.json()["type"].endswith("/insufficient-scope")
    assert (await login(vibed, address)).code == 200  # the password was not changed


# -- collections ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_collections_with_counts(vibed: Vibed) -> None:
    """GET /me/collections lists the identity's collections in name order with their
    document counts; deleted documents, blob records and declared indexes are not counted;
    another identity's collections never appear."""
    me, _, _ = await person(vibed)
    other, _, _ = await person(vibed)
    for collection, n in (("notes", 3), ("todos", 1), ("a-b", 2), ("notes-x", 1)):
        for i in range(n):
            resp = await me.call("PUT", f"/data/{collection}/d{i}", {"i": i})
            assert resp.code == 201, resp.content
    gone = await me.call("PUT", "/data/trash/x", {})
    await me.call("DELETE", f"/data/trash/x?rev={gone.json()['rev']}")
    await me.call("POST", "/data/notes/_index", {"fields": ["i"]})
    await me.upload(b"\x89PNG...")
    await other.call("PUT", "/data/secret/x", {})
    resp = await me.call("GET", "/me/collections")
    assert resp.code == 200
    assert resp.json() == {
        "collections": [
            {"name": "a-b", "count": 2},
            {"name": "notes", "count": 3},
            {"name": "notes-x", "count": 1},
            {"name": "todos", "count": 1},
        ]
    }
    empty, _, _ = await person(vibed)
    assert (await empty.call("GET", "/me/collections")).json() == {"collections": []}


class FakeData:
    """_all_docs over sorted ids, reporting offsets as CouchDB does (or as PouchDB: 0)."""

    def __init__(self, ids: list[str], real_offsets: bool) -> None:
        self.ids = sorted(ids)
        self.real = real_offsets
        self.calls = 0

    async def all_docs(self, **kw: Any) -> dict[str, Any]:
        self.calls += 1
        start, end = kw.get("startkey", ""), kw.get("endkey")
        rows = [i for i in self.ids if i >= start and (end is None or i <= end)]
        offset = len([i for i in self.ids if i < start])
        skip = kw.get("skip") or 0
        rows = rows[skip:]
        if kw.get("limit") is not None:
            rows = rows[: kw["limit"]]
        return {
            "total_rows": len(self.ids),
            "offset": offset if self.real else skip,
            "rows": [{"id": i, "key": i} for i in rows],
        }


@pytest.mark.parametrize("real_offsets", [True, False])
@pytest_twisted.ensureDeferred
async def test_collection_walk_counts_with_offsets_or_rows(real_offsets: bool) -> None:
    """The walk gives the same names and counts whether the server reports real _all_docs
    offsets (CouchDB: one request per collection, whatever its size) or not (PouchDB
    Server: rows counted); design docs, blob records and odd ids are skipped."""
    ids = ["$blob:1", "_design/vidx.notes.x", "a:1", "b-c:1", "b:1", "b:2", "zz:9"]
    ids += [f"big:{i:05d}" for i in range(12000)]
    data = FakeData(ids, real_offsets)
    found = await list_collections(data)  # type: ignore[arg-type]
    assert [(c.name, c.count) for c in found] == [
        ("a", 1),
        ("b", 2),
        ("b-c", 1),
        ("big", 12000),
        ("zz", 1),
    ]
    if real_offsets:
        assert data.calls <= 2 * len(found) + 2


# -- sessions ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sessions_list_revoke_one_and_everywhere_else(vibed: Vibed) -> None:
    """Each login is a session with its user agent, creation and last use; the caller's is
    marked current; apps' sessions are not listed. Revoking one ends its refresh and access
    tokens and closes its realtime socket (4004); 'everywhere else' ends all but the caller's;
    another identity's session id is 404."""
    me, address, _ = await person(vibed, ua="Signup/1")
    phone = await login(vibed, address, ua="Mozilla/5.0 (iPhone) Safari/605")
    laptop = await login(vibed, address, ua="Mozilla/5.0 (X11; Linux) Firefox/130")
    listed = (await me.call("GET", "/me/sessions")).json()["sessions"]
    assert {s["userAgent"] for s in listed} == {
        "Signup/1",
        "Mozilla/5.0 (iPhone) Safari/605",
        "Mozilla/5.0 (X11; Linux) Firefox/130",
    }
    assert [s["current"] for s in listed].count(True) == 1
    mine = next(s for s in listed if s["current"])
    assert mine["userAgent"] == "Signup/1" and mine["createdAt"] and mine["lastUsedAt"]
    phone_sid = next(s["id"] for s in listed if "iPhone" in s["userAgent"])
    phone_token = phone.json()["accessToken"]
    socket = await connect_realtime(vibed, phone_token)

    stranger, _, _ = await person(vibed)
    assert (await stranger.call("DELETE", f"/me/sessions/{phone_sid}")).code == 404
    assert (await me.call("DELETE", "/me/sessions/not-a-session")).code == 404
    assert (await me.call("DELETE", f"/me/sessions/{phone_sid}")).code == 204
    assert (await me.call("DELETE", f"/me/sessions/{phone_sid}")).code == 404
    assert await socket.wait_closed() == CLOSE_REVOKED
    assert (await vibed.request("GET", "/me", token=phone_token)).code == 401
    refused = await vibed.request("POST", "/auth/refresh", cookie=phone.refresh_cookie)
    assert refused.code == 401
    assert len((await me.call("GET", "/me/sessions")).json()["sessions"]) == 2

    ended = await me.call("DELETE", "/me/sessions")
    assert ended.code == 200 and ended.json() == {"revoked": 1}
    laptop_token = laptop.json()["accessToken"]
    assert (await vibed.request("GET", "/me", token=laptop_token)).code == 401
    assert (await me.call("GET", "/me")).code == 200  # the caller stays logged in
    left = (await me.call("GET", "/me/sessions")).json()["sessions"]
    assert [s["current"] for s in left] == [True]


@pytest_twisted.ensureDeferred
async def test_a_refresh_marks_the_session_used(make_vibed: VibedFactory) -> None:
    """A session's lastUsedAt moves when its refresh token rotates (at most once a minute)."""
    clock = FakeClock()
    vibed = await make_vibed(clock=clock)
    me, _, cookie = await person(vibed)
    before = (await me.call("GET", "/me/sessions")).json()["sessions"][0]
    clock.advance(3600)
    refreshed = await vibed.request("POST", "/auth/refresh", cookie=cookie)
    assert refreshed.code == 200
    token = refreshed.json()["accessToken"]
    after = (await me.call("GET", "/me/sessions", token=token)).json()["sessions"][0]
    assert after["id"] == before["id"]
    assert after["lastUsedAt"] > before["lastUsedAt"]
    assert after["createdAt"] == before["createdAt"]


# -- password -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_password_change_rewraps_the_key_and_ends_other_sessions(vibed: Vibed) -> None:
    """A wrong current password is 403 and changes nothing; a short new one 400. A right one:
    the old password no longer logs in, the new one does; the did:key is the same and the
    stored wrapped key unwraps with the new password to a seed whose did:key it is; the other
    sessions end (refresh and access), the caller's stays."""
    me, address, _ = await person(vibed)
    other = await login(vibed, address)
    identity = (await me.call("GET", "/me")).json()

    wrong = await me.call(
        "POST", "/me/password", {"currentPassword": "not it at all", "newPassword": NEW_PASSWORD}
    )
    assert wrong.code == 403 and wrong.json()["type"].endswith("/wrong-password")
    short = await me.call("POST", "/me/password", {"currentPassword": PASSWORD, "newPassword": "x"})
    assert short.code == 400
    same = await me.call(
        "POST", "/me/password", {"currentPassword": PASSWORD, "newPassword": PASSWORD}
    )
    assert same.code == 400
    assert (await login(vibed, address)).code == 200

    changed = await me.call(
        "POST", "/me/password", {"currentPassword": PASSWORD, "newPassword": NEW_PASSWORD}
    )
    assert changed.code == 200, changed.content
    assert changed.json()["revokedSessions"] >= 2  # `other` and the check login above
    assert (await login(vibed, address)).code == 401
    assert (await login(vibed, address, NEW_PASSWORD)).code == 200
    assert (await me.call("GET", "/me")).json()["did"] == identity["did"]
    assert (await vibed.request("GET", "/me", token=other.json()["accessToken"])).code == 401
    refused = await vibed.request("POST", "/auth/refresh", cookie=other.refresh_cookie)
    assert refused.code == 401

    doc = await vibed.couch.database(IDENTITIES_DB).get(me.idn)
    seed = unwrap_seed(doc["keyWrapped"], derive_wrap_key(NEW_PASSWORD, b64decode(doc["salt"])))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert did_key_from_public(public) == identity["did"]
    assert "pwdHash" not in changed.json() and "keyWrapped" not in changed.json()


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_are_rate_limited(vibed: Vibed) -> None:
    """Five wrong current passwords, then 429 with Retry-After, even for the right one: a
    stolen access token cannot guess the password through these routes."""
    me, _, _ = await person(vibed)
    for _ in range(5):
        resp = await me.call("POST", "/me/delete", {"password": "guess guess"})
        assert resp.code == 403
    blocked = await me.call("POST", "/me/delete", {"password": PASSWORD})
    assert blocked.code == 429 and int(blocked.header("retry-after") or 0) > 0
    assert (await me.call("GET", "/me")).code == 200


# -- export -------------------------------------------------------------------------------------


async def fill(me: Person, vibed: Vibed) -> dict[str, Any]:
    """Notes, todos, two files (one without a name, one named like a path) and a grant."""
    await me.call("PUT", "/data/notes/n1", {"title": "Groceries", "text": "<script>x</script>"})
    await me.call("PUT", "/data/notes/n2", {"title": "Ünïcode ✓"})
    await me.call("PUT", "/data/todos/t1", {"done": False})
    photo = await me.upload(b"\x89PNG" + bytes(range(256)) * 40, meta={"name": "../../photo.png"})
    text = await me.upload(b"hello, file", mime="text/plain")
    grant = await vibed.parts.apps.grants.create(
        me.idn, "https://notes.example", ("data:read:notes",), "Notes"
    )
    return {"photo": photo, "text": text, "grant": grant}


def open_zip(content: bytes) -> zipfile.ZipFile:
    archive = zipfile.ZipFile(io.BytesIO(content))
    assert archive.testzip() is None  # every entry's CRC checks out
    return archive


@pytest_twisted.ensureDeferred
async def test_export_holds_everything_and_nothing_secret(vibed: Vibed) -> None:
    """GET /me/export streams a ZIP: every collection's documents as JSON, every file's exact
    bytes (named safely), files.json, grants.json, identity.json with the wrapped key but no
    password hash; another identity's data is not in it."""
    me, address, _ = await person(vibed)
    made = await fill(me, vibed)
    stranger, _, _ = await person(vibed)
    await stranger.call("PUT", "/data/notes/theirs", {"title": "not yours"})
    resp = await me.call("GET", "/me/export")
    assert resp.code == 200, resp.content[:300]
    assert resp.header("content-type") == "application/zip"
    disposition = resp.header("content-disposition") or ""
    assert disposition.startswith('attachment; filename="vibe-export-')
    archive = open_zip(resp.content)
    names = set(archive.namelist())
    assert {"README.txt", "identity.json", "files.json", "grants.json"} <= names
    notes = json.loads(archive.read("collections/notes.json"))
    assert sorted(d["_id"] for d in notes) == ["n1", "n2"]
    assert {d["title"] for d in notes} == {"Groceries", "Ünïcode ✓"}
    assert all("vibe:collection" not in d for d in notes)
    assert json.loads(archive.read("collections/todos.json"))[0]["done"] is False
    files = {f["id"]: f for f in json.loads(archive.read("files.json"))}
    photo = files[made["photo"]["id"]]
    assert photo["path"] == "files/photo.png"  # "../../" cannot climb out
    assert archive.read(photo["path"]) == b"\x89PNG" + bytes(range(256)) * 40
    text = files[made["text"]["id"]]
    assert archive.read(text["path"]) == b"hello, file"
    assert text["path"] == f"files/{made['text']['id']}.txt"
    grants = json.loads(archive.read("grants.json"))
    assert [g["origin"] for g in grants] == ["https://notes.example"]
    identity = json.loads(archive.read("identity.json"))
    assert identity["email"] == address and identity["key"]["keyWrapped"]
    assert "pwdHash" not in json.dumps(identity)
    assert b"not yours" not in resp.content


@pytest_twisted.ensureDeferred
async def test_export_link_works_once_without_a_token(vibed: Vibed) -> None:
    """POST /me/export answers a link that downloads the archive without a token, once; a
    used, unknown or expired link is 404; a link of a session that has ended is 404."""
    me, address, cookie = await person(vibed)
    await me.call("PUT", "/data/notes/n1", {"title": "x"})
    link = await me.call("POST", "/me/export")
    assert link.code == 200
    url = vibed.here(link.json()["url"])
    got = await fetch("GET", url)
    assert got.code == 200 and "collections/notes.json" in open_zip(got.content).namelist()
    assert (await fetch("GET", url)).code == 404
    assert (await fetch("GET", vibed.url + "/me/export/" + "x" * 43)).code == 404
    stale = vibed.here((await me.call("POST", "/me/export")).json()["url"])
    assert (await vibed.request("POST", "/auth/logout", cookie=cookie)).code == 204
    assert (await fetch("GET", stale)).code == 404


# -- deletion -----------------------------------------------------------------------------------


async def docs_of(vibed: Vibed, db: str, idn: str, address: str) -> list[str]:
    """Ids of documents in ``db`` that still name the identity or its email."""
    page = await vibed.couch.database(db).all_docs(include_docs=True)
    found = []
    for row in page["rows"]:
        text = json.dumps(row.get("doc"))
        if idn in text or address in text or idn.removeprefix("idn:") in text:
            found.append(row["id"])
    return found


async def assert_gone(vibed: Vibed, idn: str, address: str, blob_keys: list[str]) -> None:
    dbs = set(await vibed.couch.all_dbs())
    assert not dbs & set(identity_dbs(idn))
    for db in (IDENTITIES_DB, REFRESH_DB):
        assert await docs_of(vibed, db, idn, address) == [], db
    store = vibed.parts.api.blob.blobs.store
    for key in blob_keys:
        assert await store.stat(key) is None, key
    if store.kind == "local":
        assert not (store.root / idn.removeprefix("idn:")).exists()


@pytest_twisted.ensureDeferred
async def test_delete_identity_leaves_nothing_and_the_email_can_sign_up_again(
    vibed: Vibed,
) -> None:
    """POST /me/delete with a wrong password is 403 and deletes nothing. With the right one
    (204): its tokens are refused, its sockets close with 4004, login fails, the three
    databases, the identity, email claim and did documents, the sessions and refresh tokens
    and every blob file are gone; the same email signs up again as a new identity."""
    me, address, cookie = await person(vibed)
    made = await fill(me, vibed)
    await login(vibed, address)
    socket = await connect_realtime(vibed, me.token)
    assert (await me.call("POST", "/me/delete", {"password": "not it at all"})).code == 403
    assert (await me.call("GET", "/data/notes/n1")).code == 200

    resp = await me.call("POST", "/me/delete", {"password": PASSWORD})
    assert resp.code == 204, resp.content
    assert await socket.wait_closed() == CLOSE_REVOKED
    assert (await me.call("GET", "/me")).code == 401
    assert (await login(vibed, address)).code == 401
    assert (await vibed.request("POST", "/auth/refresh", cookie=cookie)).code == 401
    keys = [made["photo"]["key"], made["text"]["key"]]
    await assert_gone(vibed, me.idn, address, keys)
    again = await vibed.signup(address)
    assert again.code == 201 and again.json()["identity"]["id"] != me.idn


@pytest_twisted.ensureDeferred
async def test_a_deletion_interrupted_halfway_finishes_by_itself(make_vibed: VibedFactory) -> None:
    """The blob store fails in the middle of a deletion: the answer is 202 (pending), the
    identity can no longer log in nor use its tokens, and the email is still taken; once the
    store is back and the job's lease has lapsed, the deletion timer finishes it: nothing
    is left and the email is free."""
    clock = FakeClock()
    vibed = await make_vibed(clock=clock)
    me, address, _ = await person(vibed)
    made = await fill(me, vibed)
    blobs = vibed.parts.api.blob.blobs
    store = blobs.store

    class Unplugged:
        """The store, but deleting fails (a disk or S3 outage)."""

        kind = store.kind

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def delete(self, key: str) -> None:
            from vibed.blobs import StoreUnavailable

            raise StoreUnavailable("disk unplugged")

    blobs.store = Unplugged()
    try:
        resp = await me.call("POST", "/me/delete", {"password": PASSWORD})
        assert resp.code == 202, resp.content
        assert resp.json()["state"] == "pending"
        assert (await me.call("GET", "/me")).code == 401
        assert (await login(vibed, address)).code == 401
        assert (await vibed.signup(address)).code == 409
        assert await store.stat(made["photo"]["key"]) is not None
        deletions = next(s for s in vibed.parts.services if type(s).__name__ == "DeletionService")
        assert await deletions.tick() == 0  # the lease is still held: nobody takes it over
    finally:
        blobs.store = store
    clock.advance(301)
    assert await deletions.tick() >= 1
    await assert_gone(vibed, me.idn, address, [made["photo"]["key"], made["text"]["key"]])
    assert (await vibed.signup(address)).code == 201


@pytest_twisted.ensureDeferred
async def test_deletion_on_one_replica_holds_on_the_other(tmp_path: Path, couch_url: str) -> None:
    """Deleted on replica A: replica B refuses its token within seconds and its login."""
    key = tmp_path / "shared-jwt.pem"
    a = await Vibed(make_config(tmp_path / "a", couch_url, jwt_key_file=str(key))).start()
    b = await Vibed(make_config(tmp_path / "b", couch_url, jwt_key_file=str(key))).start()
    try:
        me, address, _ = await person(a)
        token_b = (await login(b, address)).json()["accessToken"]
        assert (await b.request("GET", "/me", token=token_b)).code == 200
        assert (await me.call("POST", "/me/delete", {"password": PASSWORD})).code == 204

        async def refused() -> bool:
            return (await b.request("GET", "/data/notes", token=token_b)).code == 401

        await poll(refused)
        assert (await login(b, address)).code == 401
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_late_upload_with_an_old_url_is_cleaned_up(make_vibed: VibedFactory) -> None:
    """An upload URL signed before the deletion and used after it: the object lands, and the
    blob cleanup removes it once the URL's time is up (the pending record was kept for it)."""
    clock = FakeClock()
    vibed = await make_vibed(clock=clock)
    me, _, _ = await person(vibed)
    upload = await me.upload_url("text/plain", 5)
    assert (await me.call("POST", "/me/delete", {"password": PASSWORD})).code == 204
    put = await me.put(upload, b"late!")
    assert put.code == 200
    store = vibed.parts.api.blob.blobs.store
    key = (await vibed.couch.database(UPLOADS_DB).get(f"{me.idn}:{upload['id']}"))["key"]
    assert await store.stat(key) is not None
    clock.advance(vibed.config.blob_upload_ttl + 3600)
    await vibed.parts.api.blob.blobs.cleanup()
    assert await store.stat(key) is None


@pytest_twisted.ensureDeferred
async def test_export_and_deletion_with_s3(make_vibed: VibedFactory, s3_url: str) -> None:
    """With files in S3: the export streams their bytes from the bucket; deleting the identity
    removes every object under its prefix, one nobody recorded included, and no other
    identity's."""
    from harness import s3_options

    vibed = await make_vibed(**s3_options(s3_url))
    me, address, _ = await person(vibed)
    other, _, _ = await person(vibed)
    made = await fill(me, vibed)
    kept = await other.upload(b"not mine", mime="text/plain")
    store = vibed.parts.api.blob.blobs.store
    stray = f"{me.idn.removeprefix('idn:')}/{uuid.uuid4()}.bin"
    signed = store.sign_upload(stray, "application/octet-stream", 3, int(time.time()) + 60)
    assert (await fetch("PUT", signed.url, data=b"abc", headers=signed.headers)).code == 200

    resp = await me.call("GET", "/me/export")
    archive = open_zip(resp.content)
    files = {f["id"]: f for f in json.loads(archive.read("files.json"))}
    assert archive.read(files[made["text"]["id"]]["path"]) == b"hello, file"

    assert (await me.call("POST", "/me/delete", {"password": PASSWORD})).code == 204
    await assert_gone(vibed, me.idn, address, [made["photo"]["key"], made["text"]["key"], stray])
    assert await store.keys_under(me.idn.removeprefix("idn:")) == []
    assert await store.stat(kept["key"]) is not None


@pytest_twisted.ensureDeferred
async def test_an_export_that_fails_halfway_is_cut_not_truncated(vibed: Vibed) -> None:
    """When the store fails in the middle of a file, the download is aborted: the client gets
    an error, never a complete-looking archive with a file missing."""
    me, _, _ = await person(vibed)
    await fill(me, vibed)
    blobs = vibed.parts.api.blob.blobs
    store = blobs.store

    class Flaky:
        """The store, but reading breaks after the first chunk (S3 went away)."""

        kind = store.kind

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def open_read(self, key: str) -> Any:
            from vibed.blobs import StoreUnavailable

            async def chunks() -> Any:
                yield b"first bytes"
                raise StoreUnavailable("S3 stopped sending the object")

            return chunks()

    blobs.store = Flaky()
    try:
        with pytest.raises(Exception) as failed:  # noqa: B017 - any transport failure will do
            await me.call("GET", "/me/export")
        assert not isinstance(failed.value, AssertionError)
    finally:
        blobs.store = store
    assert (await me.call("GET", "/me/export")).code == 200  # and it works again
