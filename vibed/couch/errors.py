"""Typed CouchDB errors: every non-2xx answer and every transport failure maps to one of these."""

from __future__ import annotations


class CouchError(Exception):
    """A CouchDB request failed. ``status`` is the HTTP status (0 for transport failures)."""

    def __init__(self, status: int, error: str = "", reason: str = "") -> None:
        super().__init__(f"{status} {error}: {reason}".strip())
        self.status = status
        self.error = error
        self.reason = reason


class CouchNotFound(CouchError):
    """404: the database or document does not exist (or the doc was deleted)."""


class CouchConflict(CouchError):
    """409 conflict, or 412 file_exists when creating a database that exists."""


class CouchUnauthorized(CouchError):
    """401/403: the credentials in the CouchDB URL are wrong or lack a permission."""


class CouchBadRequest(CouchError):
    """400 (and other 4xx not listed here): the request was malformed."""


class CouchUnavailable(CouchError):
    """Connection refused/reset, timeout, or a 5xx: the server cannot answer right now."""
