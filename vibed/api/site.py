"""The site a person uses: the landing page (``/``) and the dashboard (``/dashboard``), served
from ``web/pages/`` (installed with the package as ``vibed_web.pages``). The log-in and
consent pages are :mod:`vibed.pages`; the dashboard's script and the pages' styles are
``/static/`` files.

Every page carries a strict Content-Security-Policy: the landing page runs no script at all;
the dashboard loads module scripts from this origin only (no inline script, no ``eval``) and
may connect only to this origin, its realtime socket and, with ``--blobs s3``, the bucket its
files go to. No page may be framed.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from attrs import define, field
from twisted.web.iweb import IRequest

from vibed.config import Config
from vibed.pages import page_headers

NOTICES = {
    ("deleted", "1"): "Your identity and everything it owned have been deleted. You can create "
    "a new account with the same email whenever you like.",
    ("deleted", "pending"): "Your identity is being deleted: you are logged out everywhere, and "
    "the rest finishes by itself within a few minutes.",
    ("loggedout", "1"): "You are logged out.",
}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@define(slots=False)
class SitePages:
    config: Config
    root: Path
    store_origin: str | None = None  # where the browser uploads files to, when not here
    _pages: dict[str, str] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for name in ("index.html", "dashboard.html"):
            path = self.root / name
            self._pages[name] = path.read_text("utf-8") if path.is_file() else ""

    def _page(self, name: str) -> str:
        text = self._pages.get(name)
        if not text:
            raise RuntimeError(f"web/pages/{name} is missing from the installation")
        return text

    def landing(self, request: IRequest) -> bytes:
        page_headers(request, referrer=b"no-referrer")
        html = self._page("index.html").replace("{{PUBLIC_URL}}", escape(self.config.public_url))
        raw = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        params = parse_qs(raw.decode("ascii", "replace"))
        for (key, value), text in NOTICES.items():
            if params.get(key) == [value]:
                notice = f'<p class="notice" role="status">{escape(text)}</p>'
                html = html.replace("<!--notice-->", notice, 1)
                break
        return html.encode("utf-8")

    def dashboard(self, request: IRequest) -> bytes:
        socket = _origin(self.config.public_url).replace("http", "ws", 1)
        connect = [socket] + ([self.store_origin] if self.store_origin else [])
        page_headers(request, scripts=True, connect=connect, referrer=b"no-referrer")
        request.setHeader(b"Cross-Origin-Opener-Policy", b"same-origin")
        return self._page("dashboard.html").encode("utf-8")


def make_site(config: Config, web: Path, blob_store: object) -> SitePages:
    """The pages, with the origin of the blob store's signed URLs when it is not this one."""
    store_origin = None
    bucket_url = getattr(blob_store, "bucket_url", None)
    if callable(bucket_url):
        store_origin = _origin(bucket_url(getattr(blob_store, "public_endpoint", None)))
    return SitePages(config=config, root=web / "pages", store_origin=store_origin)


OPENAPI_PATHS = {
    "/dashboard": {
        "get": {
            "summary": "The person's dashboard (an HTML page; its script uses this API)",
            "security": [],
            "responses": {"200": {"description": "HTML page", "content": {"text/html": {}}}},
        }
    },
}
OPENAPI_SCHEMAS: dict[str, object] = {}
