"""The site a person uses (issue 9), in a real browser (Debian's chromium, Playwright) against a
real ``twistd vibed``: landing, sign-up and log-in pages, the dashboard end to end, the
security a page must have, keyboard use and the axe-core accessibility rules.

Screenshots of every page at 390 px and 1280 px wide, light and dark, are kept in
``build/browser-artifacts/pages-*.png``."""

from __future__ import annotations

import io
import json
import os
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from browser import (
    PASSWORD,
    ROOT,
    StaticSite,
    VibedProcess,
    launch,
    need_browser,
    shot,
    until,
)

# The pages run on the embedded default engine; the routes under them are tested on both
# engines in tests/test_me_api.py.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.parametrize("couch_engine", ["pouchdb"], indirect=True),
]

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
NEW_PASSWORD = "another long passphrase"
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="module")
def sync_api() -> Any:
    return need_browser()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, couch_url: str) -> Iterator[VibedProcess]:
    tmp = tmp_path_factory.mktemp("pages-vibed")
    vibed = VibedProcess(tmp, couch_url)
    vibed.tmp = tmp  # type: ignore[attr-defined]
    vibed.couch_url = couch_url  # type: ignore[attr-defined]
    yield vibed
    vibed.stop()


@pytest.fixture(scope="module")
def browser(sync_api: Any) -> Iterator[Any]:
    yield from launch(sync_api)


@pytest.fixture(scope="module")
def other_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticSite]:
    directory = tmp_path_factory.mktemp("other-origin")
    (directory / "index.html").write_text("<!doctype html><title>elsewhere</title><p>hi</p>")
    site = StaticSite(directory, directory / "http.log")
    yield site
    site.stop()


def couch(server: VibedProcess, path: str) -> Any:
    """GET a CouchDB path of the server's database (the test looks behind vibed's back)."""
    url = server.couch_url.rstrip("/") + path  # type: ignore[attr-defined]
    parts = urlsplit(url)
    request = urllib.request.Request(url)
    if parts.username:
        import base64

        raw = f"{parts.username}:{parts.password}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(raw).decode())
        url = url.replace(f"{parts.username}:{parts.password}@", "")
        request = urllib.request.Request(url, headers=dict(request.header_items()))
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return {"status": e.code}


def login_api(server: VibedProcess, email: str, password: str, ua: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if ua:
        headers["User-Agent"] = ua
    data = json.dumps({"email": email, "password": password}).encode()
    request = urllib.request.Request(server.url + "/auth/login", data, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def both_widths(browser: Any, url: str, name: str, prepare: Any = None, dark: bool = False) -> None:
    """Screenshots of ``url`` at phone and desktop width (after ``prepare(page)``)."""
    for label, viewport in (("390", PHONE), ("1280", DESKTOP)):
        context = browser.new_context(viewport=viewport, color_scheme="dark" if dark else "light")
        page = context.new_page()
        page.goto(url)
        if prepare is not None:
            prepare(page)
        shot(page, f"pages-{name}-{label}{'-dark' if dark else ''}")
        context.close()


def dashboard_ready(page: Any) -> None:
    page.wait_for_selector("#logout:not([hidden])", timeout=15_000)


def errors_of(page: Any) -> list[str]:
    found: list[str] = []
    page.on("pageerror", lambda e: found.append(str(e)))
    return found


def test_a_new_person_from_signup_to_deletion(browser: Any, server: VibedProcess) -> None:
    """Sign up (an email already taken says so) -> the dashboard shows the identity -> a note
    created in the data view appears live in a second tab -> a stale edit asks what to keep ->
    a bad query shows the server's reason -> two files upload with progress, the quota bar
    moves, one downloads with the same bytes -> the export holds the note and the files ->
    another session is logged out -> the password changes (old fails, new works, the key still
    unwraps to the same did:key) -> the identity is deleted: login fails, its databases and
    blob files are gone, and the email signs up again."""
    from vibed.keys import b64decode, derive_wrap_key, did_key_from_public, unwrap_seed

    email = f"journey-{uuid.uuid4().hex[:10]}@example.org"
    taken, _ = server.signup()
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    errors = errors_of(page)

    page.goto(server.url + "/")
    page.click("text=Create your account")
    page.wait_for_url("**/signup?next=%2Fdashboard")
    assert page.locator("#password-rules").is_visible()
    page.fill("#email", taken)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    assert "already exists" in (page.text_content("[role=alert]") or "")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard")
    dashboard_ready(page)
    assert page.text_content("#id-email") == email
    did = page.text_content("#id-did") or ""
    assert did.startswith("did:key:z6Mk")

    # A note, created in the data view, shows up live in a second tab.
    second = context.new_page()
    second_errors = errors_of(second)
    second.goto(server.url + "/dashboard#data/notes")
    dashboard_ready(second)
    second.wait_for_selector("text=This collection has no documents yet.")
    page.goto(server.url + "/dashboard#data")
    page.fill("#collection-name", "notes")
    page.click("#open-collection button")
    page.wait_for_selector("#collection-view:not([hidden])")
    page.click("#new-doc")
    hostile = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
    page.fill("#doc-editor", json.dumps({"title": "Groceries", "html": hostile}))
    page.click("#doc-save")
    page.wait_for_selector("#doc-view:not([hidden]) #doc-json")
    assert hostile.replace('"', '\\"') in (page.text_content("#doc-json") or "")
    until(
        lambda: second.locator("#docs li").count() == 1,
        within=10,
        what="the note appears in the second tab",
    )
    assert "Groceries" in (second.text_content("#docs") or "")
    assert page.evaluate("window.__xss") is None and second.evaluate("window.__xss") is None
    assert page.locator("#doc-json img, #docs img, #doc-json script").count() == 0
    shot(page, "pages-journey-doc")

    # Both tabs edit the note; the stale save asks what to keep.
    second.click("#docs li button")
    second.wait_for_selector("#doc-edit")
    page.click("#doc-edit")
    second.click("#doc-edit")
    second.fill("#doc-editor", json.dumps({"title": "Groceries (theirs)"}))
    second.click("#doc-save")
    second.wait_for_selector("#doc-form[hidden]", state="attached")
    page.fill("#doc-editor", json.dumps({"title": "Groceries (mine)"}))
    page.click("#doc-save")
    page.wait_for_selector("#doc-conflict:not([hidden])")
    shot(page, "pages-journey-conflict")
    page.click("#conflict-mine")
    page.wait_for_selector("#doc-form[hidden]", state="attached")
    assert "Groceries (mine)" in (page.text_content("#doc-json") or "")

    # Queries: the server's reason for a bad one, the matches of a good one.
    page.click("#doc-back")
    page.fill("#query", '{"title": {"$where": "1"}}')
    page.click("#query-form button[type=submit]")
    page.wait_for_selector("#query-error:not([hidden])")
    assert "$where" in (page.text_content("#query-error") or "")
    page.fill("#query", '{"title": "Groceries (mine)"}')
    page.click("#query-form button[type=submit]")
    until(lambda: page.locator("#docs li").count() == 1, what="the query's match")

    # Files: two at once with progress, the quota bar moves, a download has the same bytes.
    page.goto(server.url + "/dashboard#files")
    page.wait_for_selector("#quota-text:has-text('used')")
    before = float(page.get_attribute("#quota-bar", "value") or 0)
    photo = os.urandom(700_000)
    page.set_input_files(
        "#file-input",
        [
            {"name": "photo.bin", "mimeType": "application/octet-stream", "buffer": photo},
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"remember the milk\n"},
        ],
    )
    page.wait_for_selector("#uploads progress")
    until(
        lambda: page.locator("#uploads .ok").count() == 2,
        within=20,
        what="both uploads finish",
    )
    until(lambda: page.locator("#files tr").count() == 2, what="both files listed")
    until(
        lambda: float(page.get_attribute("#quota-bar", "value") or 0) >= before + len(photo),
        what="the quota bar moves by the uploaded bytes",
    )
    shot(page, "pages-journey-files")
    with page.expect_download() as got:
        page.click("button[aria-label='Download photo.bin']")
    assert Path(got.value.path()).read_bytes() == photo

    # Export: the archive has the note and both files.
    page.goto(server.url + "/dashboard#export")
    with page.expect_download() as got:
        page.click("#export-start")
    archive = zipfile.ZipFile(io.BytesIO(Path(got.value.path()).read_bytes()))
    notes = json.loads(archive.read("collections/notes.json"))
    assert [n["title"] for n in notes] == ["Groceries (mine)"]
    assert archive.read("files/photo.bin") == photo
    assert archive.read("files/notes.txt") == b"remember the milk\n"

    # Sessions: another device signs in; it is listed and logged out from here.
    code, other = login_api(server, email, PASSWORD, ua="Mozilla/5.0 (iPhone) Safari/605.1")
    assert code == 200
    page.goto(server.url + "/dashboard#sessions")
    page.wait_for_selector("text=Safari on iOS")
    shot(page, "pages-journey-sessions")
    page.click("button[aria-label^='Log out Safari on iOS']")
    page.wait_for_selector("text=That session was logged out.")
    code, _ = server.call("GET", "/me", token=other["accessToken"])
    assert code == 401

    # Password: a wrong current one is refused; then old fails, new works, same key.
    page.goto(server.url + "/dashboard#security")
    page.fill("#pw-current", "not my password")
    page.fill("#pw-new", NEW_PASSWORD)
    page.fill("#pw-again", NEW_PASSWORD)
    page.click("#pw-submit")
    page.wait_for_selector("#pw-error:not([hidden])")
    assert "not your current password" in (page.text_content("#pw-error") or "")
    page.fill("#pw-current", PASSWORD)
    page.fill("#pw-new", NEW_PASSWORD)
    page.fill("#pw-again", NEW_PASSWORD)
    page.click("#pw-submit")
    page.wait_for_selector("#pw-ok:not([hidden])")
    assert login_api(server, email, PASSWORD)[0] == 401
    code, fresh = login_api(server, email, NEW_PASSWORD)
    assert code == 200
    idn = fresh["identity"]["id"]
    doc = couch(server, f"/identities/{idn}")
    seed = unwrap_seed(doc["keyWrapped"], derive_wrap_key(NEW_PASSWORD, b64decode(doc["salt"])))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert did_key_from_public(public) == did

    # Delete: everything goes, and the email is free again.
    page.goto(server.url + "/dashboard#delete")
    page.fill("#delete-password", NEW_PASSWORD)
    page.check("#delete-sure")
    shot(page, "pages-journey-delete")
    page.click("#delete-submit")
    page.wait_for_url("**/?deleted=1")
    assert "have been deleted" in (page.text_content("main") or "")
    shot(page, "pages-journey-deleted")
    assert login_api(server, email, NEW_PASSWORD)[0] == 401
    dbs = couch(server, "/_all_dbs")
    uuid_hex = idn.removeprefix("idn:").replace("-", "")
    assert not [d for d in dbs if uuid_hex in d]
    blobs = server.tmp / "vibe-data" / "blobs" / idn.removeprefix("idn:")  # type: ignore[attr-defined]
    assert not blobs.exists()
    again = server.call("POST", "/auth/signup", {"email": email, "password": PASSWORD})
    assert again[0] == 201
    # The second tab learnt that the identity is gone.
    until(lambda: "deleted=1" in second.url, within=10, what="the other tab leaves")
    assert errors == [] and second_errors == [], errors + second_errors
    context.close()


def test_pages_cannot_be_framed_and_run_no_inline_script(
    browser: Any, server: VibedProcess, other_site: StaticSite
) -> None:
    """Every page refuses to be framed (CSP frame-ancestors 'none', X-Frame-Options DENY): a
    page of another origin that frames the dashboard or the landing page sees nothing of
    them. No inline script runs on them (CSP without 'unsafe-inline'), and the dashboard's
    API calls without a valid token fail."""
    for path in ("/", "/dashboard", "/login", "/signup", "/no-such-page"):
        request = urllib.request.Request(server.url + path, headers={"Accept": "text/html"})
        try:
            response = urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as e:
            response = e
        csp = response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp, path
        assert response.headers["X-Frame-Options"] == "DENY", path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Referrer-Policy"], path

    context = browser.new_context()
    page = context.new_page()
    page.goto(other_site.origin + "/")
    page.set_content(
        f'<iframe src="{server.url}/dashboard" width="600" height="400"></iframe>'
        f'<iframe src="{server.url}/" width="600" height="400"></iframe>'
    )
    page.wait_for_timeout(1500)
    frames = [f for f in page.frames if f != page.main_frame]
    assert len(frames) == 2
    assert all(f.query_selector("#main, .cta") is None for f in frames)
    shot(page, "pages-framed")

    email, _ = server.signup()
    page = context.new_page()
    violations: list[str] = []
    page.on(
        "console", lambda m: violations.append(m.text) if "Content Security" in m.text else None
    )
    page.goto(server.url + "/login")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard")
    dashboard_ready(page)
    try:
        page.add_script_tag(content="window.__inline = 1")
    except Exception:  # noqa: S110 - the browser refused it: what is being checked
        pass
    page.evaluate(
        "() => { const b = document.createElement('button'); b.setAttribute('onclick',"
        " 'window.__handler = 1'); document.body.append(b); b.click(); }"
    )
    assert page.evaluate("window.__inline") is None
    assert page.evaluate("window.__handler") is None
    assert violations, "the browser reported no CSP violation"
    for token in ("", "Bearer nonsense", "Bearer eyJhbGciOiJub25lIn0.e30."):
        status = page.evaluate(
            """async (auth) => {
                 const headers = auth ? { Authorization: auth } : {};
                 const r = await fetch('/me/sessions', { headers });
                 return r.status;
               }""",
            token,
        )
        assert status == 401, token
    context.close()


def test_keyboard_only(browser: Any, server: VibedProcess) -> None:
    """Log in and move around the dashboard with the keyboard alone: fields in order, Enter
    submits, the section links work and move the focus to the section's heading."""
    email, _ = server.signup()
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.goto(server.url + "/login?next=%2Fdashboard")
    page.keyboard.press("Tab")  # the brand link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "email"
    page.keyboard.type(email)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "password"
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url("**/dashboard")
    dashboard_ready(page)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('data-view')") == "files":
            break
    else:
        raise AssertionError("the Files link is not reachable with Tab")
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-files:not([hidden])")
    until(lambda: page.evaluate("document.activeElement.id") == "h-files", what="focus moves")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") in ("INPUT", "BUTTON", "A")
    context.close()


def _axe(page: Any) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
             .filter(v => v.impact === 'serious' || v.impact === 'critical')
             .map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target)}))"""
    )
    return list(result)


def test_every_page_passes_axe_and_looks_right_at_both_widths(
    browser: Any, server: VibedProcess
) -> None:
    """axe-core (npm, pinned) finds no serious or critical violation (its WCAG 2.1 A and AA
    rules, contrast included) on the landing, sign-up, log-in and 404 pages and on every
    dashboard view, in the light scheme at 390 and 1280 px and the dark one at 390 px; each is
    kept as a screenshot."""
    if not AXE.exists():
        pytest.skip("axe-core is missing: npm ci (make install does)")
    email, token = server.signup()
    _, me = server.call("GET", "/me", token=token)
    server.call("PUT", "/data/notes/n1", {"title": "Groceries", "items": ["milk", "eggs"]}, token)
    _seed_grant(server, me["id"])
    found: dict[str, Any] = {}
    # Light at both widths; dark at phone width (the scheme changes colours, not layout).
    for scheme, label, viewport in (
        ("light", "390", PHONE),
        ("light", "1280", DESKTOP),
        ("dark", "390", PHONE),
    ):
        # bypass_csp: axe is injected by the test; the pages' own CSP is tested above.
        context = browser.new_context(viewport=viewport, color_scheme=scheme, bypass_csp=True)
        page = context.new_page()
        suffix = f"{label}{'-dark' if scheme == 'dark' else ''}"
        for name, path in (
            ("landing", "/"),
            ("signup", "/signup"),
            ("login", "/login"),
            ("not-found", "/no-such-page"),
        ):
            page.goto(server.url + path)
            shot(page, f"pages-{name}-{suffix}")
            found[f"{name} {suffix}"] = _axe(page)
        page.goto(server.url + "/login?next=%2Fdashboard")
        page.fill("#email", email)
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        dashboard_ready(page)
        for view in (
            "identity",
            "data/notes",
            "files",
            "apps",
            "sessions",
            "security",
            "export",
            "delete",
        ):
            page.goto(f"{server.url}/dashboard#{view}")
            section = view.split("/")[0]
            page.wait_for_selector(f"#view-{section}:not([hidden])")
            if view == "data/notes":
                page.wait_for_selector("#docs li")
                page.click("#docs li button")
                page.wait_for_selector("#doc-view:not([hidden])")
            if view == "apps":
                page.wait_for_selector("#grants li")
            page.wait_for_timeout(200)
            shot(page, f"pages-dashboard-{section}-{suffix}")
            found[f"dashboard {view} {suffix}"] = _axe(page)
        context.close()
    bad = {k: v for k, v in found.items() if v}
    assert not bad, json.dumps(bad, indent=1)


def _seed_grant(server: VibedProcess, idn: str) -> None:
    """A grant as the consent page writes it (vibed/grants.py), so the Apps view has one."""
    db = "db_" + idn.removeprefix("idn:").replace("-", "") + "_permissions"
    doc = {
        "type": "grant",
        "origin": "https://notes.example",
        "scopes": ["data:read:notes", "data:write:notes", "blob:*"],
        "name": "Notes <b>app</b>",
        "via": "consent",
        "createdAt": "2026-01-02T03:04:05Z",
        "lastUsedAt": "2026-01-03T03:04:05Z",
    }
    url = server.couch_url.rstrip("/") + f"/{db}/grant:{uuid.uuid4().hex}"  # type: ignore[attr-defined]
    request = urllib.request.Request(
        url, json.dumps(doc).encode(), {"Content-Type": "application/json"}, method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 201


def test_apps_view_lists_and_revokes_a_grant(browser: Any, server: VibedProcess) -> None:
    """The Apps view shows a grant's origin, its scopes in words and the app's own name as
    text; Revoke asks once more, then the grant is gone from the API too."""
    email, token = server.signup()
    _, me = server.call("GET", "/me", token=token)
    _seed_grant(server, me["id"])
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    page.goto(server.url + "/login?next=%2Fdashboard%23apps")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#grants li")
    text = page.text_content("#grants") or ""
    assert "https://notes.example" in text and "Read and change your notes" in text
    assert "Upload, download and delete your files" in text and "Read your notes" not in text
    assert "Notes <b>app</b>" in text and page.locator("#grants b").count() == 0
    page.click("button[aria-label='Revoke https://notes.example']")
    page.click("text=Revoke access")
    page.wait_for_selector("#grants-empty:not([hidden])")
    assert server.call("GET", "/me/grants", token=token)[1] == {"grants": []}
    context.close()
