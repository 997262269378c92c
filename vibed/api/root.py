"""The root of the HTTP API: mounts each surface and serves health, JWKS, OpenAPI and ``/me``."""

from __future__ import annotations

import re
from typing import Any

from attrs import define
from klein import Klein
from klein.interfaces import IKleinRequest
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import PathConverter

from agent_bridge.api import AgentBridge
from vibed.bootstrap import BootstrapService
from vibed.couch import CouchError, CouchServer
from vibed.errors import Forbidden, NotFound, ServiceUnavailable, install_error_handlers
from vibed.identity import IdentityService, redact
from vibed.revocation import RevocationList
from vibed.tokens import TokenIssuer

from .apps import AppsAPI
from .auth import FIRST_PARTY_SCOPE, AuthAPI
from .blob import BlobAPI
from .data import DataAPI
from .http import authenticate, json_response
from .me import MeAPI
from .openapi import openapi_document
from .site import SitePages


class AnyPath(PathConverter):
    """werkzeug's ``path`` converter, for every character (control characters included)."""

    regex = r"[^/][\s\S]*?"


# Each mounted surface: prefix -> attribute of VibeAPI holding it (the OpenAPI test reads this).
MOUNTS = {"/auth": "auth", "/data": "data", "/blob": "blob"}


@define(slots=False)
class VibeAPI:
    auth: AuthAPI
    data: DataAPI
    blob: BlobAPI
    realtime: IResource
    identities: IdentityService
    issuer: TokenIssuer
    couch: CouchServer
    bootstrap: BootstrapService
    revocations: RevocationList
    public_url: str
    apps: AppsAPI
    agent: AgentBridge
    me_api: MeAPI
    site: SitePages
    #: Which of ``--workers`` processes this is (None: the only one); /healthz says it.
    worker: int | None = None

    app = Klein()
    # Branch mounts match the rest of the path with werkzeug's "path" converter, whose regex
    # stops at a newline: /data/a%0Ab would be a 404 here instead of reaching the data API,
    # which explains what is wrong with the collection name.
    app.url_map.converters["path"] = AnyPath
    install_error_handlers(app)

    def resource(self) -> IResource:
        return self.app.resource()

    @app.route("/", methods=["GET"])
    def landing(self, request: IRequest) -> bytes:
        return self.site.landing(request)

    @app.route("/dashboard", methods=["GET"])
    def dashboard(self, request: IRequest) -> bytes:
        return self.site.dashboard(request)

    # -- apps: OAuth, pages, grants, the SDK (vibed/api/apps.py) --------------------------------

    @app.route("/auth/authorize", methods=["GET"])
    async def authorize(self, request: IRequest) -> bytes:
        return await self.apps.authorize(request)

    @app.route("/auth/authorize", methods=["POST"])
    async def authorize_decision(self, request: IRequest) -> bytes:
        return await self.apps.authorize_post(request)

    @app.route("/auth/token", methods=["POST"])
    async def oauth_token(self, request: IRequest) -> bytes:
        return await self.apps.token(request)

    @app.route("/auth/revoke", methods=["POST"])
    async def oauth_revoke(self, request: IRequest) -> bytes:
        return await self.apps.revoke(request)

    @app.route("/.well-known/oauth-authorization-server", methods=["GET"])
    def oauth_metadata(self, request: IRequest) -> bytes:
        return self.apps.metadata(request)

    @app.route("/login", methods=["GET"])
    def login_page(self, request: IRequest) -> bytes:
        return self.apps.login_form(request)

    @app.route("/login", methods=["POST"])
    async def login_form(self, request: IRequest) -> bytes:
        return await self.apps.login_submit(request)

    @app.route("/signup", methods=["GET"])
    def signup_page(self, request: IRequest) -> bytes:
        return self.apps.login_form(request, signup=True)

    @app.route("/signup", methods=["POST"])
    async def signup_form(self, request: IRequest) -> bytes:
        return await self.apps.login_submit(request, signup=True)

    @app.route("/me/grants", methods=["GET"])
    async def grants(self, request: IRequest) -> bytes:
        return await self.apps.list_grants(request)

    @app.route("/me/grants/<gid>", methods=["DELETE"])
    async def revoke_grant(self, request: IRequest, gid: str) -> bytes:
        return await self.apps.delete_grant(request, gid)

    # -- the identity's own management (vibed/api/me.py) ----------------------------------------

    @app.route("/me/collections", methods=["GET"])
    async def me_collections(self, request: IRequest) -> bytes:
        return await self.me_api.collections(request)

    @app.route("/me/sessions", methods=["GET"])
    async def me_sessions(self, request: IRequest) -> bytes:
        return await self.me_api.sessions(request)

    @app.route("/me/sessions", methods=["DELETE"])
    async def me_sessions_others(self, request: IRequest) -> bytes:
        return await self.me_api.revoke_other_sessions(request)

    @app.route("/me/sessions/<sid>", methods=["DELETE"])
    async def me_session(self, request: IRequest, sid: str) -> bytes:
        return await self.me_api.revoke_session(request, sid)

    @app.route("/me/password", methods=["POST"])
    async def me_password(self, request: IRequest) -> bytes:
        return await self.me_api.change_password(request)

    @app.route("/me/export", methods=["POST"])
    async def me_export_link(self, request: IRequest) -> bytes:
        return await self.me_api.export_link(request)

    @app.route("/me/export", methods=["GET"])
    async def me_export(self, request: IRequest) -> bytes:
        return await self.me_api.export(request)

    @app.route("/me/export/<ticket>", methods=["GET"])
    async def me_export_ticket(self, request: IRequest, ticket: str) -> bytes:
        return await self.me_api.export_by_ticket(request, ticket)

    @app.route("/me/delete", methods=["POST"])
    async def me_delete(self, request: IRequest) -> bytes:
        return await self.me_api.delete_identity(request)

    @app.route("/sdk/<path:name>", methods=["GET"])
    def sdk_file(self, request: IRequest, name: str) -> bytes:
        return self.apps.sdk.serve(request, name)

    @app.route("/static/<path:name>", methods=["GET"])
    def static_file(self, request: IRequest, name: str) -> bytes:
        return self.apps.static.serve(request, name)

    # -- the vibe agent (agent_bridge): DID challenge, wrapped key, grants --------------------

    @app.route("/auth/challenge", methods=["GET"])
    async def agent_challenge(self, request: IRequest) -> bytes:
        return await self.agent.challenge(request)

    @app.route("/auth/response", methods=["POST"])
    async def agent_response(self, request: IRequest) -> bytes:
        return await self.agent.response(request)

    @app.route("/me/key", methods=["GET"])
    async def agent_key(self, request: IRequest) -> bytes:
        return await self.agent.key(request)

    @app.route("/agent/grants", methods=["POST"])
    async def agent_grant(self, request: IRequest) -> bytes:
        return await self.agent.mint_grant(request)

    @app.route("/agent/grants/<gid>/tokens", methods=["POST"])
    async def agent_grant_tokens(self, request: IRequest, gid: str) -> bytes:
        return await self.agent.grant_tokens(request, gid)

    @app.route("/auth/", branch=True)
    def auth_branch(self, request: IRequest) -> IResource:
        # The branch takes every method, so a PUT /auth/token would land in the auth app,
        # which does not know /token (a route of this app): that is a 405, not a 404.
        takes = _root_methods(request, "auth_branch")
        if takes:
            raise MethodNotAllowed(valid_methods=sorted(takes))
        return self.auth.app.resource()

    @app.route("/data/", branch=True)
    def data_branch(self, request: IRequest) -> IResource:
        return self.data.app.resource()

    @app.route("/blob/", branch=True)
    def blob_branch(self, request: IRequest) -> IResource:
        return self.blob.app.resource()

    @app.route("/blob", methods=["GET"])
    async def blob_list(self, request: IRequest) -> bytes:
        # The branch above is "/blob/"; the list of blobs is "/blob" itself.
        return await self.blob.list_blobs(request)

    @app.route("/realtime", methods=["GET"])
    def realtime_socket(self, request: IRequest) -> IResource:
        return self.realtime

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        answer: dict[str, Any] = {"status": "ok"}
        if self.worker is not None:
            answer["worker"] = self.worker
        return json_response(request, answer)

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        if not self.bootstrap.ready:
            raise ServiceUnavailable(f"Not ready: {self.bootstrap.last_error}.", slug="not-ready")
        if not self.revocations.ready:
            raise ServiceUnavailable("Not ready: revocation list not loaded.", slug="not-ready")
        try:
            await self.couch.info()
        except CouchError as e:
            raise ServiceUnavailable(
                f"Not ready: CouchDB not reachable ({type(e).__name__}).", slug="not-ready"
            ) from None
        return json_response(request, {"status": "ready"})

    @app.route("/.well-known/jwks.json", methods=["GET"])
    def jwks(self, request: IRequest) -> bytes:
        body = json_response(request, self.issuer.jwks())
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return body

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return json_response(
            request,
            openapi_document(
                self.public_url,
                blob_mime_types=self.blob.blobs.mime_types,
                blob_max_size=self.blob.blobs.max_size,
            ),
        )

    @app.route("/me", methods=["GET"])
    async def me(self, request: IRequest) -> bytes:
        # A token that grants nothing reads nothing; an app's token (data or blob scopes
        # only) learns who it acts for (id, did:key) but not the email address.
        claims = authenticate(request, self.issuer)
        if not claims.scp:
            raise Forbidden(
                "This access token carries no scope.",
                slug="insufficient-scope",
                headers={"WWW-Authenticate": 'Bearer realm="vibe", error="insufficient_scope"'},
            )
        doc = await self.identities.get(claims.sub)
        if doc is None:
            raise NotFound("This identity no longer exists.")
        public = redact(doc)
        if FIRST_PARTY_SCOPE not in claims.scp:
            public = {k: public[k] for k in ("id", "did", "publicKey") if k in public}
        return json_response(request, public)


def _root_methods(request: IRequest, branch: str) -> set[str]:
    """The methods this app's own routes (not ``branch``) take at the request's path."""
    mapper = getattr(IKleinRequest(request), "mapper", None)
    takes: set[str] = set()
    if mapper is None:
        return takes
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        try:
            endpoint, _ = mapper.match(method=method)
        except HTTPException:
            continue
        if str(endpoint) not in (branch, branch + "_branch"):
            takes.add(method)
    return takes


def routes(api: VibeAPI) -> set[tuple[str, str]]:
    """Every (METHOD, path) the API serves, in OpenAPI path syntax (for the contract test)."""
    found: set[tuple[str, str]] = set()

    def walk(app: Any, prefix: str) -> None:
        for rule in app.url_map.iter_rules():
            if rule.rule.endswith("/") and prefix + rule.rule.rstrip("/") in MOUNTS:
                continue  # a branch mount, walked below
            path = prefix + rule.rule
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", path)
            for method in rule.methods or ():
                if method not in ("HEAD", "OPTIONS"):
                    found.add((method, path))

    walk(api.app, "")
    for prefix, attr in MOUNTS.items():
        walk(getattr(api, attr).app, prefix)
    return found
