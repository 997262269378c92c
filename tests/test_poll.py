"""vibed.poll: the daemon's leaner epoll loop behaves as twisted's own.

The same conversation runs on two fresh (never installed) epoll reactors, one with
twisted's ``doPoll`` and one with vibed's: a server protocol logs with the legacy
``log.msg`` (which takes its ``system`` from the log context the loop sets up), echoes, then
raises in ``dataReceived``. Both loops must log the same events under the same ``system``
(the connection's log prefix), drop the connection that raised, and go on serving the next
one.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python import log

from vibed import poll

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class Touchy(Protocol):
    lost: list[str] = []  # how each connection ended, as the server saw it

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted API)
        Touchy.lost.append(type(reason.value).__name__)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        log.msg(f"got {data!r}")
        if data.startswith(b"boom"):
            raise RuntimeError("boom in dataReceived")
        assert self.transport is not None
        self.transport.write(b"echo " + data)


def converse(reactor: Any) -> tuple[list[tuple[str, str]], list[bytes]]:
    """Two clients, one well behaved, one making the protocol raise; what the legacy log
    saw (system, text) and what each client read."""
    events: list[tuple[str, str]] = []

    def observe(event: dict[str, Any]) -> None:
        if "system" in event and event.get("log_namespace") == "log_legacy":
            text = " ".join(str(m) for m in event.get("message", ())) or str(
                event.get("why") or event.get("failure", "")
            )
            events.append((event["system"], text.split("\n")[0]))

    Touchy.lost = []
    port = reactor.listenTCP(0, Factory.forProtocol(Touchy), interface="127.0.0.1")
    address = ("127.0.0.1", port.getHost().port)
    answers: list[bytes] = []
    globalLogPublisher.addObserver(observe)
    try:
        for message in (b"boom", b"hello"):
            client = socket.create_connection(address, timeout=5)
            client.setblocking(False)
            deadline = time.monotonic() + 5
            got = b""
            while not got.endswith(b"CLOSED") and time.monotonic() < deadline:
                reactor.iterate(0.01)
                if message is not None:
                    client.sendall(message)
                    message = None
                try:
                    chunk = client.recv(100)
                    got += chunk if chunk else b"CLOSED"
                except BlockingIOError:
                    if got.startswith(b"echo"):
                        client.close()
                        break
            answers.append(got)
            if not got.endswith(b"CLOSED"):
                client.close()
            for _ in range(5):
                reactor.iterate(0.01)
    finally:
        globalLogPublisher.removeObserver(observe)
        port.stopListening()
        for _ in range(5):
            reactor.iterate(0.01)
    return events, answers


def test_the_lean_loop_logs_and_recovers_as_twisteds_own() -> None:
    """The same events under the same system (the connection's prefix, never "-"), the
    raising connection closed, the next one echoed, on both loops."""
    stock = epollreactor.EPollReactor()
    lean = epollreactor.EPollReactor()
    assert poll.install(lean)
    assert lean.doIteration.__func__ is poll._do_poll
    stock_events, stock_answers = converse(stock)
    stock_lost = Touchy.lost
    inline: list[Any] = []  # the connections read by the loop's inline read
    read = poll._read
    poll._read = lambda reactor, connection: (inline.append(connection), read(reactor, connection))
    try:
        lean_events, lean_answers = converse(lean)
    finally:
        poll._read = read
    # Both clients' bytes and closes were read inline: the raising one, the echoed one.
    assert len({id(c) for c in inline}) == 2
    # The server saw both connections end, the same way: dropped for the error, then closed
    # by the client.
    assert Touchy.lost == stock_lost == ["RuntimeError", "ConnectionDone"]

    def normalized(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
        # The prefix names the connection's number, which differs between the two runs.
        return [(system.rsplit(",", 2)[0], text) for system, text in events]

    assert lean_answers == stock_answers == [b"CLOSED", b"echo hello"]
    assert normalized(lean_events) == normalized(stock_events)
    systems = {system for system, _ in lean_events}
    assert systems and all(s.startswith("Touchy,") for s in systems), lean_events
    texts = [text for _, text in lean_events]
    assert "got b'boom'" in texts and "got b'hello'" in texts
    assert any("boom in dataReceived" in text or "Unhandled" in text for text in texts)


def test_only_twisteds_epoll_reactor_is_changed() -> None:
    """Another reactor (what ``twistd --reactor`` may pick) is left as it is."""
    from twisted.internet.pollreactor import PollReactor

    other = PollReactor()
    before = other.doIteration
    assert not poll.install(other)
    assert other.doIteration == before


def test_a_connection_aborted_in_the_same_turn_reads_nothing() -> None:
    """Two connections ready in one turn; the first one read aborts the other and makes it
    read again (as a resume would): the other's bytes never reach its protocol, as with
    twisted's own loop (an aborted connection's doRead is a no-op until it is lost)."""
    reactor = epollreactor.EPollReactor()
    assert poll.install(reactor)
    got: list[bytes] = []
    servers: list[Any] = []

    class Pair(Protocol):
        def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
            servers.append(self)

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            got.append(data)
            other = servers[1 - servers.index(self)].transport
            if not other.disconnecting and not got[1:]:
                other.abortConnection()
                other.startReading()

    port = reactor.listenTCP(0, Factory.forProtocol(Pair), interface="127.0.0.1")
    address = ("127.0.0.1", port.getHost().port)
    clients = [socket.create_connection(address, timeout=5) for _ in range(2)]
    try:
        deadline = time.monotonic() + 5
        while len(servers) < 2 and time.monotonic() < deadline:
            reactor.iterate(0.01)
        assert len(servers) == 2
        for client in clients:
            client.sendall(b"hello")
        time.sleep(0.2)  # both sockets readable before the next turn
        reactor.iterate(0)
        assert got == [b"hello"]  # the first read; the aborted one read nothing
    finally:
        for client in clients:
            client.close()
        port.stopListening()
        for _ in range(5):
            reactor.iterate(0.01)


def run_timed(reactor: Any) -> tuple[list[str], list[str]]:
    """A run of ``reactor`` through timed calls (in order, nested, cancelled, raising, many
    cancelled), a call from another thread and a stop: what happened, and what was logged."""
    import threading

    happened: list[str] = []
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "twisted.internet.base":
            logged.append(str(event.get("log_format", "")).split("{", 1)[0])

    def nested() -> None:
        happened.append("t2")
        reactor.callLater(0, happened.append, "nested")

    def boom() -> None:
        raise RuntimeError("boom in a timed call")

    reactor.callLater(0.05, happened.append, "t3")
    reactor.callLater(0.01, happened.append, "t1")
    reactor.callLater(0.02, nested)
    reactor.callLater(0.03, boom)
    reactor.callLater(0.04, happened.append, "never").cancel()
    for call in [reactor.callLater(10, happened.append, "never") for _ in range(120)]:
        call.cancel()
    reactor.callLater(0.06, reactor.callLater, 0.01, happened.append, "after the sweep")
    threading.Timer(0.08, reactor.callFromThread, (happened.append, "from a thread")).start()
    reactor.addSystemEventTrigger("before", "shutdown", happened.append, "shutdown")
    reactor.callLater(0.3, reactor.stop)
    globalLogPublisher.addObserver(observe)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        globalLogPublisher.removeObserver(observe)
    happened.append("ended")
    return happened, logged


def test_the_lean_main_loop_runs_timed_calls_as_twisteds_own() -> None:
    """The same timed calls in the same order, the raising one logged and the loop going on,
    the call from a thread, the shutdown, on twisted's main loop and on vibed's."""
    stock = epollreactor.EPollReactor()
    lean = epollreactor.EPollReactor()
    assert poll.install(lean)
    assert lean.mainLoop.__func__ is poll._main_loop
    stock_run = run_timed(stock)
    lean_run = run_timed(lean)
    assert lean_run == stock_run
    happened, logged = lean_run
    assert happened == [
        "t1",
        "t2",
        "nested",
        "t3",
        "after the sweep",
        "from a thread",
        "shutdown",
        "ended",
    ]
    assert any(text.startswith("while handling timed call") for text in logged), logged
    assert logged[-1] == "Main loop terminated."
