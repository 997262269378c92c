"""Blob storage (issue 4): the :class:`BlobStore` interface, object keys and mime types, and
:func:`make_blobs`, which wires the store chosen by ``--blobs`` to the blob API.

A store holds bytes under keys ``<idn uuid>/<blob uuid>.<ext>`` and knows how to sign the one
PUT that uploads an object and the GETs that download it; the records (pending uploads in
``vibe_uploads``, finalized blobs as ``$blob:<uuid>`` in the identity's data database) are
:mod:`vibed.blobs.service`'s. Stores: :mod:`vibed.blobs.local` (files under the data dir,
vibed serves the signed URLs itself) and :mod:`vibed.blobs.s3` (any S3-compatible endpoint,
SigV4 presigned URLs). See docs/blobs.md.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from attrs import define, field, frozen
from twisted.application.service import IService

from vibed.config import Config
from vibed.couch import CouchServer
from vibed.errors import ServiceUnavailable
from vibed.tokens import TokenIssuer
from vibed.web import BodyPolicy

_UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
BLOB_ID_RE = re.compile(rf"^{_UUID4}\Z")
OWNER_RE = re.compile(rf"^{_UUID4}\Z")
#: ``<idn uuid>/<blob uuid>.<ext>``: nothing else is ever a key, so no key can climb out of
#: the blob directory or name another identity's prefix by accident.
KEY_RE = re.compile(rf"^({_UUID4})/({_UUID4})\.([a-z0-9]{{1,8}})\Z")
#: RFC 6838 restricted names, lower case, no parameters.
MIME_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}\Z")

#: Extension of each known mime type. A fixed table: ``mimetypes`` guesses differently from
#: one platform to the next. An allowed type not listed here gets ``bin``.
EXTENSIONS: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/avif": "avif",
    "image/heic": "heic",
    "image/heif": "heif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
    "image/svg+xml": "svg",
    "image/x-icon": "ico",
    "image/vnd.microsoft.icon": "ico",
    "audio/mpeg": "mp3",
    "audio/mp4": "m4a",
    "audio/aac": "aac",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/flac": "flac",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/webm": "weba",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "video/ogg": "ogv",
    "video/quicktime": "mov",
    "video/x-matroska": "mkv",
    "text/plain": "txt",
    "text/csv": "csv",
    "text/markdown": "md",
    "text/html": "html",
    "text/css": "css",
    "text/xml": "xml",
    "application/xml": "xml",
    "application/pdf": "pdf",
    "application/json": "json",
    "application/zip": "zip",
    "application/gzip": "gz",
    "application/octet-stream": "bin",
}

#: Types a browser may show in place without any risk of script: everything else is served
#: by the local store as an attachment (and all of it under a ``sandbox`` CSP).
INLINE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/avif",
        "image/bmp",
        "text/plain",
        "text/csv",
    }
)


def extension_for(mime: str) -> str:
    return EXTENSIONS.get(mime, "bin")


def mime_allowed(mime: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``mime`` matches one of ``patterns`` (``type/subtype``, ``type/*`` or ``*/*``)."""
    major = mime.split("/", 1)[0]
    return any(p in (mime, "*/*", f"{major}/*") for p in patterns)


def object_key(idn: str, blob_id: str, mime: str) -> str:
    """The object key of blob ``blob_id`` of identity ``idn`` (``idn:<uuid>``).

    The identity part is its bare uuid: ``:`` needs special handling in S3 keys and URLs.
    """
    owner = idn.removeprefix("idn:")
    key = f"{owner}/{blob_id}.{extension_for(mime)}"
    if not KEY_RE.match(key):
        raise ValueError("not an identity id or blob id")
    return key


def key_owner(key: str) -> str | None:
    """The ``idn:<uuid>`` whose prefix ``key`` is under, or None when ``key`` is not a key."""
    match = KEY_RE.match(key)
    return f"idn:{match.group(1)}" if match else None


class StoreUnavailable(ServiceUnavailable):
    """The store cannot be reached (or refuses vibed's credentials) right now: a 503 whose
    detail tells the client to retry; ``reason`` (for logs) says what went wrong."""

    slug = "storage-unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__("File storage is not reachable right now; try again shortly.")
        self.reason = reason


@frozen
class SignedRequest:
    """What a client sends to upload: ``method`` to ``url`` with exactly ``headers``."""

    method: str
    url: str
    headers: dict[str, str]


@frozen
class ObjectInfo:
    """A stored object: its size and, when the store records it, its content type."""

    size: int
    content_type: str | None


class BlobStore(Protocol):
    """Where the bytes are. Signing is local and cheap; the rest may touch the network and
    raise :class:`StoreUnavailable`."""

    #: ``"local"`` or ``"s3"``.
    kind: str

    async def ensure_available(self) -> None:
        """Return when the store is known reachable (recently); StoreUnavailable otherwise."""

    def sign_upload(self, key: str, mime: str, size: int, expires_at: int) -> SignedRequest:
        """The presigned PUT of exactly ``size`` bytes of type ``mime`` to ``key``."""

    def sign_download(self, key: str, mime: str, expires_at: int) -> str:
        """A GET URL for ``key`` valid until ``expires_at`` (epoch seconds)."""

    async def stat(self, key: str) -> ObjectInfo | None:
        """The object under ``key``, or None if there is none."""

    async def delete(self, key: str) -> None:
        """Remove the object under ``key``; no error if there is none."""

    async def delete_prefix(self, owner: str) -> int:
        """Remove every object under ``<owner>/`` (an identity's uuid); returns how many."""

    async def open_read(self, key: str) -> AsyncIterator[bytes] | None:
        """The object's bytes, a chunk at a time, read as the consumer asks for them (memory
        stays bounded whatever the size); None when there is no such object."""


@define
class BlobComponents:
    api: Any  # vibed.api.blob.BlobAPI (has .app, a Klein)
    services: list[IService] = field(factory=list)
    body_policies: dict[bytes, BodyPolicy] = field(factory=dict)


def make_blobs(
    config: Config,
    couch: CouchServer,
    issuer: TokenIssuer,
    reactor: Any,
    clock: Callable[[], float],
) -> BlobComponents:
    """The store chosen by ``--blobs``, the blob service and API, their timers and the body
    policy of the local store's signed PUT."""
    from vibed.api.blob import BlobAPI
    from vibed.blobs.service import BlobService, CleanupService

    services: list[IService] = []
    policies: dict[bytes, BodyPolicy] = {}
    store: BlobStore
    local = None
    if config.blobs == "s3":
        from vibed.blobs.s3 import S3Store

        s3 = S3Store.from_config(config, reactor=reactor, clock=clock)
        services.append(s3.service())
        store = s3
    else:
        from vibed.blobs.local import LocalStore

        local = LocalStore(
            root=config.data_dir / "blobs",
            public_url=config.public_url,
            secret=issuer.derived_secret(b"vibed local blob url v1"),
            max_size=config.blob_max_size,
            reactor=reactor,
            clock=clock,
        )
        policies[b"/blob/local/"] = local.body_policy()
        store = local
    blobs = BlobService(
        couch=couch,
        store=store,
        max_size=config.blob_max_size,
        mime_types=config.blob_mime_types,
        quota=config.blob_quota,
        url_ttl=config.blob_url_ttl,
        upload_ttl=config.blob_upload_ttl,
        clock=clock,
    )
    cleanup = CleanupService(blobs, reactor=reactor, local=local)
    services.append(cleanup)
    api = BlobAPI(issuer=issuer, blobs=blobs, local=local)
    return BlobComponents(api=api, services=services, body_policies=policies)
