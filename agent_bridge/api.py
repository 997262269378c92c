"""The agent's routes, mounted by the daemon's root (:mod:`vibed.api.root`).

::

    GET  /auth/challenge   a single-use nonce and the audience to sign for
    POST /auth/response    {did, nonce, signature} -> the same tokens as a password login

The challenge message the agent signs (Ed25519, signature sent as base64url) is exactly the
UTF-8 bytes of::

    vibe-auth-v1\\naud:<aud>\\nnonce:<nonce>

with ``aud`` and ``nonce`` as ``GET /auth/challenge`` returned them (docs/auth.md). Binding
``aud`` means a signature made for one server is refused by every other.
"""

from __future__ import annotations

from attrs import define
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from vibed.api.auth import AuthAPI
from vibed.api.http import client_address, json_response, read_json_object, require_str
from vibed.errors import BadRequest, Unauthorized
from vibed.keys import b64url_decode, public_from_did_key, verify_ed25519
from vibed.sessions import NonceStore

from .protocol import challenge_message

_log = Logger(namespace="agent_bridge.api")


@define(slots=False)
class AgentBridge:
    auth: AuthAPI
    nonces: NonceStore

    # -- the DID challenge ---------------------------------------------------------------------

    async def challenge(self, request: IRequest) -> bytes:
        """``GET /auth/challenge``."""
        config = self.auth.config
        # Unauthenticated and it writes a document: bound it per address.
        address = client_address(request, config.trusted_proxies)
        await self.auth.reserve(
            [(f"challenge:issue:{address}", config.challenge_limit_per_address)],
            window=60,
            message="Too many challenges from this address; wait before asking again.",
        )
        issued = await self.nonces.issue()
        return json_response(
            request,
            {"nonce": issued.nonce, "aud": config.public_url, "expiresAt": issued.expires_at},
        )

    async def response(self, request: IRequest) -> bytes:
        """``POST /auth/response``."""
        config = self.auth.config
        body = read_json_object(request)
        did = require_str(body, "did", 200)
        nonce = require_str(body, "nonce", 200)
        signature_text = require_str(body, "signature", 200)
        try:
            public_key = public_from_did_key(did)
        except ValueError:
            raise BadRequest("'did' must be an Ed25519 did:key.") from None
        try:
            signature = b64url_decode(signature_text.rstrip("="))
        except ValueError:
            raise BadRequest("'signature' must be base64url.") from None
        address = client_address(request, config.trusted_proxies)
        key = f"challenge:addr:{address}"
        hits = await self.auth.reserve([(key, config.login_limit_per_address)])
        refused = Unauthorized("The challenge response was not accepted.", slug="challenge-failed")
        # Spend the nonce first: whatever happens next, it can never be used again.
        try:
            spent = await self.nonces.consume(nonce)
            if spent is None:
                raise refused
            message = challenge_message(config.public_url, nonce)
            doc = await self.auth.identities.by_did(did)
            if doc is None or not verify_ed25519(public_key, message, signature):
                raise refused
        except Unauthorized:
            raise  # a failure: it stays counted
        except BaseException:
            await self.auth.release(hits)
            raise
        await self.auth.release(hits)
        _log.info("DID challenge login: {idn}", idn=doc["_id"])
        return await self.auth.login_response(request, doc)
