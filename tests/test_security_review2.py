"""Security review 2: attacks on the blob and realtime surfaces that used to work, run against
a real vibed over TCP (local blob store, real PouchDB Server); each test's docstring is the
attack and what must happen instead."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from harness import FakeClock, Vibed, VibedSet, new_person, realtime_service
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from vibed.blobs.local import INCOMING
from vibed.blobs.service import CLEANUP_AFTER, BlobService, CleanupService
from vibed.realtime import MAX_FRAMES_PER_MESSAGE


@pytest_twisted.async_yield_fixture
async def vibeds(tmp_path: Path, couch_url: str) -> AsyncIterator[VibedSet]:
    started = VibedSet(tmp_path, couch_url)
    yield started
    await started.stop()


async def _sleep(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


async def _until(ready: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        assert time.monotonic() < deadline, "condition not reached in time"
        await _sleep(0.05)


def _blobs(vibed: Vibed) -> BlobService:
    service: BlobService = vibed.parts.api.blob.blobs
    return service


def _cleanup(vibed: Vibed) -> CleanupService:
    (service,) = [s for s in vibed.parts.services if isinstance(s, CleanupService)]
    return service


# -- blobs ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_put_trickled_past_the_finalize_deadline_never_lands(vibeds: VibedSet) -> None:
    """Attack: start the signed PUT in time, send all but the last byte, keep the connection
    alive until the upload's pending record has been cleaned up (URL expiry + finalize grace
    + cleanup), then send the last byte. The object used to be linked into place with no
    record pointing to it: never finalizable, never cleaned up, outside every quota (disk
    exhaustion, 100 MiB per connection). Expected: bytes that arrive after the finalize
    deadline are refused, the connection is dropped and nothing stays on disk."""
    clock = FakeClock()
    vibed = await vibeds.start(clock=clock)
    alice = await new_person(vibed)
    upload = await alice.upload_url("text/plain", 10)
    target = upload["url"].removeprefix(vibed.config.public_url).encode()
    key = f"{alice.idn.removeprefix('idn:')}/{upload['id']}.txt"
    blobs_dir = Path(vibed.config.data_dir) / "blobs"
    port = vibed.port.getHost().port

    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        conn.sendall(
            b"PUT " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 10\r\nConnection: close\r\n\r\n123456789"
        )
        await _until(lambda: any((blobs_dir / INCOMING).iterdir()))
        clock.advance(vibed.config.blob_upload_ttl + CLEANUP_AFTER + 1)
        await _cleanup(vibed).tick()  # the pending record goes
        conn.sendall(b"0")

        def answer() -> bytes:
            data = b""
            try:
                while part := conn.recv(65536):
                    data += part
            except OSError:
                pass
            return data

        reply = await deferToThread(answer)
    finally:
        conn.close()
    assert not reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert await _blobs(vibed).store.stat(key) is None
    await _until(lambda: not any((blobs_dir / INCOMING).iterdir()))


@pytest_twisted.ensureDeferred
async def test_deleted_blob_put_again_counts_against_the_quota(vibeds: VibedSet) -> None:
    """Attack: upload and finalize a blob, delete it (its bytes leave the quota), PUT the
    same bytes again with the still-valid upload URL (write-once only while the object
    exists), repeat with fresh uploads. The re-PUT objects stayed on disk until the cleanup
    (up to ~26 minutes) and no quota counted them: a quota of 1000 bytes held any number of
    max-size objects. Expected: an object PUT again after its blob was deleted counts against
    the quota until the cleanup removes it; deleting a blob still frees its bytes at once."""
    vibed = await vibeds.start(blob_quota="1000", blob_mime_types="text/plain")
    alice = await new_person(vibed)
    upload = await alice.upload_url("text/plain", 600)
    assert (await alice.put(upload, b"x" * 600)).code == 200
    done = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert done.code == 201
    assert (await alice.call("DELETE", f"/blob/{upload['id']}")).code == 204
    assert (await alice.upload_url("text/plain", 1000))["id"]  # freed at once (then pending)

    alice2 = await new_person(vibed)
    first = await alice2.upload_url("text/plain", 600)
    assert (await alice2.put(first, b"y" * 600)).code == 200
    assert (await alice2.call("POST", "/blob/finalize-upload", {"id": first["id"]})).code == 201
    assert (await alice2.call("DELETE", f"/blob/{first['id']}")).code == 204
    assert (await alice2.put(first, b"z" * 600)).code == 200  # the old URL, used again
    over = await alice2.call("POST", "/blob/upload-url", {"mime": "text/plain", "size": 600})
    assert over.code == 403, over.content
    assert over.json()["type"].endswith("/quota-exceeded")


@pytest_twisted.ensureDeferred
async def test_meta_with_an_infinite_number_is_a_400_not_a_500(vibeds: VibedSet) -> None:
    """Attack: finalize with ``{"meta": {"x": 1e999}}``. Python parses 1e999 as infinity,
    which is no JSON: CouchDB refused the record and the route answered 500 (with a logged
    traceback). Expected: a 400 (since fixed for every route in ``parse_json``, which refuses
    non-finite numbers), and the upload can still be finalized."""
    vibed = await vibeds.start(blob_mime_types="text/plain")
    alice = await new_person(vibed)
    upload = await alice.upload_url("text/plain", 2)
    assert (await alice.put(upload, b"hi")).code == 200
    for number in (b"1e999", b"-1e999"):
        raw = b'{"id": "' + upload["id"].encode() + b'", "meta": {"x": [' + number + b"]}}"
        bad = await alice.call("POST", "/blob/finalize-upload", raw=raw)
        assert bad.code == 400, bad.content
        assert bad.json()["type"].endswith(("/invalid-json", "/invalid-meta"))
    done = await alice.call("POST", "/blob/finalize-upload", {"id": upload["id"]})
    assert done.code == 201, done.content


# -- realtime ------------------------------------------------------------------------------


class _RawSocket:
    """A minimal blocking WebSocket client (run it in a thread): frames as the test wants
    them, including ones no library would send."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            part = self.sock.recv(4096)
            assert part, "handshake refused"
            self.buf += part
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    @staticmethod
    def frame(payload: bytes, opcode: int, fin: bool = True) -> bytes:
        first = (0x80 if fin else 0) | opcode
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        return struct.pack("!BB", first, 0x80 | len(payload)) + mask + masked

    def read_frame(self) -> tuple[int, bytes]:
        def need(n: int) -> None:
            while len(self.buf) < n:
                part = self.sock.recv(65536)
                if not part:
                    raise EOFError
                self.buf += part

        need(2)
        length, offset = self.buf[1] & 0x7F, 2
        if length == 126:
            need(4)
            length, offset = struct.unpack("!H", self.buf[2:4])[0], 4
        elif length == 127:
            need(10)
            length, offset = struct.unpack("!Q", self.buf[2:10])[0], 10
        need(offset + length)
        opcode, payload = self.buf[0] & 0x0F, self.buf[offset : offset + length]
        self.buf = self.buf[offset + length :]
        return opcode, payload

    def close(self) -> None:
        self.sock.close()


async def _authenticated_raw_socket(vibed: Vibed) -> _RawSocket:
    token, _ = vibed.parts.issuer.issue_access("idn:" + _uuid4(), ["data:*"])
    port = vibed.port.getHost().port
    raw: _RawSocket = await deferToThread(_RawSocket, port, f"/realtime?access_token={token}")
    opcode, payload = await deferToThread(raw.read_frame)
    assert opcode == 1 and b"authenticated" in payload, payload
    return raw


def _uuid4() -> str:
    import uuid

    return str(uuid.uuid4())


@pytest_twisted.ensureDeferred
async def test_a_ping_flood_from_a_peer_that_never_reads_stays_bounded(
    vibeds: VibedSet,
) -> None:
    """Attack: open an authenticated socket, never read, and send WebSocket pings as fast as
    possible. Every pong went straight to the transport, around the bounded send queue, so
    the daemon's memory grew with the attacker's bandwidth (about 240 MB in 30 s over
    loopback) until the ping timeout dropped the peer. Expected: while the peer's buffer is
    full, only the latest ping is answered (once it drains): the transport's buffer stays
    bounded."""
    vibed = await vibeds.start()
    raw = await _authenticated_raw_socket(vibed)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    (server,) = realtime_service(vibed).sockets
    pings = _RawSocket.frame(b"p" * 125, 9) * 2000
    marker = _RawSocket.frame(b'{"type":"subscribe","collection":"Bad"}', 1)

    def flood() -> None:
        for _ in range(40):  # ~10 MiB of pings
            raw.sock.sendall(pings)
        raw.sock.sendall(marker)

    try:
        await deferToThread(flood)
        # The marker's error reply waits in the bounded queue: every ping was handled.
        await _until(lambda: server.queued[0] >= 1 or server._gone, within=30)
        transport = server.transport
        buffered = len(transport.dataBuffer) + transport._tempDataLen
        assert buffered < 1024 * 1024, f"{buffered} bytes of pongs buffered"
    finally:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_a_message_in_endless_empty_fragments_is_refused(vibeds: VibedSet) -> None:
    """Attack: start a text message and follow it with empty continuation frames for ever
    (6 bytes each on the wire). Autobahn bounds a message's bytes, not its frames: the
    fragment list grew by a pointer per frame and the reactor stayed busy with that one peer
    for as long as it liked. Expected: past a fixed number of frames per message the socket
    is closed with 1009 (message too big)."""
    vibed = await vibeds.start()
    raw = await _authenticated_raw_socket(vibed)
    frames = _RawSocket.frame(b"{", 1, fin=False) + _RawSocket.frame(b"", 0, fin=False) * (
        MAX_FRAMES_PER_MESSAGE * 4
    )

    def attack() -> tuple[int, bytes]:
        try:
            raw.sock.sendall(frames)
        except OSError:
            pass
        while True:
            opcode, payload = raw.read_frame()
            if opcode == 8:
                return opcode, payload

    try:
        opcode, payload = await deferToThread(attack)
    finally:
        raw.close()
    assert struct.unpack("!H", payload[:2])[0] == 1009, payload


@pytest_twisted.ensureDeferred
async def test_realtime_tokens_never_reach_the_logs(vibeds: VibedSet) -> None:
    """(Held already; kept as a guard.) Attack (on the operator's logs): the access token
    rides in ``/realtime``'s query string; every way of using it (an accepted socket, a
    refused handshake, a plain GET, a POST) must leave no trace of it in any log event.
    Expected: the token never appears."""
    from twisted.logger import globalLogPublisher

    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        seen.append(formatEvent(event) + repr(event))

    vibed = await vibeds.start()
    globalLogPublisher.addObserver(observer)
    try:
        raw = await _authenticated_raw_socket(vibed)
        raw.close()
        token, _ = vibed.parts.issuer.issue_access("idn:" + _uuid4(), ["data:*"])
        port = vibed.port.getHost().port

        def attempts() -> None:
            for head in (
                "GET /realtime?access_token={t} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "GET /realtime?access_token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 99\r\n\r\n",
                "POST /realtime?access_token={t} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n",
            ):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(head.format(t=token).encode())
                    try:
                        while s.recv(65536):
                            pass
                    except OSError:
                        pass

        await deferToThread(attempts)
        await _sleep(0.2)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert seen, "nothing was logged at all"
    signature = token.rsplit(".", 1)[1]
    assert not [line for line in seen if signature in line]
