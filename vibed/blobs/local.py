"""The local blob store: objects as files under ``<data-dir>/blobs``, served by vibed itself.

vibed signs the URLs of this store like S3 does, with an HMAC instead of SigV4::

    PUT <public-url>/blob/local/<key>?exp=<epoch s>&size=<bytes>&type=<mime>&sig=<mac>
    GET <public-url>/blob/local/<key>?exp=<epoch s>&type=<mime>&sig=<mac>

    mac = base64url(HMAC-SHA256(secret, "vibed-local-blob-v1\\n<METHOD>\\n<key>\\n<exp>\\n"
                                        "<size or ->\\n<mime>"))   (no padding)

``secret`` is derived from the token signing key (``TokenIssuer.derived_secret``), so every
replica sharing the key file signs and verifies alike. Verification is constant-time and
happens before a byte of the body is written anywhere: a PUT whose signature, expiry,
``Content-Length`` or ``Content-Type`` is wrong has its body discarded as it arrives.

A good PUT streams into a temporary file in ``blobs/.incoming`` (same file system), is
checked for its exact length, ``fsync``-ed in a thread, then hard-linked into place, which
also makes every URL write-once (a second PUT of the same key is a 409). Downloads stream
from disk through :class:`twisted.web.static.File` (Range requests included), typed as
signed and marked so that no uploaded HTML or SVG ever runs on vibed's origin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import parse_qs, quote, urlencode

from attrs import define, field, frozen
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.static import File

from vibed.blobs import (
    INLINE_TYPES,
    KEY_RE,
    MIME_RE,
    OWNER_RE,
    ObjectInfo,
    SignedRequest,
    StoreUnavailable,
)
from vibed.blobs.service import FINALIZE_GRACE
from vibed.errors import BadRequest, Conflict, Forbidden, NotFound, Problem, UnsupportedMediaType
from vibed.web import BodyPolicy

_log = Logger(namespace="vibed.blobs.local")

INCOMING = ".incoming"
READ_CHUNK = 256 * 1024
_PREFIX = "/blob/local/"
_LABEL = "vibed-local-blob-v1"
_SIG_LEN = 43  # unpadded base64url of 32 bytes
_MAX_DIGITS = 16

_SPOOL_ATTR = "_vibe_blob_spool"
_OTHER_BODY_LIMIT = 64 * 1024  # GET, OPTIONS... have no business sending a body

#: Headers the browser may send cross-origin to the signed URLs (the URL is the credential,
#: no cookie is involved, so any origin may use it).
CORS_HEADERS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Expose-Headers": b"Content-Length, Content-Range, Accept-Ranges, ETag",
}


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes superscripts ("¹"), which int() refuses."""
    return text.isascii() and text.isdigit()


@frozen
class Grant:
    """A verified signed URL: what it allows."""

    method: str
    key: str
    expires_at: int
    size: int | None
    mime: str


def _deadline(grant: Grant) -> int:
    """When a PUT of ``grant`` must have arrived: as late as its upload may be finalized."""
    return grant.expires_at + FINALIZE_GRACE


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def request_target(request: IRequest) -> tuple[str, str]:
    """``(method, uri)`` of ``request``, also while its body is still arriving (Twisted sets
    ``method`` and ``uri`` only once the whole request is in; the channel has them before)."""
    req = cast(Any, request)
    method: bytes = req.method
    uri: bytes = req.uri
    if not uri.startswith(b"/"):
        channel = req.channel
        uri = getattr(channel, "_path", b"") or b""
        method = getattr(channel, "_command", b"") or b""
    return method.decode("ascii", "replace").upper(), uri.decode("ascii", "replace")


def _split(uri: str) -> tuple[str, dict[str, list[str]]]:
    path, _, query = uri.partition("?")
    try:
        args = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        args = {}
    return path, args


class _Discard:
    """Where a body goes that will be refused anyway: counted, never stored."""

    def __init__(self) -> None:
        self.received = 0

    def write(self, data: bytes) -> int:
        self.received += len(data)
        return len(data)

    def tell(self) -> int:
        return self.received

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _Spool:
    """The temporary file a verified PUT streams into, refusing bytes past ``deadline`` (the
    upload's finalize deadline): a body trickled in for ever would otherwise hold its disk
    space (and a connection), then land after the cleanup forgot its upload, an object no
    record points to and no quota counts. Past the deadline the connection is dropped and the
    file, closed with it, disappears."""

    def __init__(
        self, file: IO[bytes], deadline: int, clock: Callable[[], float], request: Any
    ) -> None:
        self.file = file
        self.deadline = deadline
        self.clock = clock
        self.request = request
        self.expired = False

    def write(self, data: bytes) -> int:
        if not self.expired and self.clock() > self.deadline:
            self.expired = True
            channel = getattr(self.request, "channel", None)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        if self.expired:
            return len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


class _BlobFile(File):
    """A static File read in larger blocks than Twisted's 64 KiB: fewer trips through the
    reactor per MiB, still a bounded buffer per download."""

    read_size = 256 * 1024

    def makeProducer(self, request: Any, fileForReading: Any) -> Any:  # noqa: N802 (Twisted)
        ranges = request.getHeader(b"range")
        if ranges is not None and b"," in ranges:
            # A multi-range answer can repeat overlapping parts any number of times (N x the
            # size for one short header). Single ranges are what clients use; serve it whole.
            request.requestHeaders.removeHeader(b"range")
        producer = super().makeProducer(request, fileForReading)
        producer.bufferSize = self.read_size
        return producer


@define(eq=False)
class LocalStore:
    """Files under ``root``; signed URLs under ``public_url``/blob/local/."""

    root: Path
    public_url: str
    secret: bytes = field(repr=False)
    max_size: int
    reactor: Any = field(repr=False)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    kind = "local"

    def __attrs_post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.incoming.mkdir(exist_ok=True, mode=0o700)

    @property
    def incoming(self) -> Path:
        return self.root / INCOMING

    def path_for(self, key: str) -> Path:
        """The file of ``key``; ValueError for anything that is not a key."""
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise ValueError("not an object key")
        return self.root / key

    # -- signing ---------------------------------------------------------------------------

    def _mac(self, method: str, key: str, expires_at: int, size: int | None, mime: str) -> str:
        message = "\n".join(
            [_LABEL, method, key, str(expires_at), "-" if size is None else str(size), mime]
        )
        return _b64url(hmac.new(self.secret, message.encode("ascii"), hashlib.sha256).digest())

    def _url(self, key: str, params: dict[str, str]) -> str:
        return f"{self.public_url}{_PREFIX}{key}?" + urlencode(params, quote_via=quote)

    def sign_upload(self, key: str, mime: str, size: int, expires_at: int) -> SignedRequest:
        self.path_for(key)
        sig = self._mac("PUT", key, expires_at, size, mime)
        url = self._url(key, {"exp": str(expires_at), "size": str(size), "type": mime, "sig": sig})
        return SignedRequest(
            method="PUT", url=url, headers={"Content-Type": mime, "Content-Length": str(size)}
        )

    def sign_download(self, key: str, mime: str, expires_at: int) -> str:
        self.path_for(key)
        sig = self._mac("GET", key, expires_at, None, mime)
        return self._url(key, {"exp": str(expires_at), "type": mime, "sig": sig})

    def verify(self, method: str, key: str, args: dict[str, list[str]], now: float) -> Grant:
        """The grant of a signed URL, or 403 saying why not (tampered, other key, expired)."""

        def one(name: str) -> str | None:
            values = args.get(name)
            return values[0] if values and len(values) == 1 else None

        exp, mime, sig, size_text = one("exp"), one("type"), one("sig"), one("size")
        malformed = Forbidden(
            "This is not a valid signed blob URL; ask for a new one.", slug="bad-signature"
        )
        if not KEY_RE.match(key) or exp is None or mime is None or sig is None:
            raise malformed
        if not (_digits(exp) and len(exp) <= _MAX_DIGITS) or not MIME_RE.match(mime):
            raise malformed
        size: int | None = None
        if method == "PUT":
            if size_text is None or not _digits(size_text) or len(size_text) > _MAX_DIGITS:
                raise malformed
            size = int(size_text)
        elif size_text is not None:
            raise malformed
        if len(sig) != _SIG_LEN or not sig.isascii():
            raise malformed
        expected = self._mac(method, key, int(exp), size, mime)
        if not hmac.compare_digest(expected.encode("ascii"), sig.encode("ascii")):
            raise Forbidden(
                "The signature does not match this URL (tampered with, or made for another "
                "object or method); ask for a new one.",
                slug="bad-signature",
            )
        if int(exp) < now:
            raise Forbidden("This signed URL has expired; ask for a new one.", slug="url-expired")
        return Grant(method=method, key=key, expires_at=int(exp), size=size, mime=mime)

    # -- the store -------------------------------------------------------------------------

    async def ensure_available(self) -> None:
        if not self.incoming.is_dir():
            raise StoreUnavailable("the blob directory is missing")

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self.path_for(key).stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"cannot read the blob directory ({e.strerror})") from None
        # The PUT refused any other type than the signed one: the file has it.
        return ObjectInfo(size=st.st_size, content_type=None)

    async def delete(self, key: str) -> None:
        try:
            self.path_for(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreUnavailable(f"cannot write the blob directory ({e.strerror})") from None

    async def delete_prefix(self, owner: str) -> int:
        if not OWNER_RE.match(owner):
            raise ValueError("not an identity's prefix")
        directory = self.root / owner
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise StoreUnavailable(f"cannot read the blob directory ({e.strerror})") from None
        removed = 0
        for entry in entries:
            try:
                entry.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StoreUnavailable(f"cannot write the blob directory ({e.strerror})") from None
        try:
            directory.rmdir()
        except OSError:
            pass  # a file arrived meanwhile: the next run (or the cleanup) takes it
        return removed

    async def open_read(self, key: str) -> AsyncIterator[bytes] | None:
        try:
            handle = self.path_for(key).open("rb")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"cannot read the blob directory ({e.strerror})") from None

        async def chunks() -> AsyncIterator[bytes]:
            # Local disk reads of this size take microseconds: fine on the reactor thread.
            with handle:
                while True:
                    chunk = handle.read(READ_CHUNK)
                    if not chunk:
                        return
                    yield chunk

        return chunks()

    def sweep_incoming(self, older_than: float) -> int:
        """Remove temporary files untouched for ``older_than`` seconds (left by a crash)."""
        removed = 0
        cutoff = time.time() - older_than
        try:
            entries = list(os.scandir(self.incoming))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed

    # -- receiving a signed PUT ------------------------------------------------------------

    def body_policy(self) -> BodyPolicy:
        """How bodies under ``/blob/local/`` arrive: at most the signed size, and only into a
        temporary file of the blob directory when the URL verifies."""
        return BodyPolicy(limit=self._limit, content=self._spool)

    def _limit(self, request: Any) -> int:
        method, uri = request_target(request)
        if method != "PUT":
            return _OTHER_BODY_LIMIT
        _, args = _split(uri)
        size = (args.get("size") or [""])[0]
        if not _digits(size) or len(size) > _MAX_DIGITS:
            # Not a signed PUT: the body is discarded as it arrives, then answered 403.
            return self.max_size
        return min(int(size), self.max_size)

    def _spool(self, request: Any, length: int | None) -> IO[bytes]:
        method, uri = request_target(request)
        if method != "PUT":
            return io.BytesIO()
        path, args = _split(uri)
        key = path[len(_PREFIX) :] if path.startswith(_PREFIX) else ""
        try:
            grant = self.verify("PUT", key, args, self.clock())
        except Problem:
            return cast(IO[bytes], _Discard())  # the route answers why
        if length is not None and length != grant.size:
            return cast(IO[bytes], _Discard())
        spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by the request
            dir=self.incoming, prefix="put-", suffix=".part", delete=True
        )
        setattr(request, _SPOOL_ATTR, (grant, spool))
        return cast(IO[bytes], _Spool(spool, _deadline(grant), self.clock, request))

    async def receive(self, request: IRequest, key: str) -> None:
        """Finish a signed PUT of ``key``: check it, put the file in place; a Problem if not."""
        method, uri = request_target(request)
        _, args = _split(uri)
        spooled = getattr(request, _SPOOL_ATTR, None)
        # A grant checked when the body started is kept: an upload that began before the
        # URL expired may finish after.
        if spooled is not None and spooled[0].key == key:
            grant: Grant = spooled[0]
            spool: Any = spooled[1]
        else:
            grant = self.verify("PUT", key, args, self.clock())
            spool = None
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if ctype != grant.mime:
            raise UnsupportedMediaType(
                f"This URL was signed for 'Content-Type: {grant.mime}'; send exactly that.",
                slug="content-type-mismatch",
            )
        declared = request.getHeader(b"content-length")
        if declared is not None and declared != str(grant.size).encode():
            raise BadRequest(
                f"This URL was signed for exactly {grant.size} bytes (Content-Length: "
                f"{grant.size}), not {declared.decode('latin-1')}.",
                slug="content-length-mismatch",
            )
        if spool is None:
            spool = self._copy_to_spool(request)
        try:
            spool.flush()
            received = os.fstat(spool.fileno()).st_size
            if received != grant.size:
                raise BadRequest(
                    f"The body was {received} bytes; this URL was signed for exactly {grant.size}.",
                    slug="content-length-mismatch",
                )
            await deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), os.fsync, spool.fileno()
            )
            if self.clock() > _deadline(grant):
                raise Problem(
                    "The upload arrived after its finalize deadline and was discarded; ask "
                    "for a new upload URL.",
                    status=408,
                    slug="upload-timeout",
                    title="Request timeout",
                )
            target = self.path_for(key)
            target.parent.mkdir(exist_ok=True, mode=0o700)
            try:
                os.link(spool.name, target)
            except FileExistsError:
                raise Conflict(
                    "An object was already uploaded with this URL; ask for a new one.",
                    slug="already-uploaded",
                ) from None
            except FileNotFoundError:
                raise Problem(
                    "The upload took too long and was discarded; upload again.",
                    status=408,
                    slug="upload-timeout",
                    title="Request timeout",
                ) from None
        finally:
            spool.close()

    def _copy_to_spool(self, request: IRequest) -> Any:
        """The body, when it did not stream into a spool file (small bodies, tests), copied
        into one."""
        spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by receive()
            dir=self.incoming, prefix="put-", suffix=".part", delete=True
        )
        content = request.content
        if content is not None:
            content.seek(0)
            while chunk := content.read(64 * 1024):
                spool.write(chunk)
        return spool

    # -- serving a signed GET --------------------------------------------------------------

    def download(self, request: IRequest, key: str) -> IResource:
        """The resource answering a signed GET (or HEAD) of ``key``: 403/404 as a Problem."""
        _, uri = request_target(request)
        _, args = _split(uri)
        now = self.clock()
        grant = self.verify("GET", key, args, now)
        path = self.path_for(key)
        if not path.is_file():
            raise NotFound("There is no object here (it may have been deleted).")
        resource: Any = _BlobFile(str(path), defaultType=grant.mime)
        resource.type = grant.mime
        resource.encoding = None
        name = key.rsplit("/", 1)[1]
        major = grant.mime.split("/", 1)[0]
        inline = grant.mime in INLINE_TYPES or major in ("audio", "video")
        disposition = "inline" if inline else "attachment"
        set_header = request.setHeader
        set_header(b"Content-Disposition", f'{disposition}; filename="{name}"'.encode("ascii"))
        set_header(b"X-Content-Type-Options", b"nosniff")
        set_header(
            b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline'; sandbox"
        )
        set_header(b"Cross-Origin-Resource-Policy", b"cross-origin")
        set_header(
            b"Cache-Control", f"private, max-age={max(0, int(grant.expires_at - now))}".encode()
        )
        for name_, value in CORS_HEADERS.items():
            set_header(name_, value)
        return cast(IResource, resource)
