"""Refresh-token families and challenge nonces, both kept in CouchDB (stateless replicas).

Refresh tokens
--------------
A token is ``rt1.<family>.<secret>``, sent only in an httpOnly cookie. CouchDB stores its
SHA-256 (``tok:<hex>``), never the token. Each use rotates it: the used token is marked
``rotatedAt`` (a conditional update on its ``_rev``, so of two concurrent rotations exactly
one wins) and its successor is **derived**, ``HMAC-SHA256(secret, token)``, with a secret every
replica derives from the shared JWT key. Deriving rather than drawing the successor is what
makes the grace interval work without storing a token in clear: for ``grace`` seconds after a
rotation, presenting the just-rotated token again (two tabs refreshing at once, a response lost
on a flaky network) yields *the same* successor. Presenting it after the grace interval is
reuse: the whole family (``fam:<family>``) is revoked and every token in it stops working.

Families of an identity
-----------------------
A family document carries its identity, ``createdAt``, ``lastUsedAt`` (written at most once a
minute, when a token of it rotates) and the ``userAgent`` of the browser or device that logged
in: what the person's dashboard lists as their sessions. Two Mango indexes (created at
bootstrap, :data:`REFRESH_INDEXES`) find them: ``byIdn`` on ``[idn, createdAt]`` holds exactly
the family documents (token documents have no ``createdAt``), ``byFamily`` on ``[family]``
exactly the token documents. Deleting an identity removes both.

Nonces
------
``n:<nonce>`` documents with an expiry. Consuming one is a DELETE on its ``_rev``: CouchDB lets
exactly one of any number of concurrent consumers, on any replica, succeed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from typing import Any

from attrs import define, field, frozen
from twisted.logger import Logger

from vibed.couch import (
    CouchConflict,
    CouchDatabase,
    CouchError,
    CouchNotFound,
    CouchUnavailable,
)
from vibed.keys import b64url_encode

_log = Logger(namespace="vibed.sessions")

#: Mango indexes of ``vibe_refresh`` (name -> fields), created by bootstrap in ddoc "refresh".
REFRESH_INDEXES = {"byIdn": ["idn", "createdAt"], "byFamily": ["family"]}
REFRESH_DDOC = "refresh"
#: lastUsedAt of a family is written at most this often (seconds).
TOUCH_EVERY = 60
MAX_USER_AGENT = 256

_TOKEN = re.compile(r"^rt1\.([0-9a-f]{32})\.([A-Za-z0-9_-]{43})\Z")
_NONCE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")


class RefreshRejected(Exception):
    """The refresh token is unknown, expired, revoked or reused; ``reason`` is for logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@frozen
class Rotation:
    idn: str
    family: str
    token: str  # the successor, to set in the cookie (or, for an app, to return)
    expires_at: int
    grant: str | None = None  # an app's family: the grant it lives under
    client_id: str | None = None  # an app's family: the app's origin


def _token_id(token: str) -> str:
    return "tok:" + hashlib.sha256(token.encode("ascii")).hexdigest()


@define
class RefreshStore:
    db: CouchDatabase
    secret: bytes = field(repr=False)
    clock: Callable[[], float] = field(repr=False)
    ttl: int = 30 * 24 * 3600
    grace: int = 30
    #: the process's RevocationList: a revoked family's access tokens stop too
    revocations: Any = field(default=None, repr=False)

    async def create_family(
        self,
        idn: str,
        *,
        family: str | None = None,
        grant: str | None = None,
        client_id: str | None = None,
        user_agent: str | None = None,
        scopes: tuple[str, ...] | None = None,
    ) -> Rotation:
        """A new login (or an app's new session under ``grant``, for ``client_id``): a new
        family and its first token. ``user_agent``: the browser's, shown in its session list.
        ``scopes``: an app session's own scopes (within its grant), which refreshes keep to."""
        family = family or secrets.token_hex(16)
        now = self.clock()
        doc: dict[str, Any] = {
            "_id": f"fam:{family}",
            "idn": idn,
            "revoked": False,
            "createdAt": int(now),
            "lastUsedAt": int(now),
        }
        if user_agent:
            doc["userAgent"] = "".join(c for c in user_agent if c.isprintable())[:MAX_USER_AGENT]
        if grant is not None:
            doc["grant"] = grant
            doc["clientId"] = client_id
            if scopes is not None:
                doc["scopes"] = list(scopes)
        await self.db.put(doc)
        token = f"rt1.{family}.{secrets.token_urlsafe(32)}"
        expires = int(now) + self.ttl
        await self._put_token(token, idn, family, expires)
        return Rotation(
            idn=idn,
            family=family,
            token=token,
            expires_at=expires,
            grant=grant,
            client_id=client_id,
        )

    def _successor(self, token: str) -> str:
        family = token.split(".")[1]
        mac = hmac.new(self.secret, token.encode("ascii"), hashlib.sha256).digest()
        return f"rt1.{family}.{b64url_encode(mac)}"

    async def _put_token(self, token: str, idn: str, family: str, expires: int) -> None:
        try:
            await self.db.put(
                {
                    "_id": _token_id(token),
                    "idn": idn,
                    "family": family,
                    "expiresAt": expires,
                    "rotatedAt": None,
                }
            )
        except CouchConflict:
            pass  # another replica wrote the same (derived) successor first

    async def rotate(self, token: str, *, client_id: str | None = None) -> Rotation:
        """Exchange ``token`` for its successor, or raise :class:`RefreshRejected`.

        A token is only accepted where it was issued: an app's (``client_id`` = its origin)
        at the token endpoint by that app, a first-party one (``client_id`` None) in the
        cookie. A mismatch is refused before anything is rotated.
        """
        match = _TOKEN.match(token or "")
        if match is None:
            raise RefreshRejected("malformed")
        family = match.group(1)
        for _attempt in range(3):
            try:
                doc = await self.db.get(_token_id(token))
            except CouchNotFound:
                raise RefreshRejected("unknown") from None
            if doc.get("family") != family:
                raise RefreshRejected("unknown")
            fam = await self._family(family)
            if fam is None or fam.get("revoked"):
                raise RefreshRejected("revoked family")
            if fam.get("clientId") != client_id:
                raise RefreshRejected("issued to another client")
            grant, fam_client = fam.get("grant"), fam.get("clientId")
            now = self.clock()
            if now > doc["expiresAt"]:
                raise RefreshRejected("expired")
            successor = self._successor(token)
            expires = int(now) + self.ttl
            rotated = doc.get("rotatedAt")
            if rotated is None:
                doc["rotatedAt"] = now
                try:
                    await self.db.put(doc)
                except CouchConflict:
                    continue  # a concurrent rotation won; re-read and take the grace path
                await self._put_token(successor, doc["idn"], family, expires)
                await self._touch(fam, now)
                return Rotation(
                    doc["idn"], family, successor, expires, grant=grant, client_id=fam_client
                )
            if now - float(rotated) <= self.grace:
                # Same successor as the concurrent request got; make sure it is stored.
                await self._put_token(successor, doc["idn"], family, expires)
                return Rotation(
                    doc["idn"], family, successor, expires, grant=grant, client_id=fam_client
                )
            await self.revoke_family(family)
            _log.warn(
                "Refresh token reused after rotation; family revoked for {idn}", idn=doc["idn"]
            )
            raise RefreshRejected("reuse")
        raise RefreshRejected("contention")

    async def _touch(self, fam: dict[str, Any], now: float) -> None:
        """Note when the family was last used (best effort, at most once a minute)."""
        last = fam.get("lastUsedAt")
        if isinstance(last, int | float) and now - last < TOUCH_EVERY:
            return
        try:
            await self.db.put({**fam, "lastUsedAt": int(now)})
        except CouchError as e:
            # A concurrent revocation or touch won: the family is as it should be.
            _log.debug("lastUsedAt of a family not written ({error})", error=type(e).__name__)

    async def families(
        self, idn: str, *, limit: int = 1000, live_only: bool = False
    ) -> list[dict[str, Any]]:
        """Every family document of ``idn``, oldest first, read ``limit`` at a time: revoked
        ones too, unless ``live_only``. All of them: logged-out families stay as tombstones,
        so the live ones (the newest) may lie past any first page, and ending "every other
        session" (a password change) must reach them."""
        selector: dict[str, Any] = {"idn": {"$eq": idn}, "createdAt": {"$gte": 0}}
        if live_only:
            selector["revoked"] = {"$eq": False}
        docs: list[dict[str, Any]] = []
        bookmark: str | None = None
        while True:
            page = await self.db.find(
                selector, limit=limit, bookmark=bookmark, use_index=[REFRESH_DDOC, "byIdn"]
            )
            docs.extend(d for d in page.docs if str(d.get("_id", "")).startswith("fam:"))
            if len(page.docs) < limit or page.bookmark is None or page.bookmark == bookmark:
                break
            bookmark = page.bookmark
        unique = {d["_id"]: d for d in docs}.values()
        return sorted(unique, key=lambda d: (d.get("createdAt", 0), d["_id"]))

    async def forget_identity(self, idn: str) -> int:
        """Revoke and delete every family of ``idn`` and every refresh token in them (an
        identity being deleted); returns how many families went. Safe to run again."""
        gone = 0
        for _round in range(1000):
            families = await self.families(idn, limit=200)
            if not families:
                return gone
            for fam in families:
                family = fam["_id"][len("fam:") :]
                if not fam.get("revoked"):
                    await self.revoke_family(family)
                await self._delete_tokens(family)
                try:
                    current = await self.db.get(fam["_id"])
                    await self.db.delete(current["_id"], current["_rev"])
                except (CouchNotFound, CouchConflict):
                    pass  # gone already, or changed: the next round sees it again
                gone += 1
        raise CouchUnavailable(0, "contention", "the sessions could not all be deleted")

    async def _delete_tokens(self, family: str) -> None:
        while True:
            page = await self.db.find(
                {"family": {"$eq": family}}, limit=500, use_index=[REFRESH_DDOC, "byFamily"]
            )
            stale = [
                {"_id": d["_id"], "_rev": d["_rev"], "_deleted": True}
                for d in page.docs
                if str(d.get("_id", "")).startswith("tok:")
            ]
            if not stale:
                return
            results = await self.db.bulk_docs(stale)
            if len(page.docs) < 500 or not any(r.get("ok") for r in results):
                return  # done, or nothing would go (the next run tries again)

    async def family_of(self, token: str) -> dict[str, Any] | None:
        """The family document of a well-formed refresh token (revoked or not), or None."""
        match = _TOKEN.match(token or "")
        return None if match is None else await self._family(match.group(1))

    async def session(self, family: str) -> str | None:
        """The identity of a live (not revoked) family, or None."""
        fam = await self._family(family) if re.fullmatch(r"[0-9a-f]{32}", family) else None
        if fam is None or fam.get("revoked"):
            return None
        idn = fam.get("idn")
        return idn if isinstance(idn, str) else None

    async def family(self, family: str) -> dict[str, Any] | None:
        """The family document ``fam:<family>`` (revoked or not), None for anything else."""
        if not isinstance(family, str) or re.fullmatch(r"[0-9a-f]{32}", family) is None:
            return None
        return await self._family(family)

    async def _family(self, family: str) -> dict[str, Any] | None:
        try:
            return await self.db.get(f"fam:{family}")
        except CouchNotFound:
            return None

    async def revoke_family(self, family: str) -> None:
        """End session ``family``: its refresh tokens and (on every replica, within seconds)
        its access tokens stop working."""
        if self.revocations is not None:
            await self.revocations.revoke_session(family)
        for _attempt in range(5):
            fam = await self._family(family)
            if fam is None or fam.get("revoked"):
                return
            fam["revoked"] = True
            fam["revokedAt"] = int(self.clock())
            try:
                await self.db.put(fam)
                return
            except CouchConflict:
                continue

    async def purge(self) -> int:
        """Delete refresh tokens that expired (their families stay, as small tombstones of
        what was revoked)."""
        return await purge_expired(self.db, "tok:", self.clock())

    async def revoke(self, token: str) -> None:
        """Logout: revoke the family of ``token`` if it is one of ours (else nothing)."""
        match = _TOKEN.match(token or "")
        if match is None:
            return
        try:
            doc = await self.db.get(_token_id(token))
        except CouchNotFound:
            return
        if doc.get("family") == match.group(1):
            await self.revoke_family(match.group(1))


@frozen
class Challenge:
    nonce: str
    expires_at: int


@define
class NonceStore:
    db: CouchDatabase
    clock: Callable[[], float] = field(repr=False)
    ttl: int = 60

    async def issue(self) -> Challenge:
        nonce = secrets.token_urlsafe(32)
        expires = int(self.clock()) + self.ttl
        await self.db.put({"_id": f"n:{nonce}", "expiresAt": expires})
        return Challenge(nonce=nonce, expires_at=expires)

    async def consume(self, nonce: str) -> Challenge | None:
        """Claim ``nonce`` once: the Challenge when it was live and is now spent, else None."""
        if not isinstance(nonce, str) or _NONCE.match(nonce) is None:
            return None
        try:
            doc = await self.db.get(f"n:{nonce}")
            await self.db.delete(doc["_id"], doc["_rev"])
        except (CouchNotFound, CouchConflict):
            return None
        if self.clock() > doc["expiresAt"]:
            return None
        return Challenge(nonce=nonce, expires_at=doc["expiresAt"])

    async def purge(self) -> int:
        """Delete nonces that expired unused."""
        return await purge_expired(self.db, "n:", self.clock())


async def purge_expired(db: CouchDatabase, prefix: str, now: float) -> int:
    """Delete the docs under ``prefix`` whose ``expiresAt`` has passed; returns how many."""
    removed = 0
    startkey: str | None = prefix
    while startkey is not None:
        page = await db.all_docs(
            startkey=startkey, endkey=prefix + "\ufff0", limit=500, include_docs=True
        )
        rows = page.get("rows", [])
        stale = [
            {"_id": r["id"], "_rev": r["value"]["rev"], "_deleted": True}
            for r in rows
            if r.get("doc") and r["doc"].get("expiresAt", 0) < now
        ]
        if stale:
            await db.bulk_docs(stale)
            removed += len(stale)
        startkey = rows[-1]["id"] + "\u0000" if len(rows) == 500 else None
    return removed
