"""The export: everything an identity owns as one ZIP archive, streamed.

Layout of ``vibe-export-<date>.zip``::

    README.txt                what is where
    identity.json             id, email, did:key, public key, created; the wrapped key and
                              its salt (docs/keys.md: the password unwraps it offline)
    collections/<name>.json   every document of the collection, a JSON array
    files.json                every file: id, name, type, size, meta, created, path below
    files/<name>              the bytes of each file (named as uploaded, made unique)
    grants.json               the apps the person allowed

The archive is written while it is sent: documents a page at a time, file bytes a chunk at a
time from the store, each piece handed to the connection and the next one read only when the
client has taken it (the request is a push producer's consumer: a slow client pauses the
export). Memory stays flat whatever the archive's size. ZIP entries use data descriptors (the
sizes follow the data), ZIP64 where a size could pass 2 GiB, DEFLATE for JSON and STORED for
files (which are mostly compressed already, and so cost no CPU).
"""

from __future__ import annotations

import json
import time
import unicodedata
import zipfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, cast

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from vibed.account import list_collections
from vibed.couch import CouchServer
from vibed.grants import GrantStore
from vibed.identity import redact
from vibed.layout import collection_range, from_storage
from vibed.naming import identity_db

_log = Logger(namespace="vibed.export")

#: Bytes gathered before they are handed to the connection.
FLUSH_AT = 64 * 1024
DOCS_PAGE = 200
#: Above this many documents a collection's JSON could pass 2 GiB (1 MiB each): ZIP64.
ZIP64_DOCS = 1500
_UNSAFE = set('/\\:*?"<>|')

README = """This archive holds everything your Vibe Cloud identity owned when it was made.

identity.json            who you are: id, email, did:key, public key, creation date, and your
                         key wrapped with your password (salt + keyWrapped; the format is in
                         the server's docs/keys.md, so your password can unwrap it offline)
collections/<name>.json  the documents of each collection your apps stored, as JSON arrays
files.json               the list of your files (name, type, size, date, the app's metadata)
files/                   the files themselves
grants.json              the apps you allowed, with what they may do
"""


class ClientGone(Exception):
    """The client stopped reading (disconnected): stop writing."""


@implementer(IPushProducer)
class ResponsePipe:
    """Writes to a request, waiting while the client is slow (its transport paused us)."""

    def __init__(self, request: IRequest) -> None:
        self.request = request
        self.paused = False
        self.stopped = False
        self._waiter: Deferred[None] | None = None
        cast(Any, request).registerProducer(self, True)

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted API)
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    async def write(self, data: bytes) -> None:
        if self.stopped:
            raise ClientGone()
        if data:
            self.request.write(data)
        while self.paused and not self.stopped:
            self._waiter = Deferred()
            await self._waiter
        if self.stopped:
            raise ClientGone()

    def close(self) -> None:
        cast(Any, self.request).unregisterProducer()


class _Sink:
    """What :class:`zipfile.ZipFile` writes into: bytes kept until drained (no ``seek``, so
    zipfile writes data descriptors instead of going back to fix headers)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.position = 0

    def write(self, data: bytes) -> int:
        chunk = bytes(data)
        self.parts.append(chunk)
        self.size += len(chunk)
        self.position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        self.size = 0
        return data


def safe_name(name: object, fallback: str) -> str:
    """A file name from an app's metadata that cannot climb out of ``files/`` or confuse an
    unzip tool: printable, no path separators, bounded."""
    if not isinstance(name, str):
        return fallback
    text = unicodedata.normalize("NFC", name)
    text = "".join(c for c in text if c.isprintable() and c not in _UNSAFE)
    text = text.strip(" .")[:120]
    return text or fallback


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        taken.add(name)
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    n = 2
    while True:
        candidate = f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})"
        if candidate not in taken:
            taken.add(candidate)
            return candidate
        n += 1


def _zip_time(iso: object) -> tuple[int, int, int, int, int, int] | None:
    """A ZIP timestamp (UTC) of an ISO 8601 time; None when there is none usable."""
    try:
        m = datetime.fromisoformat(str(iso).replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None
    if m.year < 1980:
        return None
    return (m.year, m.month, m.day, m.hour, m.minute, m.second)


@define
class Exporter:
    couch: CouchServer
    grants: GrantStore
    blobs: Any  # vibed.blobs.service.BlobService, or None
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def filename(self) -> str:
        day = datetime.fromtimestamp(self.clock(), UTC).strftime("%Y-%m-%d")
        return f"vibe-export-{day}.zip"

    async def stream(self, identity: dict[str, Any], pipe: ResponsePipe) -> None:
        """Write the archive of ``identity`` (its raw document) to ``pipe``."""
        sink = _Sink()
        moment = datetime.fromtimestamp(self.clock(), UTC)
        now = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
        archive = zipfile.ZipFile(
            cast(Any, sink), "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True
        )

        async def drain(force: bool = False) -> None:
            if sink.size >= FLUSH_AT or (force and sink.size):
                await pipe.write(sink.take())

        async def write_entry(
            name: str,
            chunks: AsyncIterator[bytes],
            *,
            stored: bool = False,
            size_hint: int = 0,
            zip64: bool = False,
            when: tuple[int, int, int, int, int, int] | None = None,
        ) -> None:
            info = zipfile.ZipInfo(name, date_time=when or now)
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            info.file_size = size_hint  # zipfile decides on ZIP64 from it
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=zip64) as entry:
                async for chunk in chunks:
                    entry.write(chunk)
                    await drain()
            await drain()

        async def one(data: bytes) -> AsyncIterator[bytes]:
            yield data

        def as_json(value: Any) -> bytes:
            return json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8")

        idn = identity["_id"]
        try:
            await write_entry("README.txt", one(README.encode("utf-8")))
            public = redact(identity)
            public["key"] = {
                "salt": identity.get("salt"),
                "keyWrapped": identity.get("keyWrapped"),
                "format": "scrypt(N=32768, r=8, p=1) + AES-256-GCM; see docs/keys.md",
            }
            await write_entry("identity.json", one(as_json(public)))
            data = self.couch.database(identity_db(idn, "data"))
            for info in await list_collections(data):
                await write_entry(
                    f"collections/{info.name}.json",
                    self._documents(data, info.name),
                    zip64=info.count > ZIP64_DOCS,
                )
            files: list[dict[str, Any]] = []
            taken: set[str] = set()
            records = await self.blobs.records(idn) if self.blobs is not None else []
            for record in records:
                await self._file(record, files, taken, write_entry)
            await write_entry("files.json", one(as_json(files)))
            grants = [g.public() for g in await self.grants.list_grants(idn)]
            await write_entry("grants.json", one(as_json(grants)))
            archive.close()
            await drain(force=True)
        except BaseException:
            # Nothing more can be written to this response: whatever went wrong, the archive
            # is cut short and the client sees an incomplete download, never a valid-looking
            # partial archive (the central directory is written only at the end).
            archive.fp = None
            raise

    async def _documents(self, data: Any, collection: str) -> AsyncIterator[bytes]:
        start, end = collection_range(collection)
        first = True
        yield b"["
        startkey, skip = start, 0
        while True:
            page = await data.all_docs(
                startkey=startkey, endkey=end, include_docs=True, limit=DOCS_PAGE, skip=skip
            )
            rows = page.get("rows", [])
            parts = []
            for row in rows:
                doc = row.get("doc")
                if not isinstance(doc, dict):
                    continue
                parts.append(("\n  " if first else ",\n  ").encode())
                parts.append(json.dumps(from_storage(doc), ensure_ascii=False).encode("utf-8"))
                first = False
            if parts:
                yield b"".join(parts)
            if len(rows) < DOCS_PAGE:
                break
            startkey, skip = rows[-1]["id"], 1
        yield b"\n]\n"

    async def _file(
        self,
        record: dict[str, Any],
        files: list[dict[str, Any]],
        taken: set[str],
        write_entry: Any,
    ) -> None:
        blob_id = str(record.get("id"))
        key = str(record.get("key", ""))
        ext = key.rpartition(".")[2] if "." in key else "bin"
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        assert isinstance(meta, dict)
        name = _unique(safe_name(meta.get("name"), f"{blob_id}.{ext}"), taken)
        entry = {
            "id": blob_id,
            "name": meta.get("name"),
            "mime": record.get("mime"),
            "size": record.get("size"),
            "meta": meta,
            "createdAt": record.get("createdAt"),
            "path": f"files/{name}",
        }
        chunks = await self.blobs.store.open_read(key)
        if chunks is None:
            entry["path"] = None
            entry["missing"] = "The file's bytes were not found in storage."
            _log.warn("Export: blob {id} has no object", id=blob_id)
        else:
            size = record.get("size") if isinstance(record.get("size"), int) else 0
            await write_entry(
                f"files/{name}",
                chunks,
                stored=True,
                size_hint=size,
                when=_zip_time(record.get("createdAt")),
            )
        files.append(entry)


async def send_export(request: IRequest, exporter: Exporter, identity: dict[str, Any]) -> bytes:
    """Answer ``request`` with the archive of ``identity``, streamed."""
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", b"application/zip")
    request.setHeader(
        b"Content-Disposition", f'attachment; filename="{exporter.filename()}"'.encode("ascii")
    )
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    pipe = ResponsePipe(request)
    try:
        await exporter.stream(identity, pipe)
    except (ClientGone, CancelledError):
        _log.info("Export of {idn} abandoned by the client", idn=identity["_id"])
        raise CancelledError() from None
    except Exception:
        # Headers are sent: the only honest signal left is to cut the connection, so the
        # download fails instead of ending as a truncated archive.
        _log.failure("Export of {idn} failed halfway", idn=identity["_id"])
        transport = getattr(request, "channel", None)
        transport = getattr(transport, "transport", None)
        if transport is not None:
            transport.abortConnection()
        raise CancelledError() from None
    finally:
        pipe.close()
    return b""
