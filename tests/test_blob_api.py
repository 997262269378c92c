"""The blob API's edges: bearer and scope on every route, bad input answered with a clear
problem (never a 500), quotas, and 503 when S3 or CouchDB is away while the rest stays up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import CouchProcess, free_port
from harness import Person, Vibed, VibedSet, fetch, new_person, s3_options

from vibed.blobs.service import CleanupService
from vibed.naming import identity_db

SOME_ID = "0f0e0d0c-0b0a-4908-8706-050403020100"
ROUTES = [
    ("POST", "/blob/upload-url", {"mime": "image/png", "size": 1}),
    ("POST", "/blob/finalize-upload", {"id": SOME_ID}),
    ("GET", f"/blob/download-url/{SOME_ID}", None),
    ("GET", "/blob", None),
    ("GET", "/blob/", None),
    ("DELETE", f"/blob/{SOME_ID}", None),
]


@pytest_twisted.async_yield_fixture
async def vibeds(tmp_path: Path, couch_url: str) -> AsyncIterator[VibedSet]:
    started = VibedSet(tmp_path, couch_url)
    yield started
    await started.stop()


@pytest_twisted.async_yield_fixture
async def vibed(vibeds: VibedSet) -> AsyncIterator[Vibed]:
    yield await vibeds.start(blob_max_size="1000")


@pytest_twisted.async_yield_fixture
async def alice(vibed: Vibed) -> AsyncIterator[Person]:
    yield await new_person(vibed)


def assert_problem(resp: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    assert resp.code == status, resp.content
    assert resp.header("content-type") == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["title"] and body.get("detail")
    assert "Traceback" not in resp.content.decode()
    if slug is not None:
        assert body["type"].endswith("/" + slug), body
    return body


@pytest_twisted.ensureDeferred
async def test_every_route_needs_a_bearer_token(vibed: Vibed) -> None:
    """Without a token every blob route is 401 with a Bearer challenge."""
    for method, path, body in ROUTES:
        resp = await vibed.request(method, path, body)
        assert_problem(resp, 401)
        assert (resp.header("www-authenticate") or "").startswith("Bearer")


@pytest_twisted.ensureDeferred
async def test_every_route_needs_the_blob_scope(vibed: Vibed, alice: Person) -> None:
    """A valid token of the same identity without blob:* is 403 insufficient-scope on every
    route, before anything is signed or read."""
    token, _ = vibed.parts.issuer.issue_access(alice.idn, ["data:*"])
    for method, path, body in ROUTES:
        resp = await alice.call(method, path, body, token=token)
        assert_problem(resp, 403, "insufficient-scope")
        assert "blob:*" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "slug"),
    [
        ({"size": 1}, 400, None),
        ({"mime": "image/png"}, 400, None),
        ({"mime": 7, "size": 1}, 400, None),
        ({"mime": "image", "size": 1}, 400, "invalid-mime"),
        ({"mime": "image/png; charset=x", "size": 1}, 400, "invalid-mime"),
        ({"mime": "image/../../png", "size": 1}, 400, "invalid-mime"),
        ({"mime": "text/html", "size": 1}, 415, "mime-not-allowed"),
        ({"mime": "application/x-msdownload", "size": 1}, 415, "mime-not-allowed"),
        ({"mime": "image/png", "size": -1}, 400, None),
        ({"mime": "image/png", "size": "10"}, 400, None),
        ({"mime": "image/png", "size": True}, 400, None),
        ({"mime": "image/png", "size": 1.5}, 400, None),
        ({"mime": "image/png", "size": 1001}, 413, "blob-too-large"),
        ({"mime": "image/png", "size": 10**30}, 413, "blob-too-large"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_upload_url_rejects_bad_declarations(
    vibed: Vibed, alice: Person, body: dict[str, Any], status: int, slug: str | None
) -> None:
    """Malformed, disallowed or oversized declarations get a 4xx saying what to fix."""
    assert_problem(await alice.call("POST", "/blob/upload-url", body), status, slug)


@pytest_twisted.ensureDeferred
async def test_upload_url_accepts_wildcards_and_normalises_the_type(alice: Person) -> None:
    """image/* allows any image type; the declared type is lower-cased and an unknown
    subtype gets the .bin extension."""
    upload = await alice.upload_url("IMAGE/X-Weird", 10)
    assert upload["headers"]["Content-Type"] == "image/x-weird"
    assert ".bin?" in upload["url"]
    jpeg = await alice.upload_url("image/jpeg", 10)
    assert ".jpg?" in jpeg["url"]


@pytest_twisted.ensureDeferred
async def test_bad_bodies_and_ids_are_clear_4xx(vibed: Vibed, alice: Person) -> None:
    """Non-JSON, non-object and malformed ids, metas and list parameters are 4xx problems."""
    for path in ("/blob/upload-url", "/blob/finalize-upload"):
        assert_problem(await alice.call("POST", path, raw=b"{nope"), 400, "invalid-json")
        assert_problem(await alice.call("POST", path, raw=b"[1]"), 400, "invalid-json")
        assert_problem(await alice.call("POST", path, raw=b""), 400, "invalid-json")
        resp = await alice.call("POST", path, raw=b"a=b", headers={"Content-Type": "text/plain"})
        assert_problem(resp, 415)
    for body in (
        {},
        {"id": "../../etc"},
        {"id": SOME_ID.upper()},
        {"id": 5},
        {"id": SOME_ID, "meta": [1, 2]},
        {"id": SOME_ID, "meta": "x"},
        {"id": SOME_ID, "meta": {"big": "x" * 5000}},
    ):
        assert_problem(await alice.call("POST", "/blob/finalize-upload", body), 400)
    assert_problem(await alice.call("GET", "/blob/download-url/nope"), 400, "invalid-blob-id")
    assert_problem(await alice.call("GET", "/blob/download-url/..%2f..%2fx"), 404)
    assert_problem(await alice.call("DELETE", "/blob/nope"), 400, "invalid-blob-id")
    for query in ("limit=0", "limit=201", "limit=abc", "limit=-1", "after=nope", "limit=1&limit=2"):
        assert_problem(await alice.call("GET", f"/blob?{query}"), 400)
    assert_problem(await alice.call("GET", "/blob/upload-url"), 405)
    assert_problem(await alice.call("PUT", "/blob/upload-url", {}), 405)


@pytest_twisted.ensureDeferred
async def test_quota_counts_finalized_and_pending_bytes(vibeds: VibedSet) -> None:
    """With a quota of 1000 bytes, pending uploads count against it (403 quota-exceeded with
    the figures), deleting a blob frees its bytes, and another identity has its own quota."""
    vibed = await vibeds.start(blob_quota="1000")
    alice, bob = await new_person(vibed), await new_person(vibed)
    blob = await alice.upload(b"x" * 600, "text/plain")
    pending = await alice.upload_url("text/plain", 300)
    over = await alice.call("POST", "/blob/upload-url", {"mime": "text/plain", "size": 101})
    body = assert_problem(over, 403, "quota-exceeded")
    assert (body["quota"], body["used"], body["pending"]) == (1000, 600, 300)
    assert (await alice.upload_url("text/plain", 100))["id"] != pending["id"]  # exactly full
    assert (await bob.upload_url("text/plain", 1000))["id"]
    assert (await alice.call("DELETE", f"/blob/{blob['id']}")).code == 204
    assert (await alice.upload_url("text/plain", 600))["id"]


@pytest_twisted.ensureDeferred
async def test_s3_unreachable_is_503_and_the_rest_stays_up(vibeds: VibedSet) -> None:
    """With S3 at a closed port, the blob routes that need it answer 503 storage-unavailable
    quickly, while signup, login and /me work as before."""
    closed = f"http://127.0.0.1:{free_port()}"
    vibed = await vibeds.start(**s3_options(closed))
    alice = await new_person(vibed)
    resp = await alice.call("POST", "/blob/upload-url", {"mime": "image/png", "size": 10})
    body = assert_problem(resp, 503, "storage-unavailable")
    assert "try again" in body["detail"]
    # A record whose object lives in S3: download-url and delete need S3 too.
    await vibed.couch.database(identity_db(alice.idn, "data")).put(
        {
            "_id": f"$blob:{SOME_ID}",
            "id": SOME_ID,
            "key": f"{alice.idn.removeprefix('idn:')}/{SOME_ID}.png",
            "mime": "image/png",
            "size": 10,
            "meta": {},
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
    )
    assert_problem(await alice.call("GET", f"/blob/download-url/{SOME_ID}"), 503)
    assert_problem(await alice.call("DELETE", f"/blob/{SOME_ID}"), 503)
    listed = await alice.call("GET", "/blob")  # records only: no S3 needed
    assert listed.code == 200 and len(listed.json()["blobs"]) == 1
    assert (await alice.call("GET", "/me")).code == 200
    assert (await new_person(vibed)).token


@pytest_twisted.ensureDeferred
async def test_couchdb_unreachable_is_503(vibeds: VibedSet, own_couch: CouchProcess) -> None:
    """With CouchDB gone, blob routes answer 503 problems instead of hanging or 500, and a
    cleanup round fails quietly without stopping its timer."""
    vibed = await vibeds.start(couch_url=own_couch.url, couch_timeout="3")
    alice = await new_person(vibed)
    own_couch.stop()
    for method, path, body in ROUTES:
        assert_problem(await alice.call(method, path, body), 503)
    # The cleanup timer logs the failure and lives on.
    (cleanup,) = [s for s in vibed.parts.services if isinstance(s, CleanupService)]
    assert await cleanup.tick() == 0
    assert cleanup.running and cleanup._loop.running


@pytest_twisted.ensureDeferred
async def test_identity_deleted_is_404(vibed: Vibed, alice: Person) -> None:
    """A still-valid token of an identity whose databases are gone gets 404, not 500."""
    await vibed.couch.delete_db(identity_db(alice.idn, "data"))
    assert_problem(await alice.call("GET", "/blob"), 404)
    assert_problem(await alice.call("GET", f"/blob/download-url/{SOME_ID}"), 404)
    resp = await alice.call("POST", "/blob/upload-url", {"mime": "image/png", "size": 1})
    assert_problem(resp, 404)  # the quota check reads the blob records


@pytest_twisted.ensureDeferred
async def test_download_url_answers_json_too(alice: Person) -> None:
    """The 302 also carries {url, expiresAt}, for clients that do not follow redirects."""
    blob = await alice.upload(b"hi", "text/plain")
    resp = await alice.call("GET", f"/blob/download-url/{blob['id']}")
    assert resp.code == 302
    assert resp.json()["url"] == resp.header("location")
    assert resp.header("cache-control") == "no-store"
    got = await fetch("GET", alice.vibed.here(resp.json()["url"]))
    assert got.content == b"hi"
