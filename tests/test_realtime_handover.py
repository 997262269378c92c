"""The hand-over from catch-up reads to the shared live feed, checked exhaustively.

A fake database stands in for CouchDB: the test decides when the continuous feed streams its
next row and when a normal ``_changes`` read is answered (seeing the database as it is at that
moment, latest revision per document, like CouchDB), with a ``Clock`` for timers. Hypothesis
then interleaves writes, stream steps, read answers and time, and checks what a resuming
subscriber receives: every change after its ``since``, nothing twice, nothing older after
newer. In "cluster" mode the reads and the stream spell seqs differently, so they never
match (as two feeds of a CouchDB cluster may not) and the subscription must stay exact on
reads alone.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from vibed.couch.errors import CouchBadRequest, CouchUnavailable
from vibed.layout import TAG
from vibed.realtime import (
    CATCHING_UP,
    CHECK_WINDOWS,
    ENDED,
    LIVE,
    Batch,
    FeedHub,
    RealtimeSettings,
    Subscription,
)


@define
class Row:
    n: int
    storage_id: str
    rev: str
    deleted: bool = False


@define
class FakeFeed:
    db: FakeDB
    on_change: Any
    pos: int = 0
    running: bool = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> Deferred[None]:
        self.running = False
        return succeed(None)

    def step(self) -> bool:
        """Stream the next row (skipping rows a later write of the same doc superseded)."""
        for row in self.db.rows[self.pos :]:
            self.pos = row.n
            if self.db.latest[row.storage_id] == row.n:
                self.on_change(self.db.row_json(row, "s"))
                return True
        return False


@define
class FakeDB:
    name: str
    cluster: bool = False
    rows: list[Row] = field(factory=list)
    latest: dict[str, int] = field(factory=dict)
    reads: list[tuple[Deferred[dict[str, Any]], str, int]] = field(factory=list)
    feeds: list[FakeFeed] = field(factory=list)
    fail_next_read: Exception | None = None
    cancelled: int = 0

    def seq(self, n: int, kind: str) -> str:
        return f"{n}-{kind}x" if self.cluster else str(n)

    @staticmethod
    def number(seq: str) -> int:
        return int(seq.split("-")[0])

    def write(self, collection: str, doc_id: str, deleted: bool = False) -> Row:
        storage_id = f"{collection}:{doc_id}"
        generation = sum(1 for r in self.rows if r.storage_id == storage_id) + 1
        row = Row(len(self.rows) + 1, storage_id, f"{generation}-{len(self.rows) + 1}", deleted)
        self.rows.append(row)
        self.latest[storage_id] = row.n
        return row

    def row_json(self, row: Row, kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq(row.n, kind),
            "id": row.storage_id,
            "changes": [{"rev": row.rev}],
        }
        doc: dict[str, Any] = {"_id": row.storage_id, "_rev": row.rev}
        if row.deleted:
            out["deleted"] = True
            doc["_deleted"] = True
        else:
            doc[TAG] = row.storage_id.split(":")[0]
        out["doc"] = doc
        return out

    # -- the CouchDatabase surface the hub uses --

    async def info(self) -> dict[str, Any]:
        return {"update_seq": self.seq(len(self.rows), "s")}

    def changes(self, *, since: str, include_docs: bool, limit: int) -> Deferred[dict[str, Any]]:
        def cancel(_: Deferred[dict[str, Any]]) -> None:
            self.cancelled += 1

        d: Deferred[dict[str, Any]] = Deferred(cancel)
        self.reads.append((d, since, limit))
        return d

    def answer_read(self) -> bool:
        self.reads = [r for r in self.reads if not r[0].called]
        if not self.reads:
            return False
        d, since, limit = self.reads.pop(0)
        if self.fail_next_read is not None:
            exc, self.fail_next_read = self.fail_next_read, None
            d.errback(exc)
            return True
        after = self.number(since)
        visible = [r for r in self.rows if r.n > after and self.latest[r.storage_id] == r.n]
        page = visible[:limit]
        if page:
            last = self.seq(page[-1].n, "r")
        else:
            # PouchDB answers with ``since``; CouchDB with the end of the database.
            last = self.seq(len(self.rows), "r") if self.cluster else since
        d.callback({"results": [self.row_json(r, "r") for r in page], "last_seq": last})
        return True

    def changes_feed(self, on_change: Any, *, since: str, **_: Any) -> FakeFeed:
        feed = FakeFeed(self, on_change, self.number(since))
        self.feeds.append(feed)
        return feed


@define
class FakeCouch:
    db: FakeDB

    def database(self, name: str) -> FakeDB:
        assert name == self.db.name
        return self.db


@define(eq=False)
class Sink:
    received: list[dict[str, Any]] = field(factory=list)
    acks: list[str | None] = field(factory=list)
    ended: list[str] = field(factory=list)

    def subscribed(self, sub: Subscription) -> None:
        self.acks.append(sub.ack_seq)

    def deliver(self, payload: bytes) -> None:
        self.received.append(json.loads(payload))

    def deliver_batch(self, batch: Batch) -> None:
        self.received.extend(json.loads(p) for p in batch.payloads)

    def drained(self) -> Deferred[None]:
        return succeed(None)

    def subscription_ended(self, sub: Subscription, code: str, message: str) -> None:
        self.ended.append(code)


def run(hub: FeedHub, sub: Subscription) -> None:
    Deferred.fromCoroutine(hub.subscribe(sub))


def settle(db: FakeDB, clock: Clock, rng: Any = None) -> None:
    """Let everything run out, in a random order when ``rng`` is given: stream rows, answer
    reads, let timers fire."""
    for _ in range(100_000):
        actions = []
        if any(f.running and f.pos < len(db.rows) for f in db.feeds):
            actions.append("step")
        if any(not r[0].called for r in db.reads):
            actions.append("read")
        if clock.getDelayedCalls():
            actions.append("tick")
        if not actions:
            return
        action = rng.choice(actions) if rng is not None else actions[0]
        if action == "step":
            for feed in db.feeds:
                if feed.running:
                    feed.step()
        elif action == "read":
            db.answer_read()
        else:
            clock.advance(0.3)
    raise AssertionError("did not settle")


def check(received: list[dict[str, Any]], db: FakeDB, since: int, collection: str) -> None:
    """What a subscriber from ``since`` must have: each (id, rev) once, revisions of a document
    in order, and the final revision of every document of the collection changed after
    ``since``; nothing from before ``since`` or from another collection."""
    pairs = [(m["id"], m["rev"]) for m in received]
    assert len(pairs) == len(set(pairs)), "an event was delivered twice"
    assert {m["collection"] for m in received} <= {collection}
    by_rev = {r.rev: r for r in db.rows}
    last_n: dict[str, int] = {}
    for m in received:
        row = by_rev[m["rev"]]
        assert row.n > since, "an event from before since"
        assert last_n.get(m["id"], 0) < row.n, "an older revision after a newer one"
        last_n[m["id"]] = row.n
        assert m["deleted"] == row.deleted and (m["doc"] is None) == row.deleted
    expected = {
        sid.split(":", 1)[1]: n
        for sid, n in db.latest.items()
        if sid.startswith(collection + ":") and n > since
    }
    assert last_n == expected, "a change was lost"


OPS = st.lists(
    st.sampled_from(["new", "new", "update", "delete", "other", "step", "step", "read", "tick"]),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=OPS,
    before=st.integers(0, 12),
    since_at=st.integers(0, 12),
    since_kind=st.sampled_from(["s", "r"]),
    cluster=st.booleans(),
    page=st.integers(1, 6),
    cap=st.integers(2, 50),
    seed=st.randoms(use_true_random=False),
)
def test_resuming_subscriber_gets_every_change_once(
    ops: list[str],
    before: int,
    since_at: int,
    since_kind: str,
    cluster: bool,
    page: int,
    cap: int,
    seed: Any,
) -> None:
    """Whatever the interleaving of writes, live-feed steps, read answers and timers, a
    subscriber resuming from any earlier seq (as the stream or a read spelled it) receives
    each change after it once, in per-document order, up to every document's final revision;
    a live subscriber receives everything after its ``subscribed`` seq; the hub ends with no
    subscription catching up when seqs can match, and stays exact on reads when they cannot."""
    clock = Clock()
    db = FakeDB("db_x", cluster=cluster)
    hub = FeedHub(
        FakeCouch(db),  # type: ignore[arg-type]
        clock,
        RealtimeSettings(page_size=page, queue_messages=cap, anchor_grace=0.25),
    )
    docs: list[str] = []

    def new(collection: str = "notes") -> None:
        doc_id = f"d{len(db.rows)}"
        db.write(collection, doc_id)
        if collection == "notes":
            docs.append(doc_id)

    for _ in range(before):
        new(seed.choice(["notes", "notes", "todos"]))
    since_n = min(since_at, len(db.rows))

    keeper_sink = Sink()
    keeper = Subscription("db_x", "notes", keeper_sink)
    run(hub, keeper)
    assert keeper.state == LIVE
    pinned = len(db.rows)

    sink = Sink()
    sub = Subscription("db_x", "notes", sink, since=db.seq(since_n, since_kind))
    run(hub, sub)
    assert sink.acks == [sub.since]

    for op in ops:
        if op == "new":
            new()
        elif op == "other":
            new("todos")
        elif op in ("update", "delete") and docs:
            doc_id = seed.choice(docs)
            if db.rows[db.latest[f"notes:{doc_id}"] - 1].deleted:
                continue
            db.write("notes", doc_id, deleted=op == "delete")
        elif op == "step":
            db.feeds[0].step()
        elif op == "read":
            db.answer_read()
        elif op == "tick":
            clock.advance(0.3)
    settle(db, clock, seed)

    check(sink.received, db, since_n, "notes")
    check(keeper_sink.received, db, pinned, "notes")
    assert not sink.ended
    if not cluster:
        assert sub.state == LIVE and not sub.buffer
    else:
        assert sub.state in (LIVE, CATCHING_UP)
    assert len(db.feeds) == 1  # one continuous feed, whatever the subscriptions


def test_catch_up_read_errors_retry_or_end_the_subscription() -> None:
    """A catch-up read that finds CouchDB unavailable is retried after a backoff (nothing
    lost); one CouchDB refuses as a bad request ends the subscription with ``bad-since``."""
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings(page_size=10))  # type: ignore[arg-type]
    for i in range(5):
        db.write("notes", f"n{i}")
    keeper = Subscription("db_x", "notes", Sink())
    run(hub, keeper)
    sink = Sink()
    sub = Subscription("db_x", "notes", sink, since="2")
    run(hub, sub)
    db.fail_next_read = CouchUnavailable(0, "connection_refused", "down")
    assert db.answer_read()
    assert sub.state == CATCHING_UP and not db.reads
    clock.advance(0.5)
    settle(db, clock)
    assert [m["id"] for m in sink.received] == ["n2", "n3", "n4"]

    bad_sink = Sink()
    bad = Subscription("db_x", "notes", bad_sink, since="1")
    run(hub, bad)
    db.fail_next_read = CouchBadRequest(400, "bad_request", "Malformed sequence")
    db.answer_read()
    assert bad.state == ENDED and bad_sink.ended == ["bad-since"]
    assert hub.feeds["db_x"].refs == 2


def test_last_subscription_leaving_stops_the_feed_and_a_new_one_reopens() -> None:
    """Refcounts: the feed is opened by the first subscription, kept by the others, stopped
    when the last leaves (also one still catching up), and a later one opens a fresh feed."""
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings())  # type: ignore[arg-type]
    db.write("notes", "a")
    first = Subscription("db_x", "notes", Sink())
    second = Subscription("db_x", "todos", Sink(), since="0")
    run(hub, first)
    run(hub, second)
    assert hub.feeds["db_x"].refs == 2 and len(db.feeds) == 1
    hub.unsubscribe(first)
    assert db.feeds[0].running
    hub.unsubscribe(second)
    assert "db_x" not in hub.feeds and not db.feeds[0].running
    assert second.state == ENDED and db.cancelled == 1  # its read was cancelled
    third = Subscription("db_x", "notes", Sink())
    run(hub, third)
    assert len(db.feeds) == 2 and db.feeds[1].running and hub.feeds_opened == 2


def test_a_hand_over_while_a_batch_window_is_open_delivers_its_changes_once() -> None:
    """A subscription handed over to the stream while the feed's batch window holds changes
    it also got from its buffer (its reads delivered none of its collection, so nothing marks
    them as seen) receives each once: the window's changes before the hand-over are not its
    batch's, the ones after it are."""
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings(page_size=1))  # type: ignore[arg-type]
    db.write("notes", "a")
    db.write("todos", "t")
    keeper_sink = Sink()
    keeper = Subscription("db_x", "notes", keeper_sink)
    run(hub, keeper)
    sink = Sink()
    sub = Subscription("db_x", "notes", sink, since="1")  # after "a": only "t" to read
    run(hub, sub)
    assert sub.state == CATCHING_UP
    db.write("notes", "b")
    assert db.feeds[0].step()  # "b" joins the open window and sub's buffer
    assert hub.feeds["db_x"].pending == 1
    assert db.answer_read()  # one row ("t", another collection): the read meets the stream
    assert sub.state == LIVE and hub.feeds["db_x"].pending == 1
    db.write("notes", "c")
    assert db.feeds[0].step()
    clock.advance(1)  # the window closes
    assert hub.feeds["db_x"].pending == 0
    assert [m["id"] for m in sink.received] == ["b", "c"]
    assert [m["id"] for m in keeper_sink.received] == ["b", "c"]


def test_a_subscription_made_while_a_batch_window_is_open_gets_none_of_it() -> None:
    """A sink that subscribes to one more collection while the feed's open window holds a
    change of it (for another sink) does not get that change, which is from before its
    ``subscribed`` seq; it still gets the window's changes of the collection it had, and
    the later ones of both."""
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings())  # type: ignore[arg-type]
    sink, other = Sink(), Sink()
    run(hub, Subscription("db_x", "notes", sink))
    run(hub, Subscription("db_x", "todos", other))
    db.write("notes", "n1")
    db.write("todos", "t1")
    assert db.feeds[0].step() and db.feeds[0].step()
    assert hub.feeds["db_x"].pending == 2
    late = Subscription("db_x", "todos", sink)
    run(hub, late)
    assert late.state == LIVE and late.ack_seq == "2"
    db.write("todos", "t2")
    assert db.feeds[0].step()
    clock.advance(1)
    assert hub.feeds["db_x"].pending == 0
    assert [m["id"] for m in sink.received] == ["n1", "t2"]
    assert [m["id"] for m in other.received] == ["t1", "t2"]


def test_catch_up_rows_go_after_the_windows_changes_made_before_them() -> None:
    """A sink with a live subscription and another catching up: when a read's rows arrive
    while the open window holds a change of the live one, that change reaches the sink first
    (every message in the order it was made), and nothing twice."""
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings())  # type: ignore[arg-type]
    db.write("todos", "t1")
    db.write("todos", "t2")
    sink = Sink()
    run(hub, Subscription("db_x", "notes", sink))
    resumed = Subscription("db_x", "todos", sink, since="0")
    run(hub, resumed)
    assert resumed.state == CATCHING_UP
    db.write("notes", "n1")
    assert db.feeds[0].step()
    assert hub.feeds["db_x"].pending == 1
    assert db.answer_read()
    settle(db, clock)
    assert [m["id"] for m in sink.received] == ["n1", "t1", "t2"]
    assert resumed.state == LIVE


@define(eq=False)
class ClosingSink(Sink):
    """A sink that, like a socket whose send queue overflows, goes away (ending all its
    subscriptions) as soon as it is handed a change of ``close_on``."""

    hub: FeedHub | None = None
    close_on: str = "notes"
    subs: list[Subscription] = field(factory=list)

    def deliver(self, payload: bytes) -> None:
        super().deliver(payload)
        assert self.hub is not None
        if json.loads(payload)["collection"] == self.close_on:
            for sub in self.subs:
                self.hub.unsubscribe(sub)


def _no_trace_of(hub: FeedHub, sink: Sink) -> None:
    entry = hub.feeds["db_x"]
    assert not [s for subs in entry.live.values() for s in subs if s.sink is sink]
    assert not [s for s in entry.catching_up if s.sink is sink]
    assert sink not in entry._sink_subs and sink not in entry._views
    assert not any(sink in group for group in entry._groups.values())


def test_a_subscription_whose_socket_goes_away_while_settling_is_not_revived() -> None:
    """A sink that goes away while the open window is handed to it (the delivery closes it,
    ending its subscriptions) as it subscribes to another collection: the new subscription
    stays ended, gets no ``subscribed``, holds no reference to the feed, and the sink is in
    none of the feed's live sets or groups."""
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings())  # type: ignore[arg-type]
    keeper = Sink()
    run(hub, Subscription("db_x", "notes", keeper))
    sink = ClosingSink(hub=hub)
    first = Subscription("db_x", "notes", sink)
    sink.subs.append(first)
    run(hub, first)
    db.write("notes", "n1")
    assert db.feeds[0].step() and hub.feeds["db_x"].pending == 1
    late = Subscription("db_x", "todos", sink)
    sink.subs.append(late)
    run(hub, late)
    assert [m["id"] for m in sink.received] == ["n1"]
    assert first.state == ENDED and late.state == ENDED and late.entry is None
    assert len(sink.acks) == 1  # only the first subscription's
    assert hub.feeds["db_x"].refs == 1  # the keeper's
    _no_trace_of(hub, sink)
    clock.advance(1)
    assert [m["id"] for m in keeper.received] == ["n1"]
    assert [m["id"] for m in sink.received] == ["n1"]


def test_a_handed_over_subscription_whose_socket_goes_away_while_settling_is_not_revived() -> None:
    """A resumed subscription handed over to the stream (the row its reads ended at arrives)
    while the open window holds a change of its sink's live subscription, where handing
    that change over closes the sink: the resumed subscription stays ended (not live, not
    counted as a hand-over), and the feed keeps no trace of the sink."""
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings())  # type: ignore[arg-type]
    db.write("todos", "t1")
    keeper = Sink()
    run(hub, Subscription("db_x", "notes", keeper))
    sink = ClosingSink(hub=hub)
    live = Subscription("db_x", "notes", sink)
    sink.subs.append(live)
    run(hub, live)
    db.write("notes", "n1")  # not streamed yet
    resumed = Subscription("db_x", "todos", sink, since="0")
    sink.subs.append(resumed)
    run(hub, resumed)
    assert resumed.state == CATCHING_UP
    assert db.answer_read()  # t1 and n1: the reads end at n1's seq, which the stream has not
    assert [m["id"] for m in sink.received] == ["t1"] and resumed.state == CATCHING_UP
    handovers = hub.handovers
    assert db.feeds[0].step()  # n1: into the window, and it is where the reads ended
    assert [m["id"] for m in sink.received] == ["t1", "n1"]
    assert live.state == ENDED and resumed.state == ENDED and resumed.entry is None
    assert hub.handovers == handovers
    assert hub.feeds["db_x"].refs == 1
    _no_trace_of(hub, sink)
    clock.advance(1)
    assert [m["id"] for m in keeper.received] == ["n1"]
    assert [m["id"] for m in sink.received] == ["t1", "n1"]


def test_a_handed_over_subscriptions_check_ends_on_a_quiet_collection() -> None:
    """A resumed subscription whose first live rows are checked against what its reads
    delivered (its sink served one by one) stops being checked after ``CHECK_WINDOWS``
    batch windows of its feed even when its own collection stays quiet: its sink then gets
    its changes in the shared batch again, and each change once."""
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings())  # type: ignore[arg-type]
    db.write("quiet", "q1")
    keeper = Sink()
    run(hub, Subscription("db_x", "hot", keeper))
    sink = Sink()
    run(hub, Subscription("db_x", "hot", sink))
    resumed = Subscription("db_x", "quiet", sink, since="0")
    run(hub, resumed)
    settle(db, clock)
    assert resumed.state == LIVE and resumed.seen
    entry = hub.feeds["db_x"]
    assert sink in entry._checked
    for i in range(CHECK_WINDOWS + 1):
        db.write("hot", f"h{i}")
        assert db.feeds[0].step()
        clock.advance(1)
    assert not resumed.seen and sink not in entry._checked and sink not in entry._solo
    db.write("hot", "last")
    db.write("quiet", "q2")
    assert db.feeds[0].step() and db.feeds[0].step()
    clock.advance(1)
    hot = [f"h{i}" for i in range(CHECK_WINDOWS + 1)] + ["last"]
    assert [m["id"] for m in keeper.received] == hot
    assert [m["id"] for m in sink.received] == ["q1", *hot, "q2"]


def test_feed_groups_are_indexed_by_collection() -> None:
    """Sinks joining and leaving sets of collections keep the feed's index of groups by
    collection exact (a window visits only the groups of its collections), and every sink
    gets exactly the window's changes of its collections, in order."""
    import random

    rng = random.Random(7)
    clock = Clock()
    db = FakeDB("db_x")
    hub = FeedHub(FakeCouch(db), clock, RealtimeSettings())  # type: ignore[arg-type]
    names = ["a", "b", "c", "d"]
    sinks = [Sink() for _ in range(12)]
    subs: dict[tuple[int, str], Subscription] = {}
    for _ in range(200):
        k, name = rng.randrange(len(sinks)), rng.choice(names)
        sub = subs.pop((k, name), None)
        if sub is None:
            sub = subs[(k, name)] = Subscription("db_x", name, sinks[k])
            run(hub, sub)
        else:
            hub.unsubscribe(sub)
        entry = hub.feeds.get("db_x")
        if entry is not None:
            expected: dict[str, set[frozenset[str]]] = {}
            for view in entry._groups:
                for collection in view:
                    expected.setdefault(collection, set()).add(view)
            assert {c: set(v) for c, v in entry._views_of.items()} == expected
    for sink in sinks:
        sink.received.clear()
    for i in range(20):
        db.write(rng.choice(names), f"x{i}")
    settle(db, clock)
    for k, sink in enumerate(sinks):
        mine = {name for (j, name) in subs if j == k}
        expected_ids = [
            r.storage_id.split(":")[1] for r in db.rows[-20:] if r.storage_id.split(":")[0] in mine
        ]
        assert [m["id"] for m in sink.received] == expected_ids
