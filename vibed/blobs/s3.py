"""The S3 blob store: any S3-compatible endpoint (AWS, Scaleway, MinIO, moto), one bucket.

Clients upload and download straight from S3 with SigV4 *presigned* URLs made by botocore's
``S3SigV4QueryAuth``: pure computation, no network. The upload URL signs ``Content-Type``,
``Content-Length`` and ``Host``, so S3 refuses a PUT of any other type or length
(``SignatureDoesNotMatch``); those are exactly the headers the client is told to send.

What vibed itself asks of S3 (HEAD and DELETE of an object, HEAD and PUT of the bucket) goes
over treq, each request signed with ``S3SigV4Auth`` (also pure computation) and bounded by a
timeout: no blocking call ever runs on the reactor. A transport failure, a timeout, a 5xx or
a refusal of vibed's credentials is :class:`StoreUnavailable`, which the API answers with 503.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast
from urllib.parse import quote, urlencode, urlsplit
from xml.etree import ElementTree

import treq
from attrs import define, field
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from vibed.blobs import KEY_RE, OWNER_RE, ObjectInfo, SignedRequest, StoreUnavailable
from vibed.config import Config, ConfigError

_log = Logger(namespace="vibed.blobs.s3")

#: Seconds a successful exchange with S3 vouches for its health (no probe in between).
HEALTH_TTL = 15.0
REQUEST_TIMEOUT = 15.0


@define(eq=False)
class S3Store:
    """One bucket of one S3 endpoint."""

    endpoint: str  # scheme://host[:port], no path
    region: str
    bucket: str
    credentials: Credentials = field(repr=False)
    addressing: str  # "path" or "virtual"
    http: HTTPClient = field(repr=False)
    reactor: Any = field(repr=False)
    clock: Callable[[], float] = field(default=time.time, repr=False)
    pool: HTTPConnectionPool | None = field(default=None, repr=False)
    timeout: float = REQUEST_TIMEOUT
    # Where clients reach the same bucket (signed URLs), when not at ``endpoint``: S3 behind a
    # reverse proxy (the self-host compose file), which vibed itself reaches by an inner name.
    public_endpoint: str | None = None

    kind = "s3"

    _bucket_ready: bool = field(default=False, init=False)
    _healthy_at: float | None = field(default=None, init=False)

    @classmethod
    def from_config(cls, config: Config, *, reactor: Any, clock: Callable[[], float]) -> S3Store:
        if not config.s3_access_key_id or not config.s3_secret_access_key:
            raise ConfigError(
                "--blobs s3 needs --s3-access-key-id and --s3-secret-access-key "
                "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        endpoint = config.s3_endpoint or f"https://s3.{config.s3_region}.amazonaws.com"
        parts = urlsplit(endpoint)
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError("--s3-endpoint: expected scheme://host[:port] without a path")
        public = None
        if config.s3_public_endpoint:
            pub = urlsplit(config.s3_public_endpoint)
            if pub.path not in ("", "/") or pub.query:
                raise ConfigError(
                    "--s3-public-endpoint: expected scheme://host[:port] without a path"
                )
            public = f"{pub.scheme}://{pub.netloc}"
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 10
        return cls(
            endpoint=f"{parts.scheme}://{parts.netloc}",
            region=config.s3_region,
            bucket=config.s3_bucket,
            credentials=Credentials(config.s3_access_key_id, config.s3_secret_access_key),
            addressing=config.s3_addressing,
            http=HTTPClient(Agent(reactor, pool=pool)),
            reactor=reactor,
            clock=clock,
            pool=pool,
            public_endpoint=public,
        )

    # -- URLs ------------------------------------------------------------------------------

    def bucket_url(self, endpoint: str | None = None) -> str:
        endpoint = endpoint or self.endpoint
        if self.addressing == "virtual":
            scheme, _, host = endpoint.partition("://")
            return f"{scheme}://{self.bucket}.{host}/"
        return f"{endpoint}/{self.bucket}"

    def object_url(self, key: str, endpoint: str | None = None) -> str:
        if not KEY_RE.match(key):
            raise ValueError("not an object key")
        base = self.bucket_url(endpoint).rstrip("/")
        return f"{base}/{quote(key, safe='/')}"

    def _public_object_url(self, key: str) -> str:
        return self.object_url(key, self.public_endpoint)

    # -- signing (no network) --------------------------------------------------------------

    def _presign(self, method: str, url: str, headers: dict[str, str], expires_at: int) -> str:
        expires = max(1, min(604800, int(expires_at - self.clock())))
        request = AWSRequest(method=method, url=url, headers=headers)
        S3SigV4QueryAuth(self.credentials, "s3", self.region, expires=expires).add_auth(request)
        return cast(str, request.url)

    def sign_upload(self, key: str, mime: str, size: int, expires_at: int) -> SignedRequest:
        headers = {"Content-Type": mime, "Content-Length": str(size)}
        url = self._presign("PUT", self._public_object_url(key), dict(headers), expires_at)
        return SignedRequest(method="PUT", url=url, headers=headers)

    def sign_download(self, key: str, mime: str, expires_at: int) -> str:
        return self._presign("GET", self._public_object_url(key), {}, expires_at)

    # -- requests vibed makes --------------------------------------------------------------

    async def _exchange(self, method: str, url: str, body: bytes) -> tuple[int, Any, bytes]:
        request = AWSRequest(method=method, url=url, data=body, headers={})
        S3SigV4Auth(self.credentials, "s3", self.region).add_auth(request)
        headers = {name: value for name, value in request.headers.items()}
        response = await self.http.request(
            method, url, headers=headers, data=body or None, allow_redirects=False
        )
        content = await treq.content(response)
        return response.code, response.headers, content

    async def _send(self, method: str, url: str, body: bytes = b"") -> tuple[int, Any, bytes]:
        """One signed request; StoreUnavailable when S3 cannot be reached or fails."""
        d = Deferred.fromCoroutine(self._exchange(method, url, body))
        d.addTimeout(self.timeout, self.reactor)
        try:
            code, headers, content = await d
        except TimeoutError:
            raise self._down(f"S3 did not answer within {self.timeout:g} s") from None
        except CancelledError:
            raise  # the client went away
        except Exception as e:
            raise self._down(f"S3 not reachable ({type(e).__name__})") from None
        if code >= 500:
            raise self._down(f"S3 answered {code}") from None
        if code in (401, 403):
            _log.error(
                "S3 refused vibed's request ({code}): check the credentials and the bucket "
                "policy; {body}",
                code=code,
                body=content[:300].decode("utf-8", "replace"),
            )
            raise self._down(f"S3 refused the credentials ({code})") from None
        self._healthy_at = self.reactor.seconds()
        return code, headers, content

    def _down(self, reason: str) -> StoreUnavailable:
        """Mark S3 down and log why; the error to raise."""
        self._healthy_at = None
        _log.warn("S3 unavailable: {reason}", reason=reason)
        return StoreUnavailable(reason)

    async def ensure_bucket(self) -> None:
        """Create the bucket if it is missing; idempotent (several replicas may race)."""
        code, _, _ = await self._send("HEAD", self.bucket_url())
        if code == 404:
            body = b""
            if self.region != "us-east-1":
                body = (
                    '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    f"<LocationConstraint>{self.region}</LocationConstraint>"
                    "</CreateBucketConfiguration>"
                ).encode()
            code, _, content = await self._send("PUT", self.bucket_url(), body)
            if code == 409 and b"BucketAlreadyOwnedByYou" in content:
                code = 200
            if code >= 300:
                raise StoreUnavailable(
                    f"cannot create bucket {self.bucket!r} ({code}: "
                    f"{content[:200].decode('utf-8', 'replace')})"
                )
            _log.info("Created S3 bucket {bucket}", bucket=self.bucket)
        elif code >= 300:
            raise StoreUnavailable(f"bucket {self.bucket!r} answered {code}")
        self._bucket_ready = True

    async def ensure_available(self) -> None:
        now = self.reactor.seconds()
        if (
            self._bucket_ready
            and self._healthy_at is not None
            and now - self._healthy_at < HEALTH_TTL
        ):
            return
        await self.ensure_bucket()

    async def stat(self, key: str) -> ObjectInfo | None:
        code, headers, _ = await self._send("HEAD", self.object_url(key))
        if code == 404:
            return None
        if code >= 300:
            raise StoreUnavailable(f"S3 answered {code} to HEAD")
        length = (headers.getRawHeaders(b"content-length") or [b""])[0]
        ctype = (headers.getRawHeaders(b"content-type") or [None])[0]
        if not length.isdigit():
            raise StoreUnavailable("S3 answered HEAD without a Content-Length")
        return ObjectInfo(size=int(length), content_type=ctype.decode("latin-1") if ctype else None)

    async def delete(self, key: str) -> None:
        code, _, _ = await self._send("DELETE", self.object_url(key))
        if code >= 300 and code != 404:
            raise StoreUnavailable(f"S3 answered {code} to DELETE")

    async def keys_under(self, owner: str) -> list[str]:
        """Every key under ``<owner>/`` (ListObjectsV2, a page of 1,000 at a time)."""
        if not OWNER_RE.match(owner):
            raise ValueError("not an identity's prefix")
        keys: list[str] = []
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": owner + "/"}
            if token is not None:
                params["continuation-token"] = token
            url = self.bucket_url() + "?" + urlencode(params, quote_via=quote)
            code, _, content = await self._send("GET", url)
            if code >= 300:
                raise StoreUnavailable(f"S3 answered {code} to a listing")
            try:
                # Our own bucket's answer, parsed by expat (no external entities).
                root = ElementTree.fromstring(content)  # noqa: S314
            except ElementTree.ParseError:
                raise StoreUnavailable("S3 answered a listing that is not XML") from None
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            for element in root.iter(f"{ns}Key"):
                if element.text and KEY_RE.match(element.text):
                    keys.append(element.text)
            token = root.findtext(f"{ns}NextContinuationToken")
            if root.findtext(f"{ns}IsTruncated") != "true" or not token:
                return keys

    async def delete_prefix(self, owner: str) -> int:
        keys = await self.keys_under(owner)
        for key in keys:
            await self.delete(key)
        return len(keys)

    async def open_read(self, key: str) -> AsyncIterator[bytes] | None:
        url = self.object_url(key)
        request = AWSRequest(method="GET", url=url, headers={})
        S3SigV4Auth(self.credentials, "s3", self.region).add_auth(request)
        headers = {name: value for name, value in request.headers.items()}
        d = Deferred.fromCoroutine(self._open(url, headers))
        d.addTimeout(self.timeout, self.reactor)
        try:
            response = await d
        except TimeoutError:
            raise self._down(f"S3 did not answer within {self.timeout:g} s") from None
        except CancelledError:
            raise
        except Exception as e:
            raise self._down(f"S3 not reachable ({type(e).__name__})") from None
        if response.code == 404:
            await treq.content(response)
            return None
        if response.code >= 300:
            await treq.content(response)
            raise self._down(f"S3 answered {response.code} to GET")
        self._healthy_at = self.reactor.seconds()
        body = _StreamingBody(self.reactor, self.timeout)
        response.deliverBody(body)
        return body.chunks()

    async def _open(self, url: str, headers: Any) -> Any:
        # unbuffered: treq would otherwise collect the whole body in memory.
        return await self.http.request(
            "GET", url, headers=headers, allow_redirects=False, unbuffered=True
        )

    def service(self) -> S3Service:
        return S3Service(self)


class _StreamingBody(Protocol):
    """An object's body, handed out a chunk at a time: the connection is paused while more
    than :data:`HIGH_WATER` bytes wait for the consumer, so memory stays bounded."""

    HIGH_WATER = 1024 * 1024
    LOW_WATER = 256 * 1024

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.waiting: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.ended: Failure | None = None
        self.waiter: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.waiting.append(data)
        self.buffered += len(data)
        if self.buffered > self.HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            cast(Any, self.transport).pauseProducing()
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.ended = reason
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.callback(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                if self.waiting:
                    data = self.waiting.popleft()
                    self.buffered -= len(data)
                    if self.paused and self.buffered < self.LOW_WATER and self.ended is None:
                        self.paused = False
                        if self.transport is not None:
                            cast(Any, self.transport).resumeProducing()
                    yield data
                    continue
                if self.ended is not None:
                    if self.ended.check(ResponseDone):
                        return
                    raise StoreUnavailable("S3 stopped sending the object")
                waiter: Deferred[None] = Deferred()
                self.waiter = waiter
                waiter.addTimeout(self.timeout, self.reactor)
                try:
                    await waiter
                except TimeoutError:
                    raise StoreUnavailable("S3 stopped sending the object") from None
        finally:
            if self.ended is None and self.transport is not None:
                cast(Any, self.transport).stopProducing()  # abandoned (the client went away)


class S3Service(Service):
    """Bootstraps the bucket at start (retried with backoff until it works, never fatal) and
    closes the connection pool at stop."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self._running: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._running = Deferred.fromCoroutine(self._bootstrap())
        self._running.addErrback(lambda f: None if f.check(CancelledError) else f)
        self._running.addErrback(lambda f: _log.failure("S3 bucket bootstrap stopped", f))

    async def _bootstrap(self) -> None:
        delay = 0.5
        while self.running:
            try:
                await self.store.ensure_bucket()
            except StoreUnavailable as e:
                _log.warn(
                    "S3 bucket {bucket} not ready: {reason}; retrying in {delay} s",
                    bucket=self.store.bucket,
                    reason=e.reason,
                    delay=delay,
                )
            else:
                _log.info("S3 bucket {bucket} ready", bucket=self.store.bucket)
                return
            await deferLater(self.store.reactor, delay, lambda: None)
            delay = min(delay * 2, 30.0)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._running is not None and not self._running.called:
            self._running.cancel()
        if self.store.pool is not None:
            return cast("Deferred[None]", self.store.pool.closeCachedConnections())
        return None
