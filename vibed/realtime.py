"""``WS /realtime``: live changes of an identity's collections over one WebSocket.

This module owns the realtime surface: the WebSocket protocol (Autobahn) served at
``GET /realtime`` on the API's port, and the fan-out behind it, where ONE continuous CouchDB
``_changes`` feed per watched ``db_<idn>_data`` serves every subscription of that identity.
``docs/realtime.md`` is the longer version of this docstring.

Wire protocol
-------------
Every message is one JSON object in a text frame, with a ``type``. Sequence numbers
(``seq``, ``since``) are opaque strings: store the last one seen per collection and send it
back, never parse or compare them.

Authentication, one of:

* the access token as a query parameter: ``GET /realtime?access_token=<jwt>``;
* the first message: ``{"type": "auth", "token": "<jwt>"}`` (preferred: query strings end up
  in proxy logs), within ``auth_timeout`` seconds (10 by default) of the socket opening.

Client -> server:

``{"type": "auth", "token": <jwt>}``
    Authenticate, or, on an authenticated socket, replace the session's token before it
    expires (same identity; the new token's scopes apply from then on).
``{"type": "subscribe", "collection": <name>, "since"?: <seq>}``
    Receive the collection's changes. Without ``since``: those after the ``seq`` of the
    ``subscribed`` answer. With ``since``: every change after that seq (missed ones first,
    then live ones, none twice), as CouchDB's ``_changes`` reports them (a document changed
    several times while away is reported once, at its latest revision).
    Needs scope ``data:*`` or ``data:read:<name>``.
``{"type": "unsubscribe", "collection": <name>}``

Server -> client:

``{"type": "authenticated", "exp": <unix time>}``
    The token was accepted; the socket is closed (4002) at ``exp`` unless a fresh token
    arrives before.
``{"type": "subscribed", "collection": <name>, "seq": <seq>}``
    Changes after ``seq`` follow (``seq`` is ``since`` when one was given).
``{"type": "unsubscribed", "collection": <name>, "reason": "request" | "scope"}``
``{"type": "change", "collection", "id", "rev", "deleted", "doc", "seq"}``
    ``doc`` is the document as the data API returns it (``_id`` = ``id``, ``_rev``), null
    when ``deleted`` is true.
``{"type": "error", "code": <code>, "message": <text>, "collection"?: <name>}``
    The socket stays open. Codes: ``bad-json``, ``bad-message``, ``unknown-type``,
    ``bad-collection``, ``bad-since``, ``forbidden``, ``already-subscribed``,
    ``not-subscribed``, ``too-many-subscriptions``, ``unavailable`` (CouchDB could not be
    reached: subscribe again), ``not-found`` (the identity's database is gone), ``internal``.

Close codes: 1001 server shutting down, 1007 text frame not UTF-8, 1009 message over the size
limit, 1011 unexpected server error, 1013 tokens cannot be checked right now (reconnect
shortly), 4001 not authenticated (no token within the timeout, an invalid/expired/forged or
revoked token, or a message other than ``auth`` first), 4002 the token expired and no fresh
one was sent, 4003 a fresh token for another identity, 4004 the session, grant or identity
was revoked (log in or authorize again; do not just reconnect), 4008 the client did not read
fast enough (its send queue passed the limit).

Fan-out and hand-over
---------------------
:class:`FeedHub` keeps one :class:`DatabaseFeed` per watched database, reference-counted by
subscriptions and stopped when the last one leaves. The feed filters rows by collection in
vibed (``filter=_selector`` is never sent) and encodes each change once for every socket.
Live changes are batched per feed within ``batch_ms``: the sockets subscribed to the same
collections share one framed batch per window (one send each), and whatever else a socket is
sent goes after the window's changes made before it (see :class:`DatabaseFeed`).

A subscription with ``since`` catches up by chained normal reads (``_changes?since=<pos>``,
paged); meanwhile the rows the shared feed streams are buffered for it. The hand-over needs a
point where the reads and the stream meet, and seqs cannot be compared, only matched: when a
read ends at the seq the stream stood at when the subscription joined, or at the seq of a
buffered row, the rows buffered after it are delivered and the subscription goes live. When a
read ends at a seq the stream has not reached yet, the subscription waits for the stream to
reach it, and reads again (from where the last read ended) if it does not within
``anchor_grace``. Reads chain exactly, so until the match nothing is lost or repeated; on a
server whose two feeds never show the same seq (a CouchDB cluster may encode positions
differently) the subscription stays on reads, rung by the stream, rather than risk either.
A buffer that fills up is dropped and the join point moved to the newest row: the reads cover
what was dropped.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol, cast

from attrs import define, field, frozen
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.internet.tcp import Connection as TCPConnection
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from zope.interface import implementer

from vibed import strictjson
from vibed.api.http import resolve_client
from vibed.config import Config
from vibed.couch import CouchServer
from vibed.couch.client import ChangesFeed, CouchDatabase
from vibed.couch.errors import CouchBadRequest, CouchError, CouchNotFound, CouchUnavailable
from vibed.errors import Problem, write_problem
from vibed.layout import from_storage, split_storage_id, valid_collection
from vibed.naming import identity_db
from vibed.revocation import RevocationsUnavailable
from vibed.tokens import LEEWAY, AccessClaims, InvalidToken, TokenIssuer

__all__ = [
    "CATCHING_UP",
    "CLOSE_FORBIDDEN",
    "CLOSE_REVOKED",
    "CLOSE_TOKEN_EXPIRED",
    "CLOSE_TOO_SLOW",
    "CLOSE_UNAUTHORIZED",
    "ENDED",
    "LIVE",
    "PENDING",
    "Batch",
    "Change",
    "DatabaseFeed",
    "FeedHub",
    "RealtimeService",
    "RealtimeSettings",
    "Subscription",
    "make_realtime",
]

_log = Logger(namespace="vibed.realtime")

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011
CLOSE_UNAUTHORIZED = 4001
CLOSE_TOKEN_EXPIRED = 4002
CLOSE_FORBIDDEN = 4003
CLOSE_TOO_SLOW = 4008
CLOSE_REVOKED = 4004
CLOSE_TRY_AGAIN = 1013

#: What a ``since`` may look like: CouchDB 3 (``N-<base64url>``) and integer seqs. Checked
#: before a URL is built; what the server makes of it is then its business.
SEQ_RE = re.compile(r"^[0-9][0-9A-Za-z_-]{0,8191}\Z")

#: Frames one client message may be split into. Autobahn bounds a message's bytes, not its
#: frames: empty continuation frames would otherwise grow its fragment list (and pin the
#: reactor) for as long as the peer sends them.
MAX_FRAMES_PER_MESSAGE = 256

#: Framed messages kept for reuse: a change is delivered to all its live sockets in one go.
PREPARED_CACHE = 256

#: A socket's outbox leaves at once past this size, whatever the batch window.
OUTBOX_FLUSH_BYTES = 64 * 1024
#: Sockets whose batches leave in one reactor turn; the rest in the next turns.
FLUSH_CHUNK = 256
#: A handed-over subscription's first live rows are checked against what its reads
#: delivered for at most this many closed batch windows of its feed (or ``page_size`` rows).
CHECK_WINDOWS = 40


@frozen
class RealtimeSettings:
    """Tunables of the realtime surface; ``Config.extra["realtime"]`` overrides them."""

    auth_timeout: float = 10.0  # seconds to authenticate after the socket opens
    max_unauthenticated: int = 1000  # open sockets still waiting for a token, in all
    max_unauthenticated_per_address: int = 20  # ...and from one client address
    expiry_grace: float = float(LEEWAY)  # seconds past ``exp``, as the HTTP API allows
    queue_messages: int = 1000  # per-socket send queue, messages...
    queue_bytes: int = 4 * 1024 * 1024  # ...and bytes (one larger message fits an empty queue)
    max_message: int = 64 * 1024  # largest client message (1009 above)
    max_subscriptions: int = 64  # per socket
    ping_interval: float = 20.0  # WebSocket ping every..., 0 for none
    ping_timeout: float = 10.0  # ...and the pong must come within
    close_timeout: float = 2.0  # close handshake, then the TCP connection is dropped
    page_size: int = 500  # rows per catch-up read
    anchor_grace: float = 0.25  # seconds the stream may take to reach a read's end
    heartbeat_ms: int = 10_000  # of the continuous feeds
    dedupe_window: int = 1024  # per database: last revision of this many documents
    #: Changes for one socket that arrive within this many milliseconds leave in one send:
    #: with many sockets, the system call per message is the fan-out's main cost.
    batch_ms: float = 25.0

    @classmethod
    def from_config(cls, config: Config) -> RealtimeSettings:
        overrides = dict(config.extra.get("realtime") or {})
        return cls(**overrides)


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def can_read(scopes: tuple[str, ...], collection: str) -> bool:
    """Whether a token with ``scopes`` may read (and so subscribe to) ``collection``."""
    return "data:*" in scopes or f"data:read:{collection}" in scopes


@frozen
class Change:
    """One row of a database's changes, as the hub keeps it.

    ``payload`` is the encoded ``change`` message, made once for every socket; rows that are
    not app documents (or repeat the previous revision of their document) keep only their
    ``seq``, which still counts as a position of the stream.
    """

    seq: str
    collection: str | None = None
    doc_id: str | None = None  # the storage _id
    rev: str | None = None
    payload: bytes | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Change:
        seq = str(row["seq"])
        storage_id = row.get("id")
        split = split_storage_id(storage_id) if isinstance(storage_id, str) else None
        if split is None:
            return cls(seq)
        collection, doc_id = split
        doc = row.get("doc")
        rev: Any = doc.get("_rev") if isinstance(doc, dict) else None
        if not isinstance(rev, str):
            changes = row.get("changes")
            first = changes[0] if isinstance(changes, list) and changes else None
            rev = first.get("rev") if isinstance(first, dict) else None
        if not isinstance(rev, str):
            return cls(seq)
        deleted = bool(row.get("deleted")) or (isinstance(doc, dict) and bool(doc.get("_deleted")))
        payload = _encode(
            {
                "type": "change",
                "collection": collection,
                "id": doc_id,
                "rev": rev,
                "deleted": deleted,
                "doc": None if deleted or not isinstance(doc, dict) else from_storage(doc),
                "seq": seq,
            }
        )
        return cls(seq, collection, storage_id, rev, payload)

    def position_only(self) -> Change:
        return Change(self.seq)


@define(eq=False)
class Batch:
    """The changes of one batch window that a set of sinks with the same collections gets:
    ``payloads`` in the stream's order, and once a sink asks, the same messages framed and
    joined, made once for every sink of the set."""

    payloads: list[bytes]
    _framed: bytes | None = field(default=None, repr=False)

    def framed(self, frame: Callable[[bytes], bytes]) -> bytes:
        """The payloads framed by ``frame`` and joined (computed on the first call)."""
        if self._framed is None:
            if len(self.payloads) == 1:
                self._framed = frame(self.payloads[0])
            else:
                self._framed = b"".join([frame(p) for p in self.payloads])
        return self._framed


class ChangeSink(Protocol):
    """Where a subscription's messages go (a socket)."""

    def subscribed(self, sub: Subscription) -> None:
        """``sub`` joined its feed; its changes follow ``sub.ack_seq``."""

    def deliver(self, payload: bytes) -> None:
        """Send one encoded ``change`` message."""

    def deliver_batch(self, batch: Batch) -> None:
        """Send the messages of a closed batch window, in order (see DatabaseFeed)."""

    def drained(self) -> Deferred[None]:
        """Fires once what was sent so far has left for the network (catch-up pacing)."""

    def subscription_ended(self, sub: Subscription, code: str, message: str) -> None:
        """The server ended ``sub`` (``code`` as in an ``error`` message)."""


PENDING, CATCHING_UP, LIVE, ENDED = "pending", "catching-up", "live", "ended"


@define(eq=False)
class Subscription:
    """One socket's interest in one collection of one database."""

    database: str
    collection: str
    sink: ChangeSink = field(repr=False)
    since: str | None = None
    state: str = PENDING
    entry: DatabaseFeed | None = field(default=None, repr=False)
    #: the seq of the ``subscribed`` answer: the changes after it follow
    ack_seq: str | None = None
    #: catching up: where the chain of reads stands, and where the stream stood at joining
    pos: str | None = None
    joined_at: str | None = None
    buffer: deque[Change] = field(factory=deque, repr=False)
    buffer_bytes: int = 0
    at_end: bool = False
    #: last revision per document the reads delivered: a safety net at the hand-over
    seen: dict[str, str] = field(factory=dict, repr=False)
    live_rows: int = 0
    #: the feed's rows and closed windows when it went live: ``seen`` is kept for a while
    checked_from: tuple[int, int] = (0, 0)
    reads: int = 0
    doorbell: Deferred[str] | None = field(default=None, repr=False)
    timer: IDelayedCall | None = field(default=None, repr=False)
    task: Deferred[None] | None = field(default=None, repr=False)


@define(eq=False)
class DatabaseFeed:
    """The shared continuous feed of one database and the subscriptions it serves.

    With a batch window (``batch_ms`` > 0) live changes are batched per feed, not per socket:
    a change only joins the feed's open window; when the window closes (the hub's timer, or
    past ``OUTBOX_FLUSH_BYTES``) every sink gets, in one :meth:`ChangeSink.deliver_batch`,
    the window's changes of the collections it is subscribed to, and the sinks subscribed to
    the same collections share one :class:`Batch` (framed and joined once). Order is kept
    per sink by one rule: before anything else reaches a sink (an acknowledgement, an error,
    a catch-up row, a close) and before its subscriptions change, :meth:`settle` hands it
    what the open window holds for it so far, one by one, and it receives the rest of that
    window's changes one by one too ("solo"). A sink whose subscription has just been handed
    over (its first live rows are checked against what its reads delivered) stays solo until
    the check ends.
    """

    hub: FeedHub = field(repr=False)
    name: str
    database: CouchDatabase = field(repr=False)
    feed: ChangesFeed | None = field(default=None, repr=False)
    #: seq of the last row the stream delivered (or where it was pinned to start)
    position: str | None = None
    refs: int = 0
    live: dict[str, set[Subscription]] = field(factory=dict, repr=False)
    catching_up: set[Subscription] = field(factory=set, repr=False)
    opened: bool = False
    _waiters: list[Deferred[None]] = field(factory=list, repr=False)
    _recent: OrderedDict[str, str] = field(factory=OrderedDict, repr=False)
    _stopping: Deferred[None] | None = field(default=None, repr=False)
    # -- the batch window: its changes, and who gets them how --
    _window: list[Change] = field(factory=list, repr=False)
    _window_bytes: int = 0
    #: each sink's live subscriptions here, by collection (a socket has one per collection)
    _sink_subs: dict[ChangeSink, dict[str, Subscription]] = field(factory=dict, repr=False)
    #: each sink's set of live collections, and the sinks of each such set
    _views: dict[ChangeSink, frozenset[str]] = field(factory=dict, repr=False)
    _groups: dict[frozenset[str], dict[ChangeSink, None]] = field(factory=dict, repr=False)
    #: the sets of collections (keys of ``_groups``) that hold each collection
    _views_of: dict[str, dict[frozenset[str], None]] = field(factory=dict, repr=False)
    #: sinks that get this window's changes one by one, as they come (not in the batch)
    _solo: set[ChangeSink] = field(factory=set, repr=False)
    #: sinks with a subscription whose first live rows are checked (solo every window)
    _checked: set[ChangeSink] = field(factory=set, repr=False)
    #: rows streamed and windows closed so far (how long a hand-over's check lasts)
    rows: int = 0
    windows: int = 0

    @property
    def settings(self) -> RealtimeSettings:
        return self.hub.settings

    # -- the shared stream ---------------------------------------------------------------

    async def open(self) -> None:
        """Pin the stream to the database's current seq, then start the continuous feed."""
        try:
            info = await self.database.info()
        except CouchError as exc:
            self.hub._forget(self)
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.errback(Failure(exc))
            return
        self.position = _seq(info.get("update_seq", "0"))
        if self.refs > 0 and self.hub.feeds.get(self.name) is self:
            self.feed = self.database.changes_feed(
                self._on_row,
                since=self.position,
                include_docs=True,
                heartbeat_ms=self.settings.heartbeat_ms,
                clock=self.hub.reactor,
            )
            self.feed.start()
            self.hub.feeds_opened += 1
        self.opened = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_open(self) -> Deferred[None]:
        if self.opened:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _on_row(self, row: dict[str, Any]) -> None:
        change = Change.from_row(row)
        doc_id, rev = change.doc_id, change.rev
        if doc_id is not None and rev is not None:
            if self._recent.get(doc_id) == rev:
                # The same revision again (a feed that rewound): a position, not an event.
                change = change.position_only()
            else:
                self._recent[doc_id] = rev
                self._recent.move_to_end(doc_id)
                if len(self._recent) > self.settings.dedupe_window:
                    self._recent.popitem(last=False)
        self.position = change.seq
        self.rows += 1
        self.hub.rows_seen += 1
        # Live subscriptions first: one that goes live below, on this very row, must not
        # receive it (its reads delivered it).
        # One subscription's failure must never cost another its event: each is guarded.
        if change.collection is not None and change.payload is not None:
            subs = self.live.get(change.collection)
            if subs and self.hub.batching:
                self._add_to_window(change)
                subs = None
            for sub in list(subs) if subs else ():
                if sub.state == LIVE:
                    try:  # _guard, inline: this loop runs once per subscriber per change
                        self._deliver_live(sub, change)
                    except Exception:
                        _log.failure("realtime: delivering a change of {db} failed", db=self.name)
                        self.hub.end(
                            sub, "internal", "The subscription failed; subscribe again with since."
                        )
        for sub in list(self.catching_up):
            if sub.state == CATCHING_UP:
                self._guard(self._buffer, sub, change)

    # -- the batch window --------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Changes in the open batch window."""
        return len(self._window)

    def _add_to_window(self, change: Change) -> None:
        assert change.payload is not None and change.collection is not None
        if not self._window:
            self.hub.window_opened(self)
        self._window.append(change)
        self._window_bytes += len(change.payload)
        if self._solo:
            # The sinks served one by one that take this collection: found from the smaller
            # side (a quiet feed may have many solo sinks, a busy collection many subscribers).
            subscribers = self.live.get(change.collection) or set()
            if len(subscribers) < len(self._solo):
                for one in [s for s in subscribers if s.sink in self._solo]:
                    if one.state == LIVE and one.sink in self._solo:
                        self._guard(self._deliver_live, one, change)
            else:
                for sink in list(self._solo):
                    sub = self._sink_subs.get(sink, _NO_SUBS).get(change.collection)
                    if sub is not None and sub.state == LIVE:
                        self._guard(self._deliver_live, sub, change)
        if self._window_bytes >= OUTBOX_FLUSH_BYTES:
            self.flush_window()

    def settle(self, sink: ChangeSink) -> None:
        """Hand ``sink`` now what the open window holds for it, one by one; it gets the rest
        of this window's changes one by one too. Called before anything else reaches the
        sink and before its subscriptions here change, so that it receives every message
        in the order it was made, and a new subscription nothing from before it."""
        if not self._window or sink in self._solo:
            return
        self._solo.add(sink)
        view = self._views.get(sink)
        if view is None:
            return
        self.hub.settled += 1
        subs = self._sink_subs[sink]
        for change in list(self._window):
            if change.collection in view:
                sub = subs.get(change.collection)
                if sub is not None and sub.state == LIVE:
                    self._guard(self._deliver_live, sub, change)

    def flush_window(self) -> None:
        """Close the window: each sink not served one by one gets the window's changes of
        its collections in one batch, made once per set of collections."""
        window = self._window
        if not window:
            return
        self._window = []
        self._window_bytes = 0
        self.windows += 1
        solo = self._solo
        if self._checked:
            self._checked = {sink for sink in self._checked if self._still_checked(sink)}
        self._solo = set(self._checked)
        # Only the sets of collections the window touches (not every socket's set).
        touched = {c.collection for c in window}
        views: dict[frozenset[str], None] = {}
        for collection in touched:
            views.update(self._views_of.get(cast(str, collection), _NO_VIEWS))
        for view in views:
            group = self._groups.get(view)
            if not group:
                continue
            payloads = [c.payload for c in window if c.collection in view]
            if not payloads:
                continue
            batch = Batch(cast(list[bytes], payloads))
            for sink in [s for s in group if s not in solo] if solo else list(group):
                try:
                    sink.deliver_batch(batch)
                except Exception:
                    _log.failure("realtime: delivering changes of {db} failed", db=self.name)
                    for sub in list(self._sink_subs.get(sink, _NO_SUBS).values()):
                        self.hub.end(
                            sub, "internal", "The subscription failed; subscribe again with since."
                        )

    def _still_checked(self, sink: ChangeSink) -> bool:
        """Whether a subscription of ``sink`` still checks its first live rows against what
        its reads delivered: until the feed has streamed ``page_size`` rows or closed
        ``CHECK_WINDOWS`` windows since it went live (a quiet collection's check ends too)."""
        checked = False
        for sub in self._sink_subs.get(sink, _NO_SUBS).values():
            if not sub.seen:
                continue
            rows, windows = sub.checked_from
            if (
                self.rows - rows > self.settings.page_size
                or self.windows - windows >= CHECK_WINDOWS
            ):
                sub.seen.clear()
            else:
                checked = True
        return checked

    def _join(self, sub: Subscription) -> None:
        """``sub`` (live now) joins its sink's set of collections."""
        sink = sub.sink
        subs = self._sink_subs.get(sink)
        if subs is None:
            subs = self._sink_subs[sink] = {}
        subs[sub.collection] = sub
        self._regroup(sink, subs)
        if sub.seen:
            sub.checked_from = (self.rows, self.windows)
            self._checked.add(sink)
            self._solo.add(sink)  # settled before (or no window open): nothing skipped

    def _leave(self, sub: Subscription) -> None:
        sink = sub.sink
        subs = self._sink_subs.get(sink)
        if subs is None or subs.get(sub.collection) is not sub:
            return
        del subs[sub.collection]
        if not subs:
            del self._sink_subs[sink]
            self._checked.discard(sink)
        self._regroup(sink, subs)

    def _regroup(self, sink: ChangeSink, subs: dict[str, Subscription]) -> None:
        old = self._views.pop(sink, None)
        if old is not None:
            group = self._groups[old]
            del group[sink]
            if not group:
                del self._groups[old]
                for collection in old:
                    views = self._views_of[collection]
                    del views[old]
                    if not views:
                        del self._views_of[collection]
        if subs:
            view = frozenset(subs)
            self._views[sink] = view
            members = self._groups.get(view)
            if members is None:
                members = self._groups[view] = {}
                for collection in view:
                    self._views_of.setdefault(collection, {})[view] = None
            members[sink] = None

    def _guard(
        self, step: Callable[[Subscription, Change], None], sub: Subscription, change: Change
    ) -> None:
        try:
            step(sub, change)
        except Exception:
            _log.failure("realtime: delivering a change of {db} failed", db=self.name)
            self.hub.end(sub, "internal", "The subscription failed; subscribe again with since.")

    def _deliver_live(self, sub: Subscription, change: Change) -> None:
        assert change.payload is not None
        if sub.seen:
            sub.live_rows += 1
            if change.doc_id is not None and sub.seen.get(change.doc_id) == change.rev:
                self.hub.duplicates_dropped += 1
                return
            if sub.live_rows > self.settings.page_size:
                sub.seen.clear()
        sub.sink.deliver(change.payload)

    # -- subscriptions -----------------------------------------------------------------

    def attach(self, sub: Subscription) -> None:
        """Join the open stream: live at once, or catching up from ``since``."""
        assert self.position is not None
        if sub.since is None or sub.since == self.position:
            sub.ack_seq = self.position if sub.since is None else sub.since
            if self._go_live(sub):
                sub.sink.subscribed(sub)
            return
        sub.ack_seq = sub.pos = sub.since
        sub.joined_at = self.position
        sub.state = CATCHING_UP
        self.catching_up.add(sub)
        sub.sink.subscribed(sub)
        if sub.state != CATCHING_UP:
            return
        task = Deferred.fromCoroutine(self._catch_up(sub))
        sub.task = task
        task.addErrback(self._catch_up_failed, sub)

    def detach(self, sub: Subscription) -> None:
        """Leave: the subscription receives nothing more (what the open window holds for
        its sink is handed over first)."""
        self.settle(sub.sink)
        sub.state = ENDED
        self.catching_up.discard(sub)
        subs = self.live.get(sub.collection)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.live[sub.collection]
        self._leave(sub)
        self._stop_waiting(sub)
        if sub.task is not None and not sub.task.called:
            sub.task.cancel()
        sub.buffer.clear()
        sub.buffer_bytes = 0
        sub.seen.clear()

    def subscriptions(self) -> list[Subscription]:
        return [*self.catching_up, *(s for subs in self.live.values() for s in subs)]

    def _go_live(self, sub: Subscription) -> bool:
        """``sub`` goes live (False: its socket went away while the window's changes were
        handed to it, which ended ``sub``: it must not be revived)."""
        self.settle(sub.sink)  # the open window's changes are not the new subscription's
        if sub.state == ENDED or sub.entry is not self:
            return False
        self.catching_up.discard(sub)
        self._stop_waiting(sub)
        sub.state = LIVE
        sub.buffer_bytes = 0
        self.live.setdefault(sub.collection, set()).add(sub)
        self._join(sub)
        return True

    def _buffer(self, sub: Subscription, change: Change) -> None:
        """A stream row while ``sub`` catches up: keep it, and see whether the reads meet it."""
        own = change.collection == sub.collection and change.payload is not None
        sub.buffer.append(change if own else change.position_only())
        if own:
            assert change.payload is not None
            sub.buffer_bytes += len(change.payload)
        if (
            len(sub.buffer) > self.settings.queue_messages
            or sub.buffer_bytes > self.settings.queue_bytes
        ):
            # Too much to hold: forget it and rejoin here; the reads cover what is dropped.
            sub.buffer.clear()
            sub.buffer_bytes = 0
            sub.joined_at = change.seq
        if sub.doorbell is None:
            return  # a read is in flight: its end is matched when it returns
        if change.seq == sub.pos:
            self._splice(sub)
        elif sub.timer is None:
            sub.timer = self.hub.reactor.callLater(self.settings.anchor_grace, self._ring, sub)

    def _ring(self, sub: Subscription) -> None:
        sub.timer = None
        if sub.doorbell is not None:
            doorbell, sub.doorbell = sub.doorbell, None
            doorbell.callback("read")

    def _stop_waiting(self, sub: Subscription) -> None:
        if sub.timer is not None and sub.timer.active():
            sub.timer.cancel()
        sub.timer = None
        if sub.doorbell is not None:
            doorbell, sub.doorbell = sub.doorbell, None
            doorbell.callback("done")

    def _meets_stream(self, sub: Subscription) -> bool:
        return sub.pos == sub.joined_at or any(c.seq == sub.pos for c in sub.buffer)

    def _splice(self, sub: Subscription) -> None:
        """Deliver the buffered rows after ``pos`` and go live, in one reactor turn."""
        rows = list(sub.buffer)
        start = 0
        if sub.pos != sub.joined_at:
            for index, change in enumerate(rows):
                if change.seq == sub.pos:
                    start = index + 1
                    break
        sub.buffer.clear()
        if not self._go_live(sub):
            return
        self.hub.handovers += 1
        for change in rows[start:]:
            if sub.state != LIVE:
                return  # the socket went away meanwhile
            if change.payload is not None:
                self._deliver_live(sub, change)

    async def _catch_up(self, sub: Subscription) -> None:
        """Chained normal reads from ``since`` until they meet the stream."""
        backoff = 0.5
        while sub.state == CATCHING_UP:
            if self._meets_stream(sub):
                self._splice(sub)
                return
            if sub.at_end:
                doorbell: Deferred[str] = Deferred()
                sub.doorbell = doorbell
                if await doorbell != "read" or sub.state != CATCHING_UP:
                    return
                if self._meets_stream(sub):
                    continue
            await sub.sink.drained()  # pace the reads by what the client takes
            if sub.state != CATCHING_UP:
                return
            assert sub.pos is not None
            try:
                page = await self.database.changes(
                    since=sub.pos, include_docs=True, limit=self.settings.page_size
                )
            except CouchBadRequest as exc:
                self.hub.end(sub, "bad-since", f"CouchDB refused this seq ({exc.error}).")
                return
            except CouchNotFound:
                self.hub.end(sub, "not-found", "This identity's database does not exist.")
                return
            except CouchError as exc:
                _log.warn(
                    "catch-up read of {db} failed ({error}); again in {delay} s",
                    db=self.name,
                    error=str(exc),
                    delay=backoff,
                )
                await _sleep(self.hub.reactor, backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            if sub.state != CATCHING_UP:
                return
            sub.reads += 1
            self.hub.catch_up_reads += 1
            results = [r for r in page.get("results") or [] if isinstance(r, dict) and "seq" in r]
            if results:
                self.settle(sub.sink)  # the window's changes of its live ones go first
                if sub.state != CATCHING_UP:
                    return  # its socket went away meanwhile
            for row in results:
                change = Change.from_row(row)
                if change.collection != sub.collection or change.payload is None:
                    continue
                if change.doc_id is not None and change.rev is not None:
                    sub.seen.pop(change.doc_id, None)
                    sub.seen[change.doc_id] = change.rev
                    if len(sub.seen) > self.settings.page_size * 4:
                        sub.seen.pop(next(iter(sub.seen)))
                sub.sink.deliver(change.payload)
                if sub.state != CATCHING_UP:
                    return
            sub.pos = _seq(page.get("last_seq", sub.pos))
            sub.at_end = len(results) < self.settings.page_size

    def _catch_up_failed(self, failure: Failure, sub: Subscription) -> None:
        if failure.check(CancelledError):
            return
        _log.failure(
            "catch-up of {db}/{collection}: bug", failure, db=self.name, collection=sub.collection
        )
        self.hub.end(sub, "internal", "The subscription failed; subscribe again.")

    def stop(self) -> Deferred[None]:
        """Stop the continuous feed (once); fires when its connection is closed."""
        if self._stopping is None:
            feed, self.feed = self.feed, None
            self._stopping = feed.stop() if feed is not None else succeed(None)
        return self._stopping


_NO_SUBS: dict[str, Subscription] = {}
_NO_VIEWS: dict[frozenset[str], None] = {}


def _seq(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


async def _sleep(reactor: Any, seconds: float) -> None:
    d: Deferred[None] = Deferred()
    call = reactor.callLater(seconds, d.callback, None)
    try:
        await d
    finally:
        if call.active():
            call.cancel()


class FeedHub:
    """Every shared feed of this replica, keyed by database name and reference-counted by
    subscriptions: the first opens it, the last one leaving stops it."""

    def __init__(self, couch: CouchServer, reactor: Any, settings: RealtimeSettings) -> None:
        self.couch = couch
        self.reactor = reactor
        self.settings = settings
        self.feeds: dict[str, DatabaseFeed] = {}
        self._stopping: set[Deferred[Any]] = set()
        # counters, for tests and the benchmark
        self.feeds_opened = 0
        self.rows_seen = 0
        self.catch_up_reads = 0
        self.handovers = 0
        self.duplicates_dropped = 0
        self.settled = 0  # sinks handed an open window's changes one by one (settle)
        #: live changes are batched per feed within ``batch_ms``
        self.batching = settings.batch_ms > 0
        self._windows: dict[DatabaseFeed, None] = {}
        self._window_call: IDelayedCall | None = None

    def stats(self) -> dict[str, int]:
        return {
            "databases": len(self.feeds),
            "subscriptions": sum(f.refs for f in self.feeds.values()),
            "catching_up": sum(len(f.catching_up) for f in self.feeds.values()),
            "feeds_open": sum(1 for f in self.feeds.values() if f.feed is not None),
            "feeds_opened": self.feeds_opened,
            "rows_seen": self.rows_seen,
            "catch_up_reads": self.catch_up_reads,
            "handovers": self.handovers,
            "duplicates_dropped": self.duplicates_dropped,
            "settled": self.settled,
        }

    def window_opened(self, entry: DatabaseFeed) -> None:
        """``entry`` has changes waiting: its window closes at the end of this batch window
        (one timer for every feed)."""
        self._windows[entry] = None
        if self._window_call is None:
            delay = self.settings.batch_ms / 1000
            self._window_call = self.reactor.callLater(delay, self.flush_windows)

    def flush_windows(self) -> None:
        """Close every open batch window now."""
        if self._window_call is not None and self._window_call.active():
            self._window_call.cancel()
        self._window_call = None
        entries, self._windows = self._windows, {}
        for entry in entries:
            try:
                entry.flush_window()
            except Exception:
                _log.failure("realtime: closing the batch window of {db}: bug", db=entry.name)

    async def subscribe(self, sub: Subscription) -> None:
        """Join ``sub`` to the feed of its database, opening the feed first if needed.

        Raises the CouchError that kept the feed from opening. ``sub`` may have been
        unsubscribed meanwhile (its state is then ``ended``)."""
        entry = self.feeds.get(sub.database)
        if entry is None:
            entry = DatabaseFeed(self, sub.database, self.couch.database(sub.database))
            self.feeds[sub.database] = entry
            entry.refs += 1
            Deferred.fromCoroutine(entry.open()).addErrback(
                lambda f: _log.failure("opening the feed of {db}: bug", f, db=sub.database)
            )
        else:
            entry.refs += 1
        sub.entry = entry
        try:
            await entry.when_open()
        except CouchError:
            self._release(sub)
            raise
        if sub.state != PENDING or sub.entry is not entry:
            return
        if self.feeds.get(sub.database) is not entry:  # the hub stopped meanwhile
            self._release(sub)
            raise CouchUnavailable(0, "stopping", "the realtime service is stopping")
        entry.attach(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        entry = sub.entry
        if entry is not None and sub.state != ENDED:
            entry.detach(sub)
        self._release(sub)

    def end(self, sub: Subscription, code: str, message: str) -> None:
        """End ``sub`` from the server's side, and tell its socket."""
        if sub.state == ENDED:
            return
        self.unsubscribe(sub)
        sub.sink.subscription_ended(sub, code, message)

    def _release(self, sub: Subscription) -> None:
        entry, sub.entry = sub.entry, None
        sub.state = ENDED
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            self._forget(entry)
            stopping = entry.stop()
            if not stopping.called:
                self._stopping.add(stopping)

                def stopped(result: object) -> object:
                    self._stopping.discard(stopping)
                    return result

                stopping.addBoth(stopped)

    def _forget(self, entry: DatabaseFeed) -> None:
        if self.feeds.get(entry.name) is entry:
            del self.feeds[entry.name]

    def stop(self) -> Deferred[Any]:
        """Stop every feed; fires once their connections are closed."""
        for entry in list(self.feeds.values()):
            for sub in entry.subscriptions():
                entry.detach(sub)
            self._forget(entry)
            self._stopping.add(entry.stop())
        self.flush_windows()
        return DeferredList(list(self._stopping), consumeErrors=True)


# -- the WebSocket side ------------------------------------------------------------------


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Autobahn swallows what its callbacks raise: log it, and end the socket cleanly."""

    @functools.wraps(method)
    def wrapper(self: RealtimeProtocol, *args: Any) -> Any:
        try:
            return method(self, *args)
        except ConnectionDeny:
            raise
        except Exception:
            _log.failure("realtime socket: {callback} failed", callback=method.__name__)
            self._internal_error()
            return None

    return wrapper


def _short(text: str, limit: int = 120) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    data = text.encode("utf-8")[:limit]
    return data.decode("utf-8", "ignore")


@implementer(IPushProducer)
class _SendPressure:
    """Registered with the socket's transport: told when its buffer fills and drains."""

    def __init__(self, protocol: RealtimeProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted API)
        self.protocol._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.protocol._paused = False
        self.protocol._flush()

    def stopProducing(self) -> None:  # noqa: N802
        pass


def _tls_layer(transport: Any) -> Any:
    """The TLS protocol under ``transport`` when it only forwards to one (vibed's
    per-address connection cap wraps every connection, inside a TLS layer when vibed
    terminates TLS itself), else ``transport``. Autobahn reads a TLS connection's details
    from its transport and only knows Twisted's TLS protocol."""
    inner = transport
    while isinstance(inner, ProtocolWrapper) and type(inner).write is ProtocolWrapper.write:
        inner = inner.transport
        if isinstance(inner, TLSMemoryBIOProtocol):
            return inner
    return transport


def _plain_tcp(transport: Any) -> TCPConnection | None:
    """The TCP connection under ``transport`` when nothing between them but wrappers that
    only forward what is written (never a TLS layer): what :func:`_send_now` may write to
    directly. None otherwise."""
    while isinstance(transport, ProtocolWrapper):
        if type(transport).write is not ProtocolWrapper.write:
            return None  # TLS, throttling...: what it does to the bytes must not be skipped
        transport = transport.transport
    if isinstance(transport, TCPConnection) and not transport.TLS:
        return transport
    return None


def _send_now(transport: TCPConnection, frame: bytes) -> bool:
    """Send ``frame`` on a plain TCP connection (see :func:`_plain_tcp`) with nothing
    queued, now (False: the connection is closing or has bytes queued; the caller writes it
    the usual way).

    ``transport.write`` would queue the bytes, register the socket for writing (one
    ``epoll_ctl``), send on the next reactor turn and unregister it (another): three system
    calls per message where one does, for every socket a change goes to. What the kernel
    does not take at once is queued as usual, so the send queue limits and the producer that
    pauses on a full kernel buffer keep working."""
    if (
        not transport.connected
        or transport.disconnecting
        or transport._tempDataLen  # noqa: SLF001 - Twisted's write buffers: must be empty
        or len(transport.dataBuffer) != transport.offset
    ):
        return False
    try:
        sent = transport.socket.send(frame)
    except BlockingIOError:
        sent = 0
    except OSError:
        return False  # let the transport meet (and report) the error
    if sent < len(frame):
        transport.write(frame[sent:])
    return True


class RealtimeProtocol(WebSocketServerProtocol):
    """One client socket; the protocol is in the module docstring."""

    factory: RealtimeFactory

    def __init__(self) -> None:
        super().__init__()
        self.claims: AccessClaims | None = None
        self.client_address = ""
        self.database: str | None = None
        self.subs: dict[str, Subscription] = {}
        self.close_code: int | None = None
        self.high_water_messages = 0
        self.high_water_bytes = 0
        self._query_token: str | None = None
        self._queue: deque[bytes] = deque()
        self._outbox: list[bytes] = []  # framed messages waiting for the batch to leave
        self._outbox_bytes = 0
        self._queued_bytes = 0
        self._paused = False
        self._closing = False
        #: _close is handing over the open windows before the close frame: a send queue that
        #: overflows meanwhile drops the rest (it is discarded at the close anyway), and
        #: the close keeps its code
        self._final_settle = False
        self._overflowed = False
        self._gone = False
        self._auth_timer: IDelayedCall | None = None
        self._expiry_timer: IDelayedCall | None = None
        self._drain_waiters: list[Deferred[None]] = []
        self._gone_waiters: list[Deferred[None]] = []
        self._frames = 0
        self._message_bytes = 0
        self._pending_pong: bytes | None = None
        #: The plain TCP connection frames may be sent on directly (None: TLS, or not TCP).
        self._tcp: TCPConnection | None = None
        self._batch_ms = 0.0

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.transport = _tls_layer(self.transport)
        self._tcp = _plain_tcp(self.transport)
        # A batch leaves as soon as it is sent: Nagle's algorithm would hold it until the
        # client acknowledged the previous one (up to its delayed-ACK timer, 40 ms on Linux).
        connection: Any = self.transport
        while isinstance(connection, ProtocolWrapper):
            connection = connection.transport
        if isinstance(connection, TCPConnection):
            try:
                connection.setTcpNoDelay(True)
            except OSError:
                pass
        self._batch_ms = self.settings.batch_ms
        super().connectionMade()

    @property
    def service(self) -> RealtimeService:
        return self.factory.service

    @property
    def settings(self) -> RealtimeSettings:
        return self.factory.service.settings

    @property
    def queued(self) -> tuple[int, int]:
        """(messages, bytes) waiting in this socket's send queue."""
        return len(self._queue), self._queued_bytes

    # -- Autobahn's callbacks --------------------------------------------------------------

    @_guarded
    def onConnect(self, request: Any) -> None:  # noqa: N802 (Autobahn API)
        if not self.service.accepting:
            raise ConnectionDeny(503, "The server is shutting down.")
        peer = str(request.peer).split(":")
        host = ":".join(peer[1:-1]) if len(peer) > 2 else str(request.peer)
        forwarded = request.headers.get("x-forwarded-for")
        self.client_address = resolve_client(
            host,
            forwarded if isinstance(forwarded, str) else None,
            self.service.config.trusted_proxies,
        )
        tokens = request.params.get("access_token")
        if tokens:
            self._query_token = tokens[0]
            return None
        # Each waits auth_timeout at most, but a flood of them must not pile up, in all or
        # from one address.
        waiting = [s for s in self.service.sockets if s.claims is None]
        if len(waiting) >= self.settings.max_unauthenticated:
            raise ConnectionDeny(503, "Too many sockets waiting to authenticate; retry shortly.")
        mine = sum(1 for s in waiting if s.client_address == self.client_address)
        if mine >= self.settings.max_unauthenticated_per_address:
            raise ConnectionDeny(
                503, "Too many sockets from this address waiting to authenticate; retry shortly."
            )
        return None

    @_guarded
    def onOpen(self) -> None:  # noqa: N802
        self.service.sockets.add(self)
        transport: Any = self.transport
        try:
            transport.registerProducer(_SendPressure(self), True)
        except RuntimeError:
            _log.warn("realtime socket: the transport already has a producer")
        token, self._query_token = self._query_token, None
        if token is not None:
            self._authenticate(token)
        else:
            self._auth_timer = self.service.reactor.callLater(
                self.settings.auth_timeout, self._auth_timed_out
            )

    @_guarded
    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        if self._closing:
            return
        authed = self.claims is not None
        if isBinary:
            self._refuse("bad-message", "Binary frames are not understood: send JSON text.")
            return
        try:
            message = strictjson.loads(payload)
        except strictjson.JSONError as exc:
            self._refuse("bad-json", _short(str(exc), 200))
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self._refuse("bad-message", "A message is a JSON object with a string 'type'.")
            return
        kind = message["type"]
        if not authed and kind != "auth":
            self._close(CLOSE_UNAUTHORIZED, "Authenticate first: send an auth message.")
            return
        handler = {
            "auth": self._handle_auth,
            "subscribe": self._handle_subscribe,
            "unsubscribe": self._handle_unsubscribe,
        }.get(kind)
        if handler is None:
            self._error("unknown-type", f"Unknown message type {_short(kind, 64)!r}.")
            return
        handler(message)

    def onMessageBegin(self, isBinary: bool) -> None:  # noqa: N802, N803
        self._frames = 0
        self._message_bytes = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:  # noqa: N802
        self._frames += 1
        self._message_bytes += length
        if self._frames > MAX_FRAMES_PER_MESSAGE and not self.failedByMe:
            self._fail_connection(
                WebSocketServerProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG,
                f"A message may be split into at most {MAX_FRAMES_PER_MESSAGE} frames.",
            )
        elif self._message_bytes > self.settings.max_message and not self.failedByMe:
            self._fail_connection(
                WebSocketServerProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG,
                f"A message may be at most {self.settings.max_message} bytes.",
            )
        super().onMessageFrameBegin(length)

    def onPing(self, payload: bytes) -> None:  # noqa: N802
        # Pongs bypass the bounded send queue: a peer that pings and never reads would pile
        # them up in the transport. While its buffer is full only the latest ping is answered,
        # once it drains (RFC 6455 5.5.3 allows answering only the most recent one).
        if self._paused:
            self._pending_pong = payload
            return
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        try:
            self._gone_now()
        except Exception:
            _log.failure("realtime socket: cleanup failed")

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        try:
            super().connectionLost(reason)
        finally:
            try:
                self._gone_now()
            except Exception:
                _log.failure("realtime socket: cleanup failed")

    # -- messages --------------------------------------------------------------------------

    def _refuse(self, code: str, message: str) -> None:
        """Bad input: an error on an authenticated socket, the door otherwise."""
        if self.claims is None:
            self._close(CLOSE_UNAUTHORIZED, "Authenticate first: send an auth message.")
        else:
            self._error(code, message)

    def _handle_auth(self, message: dict[str, Any]) -> None:
        token = message.get("token")
        if not isinstance(token, str) or not token:
            self._refuse("bad-message", "'token' is required and must be a string.")
            return
        self._authenticate(token)

    def _authenticate(self, token: str) -> None:
        try:
            claims = self.service.issuer.verify_access(token)
            database = identity_db(claims.sub, "data")
        except InvalidToken as exc:
            self._close(CLOSE_UNAUTHORIZED, f"The access token was refused: {exc}.")
            return
        except RevocationsUnavailable:
            self._close(CLOSE_TRY_AGAIN, "Tokens cannot be checked right now; reconnect shortly.")
            return
        except ValueError:
            self._close(CLOSE_UNAUTHORIZED, "The access token names no identity.")
            return
        if self.claims is not None and claims.sub != self.claims.sub:
            self._close(CLOSE_FORBIDDEN, "The new token is for another identity.")
            return
        self.claims = claims
        self.database = database
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None
        self._schedule_expiry()
        for collection, sub in list(self.subs.items()):
            if self._closing:
                return  # handing over the open window closed it (too slow)
            if not can_read(claims.scp, collection):
                self.subs.pop(collection, None)
                self.service.hub.unsubscribe(sub)
                self._send_json(
                    {"type": "unsubscribed", "collection": collection, "reason": "scope"}
                )
        if not self._closing:
            self._send_json({"type": "authenticated", "exp": claims.exp})

    def _handle_subscribe(self, message: dict[str, Any]) -> None:
        assert self.claims is not None and self.database is not None
        collection = message.get("collection")
        if not valid_collection(collection):
            self._error(
                "bad-collection",
                "'collection' must match ^[a-z][a-z0-9_-]{0,63}$.",
            )
            return
        assert isinstance(collection, str)
        since = message.get("since")
        if since is not None and (not isinstance(since, str) or not SEQ_RE.match(since)):
            self._error(
                "bad-since",
                "'since' must be a seq string this server sent (or be left out).",
                collection,
            )
            return
        if not can_read(self.claims.scp, collection):
            self._error(
                "forbidden",
                f"The token's scopes do not allow reading {collection!r}.",
                collection,
            )
            return
        if collection in self.subs:
            self._error("already-subscribed", "Already subscribed.", collection)
            return
        if len(self.subs) >= self.settings.max_subscriptions:
            self._error(
                "too-many-subscriptions",
                f"At most {self.settings.max_subscriptions} subscriptions per socket.",
                collection,
            )
            return
        sub = Subscription(database=self.database, collection=collection, sink=self, since=since)
        self.subs[collection] = sub
        subscribing = Deferred.fromCoroutine(self._subscribe(sub))
        subscribing.addErrback(self._subscribe_failed, sub)

    async def _subscribe(self, sub: Subscription) -> None:
        try:
            await self.service.hub.subscribe(sub)
        except CouchNotFound:
            self._drop(sub, "not-found", "This identity's database does not exist.")
        except CouchError:
            self._drop(sub, "unavailable", "CouchDB cannot be reached now: subscribe again.")

    def _subscribe_failed(self, failure: Failure, sub: Subscription) -> None:
        _log.failure("realtime subscribe: bug", failure)
        self.service.hub.unsubscribe(sub)
        self._drop(sub, "internal", "The subscription failed; subscribe again.")

    def _drop(self, sub: Subscription, code: str, message: str) -> None:
        if self.subs.get(sub.collection) is sub:
            del self.subs[sub.collection]
            self._error(code, message, sub.collection)

    def _handle_unsubscribe(self, message: dict[str, Any]) -> None:
        collection = message.get("collection")
        if not valid_collection(collection):
            self._error("bad-collection", "'collection' must match ^[a-z][a-z0-9_-]{0,63}$.")
            return
        assert isinstance(collection, str)
        sub = self.subs.pop(collection, None)
        if sub is None:
            self._error("not-subscribed", "Not subscribed.", collection)
            return
        self.service.hub.unsubscribe(sub)
        self._send_json({"type": "unsubscribed", "collection": collection, "reason": "request"})

    # -- ChangeSink ------------------------------------------------------------------------

    def subscribed(self, sub: Subscription) -> None:
        self._send_json({"type": "subscribed", "collection": sub.collection, "seq": sub.ack_seq})

    def deliver(self, payload: bytes) -> None:
        if (
            self._outbox
            and not self._paused
            and not self._queue
            and not self._closing
            and self.state == WebSocketServerProtocol.STATE_OPEN
        ):
            # A socket served one by one (see DatabaseFeed.settle), or catching up, short:
            # its batch is already waiting for the timer (batching is on: framed here).
            try:
                frame: bytes = self.factory.prepared(payload).payloadHybi
            except Exception:
                _log.failure("realtime socket of {peer}: sending failed", peer=self.peer)
                self._internal_error()
                return
            self._outbox.append(frame)
            self._outbox_bytes += len(frame)
            if self._outbox_bytes >= OUTBOX_FLUSH_BYTES:
                self.flush_outbox()
            return
        self._push(payload)

    def deliver_batch(self, batch: Batch) -> None:
        tcp = self._tcp
        if (
            tcp is not None
            and not self._outbox
            and not self._paused
            and not self._queue
            and not self._closing
            and not self.send_queue
            and self.state == WebSocketServerProtocol.STATE_OPEN
            and self._perMessageCompress is None
        ):
            # The common case, short: nothing waits before it, so it leaves now, in one
            # send on the plain TCP connection (what the kernel does not take is queued).
            try:
                data = batch.framed(self.factory.frame)
                if not _send_now(tcp, data):
                    self.sendData(data)
            except Exception:
                _log.failure("realtime socket of {peer}: sending failed", peer=self.peer)
                self._internal_error()
            return
        if self._closing or self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if self._paused or self._queue or self._perMessageCompress is not None:
            for payload in batch.payloads:  # the send queue's limits apply per message
                self._push(payload)
            return
        try:
            data = batch.framed(self.factory.frame)
        except Exception:
            _log.failure("realtime socket of {peer}: sending failed", peer=self.peer)
            self._internal_error()
            return
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        if self._outbox_bytes >= OUTBOX_FLUSH_BYTES:
            self.flush_outbox()
        else:
            self.factory.flush_soon(self)

    def drained(self) -> Deferred[None]:
        if self._gone or (not self._queue and not self._paused):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def subscription_ended(self, sub: Subscription, code: str, message: str) -> None:
        self._drop(sub, code, message)

    # -- sending ---------------------------------------------------------------------------

    def _error(self, code: str, message: str, collection: str | None = None) -> None:
        body: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if collection is not None:
            body["collection"] = collection
        self._send_json(body)

    def _send_json(self, message: dict[str, Any]) -> None:
        """Send an answer (acknowledgement, error) now, after the changes made before it."""
        self._settle_windows()
        self._push(_encode(message))
        self.flush_outbox()

    def _settle_windows(self) -> None:
        """What the feed's open batch window holds for this socket goes before what follows."""
        for sub in self.subs.values():
            entry = sub.entry
            if entry is not None and entry.pending:
                entry.settle(self)

    def _push(self, payload: bytes) -> None:
        if self._closing or self._overflowed or self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if self._paused or self._queue:
            count, size = len(self._queue), self._queued_bytes
            if count >= self.settings.queue_messages or (
                count and size + len(payload) > self.settings.queue_bytes
            ):
                if self._final_settle:
                    self._overflowed = True  # closing already: the rest is dropped
                else:
                    self._too_slow()
                return
            self._queue.append(payload)
            self._queued_bytes += len(payload)
            self.high_water_messages = max(self.high_water_messages, len(self._queue))
            self.high_water_bytes = max(self.high_water_bytes, self._queued_bytes)
            return
        self._send_message(payload)

    def _send_message(self, payload: bytes) -> None:
        """Hand one message to Autobahn. Whatever goes wrong ends this socket only: the
        caller may be delivering the same change to other sockets."""
        try:
            if self._perMessageCompress is None:
                # The same change goes to every socket that receives it: framed once.
                frame: bytes = self.factory.prepared(payload).payloadHybi
                if self._batch_ms > 0:
                    if not self._outbox:
                        self.factory.batch(self)
                    self._outbox.append(frame)
                    self._outbox_bytes += len(frame)
                    if self._outbox_bytes >= OUTBOX_FLUSH_BYTES:
                        self.flush_outbox()
                else:
                    self.write_frames(frame)
            else:
                self.sendMessage(payload, False)
        except Exception:
            _log.failure("realtime socket of {peer}: sending failed", peer=self.peer)
            self._internal_error()

    def _flush(self) -> None:
        pong, self._pending_pong = self._pending_pong, None
        if (
            pong is not None
            and not self._paused
            and self.state == WebSocketServerProtocol.STATE_OPEN
        ):
            self.sendPong(pong)
        while self._queue and not self._paused and not self._closing:
            if self.state != WebSocketServerProtocol.STATE_OPEN:
                break
            payload = self._queue.popleft()
            self._queued_bytes -= len(payload)
            self._send_message(payload)
        if not self._queue and not self._paused:
            self._fire_drained()

    def _fire_drained(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _too_slow(self) -> None:
        self.service.closed_too_slow += 1
        _log.info("realtime socket of {peer} closed: it did not read its changes", peer=self.peer)
        self._queue.clear()
        self._queued_bytes = 0
        self._close(CLOSE_TOO_SLOW, "Too slow: the send queue is full; reconnect with since.")

    # -- lifetime --------------------------------------------------------------------------

    def _schedule_expiry(self) -> None:
        if self._expiry_timer is not None and self._expiry_timer.active():
            self._expiry_timer.cancel()
        assert self.claims is not None
        deadline = self.claims.exp + self.settings.expiry_grace
        delay = max(0.0, deadline - self.service.issuer.clock())
        self._expiry_timer = self.service.reactor.callLater(delay, self._expired)

    def _expired(self) -> None:
        self._expiry_timer = None
        if self.claims is None or self._closing:
            return
        if self.service.issuer.clock() >= self.claims.exp + self.settings.expiry_grace:
            self._close(CLOSE_TOKEN_EXPIRED, "The access token expired; reconnect with a new one.")
        else:
            self._schedule_expiry()

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        if self.claims is None:
            self._close(CLOSE_UNAUTHORIZED, "No access token was sent in time.")

    def revoked(self) -> None:
        self._close(CLOSE_REVOKED, "Access was revoked (logged out, or the app's grant ended).")

    def going_away(self) -> None:
        self._close(CLOSE_GOING_AWAY, "The server is shutting down; reconnect with since.")

    def _internal_error(self) -> None:
        self._close(CLOSE_INTERNAL, "Internal error.")

    def write_frames(self, data: bytes) -> None:
        """Put framed messages on the wire (straight to the socket when nothing is queued)."""
        tcp = self._tcp
        if tcp is None or self.send_queue or not _send_now(tcp, data):
            self.sendData(data)

    def flush_outbox(self) -> None:
        """Send the batched messages in one go."""
        if not self._outbox:
            return
        data = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
        self._outbox.clear()
        self._outbox_bytes = 0
        if self._closing or self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        try:
            self.write_frames(data)
        except Exception:
            _log.failure("realtime socket of {peer}: sending failed", peer=self.peer)
            self._internal_error()

    def _close(self, code: int, reason: str) -> None:
        """Close with ``code``; from now on nothing more is sent nor handled."""
        if self._closing or self._final_settle:
            return
        self._final_settle = True
        self._settle_windows()
        self.flush_outbox()  # what was sent before the close goes before it
        self.close_code = code
        self._release()
        self._closing = True
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            # sendCloseFrame, not sendClose: the latter refuses the 1xxx codes we use.
            self.sendCloseFrame(code=code, reasonUtf8=_short(reason).encode("utf-8"))
        elif self.state != WebSocketServerProtocol.STATE_CLOSED:
            self.dropConnection(abort=True)

    def _release(self) -> None:
        """Give back everything the socket holds: subscriptions, timers, its queue."""
        for timer in (self._auth_timer, self._expiry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._auth_timer = self._expiry_timer = None
        subs, self.subs = self.subs, {}
        for sub in subs.values():
            self.service.hub.unsubscribe(sub)
        self._queue.clear()
        self._queued_bytes = 0
        self._fire_drained()

    def _gone_now(self) -> None:
        if self._gone:
            return
        self._gone = True
        self._closing = True
        self._release()
        self.service.sockets.discard(self)
        waiters, self._gone_waiters = self._gone_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_gone(self) -> Deferred[None]:
        """Fires once the connection is closed."""
        if self._gone:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._gone_waiters.append(waiter)
        return waiter


class RealtimeFactory(WebSocketServerFactory):
    """Builds :class:`RealtimeProtocol` sockets; holds the service and the ping options."""

    protocol = RealtimeProtocol  # type: ignore[assignment]

    def __init__(self, service: RealtimeService) -> None:
        super().__init__(server="vibed", reactor=service.reactor)
        self.service = service
        self._prepared: OrderedDict[int, tuple[bytes, Any]] = OrderedDict()
        self._batched: list[RealtimeProtocol] = []
        self._batch_call: Any = None
        self._soon: list[RealtimeProtocol] = []
        self._soon_call: Any = None
        settings = service.settings
        self.setProtocolOptions(
            webStatus=False,  # no HTML status page (it names Autobahn's version)
            # Autobahn applies maxMessagePayloadSize to what it sends too, and a change
            # carries a document of up to 1 MiB: incoming messages are bounded in
            # onMessageFrameBegin instead, outgoing ones by the send queue's limits.
            maxMessagePayloadSize=0,
            maxFramePayloadSize=settings.max_message,
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_timeout,
            openHandshakeTimeout=settings.auth_timeout,
            closeHandshakeTimeout=settings.close_timeout,
            failByDrop=False,  # protocol errors close with their code (1007, 1009...)
        )

    def batch(self, socket: RealtimeProtocol) -> None:
        """``socket`` has messages in its outbox: send them at the end of the window (one
        timer for every socket)."""
        self._batched.append(socket)
        if self._batch_call is None:
            delay = self.service.settings.batch_ms / 1000
            self._batch_call = self.service.reactor.callLater(delay, self._send_batches)

    def flush_soon(self, socket: RealtimeProtocol) -> None:
        """``socket`` got a feed's batch: send it in the next reactor turns, with the other
        sockets' (FLUSH_CHUNK per turn)."""
        self._soon.append(socket)
        if self._soon_call is None:
            self._soon_call = self.service.reactor.callLater(0, self._send_soon)

    def _send_soon(self) -> None:
        self._soon_call = None
        sockets, self._soon = self._soon, []
        self._send_batches(sockets)

    def frame(self, payload: bytes) -> bytes:
        """``payload`` as one unmasked text frame."""
        return cast(bytes, self.prepared(payload).payloadHybi)

    def _send_batches(self, batched: list[RealtimeProtocol] | None = None) -> None:
        """Flush the waiting sockets, at most FLUSH_CHUNK of them per reactor turn: the
        requests that arrive meanwhile (a write and its acknowledgement) wait for one chunk,
        not for every socket of the window."""
        if batched is None:
            self._batch_call = None
            batched, self._batched = self._batched, []
        for socket in batched[:FLUSH_CHUNK]:
            socket.flush_outbox()
        if len(batched) > FLUSH_CHUNK:
            self.service.reactor.callLater(0, self._send_batches, batched[FLUSH_CHUNK:])

    def prepared(self, payload: bytes) -> Any:
        """``payload`` as a framed message, made once however many sockets send it (a
        change's payload is one bytes object shared by every delivery)."""
        key = id(payload)
        hit = self._prepared.get(key)
        if hit is not None and hit[0] is payload:
            return hit[1]
        message = self.prepareMessage(payload, False, True)
        self._prepared[key] = (payload, message)
        if len(self._prepared) > PREPARED_CACHE:
            self._prepared.popitem(last=False)
        return message


class RealtimeResource(WebSocketResource):
    """``GET /realtime``: hands the connection over to a :class:`RealtimeProtocol`."""

    def render(self, request: Any) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            # Autobahn would answer with an HTML page naming itself and its version.
            request.setHeader(b"Upgrade", b"websocket")
            return write_problem(
                request,
                Problem(
                    "This is a WebSocket endpoint: connect with a WebSocket client "
                    "(see docs/realtime.md).",
                    status=426,
                    slug="upgrade-required",
                    title="Upgrade required",
                ),
            )
        channel = request.channel
        transport = getattr(channel, "transport", None)
        if transport is not None:
            # The socket now owns the connection: the HTTP channel must neither time it out
            # (its timer would also keep it in memory) nor be asked to pause and resume it.
            channel.setTimeout(None)
            stop_timing = getattr(channel, "stop_timing", None)  # vibed.web.VibeChannel's
            if stop_timing is not None:
                stop_timing()
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()
        return super().render(request)


class RealtimeService(Service):
    """Owns the WebSocket factory, the sockets and the feed hub; stopping closes them all."""

    def __init__(
        self, config: Config, couch: CouchServer, issuer: TokenIssuer, reactor: Any
    ) -> None:
        self.config = config
        self.couch = couch
        self.issuer = issuer
        self.reactor = reactor
        self.settings = RealtimeSettings.from_config(config)
        self.hub = FeedHub(couch, reactor, self.settings)
        self.sockets: set[RealtimeProtocol] = set()
        self.accepting = False
        self.closed_too_slow = 0
        self.factory = RealtimeFactory(self)
        self._resource = RealtimeResource(self.factory)

    def resource(self) -> IResource:
        return cast(IResource, self._resource)

    def revoked(self, kind: str, value: str) -> None:
        """A session, grant or identity was revoked: close its sockets (4004) now, not at
        the token's ``exp``."""
        for socket in list(self.sockets):
            claims = socket.claims
            if claims is None:
                continue
            if (
                (kind == "sid" and claims.sid == value)
                or (kind == "gid" and claims.gid == value)
                or (kind == "sub" and claims.sub == value)
            ):
                socket.revoked()

    def flush_batches(self) -> None:
        """Send now what waits for a batch window: the feeds' open windows, then every
        socket's outbox (for tests that must not depend on the window's timing)."""
        self.hub.flush_windows()
        for socket in list(self.sockets):
            socket.flush_outbox()

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self.factory.doStart()
        self.accepting = True

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        self.accepting = False
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        sockets = list(self.sockets)
        gone = DeferredList([s.when_gone() for s in sockets], consumeErrors=True)
        for socket in sockets:
            socket.going_away()
        # Autobahn drops a socket whose close handshake does not end in close_timeout.
        timer = self.reactor.callLater(self.settings.close_timeout + 1.0, gone.cancel)
        try:
            await gone
        except CancelledError:
            pass
        finally:
            if timer.active():
                timer.cancel()
        for socket in list(self.sockets):
            transport: Any = socket.transport
            if transport is not None:
                transport.abortConnection()
        await self.hub.stop()
        self.factory.doStop()


def make_realtime(
    config: Config, couch: CouchServer, issuer: TokenIssuer, reactor: Any
) -> RealtimeService:
    return RealtimeService(config, couch, issuer, reactor)
