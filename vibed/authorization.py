"""The authorization server's service: codes for grants, the token endpoint's two grant types,
token revocation, and the one way to turn a grant into tokens (which the agent's route will
call too). HTTP parsing and pages are :mod:`vibed.api.apps`; the rules are :mod:`vibed.oauth`.

App sessions are refresh-token families (:class:`vibed.sessions.RefreshStore`) marked with
their grant and client: their refresh tokens rotate on every use with the same reuse
detection as the first-party ones, are accepted only at the token endpoint and only from the
app they were issued to, and die with their grant. App access tokens carry ``sub``, the
granted ``scp``, ``client_id`` (the origin), ``gid`` (the grant) and ``sid`` (the family);
never the first-party scope.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.logger import Logger

from vibed.grants import Grant, GrantStore
from vibed.oauth import (
    FIRST_PARTY_SCOPE,
    AuthorizationRequest,
    CodeRejected,
    CodeStore,
    OAuthError,
    covers,
    parse_client_id,
    parse_scopes,
    pkce_matches,
    redirect_to,
)
from vibed.sessions import RefreshRejected, RefreshStore
from vibed.tokens import InvalidToken, TokenIssuer

_log = Logger(namespace="vibed.authorization")

MAX_PARAM = 4096


def _param(form: dict[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise OAuthError("invalid_request", f"The {name} parameter is required.")
    if len(value) > MAX_PARAM:
        raise OAuthError("invalid_request", f"The {name} parameter is too long.")
    return value


def _within(granted: tuple[str, ...], asked: tuple[str, ...]) -> tuple[str, ...]:
    """``asked`` (normalised), which ``granted`` must cover; never more than was granted."""
    if not covers(granted, asked):
        raise OAuthError("invalid_scope", "The grant does not cover these scopes.")
    return tuple(s for s in asked if s != FIRST_PARTY_SCOPE)


def _client(form: dict[str, str]) -> str:
    try:
        return parse_client_id(_param(form, "client_id"))
    except OAuthError as e:
        raise OAuthError("invalid_client", e.description, status=401) from None


@define
class AppAuthority:
    issuer: TokenIssuer
    refresh: RefreshStore
    grants: GrantStore
    codes: CodeStore
    #: the process's RevocationList (revoke_session); None in unit tests
    revocations: Any = field(default=None, repr=False)

    # -- authorization ---------------------------------------------------------------------

    async def code_redirect(self, idn: str, grant: Grant, request: AuthorizationRequest) -> str:
        """The redirect that hands the app a code for ``grant`` (RFC 6749 4.1.2, RFC 9207)."""
        code = await self.codes.issue(
            idn=idn,
            gid=grant.id,
            client_id=request.client_id,
            redirect_uri=request.redirect_uri,
            scopes=request.scopes,
            challenge=request.code_challenge,
        )
        params = {"code": code}
        if request.state is not None:
            params["state"] = request.state
        params["iss"] = self.issuer.issuer
        return redirect_to(request.redirect_uri, params)

    # -- tokens ----------------------------------------------------------------------------

    def access(
        self, idn: str, scopes: tuple[str, ...], family: str, gid: str, client_id: str
    ) -> tuple[str, int]:
        if FIRST_PARTY_SCOPE in scopes:  # never, whatever a grant document says
            raise OAuthError("invalid_scope", "An app cannot hold the identity scope.")
        return self.issuer.issue_access(idn, scopes, sid=family, gid=gid, client_id=client_id)

    def token_response(
        self, idn: str, scopes: tuple[str, ...], family: str, gid: str, client_id: str, rt: str
    ) -> dict[str, Any]:
        token, _exp = self.access(idn, scopes, family, gid, client_id)
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.issuer.ttl,
            "refresh_token": rt,
            "scope": " ".join(scopes),
        }

    async def tokens_for(
        self,
        grant: Grant,
        *,
        family: str | None = None,
        scopes: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """A new app session under ``grant``: the token endpoint's answer. The consent flow
        gets here through a code; the agent (which mints grants itself) calls it directly.

        ``scopes``: what the app asked for this time (and the person was shown), which the
        grant must cover; the session's tokens carry only those, even when the grant reused
        allows more (an earlier ``data:*`` grant does not turn a request for
        ``data:read:notes`` into ``data:*`` tokens). The family remembers them, so every
        refresh keeps to them. None: the grant's scopes."""
        carried = grant.scopes if scopes is None else _within(grant.scopes, scopes)
        rotation = await self.refresh.create_family(
            grant.idn,
            family=family,
            grant=grant.id,
            client_id=grant.origin,
            scopes=None if scopes is None else carried,
        )
        await self.grants.touch(grant)
        return self.token_response(
            grant.idn, carried, rotation.family, grant.id, grant.origin, rotation.token
        )

    async def exchange_code(self, form: dict[str, str]) -> dict[str, Any]:
        """``grant_type=authorization_code``."""
        client_id = _client(form)
        code = _param(form, "code")
        redirect_uri = _param(form, "redirect_uri")
        verifier = _param(form, "code_verifier")
        try:
            issued = await self.codes.consume(code)
        except CodeRejected as e:
            if e.revoke:
                # RFC 6749 4.1.2: a code used twice revokes what it issued.
                _log.warn("Authorization code replayed; its session is revoked")
                await self.refresh.revoke_family(e.revoke)
            raise OAuthError(
                "invalid_grant", "The code is invalid, expired or was already used."
            ) from None
        if issued.client_id != client_id or issued.redirect_uri != redirect_uri:
            raise OAuthError(
                "invalid_grant", "The code was issued to another client or redirect_uri."
            )
        if not pkce_matches(verifier, issued.challenge):
            raise OAuthError("invalid_grant", "The code_verifier does not match the challenge.")
        grant = await self.grants.get(issued.idn, issued.gid)
        if grant is None:
            raise OAuthError("invalid_grant", "The person revoked this app's access.")
        return await self.tokens_for(grant, family=issued.family, scopes=issued.scopes)

    async def refresh_tokens(self, form: dict[str, str]) -> dict[str, Any]:
        """``grant_type=refresh_token``: rotate; ``scope`` may narrow, never widen."""
        client_id = _client(form)
        token = _param(form, "refresh_token")
        family = await self.refresh.family_of(token)
        if family is None or family.get("clientId") != client_id or not family.get("grant"):
            raise OAuthError("invalid_grant", "The refresh token is not valid for this client.")
        grant = await self.grants.get(family["idn"], family["grant"])
        if grant is None:
            raise OAuthError("invalid_grant", "The person revoked this app's access.")
        # The session's own scopes (what the app asked for when it began), within the grant.
        session_scopes = family.get("scopes")
        scopes = (
            _within(grant.scopes, tuple(session_scopes))
            if isinstance(session_scopes, list)
            else grant.scopes
        )
        if form.get("scope"):
            try:
                asked = parse_scopes(form["scope"])
            except OAuthError as e:
                raise OAuthError("invalid_scope", e.description) from None
            if not set(asked) <= set(scopes):
                raise OAuthError(
                    "invalid_scope", "A refresh cannot add scopes the person did not grant."
                )
            scopes = asked
        try:
            rotation = await self.refresh.rotate(token, client_id=client_id)
        except RefreshRejected as e:
            _log.info("App refresh refused: {reason}", reason=e.reason)
            raise OAuthError(
                "invalid_grant", "The refresh token is invalid, expired or was revoked."
            ) from None
        await self.grants.touch(grant)
        return self.token_response(
            grant.idn, scopes, rotation.family, grant.id, client_id, rotation.token
        )

    async def revoke_token(self, form: dict[str, str]) -> None:
        """RFC 7009: end the app session a refresh or access token belongs to. Unknown or
        invalid tokens are not an error; a token of another client is."""
        client_id = _client(form)
        token = _param(form, "token")
        hint = form.get("token_type_hint")
        if hint not in (None, "", "access_token", "refresh_token"):
            raise OAuthError("unsupported_token_type", "token_type_hint is not known.")
        if token.startswith("rt1."):
            family = await self.refresh.family_of(token)
            if family is None:
                return
            if family.get("clientId") != client_id:
                raise OAuthError(
                    "invalid_client", "This token was issued to another client.", status=401
                )
            await self.refresh.revoke(token)
            return
        try:
            claims = self.issuer.verify_access(token)
        except InvalidToken:
            return
        if claims.client_id != client_id:
            raise OAuthError(
                "invalid_client", "This token was issued to another client.", status=401
            )
        if claims.sid:
            await self.refresh.revoke_family(claims.sid)
