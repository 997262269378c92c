"""IdentityService: signup, login and look-ups of identities in the ``identities`` database.

Email uniqueness cannot rest on a Mango index (CouchDB has no unique constraints), so signup
first *claims* the normalised email with a document whose ``_id`` is derived from it,
``email:<address>``: a second concurrent signup of the same address (in any letter case)
gets a conflict from CouchDB itself, on every replica. The claim starts ``pending`` and
becomes ``active`` once the identity doc and its databases exist. A signup that fails
halfway removes what it created; if the process dies instead, a pending claim older than
``STALE_CLAIM`` seconds no longer blocks a retry of the same email.

A password change re-wraps the same key under the new password (:meth:`change_password`).
An identity being deleted carries ``deleting`` (see :mod:`vibed.deletion`): from that moment
it no longer exists for :meth:`get`, so logins, DID challenges and ``/me`` refuse it.

``did:<did:key>`` pointer documents map an agent's key to its identity for the challenge
login. Identity docs are the only documents with an ``email`` field (what ``byEmail`` indexes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from attrs import define, field
from twisted.logger import Logger

from vibed.couch import CouchConflict, CouchDatabase, CouchError, CouchNotFound, CouchServer
from vibed.cpu import CPUPool
from vibed.errors import BadRequest, Conflict, ServiceUnavailable
from vibed.keys import (
    KeyUnwrapError,
    dummy_hash,
    make_signup_material,
    rewrap_for_password,
    verify_password,
)
from vibed.naming import IDENTITIES_DB, identity_dbs, is_idn, new_idn

_log = Logger(namespace="vibed.identity")

STALE_CLAIM = 120
MAX_EMAIL = 254
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
_EMAIL = re.compile(r"^[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f.]+$")

PUBLIC_FIELDS = ("email", "publicKey", "did", "createdAt")


class LoginFailed(Exception):
    """Unknown email or wrong password; deliberately indistinguishable."""


class WrongPassword(Exception):
    """The password a logged-in person gave to confirm an action is not theirs."""


def normalise_email(value: object) -> str:
    """Lower-cased, trimmed, validated email, or BadRequest naming the problem."""
    if not isinstance(value, str):
        raise BadRequest("'email' must be a string.")
    email = value.strip().lower()
    if len(email) > MAX_EMAIL or not _EMAIL.match(email):
        raise BadRequest("'email' is not a valid email address.")
    return email


def check_password(value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest("'password' must be a string.")
    if not MIN_PASSWORD <= len(value) <= MAX_PASSWORD:
        raise BadRequest(
            f"'password' must be between {MIN_PASSWORD} and {MAX_PASSWORD} characters."
        )
    return value


def redact(doc: dict[str, Any]) -> dict[str, Any]:
    """The identity as any response shows it: never pwdHash, salt or keyWrapped."""
    out = {"id": doc["_id"]}
    out.update({name: doc[name] for name in PUBLIC_FIELDS if name in doc})
    return out


def _now_iso(clock: Callable[[], float]) -> str:
    return (
        datetime.fromtimestamp(clock(), UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@define
class IdentityService:
    server: CouchServer
    pool: CPUPool
    clock: Callable[[], float] = field(default=time.time, repr=False)

    @property
    def db(self) -> CouchDatabase:
        return self.server.database(IDENTITIES_DB)

    async def signup(self, email: str, password: str) -> dict[str, Any]:
        """Create an identity; Conflict when the email is taken."""
        material = await self.pool.run(make_signup_material, password)
        idn = new_idn()
        claim_id = f"email:{email}"
        await self._claim(claim_id, idn)
        created_dbs: list[str] = []
        doc: dict[str, Any] = {
            "_id": idn,
            "type": "identity",
            "email": email,
            "pwdHash": material.pwd_hash,
            "salt": material.salt,
            "keyWrapped": material.key_wrapped,
            "publicKey": material.public_key,
            "did": material.did,
            "createdAt": _now_iso(self.clock),
        }
        try:
            for name in identity_dbs(idn):
                await self.server.create_db(name)
                created_dbs.append(name)
            result = await self.db.put(doc)
            doc["_rev"] = result["rev"]
            await self.db.put({"_id": f"did:{material.did}", "type": "didPointer", "idn": idn})
            claim = await self.db.get(claim_id)
            claim["state"] = "active"
            await self.db.put(claim)
        except CouchError as e:
            _log.warn("Signup failed halfway ({error}); undoing", error=type(e).__name__)
            await self._undo(idn, claim_id, material.did, created_dbs)
            raise ServiceUnavailable("The database failed during signup; please retry.") from e
        return doc

    async def _claim(self, claim_id: str, idn: str) -> None:
        claim = {
            "_id": claim_id,
            "type": "emailClaim",
            "idn": idn,
            "state": "pending",
            "claimedAt": self.clock(),
        }
        for _attempt in range(2):
            try:
                await self.db.put(claim)
                return
            except CouchConflict:
                try:
                    existing = await self.db.get(claim_id)
                except CouchNotFound:
                    continue  # deleted in between: try again
                stale = (
                    existing.get("state") == "pending"
                    and self.clock() - float(existing.get("claimedAt", 0)) > STALE_CLAIM
                )
                if not stale:
                    break
                try:
                    await self.db.delete(claim_id, existing["_rev"])
                except (CouchConflict, CouchNotFound):
                    break
        raise Conflict("An identity with this email already exists.", slug="email-taken")

    async def _undo(self, idn: str, claim_id: str, did: str, dbs: list[str]) -> None:
        for name in dbs:
            await _quietly(self.server.delete_db(name))
        for doc_id in (idn, f"did:{did}", claim_id):
            try:
                doc = await self.db.get(doc_id)
                if doc_id != claim_id or doc.get("idn") == idn:
                    await self.db.delete(doc_id, doc["_rev"])
            except CouchError:
                pass

    async def login(self, email: str, password: str) -> dict[str, Any]:
        """The identity for these credentials, or LoginFailed (same cost either way)."""
        doc = await self._by_email(email)
        if doc is None:
            # Spend the same Argon2id verify an existing identity would cost.
            await self.pool.run(verify_password, await self.pool.run(dummy_hash), password)
            raise LoginFailed()
        ok = await self.pool.run(verify_password, doc["pwdHash"], password)
        if not ok:
            raise LoginFailed()
        return doc

    async def _by_email(self, email: str) -> dict[str, Any] | None:
        try:
            claim = await self.db.get(f"email:{email}")
        except CouchNotFound:
            return None
        if claim.get("state") != "active":
            return None
        return await self.get(claim["idn"])

    async def get(self, idn: str) -> dict[str, Any] | None:
        """The identity document, None when there is none or it is being deleted."""
        doc = await self.get_raw(idn)
        return None if doc is None or doc.get("deleting") else doc

    async def get_raw(self, idn: str) -> dict[str, Any] | None:
        """The identity document even while it is being deleted (the deletion needs it)."""
        if not is_idn(idn):
            return None
        try:
            doc = await self.db.get(idn)
        except CouchNotFound:
            return None
        return doc if doc.get("type") == "identity" else None

    async def confirm_password(self, idn: str, password: str) -> dict[str, Any]:
        """The identity document if ``password`` is its password; WrongPassword otherwise
        (NotFound-like None is WrongPassword too: the identity is gone)."""
        doc = await self.get(idn)
        if doc is None:
            await self.pool.run(verify_password, await self.pool.run(dummy_hash), password)
            raise WrongPassword()
        if not await self.pool.run(verify_password, doc["pwdHash"], password):
            raise WrongPassword()
        return doc

    async def change_password(self, idn: str, current: str, new: str) -> dict[str, Any]:
        """Set a new password: a new Argon2id hash, and the same Ed25519 seed wrapped under
        the new password with a fresh salt (the did:key does not change; the agent unwraps
        the key with the new password). WrongPassword when ``current`` is not right;
        Conflict when the identity changed meanwhile three times over."""
        for _attempt in range(3):
            doc = await self.confirm_password(idn, current)
            try:
                material = await self.pool.run(
                    rewrap_for_password,
                    doc["salt"],
                    doc["keyWrapped"],
                    doc["publicKey"],
                    current,
                    new,
                )
            except KeyUnwrapError:
                # The hash matched but the key does not open: a damaged record. Refuse
                # rather than write a key nobody could ever unwrap again.
                _log.error("Identity {idn}: the password does not unwrap its key", idn=idn)
                raise Conflict(
                    "Your key could not be re-wrapped; the password was not changed.",
                    slug="key-unwrap-failed",
                ) from None
            updated = {
                **doc,
                "pwdHash": material.pwd_hash,
                "salt": material.salt,
                "keyWrapped": material.key_wrapped,
                "passwordChangedAt": _now_iso(self.clock),
            }
            try:
                result = await self.db.put(updated)
            except CouchConflict:
                continue  # changed meanwhile (another password change?): check again
            updated["_rev"] = result["rev"]
            return updated
        raise Conflict("The identity changed while the password was being changed; try again.")

    async def by_did(self, did: str) -> dict[str, Any] | None:
        try:
            pointer = await self.db.get(f"did:{did}")
        except CouchNotFound:
            return None
        doc = await self.get(pointer.get("idn", ""))
        return doc if doc is not None and doc.get("did") == did else None


async def _quietly(d: Any) -> None:
    try:
        await d
    except CouchError:
        pass
