"""The local store's signed URLs, served by a real vibed over TCP: signatures, expiry,
streaming limits, Range requests, safe download headers and key validation."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest_twisted
from harness import FakeClock, Person, Vibed, VibedSet, fetch, new_person
from twisted.internet.threads import deferToThread

from vibed.blobs.local import INCOMING


@pytest_twisted.async_yield_fixture
async def vibed(tmp_path: Path, couch_url: str) -> AsyncIterator[Vibed]:
    started = VibedSet(tmp_path, couch_url)
    yield await started.start(clock=FakeClock(), blob_mime_types="image/*,text/*,application/pdf")
    await started.stop()


@pytest_twisted.async_yield_fixture
async def alice(vibed: Vibed) -> AsyncIterator[Person]:
    yield await new_person(vibed)


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return parts._replace(query=urlencode(query)).geturl()


def problem(resp: Any, status: int, slug: str) -> dict[str, Any]:
    assert resp.code == status, resp.content
    assert resp.header("content-type") == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["type"].endswith("/" + slug), body
    return body


@pytest_twisted.ensureDeferred
async def test_tampered_signature_is_403(vibed: Vibed, alice: Person) -> None:
    """Changing the signature, the size, the type or the expiry of a signed PUT URL makes it
    a 403 bad-signature, and nothing is stored."""
    upload = await alice.upload_url("text/plain", 5)
    sig = parse_qs(urlsplit(upload["url"]).query)["sig"][0]
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    for url in (
        with_query(upload["url"], sig=flipped),
        with_query(upload["url"], sig=sig[:-1]),
        with_query(upload["url"], size="6"),
        with_query(upload["url"], type="text/html"),
        with_query(upload["url"], exp=str(upload["expiresAt"] + 3600)),
    ):
        size = parse_qs(urlsplit(url).query)["size"][0]
        mime = parse_qs(urlsplit(url).query)["type"][0]
        resp = await fetch(
            "PUT", vibed.here(url), data=b"x" * int(size), headers={"Content-Type": mime}
        )
        problem(resp, 403, "bad-signature")
    early = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    problem(early, 409, "not-uploaded")


@pytest_twisted.ensureDeferred
async def test_signature_reused_for_another_key_or_method_is_403(
    vibed: Vibed, alice: Person
) -> None:
    """A signature made for one object does not open another (of the same or another
    identity), and a download signature does not allow an upload."""
    bob = await new_person(vibed)
    mine = await alice.upload_url("text/plain", 5)
    theirs = await bob.upload_url("text/plain", 5)
    mine_query = urlsplit(mine["url"]).query
    stolen = theirs["url"].split("?")[0] + "?" + mine_query
    resp = await alice.put({**theirs, "url": stolen}, b"12345")
    problem(resp, 403, "bad-signature")

    blob = await alice.upload(b"hello", "text/plain")
    location = (await alice.call("GET", f"/blob/download-url/{blob['id']}")).header("location")
    assert location is not None
    get_query = parse_qs(urlsplit(location).query)
    as_put = with_query(location, size="5")
    resp = await fetch(
        "PUT", vibed.here(as_put), data=b"EVIL!", headers={"Content-Type": "text/plain"}
    )
    problem(resp, 403, "bad-signature")
    # And the GET signature of one object does not read another.
    other = await alice.upload(b"other", "text/plain")
    other_url = f"{vibed.url}/blob/local/{other['key']}?" + urlencode(
        {k: v[0] for k, v in get_query.items()}
    )
    problem(await fetch("GET", other_url), 403, "bad-signature")
    assert (await fetch("GET", vibed.here(location))).content == b"hello"


@pytest_twisted.ensureDeferred
async def test_expired_urls_are_403(vibed: Vibed, alice: Person) -> None:
    """Upload and download URLs stop working once their expiry passes (403 url-expired)."""
    blob = await alice.upload(b"hello", "text/plain")
    location = (await alice.call("GET", f"/blob/download-url/{blob['id']}")).header("location")
    assert location is not None
    upload = await alice.upload_url("text/plain", 5)
    clock = vibed.clock
    assert isinstance(clock, FakeClock)
    clock.advance(vibed.config.blob_url_ttl + 1)
    problem(await fetch("GET", vibed.here(location)), 403, "url-expired")
    clock.advance(vibed.config.blob_upload_ttl)
    problem(await alice.put(upload, b"12345"), 403, "url-expired")


@pytest_twisted.ensureDeferred
async def test_range_requests(vibed: Vibed, alice: Person) -> None:
    """Downloads honour single byte ranges (206 with Content-Range), suffix ranges, and
    answer 416 for a range past the end."""
    data = bytes(range(256)) * 40
    blob = await alice.upload(data, "application/pdf")
    part = await alice.download(blob["id"], headers={"Range": "bytes=100-199"})
    assert part.code == 206
    assert part.content == data[100:200]
    assert part.header("content-range") == f"bytes 100-199/{len(data)}"
    tail = await alice.download(blob["id"], headers={"Range": "bytes=-10"})
    assert tail.code == 206 and tail.content == data[-10:]
    past = await alice.download(blob["id"], headers={"Range": f"bytes={len(data) + 5}-"})
    assert past.code == 416


@pytest_twisted.ensureDeferred
async def test_downloads_cannot_run_script_on_our_origin(vibed: Vibed, alice: Person) -> None:
    """Every download is typed as finalized, nosniff and CSP-sandboxed; HTML and SVG are
    attachments, while plain images stay inline; anyone may read them cross-origin (the URL is
    the credential)."""
    html = await alice.upload(b"<script>alert(1)</script>", "text/html")
    svg = await alice.upload(b"<svg onload='alert(1)'/>", "image/svg+xml")
    png = await alice.upload(b"\x89PNG fake", "image/png")
    for blob, disposition in ((html, "attachment"), (svg, "attachment"), (png, "inline")):
        resp = await alice.download(blob["id"])
        assert resp.code == 200
        assert resp.header("content-type") == blob["mime"]
        assert resp.header("x-content-type-options") == "nosniff"
        assert "sandbox" in (resp.header("content-security-policy") or "")
        assert (resp.header("content-disposition") or "").startswith(disposition)
        assert resp.header("access-control-allow-origin") == "*"


@pytest_twisted.ensureDeferred
async def test_each_upload_url_writes_once(vibed: Vibed, alice: Person) -> None:
    """A second PUT with the same URL is 409: a blob's bytes never change under it."""
    upload = await alice.upload_url("text/plain", 5)
    assert (await alice.put(upload, b"first")).code == 200
    problem(await alice.put(upload, b"other"), 409, "already-uploaded")
    await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert (await alice.download(upload["id"])).content == b"first"


@pytest_twisted.ensureDeferred
async def test_keys_that_are_not_keys_never_reach_the_disk(vibed: Vibed, alice: Person) -> None:
    """Traversal and malformed keys are 404 (or 400) problems, never a file outside the blob
    directory, never a 500."""
    upload = await alice.upload_url("text/plain", 5)
    query = urlsplit(upload["url"]).query
    owner = alice.idn.removeprefix("idn:")
    for path in (
        "/blob/local/../../etc/passwd",
        "/blob/local/%2e%2e/%2e%2e/etc/passwd",
        f"/blob/local/{owner}/..%2f..%2fjwt-ed25519.pem",
        f"/blob/local/{owner}/{INCOMING}",
        f"/blob/local/{owner}/{upload['id']}.PNG",
        f"/blob/local/{owner}/{upload['id']}",
        f"/blob/local/{owner.upper()}/{upload['id']}.txt",
        "/blob/local/x/y",
    ):
        for method, data in (("GET", None), ("PUT", b"12345")):
            resp = await fetch(
                method,
                f"{vibed.url}{path}?{query}",
                data=data,
                headers={"Content-Type": "text/plain"},
            )
            assert resp.code in (400, 403, 404), (method, path, resp.code)
            assert b"Traceback" not in resp.content
    root = Path(vibed.config.data_dir) / "blobs"
    assert sorted(p.name for p in root.iterdir()) == [INCOMING]
    assert list((root / INCOMING).iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_cors_preflight(vibed: Vibed, alice: Person) -> None:
    """Browsers on other origins may PUT to and GET from signed URLs (preflight 204)."""
    upload = await alice.upload_url("text/plain", 5)
    resp = await fetch(
        "OPTIONS",
        vibed.here(upload["url"]),
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PUT"},
    )
    assert resp.code == 204
    assert resp.header("access-control-allow-origin") == "*"
    assert "PUT" in (resp.header("access-control-allow-methods") or "")
    assert "Content-Type" in (resp.header("access-control-allow-headers") or "")


@pytest_twisted.ensureDeferred
async def test_large_upload_streams_to_disk(vibed: Vibed, alice: Person) -> None:
    """An upload larger than the API's 1 MiB body limit streams into the blob directory
    (the signed size is its limit) and comes back byte for byte; no temporary file stays."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    blob = await alice.upload(data, "application/pdf")
    assert (await alice.download(blob["id"])).content == data
    assert list((Path(vibed.config.data_dir) / "blobs" / INCOMING).iterdir()) == []


def _raw_put(port: int, head: bytes, chunks: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except OSError:
            pass  # refused while sending: the point
        answer = b""
        try:
            while part := s.recv(65536):
                answer += part
        except OSError:
            pass
        return answer


@pytest_twisted.ensureDeferred
async def test_chunked_body_longer_than_signed_is_cut_off(vibed: Vibed, alice: Person) -> None:
    """A chunked PUT (no Content-Length) is refused with 413 as soon as it passes the signed
    size; an exact chunked PUT is accepted."""
    upload = await alice.upload_url("text/plain", 100_000)
    target = upload["url"].removeprefix(vibed.config.public_url).encode()
    head = (
        b"PUT " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    chunk = b"%x\r\n" % 60_000 + b"a" * 60_000 + b"\r\n"
    port = vibed.port.getHost().port
    answer = await deferToThread(_raw_put, port, head, [chunk] * 5 + [b"0\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    exact = [b"%x\r\n" % 50_000 + b"b" * 50_000 + b"\r\n"] * 2 + [b"0\r\n\r\n"]
    answer = await deferToThread(_raw_put, port, head, exact)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    done = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert done.code == 201


@pytest_twisted.ensureDeferred
async def test_local_urls_need_no_bearer_but_everything_else_does(
    vibed: Vibed, alice: Person
) -> None:
    """Signed URLs work without Authorization (the signature is the credential), and a bearer
    token does not replace a signature."""
    upload = await alice.upload_url("text/plain", 5)
    unsigned = vibed.here(upload["url"]).split("?")[0]
    resp = await fetch(
        "PUT",
        unsigned,
        data=b"12345",
        headers={"Content-Type": "text/plain", "Authorization": f"Bearer {alice.token}"},
    )
    problem(resp, 403, "bad-signature")
    assert (await alice.put(upload, b"12345")).code == 200
