"""--s3-public-endpoint: signed URLs name the address clients use, while vibed's own requests
go to --s3-endpoint (S3 behind the self-host reverse proxy, reached inside by another name)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from harness import make_config
from twisted.internet.task import Clock

from vibed.blobs import object_key
from vibed.blobs.s3 import S3Store
from vibed.config import ConfigError

KEY = object_key(f"idn:{uuid.uuid4()}", str(uuid.uuid4()), "image/png")


def store(tmp_path: Path, **options: str) -> S3Store:
    config = make_config(
        tmp_path,
        "http://127.0.0.1:5984/",
        blobs="s3",
        s3_endpoint="http://minio:9000",
        s3_access_key_id="AKIAEXAMPLE",
        s3_secret_access_key="secret-example-key",
        **options,
    )
    return S3Store.from_config(config, reactor=Clock(), clock=time.time)


def test_signed_urls_use_the_public_endpoint_and_vibed_the_inner_one(tmp_path: Path) -> None:
    """With a public endpoint, upload and download URLs point at it (path style, same bucket
    and key, the host signed being the public one), while the bucket and object requests vibed
    makes itself still go to the inner endpoint."""
    s3 = store(tmp_path, s3_public_endpoint="https://vibe.example.org/")
    upload = urlsplit(s3.sign_upload(KEY, "image/png", 42, int(time.time()) + 300).url)
    download = urlsplit(s3.sign_download(KEY, "image/png", int(time.time()) + 300))
    for url in (upload, download):
        assert (url.scheme, url.netloc, url.path) == (
            "https",
            "vibe.example.org",
            f"/vibe-objects/{KEY}",
        )
        assert "host" in parse_qs(url.query)["X-Amz-SignedHeaders"][0].split(";")
    assert s3.bucket_url() == "http://minio:9000/vibe-objects"
    assert s3.object_url(KEY) == f"http://minio:9000/vibe-objects/{KEY}"


def test_without_a_public_endpoint_signed_urls_use_the_endpoint(tmp_path: Path) -> None:
    """The option is optional: without it nothing changes, signed URLs name --s3-endpoint."""
    s3 = store(tmp_path)
    url = urlsplit(s3.sign_download(KEY, "image/png", int(time.time()) + 300))
    assert (url.scheme, url.netloc) == ("http", "minio:9000")


@pytest.mark.parametrize(
    "bad", ["ftp://vibe.example.org", "vibe.example.org", "https://vibe.example.org/s3"]
)
def test_a_bad_public_endpoint_stops_the_start_naming_it(tmp_path: Path, bad: str) -> None:
    """A public endpoint that is not scheme://host[:port] is a one-line error naming the option."""
    with pytest.raises(ConfigError, match="--s3-public-endpoint"):
        store(tmp_path, s3_public_endpoint=bad)
