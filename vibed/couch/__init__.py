"""A small paisley-style asynchronous CouchDB 3.x client on treq."""

from vibed.couch.client import ChangesFeed, CouchDatabase, CouchServer
from vibed.couch.errors import (
    CouchBadRequest,
    CouchConflict,
    CouchError,
    CouchNotFound,
    CouchUnauthorized,
    CouchUnavailable,
)

__all__ = [
    "ChangesFeed",
    "CouchBadRequest",
    "CouchConflict",
    "CouchDatabase",
    "CouchError",
    "CouchNotFound",
    "CouchServer",
    "CouchUnauthorized",
    "CouchUnavailable",
]
