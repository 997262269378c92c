"""The blob flow end to end, against both stores: a real vibed over TCP and a real PouchDB
Server, with the local store on disk or moto's S3 server (a separate process)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import FakeClock, Vibed, VibedSet, fetch, new_person, s3_options

from vibed.blobs.service import CLEANUP_AFTER, BlobService, CleanupService
from vibed.naming import UPLOADS_DB

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


@pytest_twisted.async_yield_fixture
async def vibeds(tmp_path: Path, couch_url: str) -> AsyncIterator[VibedSet]:
    started = VibedSet(tmp_path, couch_url)
    yield started
    await started.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> str:
    """Which store the test runs against."""
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def vibed(
    vibeds: VibedSet, store: str, request: pytest.FixtureRequest
) -> AsyncIterator[Vibed]:
    options: dict[str, Any] = {"clock": FakeClock()}
    if store == "s3":
        options |= s3_options(request.getfixturevalue("s3_url"))
    yield await vibeds.start(**options)


def blobs_of(vibed: Vibed) -> BlobService:
    service: BlobService = vibed.parts.api.blob.blobs
    return service


def cleanup_of(vibed: Vibed) -> CleanupService:
    (service,) = [s for s in vibed.parts.services if isinstance(s, CleanupService)]
    return service


@pytest_twisted.ensureDeferred
async def test_whole_flow(vibed: Vibed, store: str) -> None:
    """upload-url signs a PUT of exactly the declared type and size under the caller's
    prefix; the bytes PUT with exactly the listed headers are finalized, listed, downloaded
    identical through the 302, then deleted: the record, the listing entry and the object go,
    and a later download-url is 404."""
    alice = await new_person(vibed)
    data = os.urandom(70_000) + b"\x00\xff end"
    upload = await alice.upload_url("image/png", len(data))
    assert set(upload) == {"id", "url", "method", "headers", "expiresAt"}
    assert re.fullmatch(UUID, upload["id"])
    assert upload["method"] == "PUT"
    assert upload["headers"] == {"Content-Type": "image/png", "Content-Length": str(len(data))}
    owner = alice.idn.removeprefix("idn:")
    assert f"/{owner}/{upload['id']}.png?" in upload["url"]
    assert upload["expiresAt"] == pytest.approx(vibed.clock() + 900, abs=5)

    put = await alice.put(upload, data)
    assert put.code == 200, put.content

    finalized = await alice.call(
        "POST", "/blob/finalize-upload", {"id": upload["id"], "meta": {"name": "cat.png"}}
    )
    assert finalized.code == 201, finalized.content
    blob = finalized.json()
    assert blob["id"] == upload["id"]
    assert blob["key"] == f"{owner}/{upload['id']}.png"
    assert (blob["mime"], blob["size"], blob["meta"]) == (
        "image/png",
        len(data),
        {"name": "cat.png"},
    )
    assert blob["createdAt"].endswith("Z")

    listed = await alice.call("GET", "/blob")
    assert listed.code == 200
    assert listed.json() == {"blobs": [blob], "next": None}

    redirect = await alice.call("GET", f"/blob/download-url/{blob['id']}")
    assert redirect.code == 302
    location = redirect.header("location")
    assert location is not None and location == redirect.json()["url"]
    downloaded = await fetch("GET", vibed.here(location))
    assert downloaded.code == 200
    assert downloaded.content == data
    assert downloaded.header("content-type") == "image/png"

    deleted = await alice.call("DELETE", f"/blob/{blob['id']}")
    assert deleted.code == 204
    assert (await alice.call("GET", "/blob")).json() == {"blobs": [], "next": None}
    gone = await alice.call("GET", f"/blob/download-url/{blob['id']}")
    assert gone.code == 404
    assert gone.header("content-type") == "application/problem+json"
    assert (await fetch("GET", vibed.here(location))).code == 404
    assert await blobs_of(vibed).store.stat(blob["key"]) is None
    assert (await alice.call("DELETE", f"/blob/{blob['id']}")).code == 404


@pytest_twisted.ensureDeferred
async def test_finalize_twice_before_upload_and_unknown(vibed: Vibed) -> None:
    """Finalize before the PUT is 409 not-uploaded (and may be retried after it); a second
    finalize is 409 already-finalized; an id nobody signed is 404."""
    alice = await new_person(vibed)
    upload = await alice.upload_url("text/plain", 5)
    early = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert early.code == 409
    assert early.json()["type"].endswith("/not-uploaded")
    assert "PUT the bytes" in early.json()["detail"]

    assert (await alice.put(upload, b"hello")).code == 200
    first = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert first.code == 201
    assert first.json()["meta"] == {}
    again = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert again.code == 409
    assert again.json()["type"].endswith("/already-finalized")

    unknown = await alice.call(
        "POST", "/blob/finalize-upload", {"id": "0f0e0d0c-0b0a-4908-8706-050403020100"}
    )
    assert unknown.code == 404


@pytest_twisted.ensureDeferred
async def test_isolation_between_identities(vibed: Vibed) -> None:
    """Bob's token cannot finalize, download, list or delete Alice's blob: each answers as if
    it did not exist (404), and Alice's blob is untouched afterwards."""
    alice, bob = await new_person(vibed), await new_person(vibed)
    upload = await alice.upload_url("text/plain", 3)
    assert (await alice.put(upload, b"abc")).code == 200

    stolen = await bob.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert stolen.code == 404
    mine = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert mine.code == 201

    assert (await bob.call("GET", f"/blob/download-url/{upload['id']}")).code == 404
    assert (await bob.call("DELETE", f"/blob/{upload['id']}")).code == 404
    assert (await bob.call("GET", "/blob")).json() == {"blobs": [], "next": None}
    again = await bob.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert again.code == 404  # not 409: Bob learns nothing about Alice's ids

    assert (await alice.download(upload["id"])).content == b"abc"


@pytest_twisted.ensureDeferred
async def test_put_that_differs_from_the_signature_is_rejected(vibed: Vibed, store: str) -> None:
    """A PUT with another Content-Type or length than signed never becomes a blob: the local
    store refuses it (415, 400, 413); moto stores it (it checks no presigned signature, see
    docs/blobs.md), so finalize refuses it (409 upload-mismatch) and removes the object."""
    alice = await new_person(vibed)
    upload = await alice.upload_url("image/png", 10)
    other_type = await alice.put(upload, b"0123456789", headers={"Content-Type": "text/html"})
    shorter = await alice.put(upload, b"012345678")
    if store == "local":
        assert other_type.code == 415
        assert "image/png" in other_type.json()["detail"]
        assert shorter.code == 400
        longer = await alice.put(upload, b"0123456789A")
        assert longer.code == 413
        early = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
        assert early.code == 409 and early.json()["type"].endswith("/not-uploaded")
    else:
        assert shorter.code == 200  # moto: the last PUT wins, 9 bytes instead of 10
        refused = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
        assert refused.code == 409
        assert refused.json()["type"].endswith("/upload-mismatch")
        key = f"{alice.idn.removeprefix('idn:')}/{upload['id']}.png"
        assert await blobs_of(vibed).store.stat(key) is None
        typed = await alice.put(upload, b"0123456789", headers={"Content-Type": "text/html"})
        assert typed.code == 200
        refused = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
        assert refused.code == 409 and "text/html" in refused.json()["detail"]
    # The right PUT still works afterwards, within the URL's lifetime.
    assert (await alice.put(upload, b"0123456789")).code == 200
    ok = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert ok.code == 201


@pytest_twisted.ensureDeferred
async def test_cleanup_removes_uploads_never_finalized(vibed: Vibed) -> None:
    """Once an upload's URL has expired (plus the finalize grace), one cleanup round removes
    its object and its pending record, also when nothing was ever PUT; finalized blobs and
    fresh uploads are left alone; finalize then answers 404."""
    alice = await new_person(vibed)
    blobs = blobs_of(vibed)
    kept = await alice.upload(b"keep me", "text/plain")
    abandoned = await alice.upload_url("text/plain", 4)
    assert (await alice.put(abandoned, b"lost")).code == 200
    never_put = await alice.upload_url("text/plain", 4)
    owner = alice.idn.removeprefix("idn:")
    abandoned_key = f"{owner}/{abandoned['id']}.txt"
    assert await blobs.store.stat(abandoned_key) is not None

    await cleanup_of(vibed).tick()  # nothing of Alice's has expired yet
    assert await blobs.store.stat(abandoned_key) is not None
    clock = vibed.clock
    assert isinstance(clock, FakeClock)
    clock.advance(vibed.config.blob_upload_ttl + CLEANUP_AFTER + 1)
    alice.token, _ = vibed.parts.issuer.issue_access(alice.idn, ["blob:*"])
    fresh = await alice.upload_url("text/plain", 1)  # signed now: not expired

    # (Other tests' expired uploads in the shared database may go in the same round.)
    assert await cleanup_of(vibed).tick() >= 2
    assert await blobs.store.stat(abandoned_key) is None
    uploads = await vibed.couch.database(UPLOADS_DB).all_docs(
        startkey=f"{alice.idn}:", endkey=f"{alice.idn}:\ufff0"
    )
    assert [row["id"] for row in uploads["rows"]] == [f"{alice.idn}:{fresh['id']}"]
    assert await blobs.store.stat(kept["key"]) is not None
    for upload in (abandoned, never_put):
        late = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
        assert late.code == 404


@pytest_twisted.ensureDeferred
async def test_object_put_again_after_delete_is_cleaned_up(vibed: Vibed) -> None:
    """Deleting a blob whose upload URL is still valid leaves a tombstone: an object PUT again
    with the old URL is not a blob (finalize 404) and the cleanup removes it."""
    alice = await new_person(vibed)
    upload = await alice.upload_url("text/plain", 5)
    assert (await alice.put(upload, b"first")).code == 200
    assert (await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})).code == 201
    assert (await alice.call("DELETE", f"/blob/{upload['id']}")).code == 204

    assert (await alice.put(upload, b"again")).code == 200
    key = f"{alice.idn.removeprefix('idn:')}/{upload['id']}.txt"
    assert await blobs_of(vibed).store.stat(key) is not None
    late = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert late.code == 404

    clock = vibed.clock
    assert isinstance(clock, FakeClock)
    clock.advance(vibed.config.blob_upload_ttl + CLEANUP_AFTER + 1)
    assert await cleanup_of(vibed).tick() >= 1
    assert await blobs_of(vibed).store.stat(key) is None


@pytest_twisted.ensureDeferred
async def test_list_pages(vibed: Vibed) -> None:
    """GET /blob pages through every blob exactly once with limit and after."""
    alice = await new_person(vibed)
    ids = {(await alice.upload(b"x" * n, "text/plain"))["id"] for n in range(1, 6)}
    seen: list[str] = []
    after = ""
    for _ in range(5):
        page = await alice.call("GET", f"/blob?limit=2{after}")
        assert page.code == 200, page.content
        body = page.json()
        assert len(body["blobs"]) <= 2
        seen += [b["id"] for b in body["blobs"]]
        if body["next"] is None:
            break
        after = f"&after={body['next']}"
    assert sorted(seen) == sorted(ids)
    slash = await alice.call("GET", "/blob/?limit=200")
    assert {b["id"] for b in slash.json()["blobs"]} == ids
