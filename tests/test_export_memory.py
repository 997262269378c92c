"""The export is streamed (issue 9): a real ``twistd vibed`` sends an archive several times
larger than the growth of its own memory, to a fast reader and to one that stops reading for a
while (the daemon must pause, not buffer)."""

from __future__ import annotations

import http.client
import json
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from browser import PASSWORD, VibedProcess

FILES = 3
FILE_SIZE = 40 * 1024 * 1024


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, couch_url: str) -> Iterator[VibedProcess]:
    vibed = VibedProcess(tmp_path_factory.mktemp("export-vibed"), couch_url)
    yield vibed
    vibed.stop()


def put_bytes(url: str, headers: dict[str, str], size: int) -> None:
    """PUT ``size`` bytes (a repeating pattern, generated as sent) to a signed URL."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=60)
    conn.putrequest("PUT", parts.path + "?" + parts.query)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    block = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(size // len(block)):
        conn.send(block)
    answer = conn.getresponse()
    assert answer.status == 200, answer.read()
    conn.close()


def test_export_memory_stays_flat(server: VibedProcess, tmp_path: Path) -> None:
    """An identity with 120 MiB of files exports a ZIP of that size; the daemon's resident
    memory grows by far less than the archive (under 40 MiB) while a client reads it, including
    while the client stops reading for two seconds; the archive is whole (every CRC checks)."""
    email = f"export-{uuid.uuid4().hex[:10]}@example.org"
    code, body = server.call("POST", "/auth/signup", {"email": email, "password": PASSWORD})
    assert code == 201, body
    token = body["accessToken"]
    for i in range(FILES):
        declared = {"mime": "application/octet-stream", "size": FILE_SIZE}
        code, up = server.call("POST", "/blob/upload-url", declared, token)
        assert code == 200, up
        put_bytes(up["url"], up["headers"], FILE_SIZE)
        code, blob = server.call(
            "POST", "/blob/finalize-upload", {"id": up["id"], "meta": {"name": f"f{i}.bin"}}, token
        )
        assert code == 201, blob
    pid = server.process.proc.pid
    time.sleep(0.5)
    before = rss(pid)
    peak = before
    out = tmp_path / "export.zip"
    conn = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=60)
    conn.request("GET", "/me/export", headers={"Authorization": f"Bearer {token}"})
    answer = conn.getresponse()
    assert answer.status == 200
    received = 0
    with out.open("wb") as f:
        paused = False
        while chunk := answer.read(1024 * 1024):
            f.write(chunk)
            received += len(chunk)
            peak = max(peak, rss(pid))
            if received > 10 * 1024 * 1024 and not paused:
                paused = True
                for _ in range(20):  # the reader stops for 2 s: the daemon must wait
                    time.sleep(0.1)
                    peak = max(peak, rss(pid))
    conn.close()
    assert received > FILES * FILE_SIZE
    growth = peak - before
    print(f"export {received / 2**20:.0f} MiB, daemon RSS +{growth / 2**20:.1f} MiB")
    assert growth < 40 * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MiB"
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None
        files = json.loads(archive.read("files.json"))
        assert sorted(f["path"] for f in files) == [f"files/f{i}.bin" for i in range(FILES)]
        assert archive.getinfo("files/f0.bin").file_size == FILE_SIZE
