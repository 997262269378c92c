"""Range requests on the local store: single ranges honoured, multi-range lists ignored."""

from __future__ import annotations

from pathlib import Path

from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from vibed.blobs.local import _BlobFile


def _get(path: Path, range_header: bytes | None) -> tuple[int, bytes]:
    request = DummyRequest([b""])
    if range_header is not None:
        request.requestHeaders.setRawHeaders(b"range", [range_header])
    result = _BlobFile(str(path)).render(request)
    assert result == NOT_DONE_YET
    # DummyRequest drives the (pull) producer to the end inside render.
    return request.responseCode or 200, b"".join(request.written)


def test_one_range_is_served_as_206(tmp_path: Path) -> None:
    """``bytes=2-5`` answers 206 with exactly those bytes."""
    blob = tmp_path / "b"
    blob.write_bytes(b"0123456789")
    code, body = _get(blob, b"bytes=2-5")
    assert (code, body) == (206, b"2345")


def test_many_overlapping_ranges_get_the_file_once(tmp_path: Path) -> None:
    """A header listing the same range a thousand times cannot multiply the answer: the
    file is served once, whole, with 200."""
    blob = tmp_path / "b"
    blob.write_bytes(b"hello")
    code, body = _get(blob, b"bytes=" + b",".join([b"0-4"] * 1000))
    assert (code, body) == (200, b"hello")
