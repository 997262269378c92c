"""Names of things in CouchDB, written once: system databases, identity ids and their databases."""

from __future__ import annotations

import functools
import re
import uuid

IDENTITIES_DB = "identities"
REFRESH_DB = "vibe_refresh"
NONCES_DB = "vibe_nonces"
RATELIMIT_DB = "vibe_ratelimit"
UPLOADS_DB = "vibe_uploads"  # blob uploads signed but not yet finalized (all identities)
REVOCATIONS_DB = "vibe_revocations"  # revoked sessions/grants/identities, until tokens expire
SYSTEM_DBS = (IDENTITIES_DB, REFRESH_DB, NONCES_DB, RATELIMIT_DB, UPLOADS_DB, REVOCATIONS_DB)

IDENTITY_DB_KINDS = ("data", "permissions", "groups")

_IDN = re.compile(r"^idn:([0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})\Z")


def new_idn() -> str:
    """A fresh identity id, ``idn:<uuid4>``."""
    return f"idn:{uuid.uuid4()}"


def is_idn(value: object) -> bool:
    return isinstance(value, str) and _IDN.match(value) is not None


@functools.lru_cache(maxsize=4096)
def identity_db(idn: str, kind: str) -> str:
    """``db_<uuid hex>_<kind>``: CouchDB names allow ``[a-z][a-z0-9_$()+/-]*``, so the uuid
    goes in without its dashes and the ``idn:`` prefix."""
    match = _IDN.match(idn)
    if match is None or kind not in IDENTITY_DB_KINDS:
        raise ValueError("not an identity id or database kind")
    return f"db_{match.group(1).replace('-', '')}_{kind}"


def identity_dbs(idn: str) -> list[str]:
    return [identity_db(idn, kind) for kind in IDENTITY_DB_KINDS]
