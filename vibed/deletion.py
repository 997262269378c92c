"""Deleting an identity: everything it owns goes, on every replica, and an interrupted deletion
finishes by itself.

What goes, in this order (each step can run again without harm):

1. a *job* document ``deletion:<idn>`` in ``identities`` is written first: as long as it
   exists, the deletion is not finished, and any replica's :class:`DeletionService` picks it up
   (a lease, ``leaseUntil``, taken by a conditional write, keeps two replicas from running the
   same job at once; a lease that was not renewed for :data:`LEASE` seconds is free again);
2. the identity document is marked ``deleting``: from then on logins, DID challenges and
   ``/me`` refuse it (:meth:`vibed.identity.IdentityService.get` treats it as gone);
3. every session (refresh family, the apps' too) is revoked, then deleted with its refresh
   tokens; the identity's access tokens are revoked on every replica (``r:sub``), so its
   realtime sockets close with 4004 within seconds;
4. every blob object: the finalized ones, the pending uploads', then whatever else is under the
   identity's prefix in the store. Records of uploads whose signed URL may still be used stay
   in ``vibe_uploads`` until the blob cleanup runs after their expiry, so an object PUT late
   with an old URL is removed too;
5. the three databases (data, permissions: the grants, groups);
6. the ``did:`` pointer, the identity document and the email claim (the email can sign up
   again), the tokens revoked once more, and last the job.

A deletion interrupted halfway (the process killed, CouchDB or S3 down) keeps its job document
and the identity stays ``deleting``: it cannot log in, its tokens are refused, and within a
minute or two of the stores answering again a replica completes the steps that remain. Nothing
is left behind, because the job records everything the remaining steps need.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.logger import Logger

from vibed.bootstrap import PurgeService
from vibed.couch import CouchConflict, CouchError, CouchNotFound, CouchServer
from vibed.errors import Problem
from vibed.identity import IdentityService
from vibed.naming import IDENTITIES_DB, identity_dbs, is_idn
from vibed.sessions import RefreshStore

_log = Logger(namespace="vibed.deletion")

JOB_PREFIX = "deletion:"
#: Seconds a running deletion holds its job before another replica may take it over.
LEASE = 300
#: How often each replica looks for deletions to finish.
RESUME_INTERVAL = 60.0


class DeletionPending(Exception):
    """The deletion started but could not finish now; it finishes by itself later."""


@define
class IdentityDeleter:
    couch: CouchServer
    identities: IdentityService
    refresh: RefreshStore
    revocations: Any  # vibed.revocation.RevocationList
    blobs: Any  # vibed.blobs.service.BlobService (None: a deployment without blobs)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    @property
    def db(self) -> Any:
        return self.couch.database(IDENTITIES_DB)

    async def delete(self, idn: str) -> None:
        """Delete ``idn`` now. DeletionPending when it started but could not finish (a store
        failed, or another replica is running it): it then finishes by itself."""
        job = await self._start(idn)
        if job is None:
            raise DeletionPending("another replica is deleting this identity")
        try:
            await self._run(job)
        except (CouchError, Problem) as e:
            _log.warn(
                "Deletion of {idn} interrupted ({error}); it will be resumed",
                idn=idn,
                error=type(e).__name__,
            )
            raise DeletionPending(str(e)) from None

    async def _start(self, idn: str) -> dict[str, Any] | None:
        """The job for ``idn``, its lease held by this process (None: someone else holds it)."""
        doc = await self.identities.get_raw(idn)
        now = self.clock()
        job: dict[str, Any] = {
            "_id": JOB_PREFIX + idn,
            "type": "deletion",
            "idn": idn,
            "claim": f"email:{doc['email']}" if doc else None,
            "did": doc.get("did") if doc else None,
            "startedAt": int(now),
            "leaseUntil": int(now) + LEASE,
        }
        try:
            result = await self.db.put(job)
            job["_rev"] = result["rev"]
            return job
        except CouchConflict:
            existing = await self.db.get(job["_id"])
            return await self._take(existing)

    async def _take(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """Hold ``job``'s lease if it is free; None when another replica holds it."""
        now = self.clock()
        if job.get("leaseUntil", 0) > now:
            return None
        return await self._renew(job)

    async def _renew(self, job: dict[str, Any]) -> dict[str, Any] | None:
        updated = {**job, "leaseUntil": int(self.clock()) + LEASE}
        try:
            result = await self.db.put(updated)
        except CouchConflict:
            return None  # another replica took it meanwhile
        updated["_rev"] = result["rev"]
        return updated

    async def _run(self, job: dict[str, Any]) -> None:
        idn = job["idn"]
        if not is_idn(idn):
            _log.error("Deletion job {id} names no identity; removed", id=job["_id"])
            await self._drop(job)
            return
        await self._mark(idn)
        # Sessions first (their families revoked, so no refresh can mint a token after the
        # identity-wide revocation below), then every access token of the identity.
        await self.refresh.forget_identity(idn)
        await self.revocations.revoke_identity(idn)
        job = await self._must_renew(job)
        if self.blobs is not None:
            await self.blobs.delete_all(idn)
        job = await self._must_renew(job)
        for name in identity_dbs(idn):
            await self.couch.delete_db(name)
        await self._delete_doc(f"did:{job['did']}" if job.get("did") else None, idn)
        await self._delete_doc(idn, idn)
        await self._delete_doc(job.get("claim"), idn)
        # A login that was in flight when the deletion began may have minted a token since.
        await self.revocations.revoke_identity(idn)
        await self._drop(job)
        _log.info("Identity {idn} deleted", idn=idn)

    async def _must_renew(self, job: dict[str, Any]) -> dict[str, Any]:
        renewed = await self._renew(job)
        if renewed is None:
            raise CouchConflict(409, "conflict", "the deletion was taken over by another replica")
        return renewed

    async def _mark(self, idn: str) -> None:
        for _attempt in range(5):
            doc = await self.identities.get_raw(idn)
            if doc is None or doc.get("deleting"):
                return
            try:
                await self.db.put({**doc, "deleting": int(self.clock())})
                return
            except CouchConflict:
                continue
        raise CouchConflict(409, "conflict", "the identity kept changing")

    async def _delete_doc(self, doc_id: str | None, idn: str) -> None:
        """Delete ``doc_id`` from ``identities`` if it (still) belongs to ``idn``."""
        if not doc_id:
            return
        for _attempt in range(5):
            try:
                doc = await self.db.get(doc_id)
            except CouchNotFound:
                return
            if doc.get("idn", doc.get("_id")) != idn:
                return  # e.g. the email was claimed again by a new identity: not ours
            try:
                await self.db.delete(doc_id, doc["_rev"])
                return
            except CouchNotFound:
                return
            except CouchConflict:
                continue
        raise CouchConflict(409, "conflict", f"{doc_id} kept changing")

    async def _drop(self, job: dict[str, Any]) -> None:
        try:
            await self.db.delete(job["_id"], job["_rev"])
        except CouchNotFound:
            pass

    async def pending(self) -> list[dict[str, Any]]:
        """Every unfinished deletion job."""
        page = await self.db.all_docs(
            startkey=JOB_PREFIX, endkey=JOB_PREFIX + "\ufff0", include_docs=True, limit=1000
        )
        return [r["doc"] for r in page.get("rows", []) if isinstance(r.get("doc"), dict)]

    async def resume(self) -> int:
        """Finish the deletions nobody is running (lease expired); returns how many finished."""
        finished = 0
        for job in await self.pending():
            taken = await self._take(job)
            if taken is None:
                continue
            _log.info("Resuming the deletion of {idn}", idn=job.get("idn"))
            try:
                await self._run(taken)
            except (CouchError, Problem) as e:
                _log.warn(
                    "Deletion of {idn} still not finished ({error}); next round",
                    idn=job.get("idn"),
                    error=type(e).__name__,
                )
                continue
            finished += 1
        return finished


class DeletionService(PurgeService):
    """Every :data:`RESUME_INTERVAL` seconds, finishes interrupted deletions (every replica
    runs one; the job's lease keeps them from doing the same work twice)."""

    def __init__(
        self, deleter: IdentityDeleter, reactor: Any, interval: float = RESUME_INTERVAL
    ) -> None:
        self.deleter = deleter
        super().__init__([deleter.resume], interval, reactor)
