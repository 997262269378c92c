"""VibeChannel and VibeRequest on a Clock and a StringTransport: on a keep-alive connection
one progress timer is moved lazily from request to request, and every request head still
gets its whole ``header_timeout`` from its own first byte (never less, never much more);
form bodies are decoded into ``args`` as twisted.web does, other bodies left alone."""

from __future__ import annotations

from typing import Any

from harness import string_channel
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from vibed.web import ConnectionLimits, VibeSite


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (twisted.web API)
        return b"hi"

    def render_POST(self, request: Any) -> bytes:  # noqa: N802
        return b"got " + request.content.read()


def connect(clock: Clock, **limits: Any) -> tuple[Any, StringTransport]:
    site = VibeSite(Hello(), access_log="off", limits=ConnectionLimits(**limits))
    return string_channel(site, clock)


def test_a_later_request_head_gets_its_whole_header_timeout() -> None:
    """A head begun 15 s into a connection (after a first request was served) is not cut at
    the first request's deadline (20 s) but at its own (35 s), with a 408."""
    clock = Clock()
    channel, transport = connect(clock, header_timeout=20.0, idle_timeout=600.0)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    transport.clear()
    clock.advance(15)
    channel.dataReceived(b"GET /b HTTP/1.1\r\nHo")  # a head, left unfinished
    clock.advance(6)  # 21 s: past the first head's deadline
    assert not transport.disconnecting and transport.value() == b""
    clock.advance(13.9)  # 34.9 s
    assert not transport.disconnecting
    clock.advance(0.2)  # 35.1 s: the unfinished head's own deadline has passed
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_a_fast_keep_alive_client_is_never_cut_and_leaves_one_timer() -> None:
    """A client sending a request every second for a minute is served every time, and the
    connection holds at most one pending progress timer (not one per request)."""
    clock = Clock()
    channel, transport = connect(clock, header_timeout=5.0, body_timeout=5.0, idle_timeout=600)
    for i in range(60):
        transport.clear()
        channel.dataReceived(
            b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n%02d" % (i % 100)
        )
        assert transport.value().startswith(b"HTTP/1.1 200 "), i
        assert transport.value().endswith(b"got %02d" % (i % 100))
        pending = [c for c in clock.getDelayedCalls() if c.func == channel._fire]
        assert len(pending) <= 1
        clock.advance(1)
    assert not transport.disconnecting


def test_a_body_phase_deadline_sooner_than_the_pending_timer_is_kept() -> None:
    """After a head, a body that stops arriving is cut at its own body_timeout even when it
    is shorter than the header timeout still pending (the timer is moved sooner)."""
    clock = Clock()
    channel, transport = connect(
        clock, header_timeout=30.0, body_timeout=2.0, body_min_rate=10, idle_timeout=600
    )
    channel.dataReceived(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
    clock.advance(2.1)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


class Echo(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 (twisted.web API)
        args = sorted((k + b"=" + v[0]) for k, v in request.args.items())
        return b"args:" + b"&".join(args) + b" body:" + request.content.read()


def post(ctype: bytes, body: bytes) -> bytes:
    site = VibeSite(Echo(), access_log="off")
    channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    return transport.value().split(b"\r\n\r\n", 1)[1]


def test_form_bodies_are_still_decoded_and_json_bodies_left_alone() -> None:
    """A POST whose type names a form (any case, with parameters) has its fields in
    ``args`` as twisted.web gives them; a JSON body (which skips twisted's Content-Type
    parsing) has no ``args`` and its bytes intact."""
    assert post(b"Application/X-WWW-Form-Urlencoded; charset=utf-8", b"a=1&b=2").endswith(
        b"args:a=1&b=2 body:a=1&b=2"
    )
    assert post(b"application/json", b'{"a": "1"}').endswith(b'args: body:{"a": "1"}')
    assert post(b"application/json; x=form", b"a=1").endswith(b"args: body:a=1")


def test_the_connection_wrapper_resumes_only_what_it_paused() -> None:
    """The channel resumes its producer after every request; the per-address wrapper passes a
    resume on to the transport only when a pause came through it before (a transport never
    paused would only be told to start reading again)."""
    from vibed.web import AddressLimit

    class Recording(StringTransport):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def pauseProducing(self) -> None:  # noqa: N802 (Twisted API)
            self.calls.append("pause")
            super().pauseProducing()

        def resumeProducing(self) -> None:  # noqa: N802
            self.calls.append("resume")
            super().resumeProducing()

    limit = AddressLimit(VibeSite(Hello(), access_log="off"))
    wrapper: Any = limit.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = Recording()
    wrapper.makeConnection(transport)
    wrapper.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")  # served: the channel resumes
    assert transport.value().startswith(b"HTTP/1.1 200 ") and transport.calls == []
    wrapper.pauseProducing()
    wrapper.resumeProducing()
    wrapper.resumeProducing()
    assert transport.calls == ["pause", "resume"]
    assert transport.producerState == "producing"
