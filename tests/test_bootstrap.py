"""Bootstrap creates what vibed needs, idempotently, and keeps trying until CouchDB answers."""

from __future__ import annotations

import pytest_twisted
from conftest import CouchProcess
from twisted.internet import reactor
from twisted.internet.task import deferLater

from vibed.bootstrap import BootstrapService, bootstrap
from vibed.couch import CouchServer
from vibed.naming import IDENTITIES_DB, SYSTEM_DBS


@pytest_twisted.ensureDeferred
async def test_bootstrap_waits_for_couchdb_then_is_ready(own_couch: CouchProcess) -> None:
    """Started while CouchDB is down, bootstrap is not ready and says why; once CouchDB is
    up it creates every system database and the byEmail index, and running it again changes
    nothing."""
    own_couch.stop()
    couch = CouchServer.from_url(own_couch.url, timeout=2)
    service = BootstrapService(couch, reactor)
    service.startService()
    try:
        await deferLater(reactor, 1.0, lambda: None)
        assert not service.ready
        assert service.last_error and "not reachable" in service.last_error
        own_couch.start()
        await service.whenReady()
        assert service.ready and service.last_error is None
        for name in SYSTEM_DBS:
            assert await couch.db_exists(name)
        index = await couch.request("GET", f"{IDENTITIES_DB}/_index")
        names = {i["name"] for i in index["indexes"]}
        assert "byEmail" in names
        await bootstrap(couch)  # idempotent
        index_again = await couch.request("GET", f"{IDENTITIES_DB}/_index")
        assert len(index_again["indexes"]) == len(index["indexes"])
    finally:
        service.stopService()
        await couch.close()
