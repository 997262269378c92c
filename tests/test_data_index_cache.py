"""DataService remembers an index it has just declared: a sorted query right after the
declaration must not depend on CouchDB's ``_index`` listing showing it yet (under load, once,
it did not). CouchDB's late listing is the edge case, so the server here is a stand-in."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted

from vibed.data import BookmarkCodec, DataService, Sort
from vibed.errors import BadRequest


class LateListingServer:
    """A CouchServer whose ``_index`` listing does not show indexes declared through it."""

    def __init__(self) -> None:
        self.declared: list[dict[str, Any]] = []
        self.listings = 0

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        assert (method, path.rsplit("/", 1)[-1]) == ("GET", "_index")
        self.listings += 1
        return {"indexes": []}  # not yet

    def database(self, name: str) -> LateListingDatabase:
        return LateListingDatabase(self)


class LateListingDatabase:
    def __init__(self, server: LateListingServer) -> None:
        self.server = server

    async def exists(self) -> bool:
        return True

    async def create_index(self, fields: list[str], *, name: str, ddoc: str) -> dict[str, str]:
        self.server.declared.append({"fields": fields, "name": name, "ddoc": ddoc})
        return {"result": "created", "name": name, "id": f"_design/{ddoc}"}


@pytest_twisted.ensureDeferred
async def test_a_declared_index_serves_a_sorted_query_at_once() -> None:
    server = LateListingServer()
    service = DataService(couch=server, bookmarks=BookmarkCodec(b"k" * 32))  # type: ignore[arg-type]
    idn = f"idn:{uuid.uuid4()}"
    by_title = Sort(fields=("title",), descending=False)
    with pytest.raises(BadRequest):  # nothing declared: the 400 naming the index to declare
        await service._index_for(idn, "notes", by_title)

    made = await service.create_index(idn, "notes", ["title", "n"])
    assert made["result"] == "created"
    assert server.declared[0]["fields"] == ["vibe:collection", "title", "n"]
    listings = server.listings
    found = await service._index_for(idn, "notes", by_title)
    assert found == {"name": made["name"], "fields": ["title", "n"]}
    assert server.listings == listings  # from what it declared, not from a listing
    # Another collection's query does not see it.
    with pytest.raises(BadRequest):
        await service._index_for(idn, "tasks", by_title)
