"""``WS /realtime`` feeds: one shared CouchDB feed per identity, resuming with ``since``, a
CouchDB outage, slow and dead clients, shutdown. Real vibed, real sockets, on PouchDB Server and
Apache CouchDB."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest_twisted
from conftest import CouchProcess
from harness import (
    VibedFactory,
    connect_realtime,
    fetch,
    put_doc,
    realtime_identity,
    realtime_service,
    server_socket,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from vibed.layout import to_storage
from vibed.realtime import CLOSE_TOO_SLOW


async def subscribe(client: Any, collection: str, since: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "subscribe", "collection": collection}
    if since is not None:
        message["since"] = since
    client.send(message)
    answer: dict[str, Any] = await client.next_of("subscribed")
    assert answer["collection"] == collection
    return answer


async def poll(ready: Callable[[], bool], within: float = 10.0, step: float = 0.02) -> None:
    """Wait until ``ready()`` (state another component changes), or fail after ``within``."""
    waited = 0.0
    while not ready():
        if waited >= within:
            raise AssertionError(f"condition not met within {within} s")
        await deferLater(reactor, step, lambda: None)
        waited += step


async def close(*clients: Any) -> None:
    for client in clients:
        if not client.closed.called:
            client.sendClose()
        await client.wait_closed()


# -- one feed per identity -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sockets_of_one_identity_share_one_feed(make_vibed: VibedFactory) -> None:
    """Two sockets of one identity (different collections) share ONE CouchDB feed; another
    identity gets its own; the feed stays while one subscription remains and is stopped when
    the last one leaves; both sockets still receive their own collection's changes."""
    vibed = await make_vibed()
    hub = realtime_service(vibed).hub
    me = await realtime_identity(vibed)
    other = await realtime_identity(vibed)
    first = await connect_realtime(vibed, me.token)
    second = await connect_realtime(vibed, me.token)
    third = await connect_realtime(vibed, other.token)
    opened_before = hub.feeds_opened
    await subscribe(first, "notes")
    await subscribe(second, "todos")
    await subscribe(second, "notes")
    await subscribe(third, "notes")
    assert set(hub.feeds) == {me.db, other.db}
    assert hub.feeds[me.db].refs == 3
    assert hub.feeds_opened - opened_before == 2
    feed = hub.feeds[me.db].feed
    assert feed is not None and feed.running

    await put_doc(vibed.couch, me.db, "todos", "t1", {})
    await put_doc(vibed.couch, me.db, "notes", "n1", {})
    assert [c["id"] for c in await first.changes(1)] == ["n1"]
    assert [c["id"] for c in await second.changes(2)] == ["t1", "n1"]

    await close(first)
    await poll(lambda: hub.feeds.get(me.db) is not None and hub.feeds[me.db].refs == 2)
    assert feed.running
    second.send({"type": "unsubscribe", "collection": "todos"})
    await second.next_of("unsubscribed")
    assert hub.feeds[me.db].refs == 1
    await close(second)
    await poll(lambda: me.db not in hub.feeds)
    await poll(lambda: not feed.running)
    assert other.db in hub.feeds
    await close(third)
    await poll(lambda: not hub.feeds)
    assert hub.feeds_opened - opened_before == 2


# -- resume --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_resume_with_since_gets_exactly_the_missed_changes(make_vibed: VibedFactory) -> None:
    """A subscriber that disconnects, misses N writes and reconnects with ``since`` = the last
    seq it saw gets exactly those N (in order, none repeated, none of other collections),
    then live ones. Reads are paged (page_size 4 here) to cover a long absence."""
    vibed = await make_vibed(realtime={"page_size": 4})
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    for i in range(3):
        await put_doc(vibed.couch, me.db, "notes", f"seen{i}", {})
    seen = await client.changes(3)
    last = seen[-1]["seq"]
    await close(client)

    missed = [f"missed{i}" for i in range(11)]
    for i, doc_id in enumerate(missed):
        await put_doc(vibed.couch, me.db, "notes", doc_id, {"i": i})
        await put_doc(vibed.couch, me.db, "todos", f"todo{i}", {})
    again = await connect_realtime(vibed, me.token)
    ack = await subscribe(again, "notes", since=last)
    assert ack["seq"] == last
    replayed = await again.changes(len(missed))
    assert [c["id"] for c in replayed] == missed
    await put_doc(vibed.couch, me.db, "notes", "live", {})
    (live,) = await again.changes(1)
    assert live["id"] == "live"
    await close(again)
    ids = [m["id"] for m in again.inbox if m["type"] == "change"]
    assert ids == [*missed, "live"]


@pytest_twisted.ensureDeferred
async def test_resume_from_the_ack_seq_with_nothing_missed(make_vibed: VibedFactory) -> None:
    """Resuming from the ``subscribed`` seq with no write in between joins the live stream at
    once (no read): the next write arrives once."""
    vibed = await make_vibed()
    hub = realtime_service(vibed).hub
    me = await realtime_identity(vibed)
    keeper = await connect_realtime(vibed, me.token)
    ack = await subscribe(keeper, "notes")
    client = await connect_realtime(vibed, me.token)
    reads_before = hub.catch_up_reads
    await subscribe(client, "notes", since=ack["seq"])
    assert hub.catch_up_reads == reads_before
    await put_doc(vibed.couch, me.db, "notes", "x", {})
    assert [c["id"] for c in await client.changes(1)] == ["x"]
    await close(client, keeper)
    assert [m["id"] for m in client.inbox if m["type"] == "change"] == ["x"]


@pytest_twisted.ensureDeferred
async def test_reconnects_during_steady_writes_lose_and_repeat_nothing(
    make_vibed: VibedFactory,
) -> None:
    """While a writer writes continuously, a subscriber drops and resumes with ``since``
    again and again (other sockets keep the shared feed busy): across all its connections it
    receives every write exactly once, in order."""
    vibed = await make_vibed(realtime={"page_size": 5})
    hub = realtime_service(vibed).hub
    me = await realtime_identity(vibed)
    keeper = await connect_realtime(vibed, me.token)
    ack = await subscribe(keeper, "notes")
    total = 120
    written: list[str] = []

    async def writer() -> None:
        for i in range(total):
            doc_id = f"w{i:04d}"
            await put_doc(vibed.couch, me.db, "notes", doc_id, {"i": i})
            written.append(doc_id)
            if i % 7 == 0:
                await put_doc(vibed.couch, me.db, "other", doc_id, {})

    writing = ensureDeferred(writer())
    received: list[str] = []
    # From before the first write: the first subscription may come after it (a slow machine).
    last: str | None = ack["seq"]
    rng = random.Random(7)
    rounds = 0
    # A bound on a hang, not a speed test: a loaded 2-core CI box is slow.
    deadline = reactor.seconds() + 120
    while not writing.called or len(received) < total:
        assert reactor.seconds() < deadline, (
            len(received),
            len(written),
            received[-3:],
            sorted(set(written) - set(received)),  # lost
            [d for d in set(received) if received.count(d) > 1],  # repeated
        )
        client = await connect_realtime(vibed, me.token)
        await subscribe(client, "notes", since=last)
        want = min(rng.randint(3, 15), total - len(received))
        try:
            for change in await client.changes(want, within=3):
                received.append(change["id"])
                last = change["seq"]
        except TimeoutError:
            pass
        await close(client)
        # whatever arrived after the last change we counted is not "seen": resume from last
        rounds += 1
        if len(received) >= total:
            break
    await writing
    await close(keeper)
    assert received == written, (len(received), len(written))
    assert rounds > 5 and hub.handovers > 0


# -- CouchDB outage ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_couchdb_restart_while_writing_delivers_every_write_once(
    make_vibed: VibedFactory, own_couch: CouchProcess
) -> None:
    """The CouchDB server is stopped and started again (same directory, same data) while an
    app keeps writing through the data API (a write answered 503 is retried with the same id
    until acknowledged; a 409 on a retry means the lost answer had committed): after recovery
    every acknowledged write has reached the subscribed socket exactly once, in order, and
    the socket never closed."""
    vibed = await make_vibed(couch_url=own_couch.url, couch_timeout="2")
    vibed.couch.timeout = 2.0
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    total = 60
    acknowledged: list[str] = []
    refused: list[int] = []

    async def write(i: int) -> None:
        doc_id = f"d{i:03d}"
        retried = False
        while True:
            resp = await fetch(
                "PUT",
                f"{vibed.url}/data/notes/{doc_id}",
                data=json.dumps({"i": i}).encode(),
                headers={"Authorization": f"Bearer {me.token}", "Content-Type": "application/json"},
            )
            if resp.code in (200, 201) or (resp.code == 409 and retried):
                break
            assert resp.code == 503, (resp.code, resp.content)
            refused.append(i)
            retried = True
            await deferLater(reactor, 0.1, lambda: None)
        acknowledged.append(doc_id)

    async def writer() -> None:
        for i in range(total):
            await write(i)
            await deferLater(reactor, 0.02, lambda: None)

    writing = ensureDeferred(writer())
    await poll(lambda: len(acknowledged) >= 10)
    await deferToThread(own_couch.stop)  # writes keep coming while it goes down
    await deferLater(reactor, 0.5, lambda: None)  # the feed notices and backs off
    await deferToThread(own_couch.start)
    await writing
    assert refused, "no write met the outage: the restart did not happen under writes"
    got = await client.changes(total, within=30)
    assert [c["id"] for c in got] == acknowledged
    assert not client.closed.called
    await put_doc(vibed.couch, me.db, "notes", "after", {})
    assert (await client.changes(1))[0]["id"] == "after"
    await close(client)


# -- slow and dead clients, shutdown -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_closed_with_4008(make_vibed: VibedFactory) -> None:
    """A client that stops reading while changes keep coming is closed with 4008 once its
    send queue passes the cap; the queue never held more than the cap (messages, bytes),
    and the other socket of the identity is unaffected."""
    caps = {"queue_messages": 20, "queue_bytes": 256 * 1024, "close_timeout": 10}
    vibed = await make_vibed(realtime=caps)
    service = realtime_service(vibed)
    me = await realtime_identity(vibed)
    slow = await connect_realtime(vibed, me.token)
    fine = await connect_realtime(vibed, me.token)
    await subscribe(slow, "notes")
    await subscribe(fine, "notes")
    server_slow = server_socket(vibed, slow)
    slow.transport.pauseProducing()  # stop reading: the kernel buffers fill, then vibed's
    blob = "x" * 60_000
    db = vibed.couch.database(me.db)
    sent = 0
    while not server_slow.close_code and sent < 2000:
        batch = [to_storage("notes", f"big{sent + i}", {"blob": blob}) for i in range(20)]
        await db.bulk_docs(batch)
        sent += len(batch)
        await deferLater(reactor, 0.05, lambda: None)  # let the feed deliver
    assert server_slow.close_code == CLOSE_TOO_SLOW or any(
        s.close_code == CLOSE_TOO_SLOW for s in service.sockets
    )
    assert service.closed_too_slow >= 1
    for sock in list(service.sockets) + [server_slow]:
        assert sock.high_water_messages <= caps["queue_messages"]
        assert sock.high_water_bytes <= caps["queue_bytes"]
    slow.transport.resumeProducing()
    assert await slow.wait_closed(within=20) == CLOSE_TOO_SLOW
    got = await fine.changes(sent, within=30)
    assert len(got) == sent
    await close(fine)


@pytest_twisted.ensureDeferred
async def test_a_dead_peer_is_dropped_by_pings(make_vibed: VibedFactory) -> None:
    """A peer that stops answering pings (here: stops reading) is dropped after the ping
    timeout, releasing its subscriptions and the feed."""
    vibed = await make_vibed(realtime={"ping_interval": 0.5, "ping_timeout": 1.0})
    service = realtime_service(vibed)
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    assert me.db in service.hub.feeds
    client.transport.pauseProducing()
    await poll(lambda: not service.sockets, within=5)
    await poll(lambda: me.db not in service.hub.feeds)
    client.transport.resumeProducing()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_closes_sockets_with_1001_and_feeds(
    make_vibed: VibedFactory,
) -> None:
    """Stopping vibed closes every socket with 1001 (going away) and stops every feed."""
    vibed = await make_vibed()
    service = realtime_service(vibed)
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    feed = service.hub.feeds[me.db].feed
    stopping: Deferred[None] = service.stopService()
    assert await client.wait_closed() == 1001
    await stopping
    assert not service.sockets and not service.hub.feeds and not feed.running


@pytest_twisted.ensureDeferred
async def test_batched_sends_keep_order_and_leave_before_a_close(make_vibed: VibedFactory) -> None:
    """With a batch window, changes written in a burst reach every socket once and in order
    (several per send), a lone change still arrives within the window, and messages batched
    when the server closes the socket leave before the close frame."""
    vibed = await make_vibed(realtime={"batch_ms": 200})  # wide: the test sees a batch wait
    service = realtime_service(vibed)
    me = await realtime_identity(vibed)
    clients = [await connect_realtime(vibed, me.token) for _ in range(3)]
    for client in clients:
        await subscribe(client, "notes")
    db = vibed.couch.database(me.db)
    await db.bulk_docs([to_storage("notes", f"b{i:02d}", {"i": i}) for i in range(20)])
    # The feed's order is CouchDB's (a bulk write need not land in the order of its array).
    feed = await db.changes()
    order = [r["id"].split(":", 1)[1] for r in feed["results"] if r["id"].startswith("notes:")]
    assert sorted(order) == [f"b{i:02d}" for i in range(20)]
    for client in clients:
        got = await client.changes(20)
        assert [c["id"] for c in got] == order
    await put_doc(vibed.couch, me.db, "notes", "lone", {})
    for client in clients:
        assert (await client.changes(1))[0]["id"] == "lone"
    await put_doc(vibed.couch, me.db, "notes", "last", {})
    sock = server_socket(vibed, clients[1])
    await poll(lambda: service.hub.feeds[me.db].pending > 0)  # batched, not sent yet
    sock.going_away()
    assert (await clients[1].changes(1))[0]["id"] == "last"
    assert await clients[1].wait_closed() == 1001
    assert service.closed_too_slow == 0
    await close(clients[0], clients[2])


# -- batch windows: order on every socket ---------------------------------------------------


async def in_window(service: Any, db: str, count: int) -> None:
    """Wait until the feed of ``db`` holds ``count`` changes in its open batch window."""
    await poll(lambda: db in service.hub.feeds and service.hub.feeds[db].pending == count)


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    """Each message as ``change:<id>``, else its type and its code or collection."""
    out = []
    for m in messages:
        if m["type"] == "change":
            out.append(f"change:{m['id']}")
        else:
            out.append(f"{m['type']}:{m.get('code') or m.get('collection')}")
    return out


async def take(client: Any, count: int) -> list[str]:
    return kinds([await client.next() for _ in range(count)])


@pytest_twisted.ensureDeferred
async def test_a_pending_batch_goes_before_acks_errors_and_unsubscribing(
    make_vibed: VibedFactory,
) -> None:
    """While the feed's batch window holds a change for a socket, whatever else the socket is
    sent comes after it: a ``subscribed`` for another collection (which gets none of the
    window's changes of that collection: they are from before its seq), an ``error``, an
    ``unsubscribed`` (nothing of the collection after it); the other sockets get the same
    changes in one batch when the window closes, each once."""
    vibed = await make_vibed(realtime={"batch_ms": 60_000})  # closed by the test only
    service = realtime_service(vibed)
    me = await realtime_identity(vibed)
    a, b, c = [await connect_realtime(vibed, me.token) for _ in range(3)]
    await subscribe(a, "notes")
    await subscribe(b, "notes")
    await subscribe(c, "todos")
    settled = service.hub.settled

    # a subscribes to todos while n1 (its) and t0 (not yet its) wait in the window
    await put_doc(vibed.couch, me.db, "notes", "n1", {})
    await put_doc(vibed.couch, me.db, "todos", "t0", {})
    await in_window(service, me.db, 2)
    a.send({"type": "subscribe", "collection": "todos"})
    assert await take(a, 2) == ["change:n1", "subscribed:todos"]
    assert service.hub.feeds[me.db].pending == 2  # the window was still open
    service.flush_batches()
    assert await take(b, 1) == ["change:n1"]
    assert await take(c, 1) == ["change:t0"]
    await put_doc(vibed.couch, me.db, "todos", "t1", {})
    await put_doc(vibed.couch, me.db, "notes", "n2", {})
    await in_window(service, me.db, 2)
    service.flush_batches()
    assert await take(a, 2) == ["change:t1", "change:n2"]

    # an error while n3 waits
    await put_doc(vibed.couch, me.db, "notes", "n3", {})
    await in_window(service, me.db, 1)
    a.send({"type": "subscribe", "collection": "notes"})
    assert await take(a, 2) == ["change:n3", "error:already-subscribed"]

    # unsubscribing while n4 waits: n4 first, nothing of notes after the answer
    service.flush_batches()
    await put_doc(vibed.couch, me.db, "notes", "n4", {})
    await in_window(service, me.db, 1)
    a.send({"type": "unsubscribe", "collection": "notes"})
    assert await take(a, 2) == ["change:n4", "unsubscribed:notes"]
    service.flush_batches()
    await put_doc(vibed.couch, me.db, "notes", "n5", {})
    await put_doc(vibed.couch, me.db, "todos", "t2", {})
    await in_window(service, me.db, 2)
    service.flush_batches()
    assert await take(a, 1) == ["change:t2"]
    assert await take(b, 4) == ["change:n2", "change:n3", "change:n4", "change:n5"]
    assert await take(c, 2) == ["change:t1", "change:t2"]
    assert service.hub.settled - settled == 3  # each time, a's window was handed over
    await close(a, b, c)
    assert [m["id"] for m in a.inbox if m["type"] == "change"] == [
        "n1",
        "t1",
        "n2",
        "n3",
        "n4",
        "t2",
    ]


@pytest_twisted.ensureDeferred
async def test_a_pending_batch_goes_before_a_resumed_subscriptions_rows(
    make_vibed: VibedFactory,
) -> None:
    """A socket that resumes another collection with ``since`` while the window holds a
    change of its live one gets that change first, then ``subscribed``, then the missed
    rows, then the live ones: each once."""
    vibed = await make_vibed(realtime={"batch_ms": 60_000})
    service = realtime_service(vibed)
    me = await realtime_identity(vibed)
    keeper = await connect_realtime(vibed, me.token)
    await subscribe(keeper, "notes")
    ack = await subscribe(keeper, "todos")
    for i in range(3):
        await put_doc(vibed.couch, me.db, "todos", f"missed{i}", {})
    await in_window(service, me.db, 3)
    service.flush_batches()
    assert await take(keeper, 3) == [f"change:missed{i}" for i in range(3)]

    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    await put_doc(vibed.couch, me.db, "notes", "n1", {})
    await in_window(service, me.db, 1)
    client.send({"type": "subscribe", "collection": "todos", "since": ack["seq"]})
    assert await take(client, 2) == ["change:n1", "subscribed:todos"]
    await poll(lambda: service.hub.stats()["catching_up"] == 0)
    await put_doc(vibed.couch, me.db, "todos", "live", {})
    await in_window(service, me.db, 2)  # n1 and live: the window is still open
    service.flush_batches()
    assert await take(client, 4) == [*(f"change:missed{i}" for i in range(3)), "change:live"]
    assert await take(keeper, 2) == ["change:n1", "change:live"]
    await close(client, keeper)
    assert len([m for m in client.inbox if m["type"] == "change"]) == 5


# -- a slow socket whose send queue overflows while the window is handed to it -------------


async def slow_socket_with_pending_window(vibed: Any, service: Any, me: Any, client: Any) -> Any:
    """Make the server side of ``client`` (subscribed to notes) stop sending, with one
    answer in its send queue (limit 2) and two notes changes waiting in the open window:
    handing the window to it overflows its queue. Returns the server socket."""
    sock = server_socket(vibed, client)
    sock._paused = True  # as the transport's producer does when the client stops reading
    client.send({"type": "bogus"})  # its error answer waits in the send queue
    await poll(lambda: sock.queued[0] == 1)
    await put_doc(vibed.couch, me.db, "notes", "n1", {})
    await put_doc(vibed.couch, me.db, "notes", "n2", {})
    await in_window(service, me.db, 2)
    assert sock.queued[0] == 1 and not sock._closing
    return sock


@pytest_twisted.ensureDeferred
async def test_a_close_keeps_its_code_when_the_final_hand_over_overflows(
    make_vibed: VibedFactory,
) -> None:
    """A socket closed by the server (access revoked: 4004) while the open window holds more
    for it than its send queue takes: the client sees 4004 (not an aborted connection, not
    4008); what did not fit is dropped with the queue, as any close drops it."""
    vibed = await make_vibed(realtime={"batch_ms": 60_000, "queue_messages": 2})
    service = realtime_service(vibed)
    me = await realtime_identity(vibed)
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    sock = await slow_socket_with_pending_window(vibed, service, me, client)
    sock.revoked()
    assert await client.wait_closed() == 4004
    assert sock.close_code == 4004 and service.closed_too_slow == 0
    assert me.db not in service.hub.feeds  # its subscription was the feed's only one


@pytest_twisted.ensureDeferred
async def test_a_socket_closed_while_subscribing_keeps_no_live_subscription(
    make_vibed: VibedFactory,
) -> None:
    """A slow socket that subscribes to another collection while the open window holds more
    for it than its send queue takes is closed (4008), and the feed keeps none of its
    subscriptions: not live, not in a batch group, not counted."""
    vibed = await make_vibed(realtime={"batch_ms": 60_000, "queue_messages": 2})
    service = realtime_service(vibed)
    me = await realtime_identity(vibed)
    keeper = await connect_realtime(vibed, me.token)
    await subscribe(keeper, "notes")
    client = await connect_realtime(vibed, me.token)
    await subscribe(client, "notes")
    sock = await slow_socket_with_pending_window(vibed, service, me, client)
    client.send({"type": "subscribe", "collection": "todos"})
    assert await client.wait_closed() == CLOSE_TOO_SLOW
    entry = service.hub.feeds[me.db]
    assert not [s for subs in entry.live.values() for s in subs if s.sink is sock]
    assert not any(sock in group for group in entry._groups.values())
    assert entry.refs == 1  # the keeper's
    service.flush_batches()
    assert await take(keeper, 2) == ["change:n1", "change:n2"]
    await close(keeper)


@pytest_twisted.ensureDeferred
async def test_a_narrowing_token_on_a_slow_socket_closes_it_cleanly(
    make_vibed: VibedFactory,
) -> None:
    """A fresh token with narrower scopes sent by a slow socket whose queue overflows as the
    open window is handed to it on the first lost subscription: the socket is closed as too
    slow (4008), nothing fails inside vibed (no error logged), and no subscription of it
    stays in the feed."""
    from twisted.logger import globalLogPublisher

    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        vibed = await make_vibed(realtime={"batch_ms": 60_000, "queue_messages": 2})
        service = realtime_service(vibed)
        me = await realtime_identity(vibed)
        client = await connect_realtime(vibed, me.token)
        await subscribe(client, "notes")
        await subscribe(client, "todos")
        await slow_socket_with_pending_window(vibed, service, me, client)
        narrow, _ = vibed.parts.issuer.issue_access(me.idn, ["data:read:other"])
        client.send({"type": "auth", "token": narrow})
        assert await client.wait_closed() == CLOSE_TOO_SLOW
        assert me.db not in service.hub.feeds
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [str(e["log_failure"].value) for e in failures] == []
