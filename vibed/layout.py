"""How app documents are laid out in an identity's ``db_<idn>_data`` database, written once.

A collection is a key range: the document ``abc`` of collection ``notes`` is stored with
``_id`` ``notes:abc``. Listing a collection is ``_all_docs`` from ``notes:`` to
``notes:\\ufff0``; every Mango query of a collection ANDs that ``_id`` range into its
selector, so no selector can reach another collection. Each stored doc also carries the
storage tag ``vibe:collection`` (what the data API strips before answering; an app may not
send it). Ids that are not ``<collection>:<id>`` (e.g. blob records, ``$blob:...``) belong to
no collection and never reach the data API or the realtime feed.

Apps see ``_id`` = ``abc`` and ``_rev``, as CouchDB would show them.

Indexes an app declares for a collection are Mango JSON indexes on
``["vibe:collection", *fields]``, each in its own design doc ``_design/vidx.<collection>.<name>``
(no ``:`` in it, so :func:`split_storage_id` never takes one for an app document).
"""

from __future__ import annotations

import re
from typing import Any

TAG = "vibe:collection"
COLLECTION_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}\Z")
# Bounded, URL-safe, never starting with "_" (CouchDB reserves it) or containing ":".
DOC_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,199}\Z")
RANGE_END = "\ufff0"
INDEX_DDOC_PREFIX = "vidx."


def valid_collection(name: object) -> bool:
    return isinstance(name, str) and COLLECTION_RE.match(name) is not None


def valid_doc_id(doc_id: object) -> bool:
    return isinstance(doc_id, str) and DOC_ID_RE.match(doc_id) is not None


def storage_id(collection: str, doc_id: str) -> str:
    if (  # valid_collection and valid_doc_id, inline: this is on every document request
        not isinstance(collection, str)
        or COLLECTION_RE.match(collection) is None
        or not isinstance(doc_id, str)
        or DOC_ID_RE.match(doc_id) is None
    ):
        raise ValueError("invalid collection or document id")
    return f"{collection}:{doc_id}"


def split_storage_id(storage: str) -> tuple[str, str] | None:
    """``(collection, id)`` of a stored ``_id``, or None when it is not an app document."""
    collection, sep, doc_id = storage.partition(":")
    if not sep or not valid_collection(collection) or not valid_doc_id(doc_id):
        return None
    return collection, doc_id


def collection_range(collection: str) -> tuple[str, str]:
    """``(startkey, endkey)`` covering exactly the collection's documents."""
    if not valid_collection(collection):
        raise ValueError("invalid collection")
    return f"{collection}:", f"{collection}:{RANGE_END}"


def to_storage(collection: str, doc_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The CouchDB document for an app body (which must not carry ``_id`` of another doc)."""
    stored = dict(body)  # (a copy without the two, in C: no comprehension on every write)
    stored.pop("_id", None)
    stored.pop(TAG, None)
    stored["_id"] = storage_id(collection, doc_id)
    stored[TAG] = collection
    return stored


def from_storage(stored: dict[str, Any]) -> dict[str, Any]:
    """The app's view of a stored document: its own ``_id``, no storage tag."""
    app = {k: v for k, v in stored.items() if k != TAG}
    split = split_storage_id(str(stored.get("_id", "")))
    if split is not None:
        app["_id"] = split[1]
    return app


_ID_AFTER_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,199}\Z")  # DOC_ID_RE, unanchored


def from_storage_in_place(stored: dict[str, Any], prefix: str) -> dict[str, Any]:
    """What :func:`from_storage` returns, made from ``stored`` itself (which the caller owns:
    a freshly parsed answer) instead of a copy; ``prefix`` is ``"<collection>:"`` of the
    (valid) collection whose key range the document was read from; any other id is split as
    :func:`from_storage` does. Queries and listings present every document they return with
    this: it is their hot path."""
    stored.pop(TAG, None)
    storage = stored.get("_id")
    if not isinstance(storage, str):
        return stored
    start = len(prefix)
    if storage.startswith(prefix):
        if _ID_AFTER_PREFIX_RE.match(storage, start):
            stored["_id"] = storage[start:]
        return stored
    split = split_storage_id(storage)
    if split is not None:
        stored["_id"] = split[1]
    return stored


def index_ddoc(collection: str, name: str) -> str:
    """The design doc id (without ``_design/``) of index ``name`` of ``collection``;
    with ``name`` empty, the prefix every index of the collection shares."""
    if not valid_collection(collection):
        raise ValueError("invalid collection")
    return f"{INDEX_DDOC_PREFIX}{collection}.{name}"
