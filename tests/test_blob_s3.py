"""vibed's own S3 requests (bucket bootstrap, HEAD, DELETE), signed with SigV4 headers and sent
over treq, checked by a moto server that verifies signatures (IAM auth on): what goes on the
wire is exactly what was signed. (The shared moto server of the session checks nothing.)"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from conftest import MotoS3
from harness import make_config
from twisted.internet import reactor

from vibed.blobs import StoreUnavailable, object_key
from vibed.blobs.s3 import S3Store


@pytest.fixture(scope="module")
def verifying_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(endpoint, access key id, secret) of a moto server that checks every signature."""
    import botocore.session

    server = MotoS3(tmp_path_factory.mktemp("moto-auth"))
    server.start()
    try:
        iam = botocore.session.get_session().create_client(
            "iam",
            region_name="us-east-1",
            endpoint_url=server.url,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="vibed")
        key = iam.create_access_key(UserName="vibed")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="vibed", PolicyName="s3", PolicyDocument=json.dumps(policy))
        enforce = urllib.request.Request(
            server.url + "/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(enforce, timeout=10):
            pass
        yield server.url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.stop()


def store(tmp_path: Path, endpoint: str, key_id: str, secret: str, region: str) -> S3Store:
    config = make_config(
        tmp_path,
        "http://127.0.0.1:5984/",
        blobs="s3",
        s3_endpoint=endpoint,
        s3_region=region,
        s3_bucket=f"vibe-auth-{uuid.uuid4().hex[:12]}",
        s3_access_key_id=key_id,
        s3_secret_access_key=secret,
    )
    return S3Store.from_config(config, reactor=reactor, clock=time.time)


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-3"])
@pytest_twisted.ensureDeferred
async def test_signed_requests_pass_a_verifying_server(
    tmp_path: Path, verifying_s3: tuple[str, str, str], region: str
) -> None:
    """Creating the bucket (with a signed location body outside us-east-1), creating it again,
    HEAD of a missing object and DELETE all pass signature verification."""
    s3 = store(tmp_path, *verifying_s3, region=region)
    try:
        await s3.ensure_bucket()
        await s3.ensure_bucket()  # idempotent
        await s3.ensure_available()
        key = object_key(f"idn:{uuid.uuid4()}", str(uuid.uuid4()), "image/png")
        assert await s3.stat(key) is None
        await s3.delete(key)
    finally:
        assert s3.pool is not None
        await s3.pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_storage_unavailable(
    tmp_path: Path, verifying_s3: tuple[str, str, str]
) -> None:
    """A secret S3 does not accept makes the store unavailable (a 503 for clients)."""
    endpoint, key_id, _ = verifying_s3
    s3 = store(tmp_path, endpoint, key_id, "not-the-secret", region="us-east-1")
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await s3.ensure_available()
        assert caught.value.status == 503
        assert "403" in caught.value.reason
    finally:
        assert s3.pool is not None
        await s3.pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_listing_streaming_and_prefix_delete_pass_a_verifying_server(
    tmp_path: Path, verifying_s3: tuple[str, str, str]
) -> None:
    """What export and identity deletion ask of S3, signed and checked: a listing of one
    identity's prefix (paged, 1,000 keys a page, another identity's keys left out), an
    object's bytes streamed back exactly (a missing one is None), and every object under the
    prefix deleted while the other identity's stay."""
    s3 = store(tmp_path, *verifying_s3, region="us-east-1")
    try:
        await s3.ensure_bucket()
        owner, other = str(uuid.uuid4()), str(uuid.uuid4())
        keys = [object_key(f"idn:{owner}", str(uuid.uuid4()), "text/plain") for _ in range(3)]
        theirs = object_key(f"idn:{other}", str(uuid.uuid4()), "text/plain")
        big = bytes(range(256)) * 12_000  # 3 MiB: more than the reader's high-water mark
        for i, key in enumerate([*keys, theirs]):
            body = big if i == 0 else f"object {i}".encode()
            code, _, answer = await s3._send("PUT", s3.object_url(key), body)
            assert code == 200, answer
        assert sorted(await s3.keys_under(owner)) == sorted(keys)
        chunks = await s3.open_read(keys[0])
        assert chunks is not None
        received = b"".join([chunk async for chunk in chunks])
        assert received == big
        missing = object_key(f"idn:{owner}", str(uuid.uuid4()), "text/plain")
        assert await s3.open_read(missing) is None
        assert await s3.delete_prefix(owner) == 3
        assert await s3.keys_under(owner) == []
        assert await s3.keys_under(other) == [theirs]
        with pytest.raises(ValueError):
            await s3.keys_under("../" + owner)
    finally:
        assert s3.pool is not None
        await s3.pool.closeCachedConnections()
