"""Blob records and their life cycle: signing uploads, finalizing, listing, downloading,
deleting, and the timer that cleans up uploads nobody finalized.

Records, all in CouchDB:

- a *pending upload* in ``vibe_uploads`` (every identity's), ``_id`` ``<idn>:<blob id>``, so
  one identity's uploads are one ``_all_docs`` key range and nobody can name another's:
  ``{id, idn, key, mime, size, state: "pending", createdAt, expiresAt}``;
- a *blob* in the identity's ``db_<idn>_data``, ``_id`` ``$blob:<blob id>`` (outside every
  data collection, see :mod:`vibed.layout`): ``{id, key, mime, size, meta, createdAt,
  uploadExpiresAt}``.

Finalizing turns the first into the second. Deleting a blob whose upload URL could still be
used leaves a pending record in state ``deleted`` behind, so that an object PUT again with the
old URL is removed by the cleanup too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from attrs import define, field
from twisted.logger import Logger

from vibed.blobs import (
    BLOB_ID_RE,
    KEY_RE,
    MIME_RE,
    BlobStore,
    key_owner,
    mime_allowed,
    object_key,
)
from vibed.bootstrap import PurgeService
from vibed.couch import CouchConflict, CouchDatabase, CouchError, CouchNotFound, CouchServer
from vibed.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Problem,
    UnsupportedMediaType,
)
from vibed.naming import UPLOADS_DB, identity_db, is_idn

_log = Logger(namespace="vibed.blobs")

#: Seconds after its URL expired that an upload may still be finalized (a large PUT that
#: started in time may still be arriving); the cleanup waits a minute more.
FINALIZE_GRACE = 600
CLEANUP_AFTER = FINALIZE_GRACE + 60
CLEANUP_INTERVAL = 60.0
META_MAX_BYTES = 4096
LIST_DEFAULT = 50
LIST_MAX = 200
_PAGE = 500
_RANGE_END = "\ufff0"
BLOB_PREFIX = "$blob:"

#: The fields of a blob record an app sees.
PUBLIC_FIELDS = ("id", "key", "mime", "size", "meta", "createdAt")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {name: record.get(name) for name in PUBLIC_FIELDS}


def check_blob_id(value: object) -> str:
    if not isinstance(value, str) or not BLOB_ID_RE.match(value):
        raise BadRequest("'id' must be a blob id (a lower-case UUID).", slug="invalid-blob-id")
    return value


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _whole(value: object) -> int | None:
    """A JSON integer as JSON Schema counts them: 5, or 5.0 (a number without a fraction)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return _int(value)


@define(eq=False)
class BlobService:
    couch: CouchServer
    store: BlobStore
    max_size: int
    mime_types: tuple[str, ...]
    quota: int  # 0: none
    url_ttl: int
    upload_ttl: int
    clock: Callable[[], float] = field(default=time.time, repr=False)

    # -- records ---------------------------------------------------------------------------

    @property
    def uploads(self) -> CouchDatabase:
        return self.couch.database(UPLOADS_DB)

    def data(self, idn: str) -> CouchDatabase:
        return self.couch.database(identity_db(idn, "data"))

    @staticmethod
    def pending_id(idn: str, blob_id: str) -> str:
        return f"{idn}:{blob_id}"

    async def _get(self, db: CouchDatabase, doc_id: str) -> dict[str, Any] | None:
        try:
            return await db.get(doc_id)
        except CouchNotFound:
            return None

    async def _record(self, idn: str, blob_id: str) -> dict[str, Any] | None:
        """The blob record, None if there is none; 404 when the identity itself is gone."""
        try:
            return await self.data(idn).get(BLOB_PREFIX + blob_id)
        except CouchNotFound as e:
            if e.reason in ("missing", "deleted"):
                return None
            raise NotFound("This identity no longer exists.") from None

    async def _range(
        self, db: CouchDatabase, start: str | None, end: str | None
    ) -> list[dict[str, Any]]:
        """Every doc with an ``_id`` in [start, end] (None: unbounded), a page at a time."""
        docs: list[dict[str, Any]] = []
        startkey = start
        skip = 0
        while True:
            page = await db.all_docs(
                startkey=startkey, endkey=end, include_docs=True, limit=_PAGE, skip=skip
            )
            rows = [r for r in page.get("rows", []) if isinstance(r.get("doc"), dict)]
            docs.extend(r["doc"] for r in rows)
            if len(page.get("rows", [])) < _PAGE:
                return docs
            startkey, skip = page["rows"][-1]["id"], 1

    async def usage(self, idn: str) -> tuple[int, int]:
        """(bytes of finalized blobs, bytes declared by pending uploads) of ``idn``."""
        try:
            blobs = await self._range(self.data(idn), BLOB_PREFIX, BLOB_PREFIX + _RANGE_END)
        except CouchNotFound:
            raise NotFound("This identity no longer exists.") from None
        used = sum(_int(d.get("size")) or 0 for d in blobs)
        now = self.clock()
        pending = 0
        for doc in await self._range(self.uploads, f"{idn}:", f"{idn}:{_RANGE_END}"):
            expires = _int(doc.get("expiresAt")) or 0
            if doc.get("state") == "pending" and now <= expires + FINALIZE_GRACE:
                pending += _int(doc.get("size")) or 0
            elif doc.get("state") == "deleted" and key_owner(str(doc.get("key"))) == idn:
                # The upload URL of a deleted blob may have been used again: until the cleanup
                # removes it, that object takes space like any other.
                info = await self.store.stat(doc["key"])
                pending += info.size if info is not None else 0
        return used, pending

    # -- operations ------------------------------------------------------------------------

    def check_declaration(self, mime: object, size: object) -> tuple[str, int]:
        """A normalised ``(mime, size)``, or the 4xx saying what is wrong with them."""
        if not isinstance(mime, str) or not mime.strip():
            raise BadRequest("'mime' is required: a media type such as image/png.")
        mime = mime.strip().lower()
        if len(mime) > 255 or not MIME_RE.match(mime):
            raise BadRequest(
                "'mime' must be a media type such as image/png, without parameters.",
                slug="invalid-mime",
            )
        if not mime_allowed(mime, self.mime_types):
            raise UnsupportedMediaType(
                f"Blobs of type {mime} are not accepted here; allowed: "
                + ", ".join(self.mime_types)
                + ".",
                slug="mime-not-allowed",
                extra={"allowed": list(self.mime_types)},
            )
        number = _whole(size)
        if number is None or number < 0:
            raise BadRequest("'size' is required: the exact number of bytes, 0 or more.")
        if number > self.max_size:
            raise PayloadTooLarge(
                f"A blob may be at most {self.max_size} bytes; this one declares {number}.",
                slug="blob-too-large",
                extra={"maxSize": self.max_size},
            )
        return mime, number

    async def create_upload(self, idn: str, mime_in: object, size_in: object) -> dict[str, Any]:
        """Record a pending upload and sign its PUT."""
        mime, size = self.check_declaration(mime_in, size_in)
        if self.quota:
            used, pending = await self.usage(idn)
            if used + pending + size > self.quota:
                raise Forbidden(
                    f"This upload would exceed the storage quota of {self.quota} bytes "
                    f"({used} used, {pending} in pending uploads); delete blobs first.",
                    slug="quota-exceeded",
                    extra={"quota": self.quota, "used": used, "pending": pending},
                )
        await self.store.ensure_available()
        blob_id = str(uuid.uuid4())
        key = object_key(idn, blob_id, mime)
        now = self.clock()
        expires_at = int(now) + self.upload_ttl
        await self.uploads.put(
            {
                "_id": self.pending_id(idn, blob_id),
                "id": blob_id,
                "idn": idn,
                "key": key,
                "mime": mime,
                "size": size,
                "state": "pending",
                "createdAt": _iso(now),
                "expiresAt": expires_at,
            }
        )
        signed = self.store.sign_upload(key, mime, size, expires_at)
        return {
            "id": blob_id,
            "url": signed.url,
            "method": signed.method,
            "headers": signed.headers,
            "expiresAt": expires_at,
        }

    async def finalize(self, idn: str, blob_id_in: object, meta: object) -> dict[str, Any]:
        """Check the uploaded object against its declaration and record the blob."""
        blob_id = check_blob_id(blob_id_in)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise BadRequest("'meta' must be a JSON object.", slug="invalid-meta")
        if len(json.dumps(meta, separators=(",", ":")).encode()) > META_MAX_BYTES:
            raise BadRequest(
                f"'meta' may be at most {META_MAX_BYTES} bytes of JSON.", slug="invalid-meta"
            )
        pending = await self._get(self.uploads, self.pending_id(idn, blob_id))
        if pending is None or pending.get("state") != "pending":
            if await self._record(idn, blob_id) is not None:
                raise Conflict("This blob is already finalized.", slug="already-finalized")
            raise NotFound("No upload with this id (it may have expired).")
        now = self.clock()
        expires_at = _int(pending.get("expiresAt")) or 0
        if now > expires_at + FINALIZE_GRACE:
            raise Problem(
                "This upload expired before it was finalized; ask for a new upload URL.",
                status=410,
                slug="upload-expired",
                title="Gone",
            )
        key, mime, size = pending["key"], pending["mime"], pending["size"]
        info = await self.store.stat(key)
        if info is None:
            raise Conflict(
                "Nothing has been uploaded for this id yet: PUT the bytes to the upload URL, "
                "then finalize.",
                slug="not-uploaded",
            )
        if info.size != size or (info.content_type is not None and info.content_type != mime):
            await self.store.delete(key)
            raise Conflict(
                f"The uploaded object ({info.size} bytes, {info.content_type}) does not match "
                f"the declaration ({size} bytes, {mime}); it was removed. Upload it again with "
                "exactly the signed headers.",
                slug="upload-mismatch",
            )
        record = {
            "_id": BLOB_PREFIX + blob_id,
            "id": blob_id,
            "key": key,
            "mime": mime,
            "size": size,
            "meta": meta,
            "createdAt": _iso(now),
            "uploadExpiresAt": expires_at,
        }
        try:
            await self.data(idn).put(record)
        except CouchConflict:
            raise Conflict("This blob is already finalized.", slug="already-finalized") from None
        except CouchNotFound:
            raise NotFound("This identity no longer exists.") from None
        try:
            await self.uploads.delete(pending["_id"], pending["_rev"])
        except CouchError as e:
            # The cleanup finds the blob record and removes only the pending one.
            _log.warn("Pending upload {id} not removed: {error}", id=blob_id, error=str(e))
        return public(record)

    async def download_url(self, idn: str, blob_id_in: object) -> tuple[str, int]:
        """A signed GET of the blob and its expiry; 404 when it is not the caller's."""
        blob_id = check_blob_id(blob_id_in)
        record = await self._record(idn, blob_id)
        if record is None:
            raise NotFound("No blob with this id.")
        await self.store.ensure_available()
        expires_at = int(self.clock()) + self.url_ttl
        return self.store.sign_download(record["key"], record["mime"], expires_at), expires_at

    async def list_page(self, idn: str, limit: int, after: str | None) -> dict[str, Any]:
        """One page of the identity's blobs, in id order; ``next`` is the ``after`` of the
        next page (None: no more)."""
        start = BLOB_PREFIX + (after or "")
        try:
            page = await self.data(idn).all_docs(
                startkey=start,
                endkey=BLOB_PREFIX + _RANGE_END,
                include_docs=True,
                limit=limit + 2,
            )
        except CouchNotFound:
            raise NotFound("This identity no longer exists.") from None
        docs = [
            r["doc"]
            for r in page.get("rows", [])
            if isinstance(r.get("doc"), dict) and r.get("id") != start
        ]
        more = len(docs) > limit
        docs = docs[:limit]
        return {
            "blobs": [public(d) for d in docs],
            "next": docs[-1]["id"] if more and docs else None,
        }

    async def delete(self, idn: str, blob_id_in: object) -> None:
        """Remove the object, then its record. A store failure leaves the record (retry)."""
        blob_id = check_blob_id(blob_id_in)
        record = await self._record(idn, blob_id)
        if record is None:
            raise NotFound("No blob with this id.")
        await self.store.delete(record["key"])
        try:
            await self.data(idn).delete(record["_id"], record["_rev"])
        except CouchNotFound:
            raise NotFound("No blob with this id.") from None
        except CouchConflict:
            pass  # deleted (or changed) concurrently; the object is gone either way
        upload_expires = _int(record.get("uploadExpiresAt")) or 0
        if self.clock() <= upload_expires + FINALIZE_GRACE:
            await self._leave_tombstone(idn, record, upload_expires)

    async def _leave_tombstone(self, idn: str, record: dict[str, Any], expires_at: int) -> None:
        """Make the cleanup remove any object PUT again with the still-valid upload URL."""
        doc_id = self.pending_id(idn, record["id"])
        tombstone = {
            "_id": doc_id,
            "id": record["id"],
            "idn": idn,
            "key": record["key"],
            "mime": record["mime"],
            "size": record["size"],
            "state": "deleted",
            "expiresAt": expires_at,
        }
        try:
            try:
                await self.uploads.put(tombstone)
            except CouchConflict:
                current = await self.uploads.get(doc_id)
                await self.uploads.put({**tombstone, "_rev": current["_rev"]})
        except CouchError as e:
            _log.warn("No tombstone for deleted blob {id}: {error}", id=record["id"], error=str(e))

    async def records(self, idn: str) -> list[dict[str, Any]]:
        """Every finalized blob record of ``idn``, in id order (the export reads them)."""
        try:
            return await self._range(self.data(idn), BLOB_PREFIX, BLOB_PREFIX + _RANGE_END)
        except CouchNotFound:
            raise NotFound("This identity no longer exists.") from None

    async def delete_all(self, idn: str) -> int:
        """Remove every object of ``idn`` (an identity being deleted): its blobs, its pending
        uploads', then anything else under its prefix; returns how many objects went.

        Records of uploads whose signed URL may still be used stay in ``vibe_uploads`` (a
        tombstone is left for blobs finalized recently): the cleanup removes, after their
        expiry, any object PUT again with such a URL. Safe to run again.
        """
        owner = idn.removeprefix("idn:")
        removed = 0
        try:
            records = await self.records(idn)
        except NotFound:
            records = []  # the data database is gone already (a resumed deletion)
        for record in records:
            key = str(record.get("key", ""))
            if key_owner(key) != idn:
                continue
            await self.store.delete(key)
            removed += 1
            upload_expires = _int(record.get("uploadExpiresAt")) or 0
            if self.clock() <= upload_expires + FINALIZE_GRACE:
                await self._leave_tombstone(idn, record, upload_expires)
        for doc in await self._range(self.uploads, f"{idn}:", f"{idn}:{_RANGE_END}"):
            key = str(doc.get("key", ""))
            if key_owner(key) == idn:
                await self.store.delete(key)
        removed += await self.store.delete_prefix(owner)
        return removed

    # -- cleanup ---------------------------------------------------------------------------

    async def cleanup(self) -> int:
        """Remove every upload record (and its object) past its finalize deadline; returns
        how many. One record's failure is logged and skipped."""
        now = self.clock()
        removed = 0
        for doc in await self._range(self.uploads, None, None):
            if str(doc.get("_id", "_")).startswith("_"):
                continue  # a design doc: not an upload
            expires = _int(doc.get("expiresAt"))
            if expires is not None and now <= expires + CLEANUP_AFTER:
                continue
            try:
                await self._clean_one(doc)
                removed += 1
            except Exception:
                _log.failure("Cleanup of upload {id} failed; retried next round", id=doc["_id"])
        return removed

    async def _clean_one(self, doc: dict[str, Any]) -> None:
        idn, key, blob_id = doc.get("idn"), doc.get("key"), doc.get("id")
        valid = (
            is_idn(idn)
            and isinstance(key, str)
            and KEY_RE.match(key) is not None
            and key_owner(key) == idn
            and isinstance(blob_id, str)
            and BLOB_ID_RE.match(blob_id) is not None
        )
        if valid:
            assert isinstance(idn, str) and isinstance(key, str) and isinstance(blob_id, str)
            finalized = False
            if doc.get("state") == "pending":
                try:
                    finalized = await self._record(idn, blob_id) is not None
                except NotFound:
                    finalized = False  # the identity is gone: so goes its object
            if not finalized:
                await self.store.delete(key)
        else:
            _log.warn("Malformed upload record {id} removed", id=doc["_id"])
        try:
            await self.uploads.delete(doc["_id"], doc["_rev"])
        except (CouchNotFound, CouchConflict):
            pass  # another replica's cleanup got there first


class CleanupService(PurgeService):
    """Runs :meth:`BlobService.cleanup` every minute (and sweeps the local store's abandoned
    temporary files); an error is logged, never fatal to the loop. ``tick()`` fires with the
    number of upload records removed."""

    def __init__(
        self,
        blobs: BlobService,
        reactor: Any,
        local: Any = None,
        interval: float = CLEANUP_INTERVAL,
    ) -> None:
        self.blobs = blobs
        self.local = local
        super().__init__([blobs.cleanup, self._sweep], interval, reactor)

    async def _sweep(self) -> int:
        if self.local is not None:
            self.local.sweep_incoming(older_than=self.blobs.upload_ttl + CLEANUP_AFTER + 3600)
        return 0
