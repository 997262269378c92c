"""Bytes that vibed sends straight to a socket (the fast write paths of ``vibed.web``) never
skip a TLS layer: over TLS, an answer or a request to CouchDB sent past it would leave in
clear (a document, CouchDB's credentials). vibed terminating TLS itself (``--port ssl:``)
and a CouchDB reached over ``https`` both keep working."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest_twisted
import treq
from harness import Vibed, self_signed
from twisted.internet import reactor, ssl
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from vibed.couch.wire import WirePool


@implementer(IPolicyForHTTPS)
class _Trust:
    """Trusts the test's own certificate for 127.0.0.1."""

    def __init__(self, cert: Any) -> None:
        self.cert = cert

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:  # noqa: N802
        return ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate(self.cert))


@pytest_twisted.ensureDeferred
async def test_the_data_api_answers_over_tls_it_terminates(make_vibed: Any) -> None:
    """On a TLS port vibed serves the document routes (whose answers go straight to the
    socket on plain TCP) intact: sign up, create, read, over https."""
    vibed: Vibed = await make_vibed()
    cert, key = self_signed()
    options = ssl.CertificateOptions(privateKey=key, certificate=cert)
    site = vibed.parts.site()
    routes = site.wrappedFactory.lean_routes
    lean: list[bytes] = []
    start = routes.start
    routes.start = lambda request, route: (lean.append(request.path), start(request, route))
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    # Kept-alive connections: the reads go the lean path (vibed.web.LeanRequest) over TLS.
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, contextFactory=_Trust(cert), pool=pool)
    base = f"https://127.0.0.1:{port.getHost().port}"
    try:
        signup = await treq.post(
            base + "/auth/signup",
            json={"email": f"tls-{uuid.uuid4().hex[:8]}@example.org", "password": "x" * 16},
            agent=agent,
        )
        assert signup.code == 201, await signup.text()
        token = (await signup.json())["accessToken"]
        auth = {"Authorization": f"Bearer {token}"}
        made = await treq.post(
            base + "/data/notes", json={"secret": "s3cr3t"}, headers=auth, agent=agent
        )
        assert made.code == 201, await made.text()
        doc_id = (await made.json())["id"]
        for _ in range(3):  # a kept-alive connection too
            got = await treq.get(f"{base}/data/notes/{doc_id}", headers=auth, agent=agent)
            assert got.code == 200
            assert (await got.json())["secret"] == "s3cr3t"
        assert lean.count(f"/data/notes/{doc_id}".encode()) == 3
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


class _Json(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        request.setHeader(b"Content-Type", b"application/json")
        seen = request.getHeader(b"authorization") or b""
        return json.dumps({"couchdb": "Welcome", "auth": seen.decode()}).encode()


@pytest_twisted.ensureDeferred
async def test_requests_to_an_https_couchdb_go_through_tls() -> None:
    """The lean CouchDB client (``vibed.couch.wire``, which writes requests straight to the
    socket on plain TCP) sends its requests, credentials included, through TLS to an https
    server, on a new connection and on a reused one (not retried: a retry on a new
    connection would hide a request that the reused one sent in clear)."""
    cert, key = self_signed()
    options = ssl.CertificateOptions(privateKey=key, certificate=cert)
    port = reactor.listenSSL(0, Site(_Json()), options, interface="127.0.0.1")
    number = port.getHost().port
    pool = WirePool(
        reactor,
        "https",
        "127.0.0.1",
        number,
        tls_options=lambda: ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate(cert)),
    )
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{number}\r\nAccept: application/json\r\n"
        "Authorization: Basic YWRtaW46c2VjcmV0\r\n\r\n"
    ).encode()
    try:
        for _ in range(3):
            answer = await pool.request(request, head_only=False, retry=False)
            assert answer.code == 200
            assert json.loads(answer.body) == {
                "couchdb": "Welcome",
                "auth": "Basic YWRtaW46c2VjcmV0",
            }
        assert len(pool._all) == 1  # noqa: SLF001 - one connection, reused
    finally:
        await pool.close()
        await port.stopListening()
