"""The example notes app and the React hooks in a real browser (Debian's chromium, Playwright),
served on another origin than a real ``twistd vibed`` (issue 8, section 5)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

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

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def sync_api() -> Any:
    return need_browser()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, couch_url: str) -> Iterator[VibedProcess]:
    vibed = VibedProcess(tmp_path_factory.mktemp("browser-vibed"), couch_url)
    yield vibed
    vibed.stop()


@pytest.fixture(scope="module")
def notes_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticSite]:
    site = StaticSite(
        ROOT / "web" / "examples" / "notes",
        tmp_path_factory.mktemp("notes-site") / "http.log",
    )
    yield site
    site.stop()


@pytest.fixture(scope="module")
def browser(sync_api: Any) -> Iterator[Any]:
    yield from launch(sync_api)


def log_in_and_allow(page: Any, email: str, name: str) -> None:
    """On vibed's pages: log in, look at the consent page, allow."""
    page.wait_for_url("**/login?**")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    try:
        page.wait_for_selector("#allow", timeout=10_000)
    except Exception:
        shot(page, f"{name}-no-consent")
        raise
    shot(page, f"{name}-consent")
    page.click("#allow")


def note_titles(page: Any, selector: str = "#notes li") -> list[str]:
    return [str(t) for t in page.locator(selector).all_text_contents()]


def test_notes_app_login_consent_live_offline_and_revoke(
    browser: Any, server: VibedProcess, notes_site: StaticSite
) -> None:
    """The example app on another origin: login -> consent -> create, list and query notes ->
    a second tab sees them live -> the network drops and comes back and no change is lost
    or repeated -> the person revokes the grant -> within 5 s the app's calls fail, its
    socket closes and it says it is logged out."""
    email, first_party = server.signup()
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    app_url = f"{notes_site.origin}/?server={quote(server.url, safe='')}"
    page.goto(app_url)
    page.wait_for_selector("#login:not([hidden])")
    page.click("#login")
    log_in_and_allow(page, email, "notes")
    try:
        page.wait_for_selector("#app:not([hidden])", timeout=10_000)
    except Exception:
        shot(page, "notes-not-logged-in")
        raise AssertionError(f"{page.url} {page.text_content('#error')} {console}") from None
    assert page.text_content("#status") == "Logged in"
    assert page.url.startswith(notes_site.origin) and "code=" not in page.url

    for title in ("Buy milk", "Call <b>mum</b>", "Groceries: milk, eggs"):
        page.fill("#title", title)
        page.click("#new-note button")
        page.wait_for_function(
            "t => [...document.querySelectorAll('#notes li')].some(li => li.textContent === t)",
            arg=title,
        )
    assert sorted(note_titles(page)) == ["Buy milk", "Call <b>mum</b>", "Groceries: milk, eggs"]
    assert page.locator("#notes b").count() == 0  # text, never markup
    page.fill("#needle", "milk")
    page.click("#search button")
    page.wait_for_selector("#results li")
    assert sorted(note_titles(page, "#results li")) == ["Buy milk", "Groceries: milk, eggs"]
    shot(page, "notes-app")

    # A second tab of the same app: the session is restored, changes arrive live.
    second = context.new_page()
    second.goto(app_url)
    second.wait_for_selector("#app:not([hidden])")
    until(lambda: len(note_titles(second)) == 3, what="second tab lists the notes")
    until(lambda: second.text_content("#realtime") == "open", what="second tab's socket open")
    page.fill("#title", "Seen live")
    page.click("#new-note button")
    until(lambda: "Seen live" in note_titles(second), what="second tab sees the new note")

    # Record the raw change events in the second tab, then drop the network.
    second.evaluate(
        "() => { window.seen = []; window.notesApp.vibe.collection('notes')"
        ".subscribe(c => window.seen.push(c.id)); }"
    )
    until(lambda: second.text_content("#realtime") == "open", what="subscribed")
    second.wait_for_timeout(300)  # the subscription's "subscribed" answer
    context.set_offline(True)
    until(lambda: second.text_content("#realtime") != "open", what="socket noticed offline")
    written = []
    for title in ("Written while offline 1", "Written while offline 2"):
        code, body = server.call("POST", "/data/notes", {"title": title}, token=first_party)
        assert code == 201, body
        written.append(body["id"])
    context.set_offline(False)
    until(
        lambda: {"Written while offline 1", "Written while offline 2"} <= set(note_titles(second)),
        within=15,
        what="changes made while offline arrive after reconnecting",
    )
    second.wait_for_timeout(500)
    seen = second.evaluate("() => window.seen")
    assert [i for i in seen if i in written] == written, seen  # each once, in order
    assert len(note_titles(second)) == 6
    shot(second, "notes-second-tab")

    # The person revokes the grant: the app loses access within 5 s.
    code, body = server.call("GET", "/me/grants", token=first_party)
    assert code == 200 and len(body["grants"]) == 1
    grant = body["grants"][0]
    assert grant["origin"] == notes_site.origin and grant["name"] == "Notes (example)"
    token = page.evaluate("() => window.notesApp.vibe.token()")
    code, _ = server.call("DELETE", f"/me/grants/{grant['id']}", token=first_party)
    assert code == 204
    until(lambda: page.text_content("#status") == "Logged out", what="app logged out")
    until(lambda: second.text_content("#status") == "Logged out", what="second tab logged out")
    assert page.text_content("#realtime") == "closed"
    # Whichever tab's socket closed first, both say why (the reason travels in the store).
    assert "revoked" in (page.text_content("#error") or "")
    assert "revoked" in (second.text_content("#error") or "")
    status = page.evaluate(
        "async ([url, t]) => (await fetch(url + '/data/notes', "
        "{headers: {Authorization: 'Bearer ' + t}})).status",
        [server.url, token],
    )
    assert status == 401
    shot(page, "notes-revoked")
    assert errors == []
    context.close()


def test_consent_and_login_pages_cannot_be_framed(
    browser: Any, server: VibedProcess, notes_site: StaticSite
) -> None:
    """A page on another origin that frames vibed's login page (clickjacking) gets nothing:
    the frame never shows the form."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(notes_site.origin + "/style.css")  # any page of the other origin
    page.set_content(f'<iframe id="f" src="{server.url}/login" width="600" height="400"></iframe>')
    page.wait_for_timeout(1500)
    frames = [f for f in page.frames if f != page.main_frame]
    assert frames
    assert all(f.query_selector("#email") is None for f in frames)
    shot(page, "framed-login")
    context.close()


@pytest.fixture(scope="module")
def react_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticSite]:
    """The React example bundled by esbuild (React from npm, the hooks and SDK from web/)."""
    esbuild = ROOT / "node_modules" / ".bin" / "esbuild"
    if not esbuild.exists():
        pytest.skip("esbuild is missing: npm ci (make install does)")
    out = tmp_path_factory.mktemp("react-site")
    source = ROOT / "web" / "examples" / "react-notes"
    (out / "index.html").write_bytes((source / "index.html").read_bytes())
    subprocess.run(
        [
            str(esbuild),
            str(source / "main.jsx"),
            "--bundle",
            "--format=esm",
            "--jsx=automatic",
            '--define:process.env.NODE_ENV="production"',
            f"--alias:vibe-sdk={ROOT / 'web' / 'sdk' / 'vibe.js'}",
            f"--alias:vibe-react={ROOT / 'web' / 'react' / 'index.js'}",
            f"--outfile={out / 'app.js'}",
        ],
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    site = StaticSite(out, out / "http.log")
    yield site
    site.stop()


def test_react_hooks_live(browser: Any, server: VibedProcess, react_site: StaticSite) -> None:
    """A React page (React from npm) using VibeProvider, useIdentity, useCollection and
    useDocument: after login and consent it lists the notes, and a note written elsewhere
    appears without a reload; useDocument follows an edit of one note."""
    email, first_party = server.signup()
    first_id = "a-first"  # ids sort: this one stays first in the list
    code, _ = server.call("PUT", f"/data/notes/{first_id}", {"title": "From before"}, first_party)
    assert code == 201
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{react_site.origin}/?server={quote(server.url, safe='')}")
    page.click("#login")
    log_in_and_allow(page, email, "react")
    page.wait_for_selector("#who")
    until(lambda: note_titles(page) == ["From before"], what="useCollection lists the note")
    until(lambda: page.text_content("#first") == "From before", what="useDocument")
    assert (page.text_content("#who") or "").startswith("idn:")
    code, _ = server.call("PUT", "/data/notes/z-later", {"title": "Written elsewhere"}, first_party)
    assert code == 201
    until(lambda: "Written elsewhere" in note_titles(page), what="useCollection is live")
    until(lambda: page.text_content("#first") == "From before", what="useDocument")
    code, doc = server.call("GET", f"/data/notes/{first_id}", token=first_party)
    code, _ = server.call(
        "PUT", f"/data/notes/{first_id}", {**doc, "title": "Edited"}, token=first_party
    )
    assert code == 200
    until(
        lambda: page.text_content("#first") == "Edited",
        what=f"useDocument is live ({first_id})",
        on_fail=lambda: (shot(page, "react-failed"), note_titles(page)),
    )
    shot(page, "react-hooks")
    assert errors == []
    context.close()


def test_sdk_uses_the_agent_when_present(
    browser: Any, server: VibedProcess, notes_site: StaticSite
) -> None:
    """With an agent on the page (window.vibe: connect, identity, getToken, disconnect, on),
    init() connects through it with the app's scopes and name instead of redirecting, the
    app's calls carry the agent's token (notes; files uploaded with progress, a signed URL,
    listed, deleted; a typed error for a missing note), and the agent's disconnect logs the
    app out."""
    email, first_party = server.signup()
    _, me = server.call("GET", "/me", token=first_party)
    context = browser.new_context()
    identity = json.dumps({"id": me["id"], "did": me["did"]})
    context.add_init_script(
        "window.vibe = {"
        " identity: null, calls: [], listeners: {},"
        " async connect(options) {"
        f"  this.calls.push(options); this.identity = {identity};"
        "   return { identity: this.identity }; },"
        f" async getToken() {{ return {json.dumps(first_party)}; }},"
        " async disconnect() { this.identity = null; },"
        " on(event, listener) { this.listeners[event] = listener; },"
        "};"
    )
    page = context.new_page()
    page.goto(f"{notes_site.origin}/?server={quote(server.url, safe='')}")
    page.wait_for_selector("#app:not([hidden])")
    assert page.url.startswith(notes_site.origin)  # no redirect to the server
    calls = page.evaluate("() => window.vibe.calls")
    # init() never makes the agent show its consent window (prompt "none"); login() would.
    assert calls == [
        {
            "scopes": ["data:write:notes"],
            "appName": "Notes (example)",
            "server": server.url,
            "prompt": "none",
        }
    ]
    assert me["did"] in (page.text_content("#who") or "")
    page.fill("#title", "Through the agent")
    page.click("#new-note button")
    until(lambda: "Through the agent" in note_titles(page), what="note written via the agent")
    code, body = server.call("GET", "/data/notes", token=first_party)
    assert [d["title"] for d in body["docs"]] == ["Through the agent"]
    # Files and typed errors through the SDK (the agent's token carries blob:*).
    result = page.evaluate(
        """async () => {
          const vibe = window.notesApp.vibe;
          const progress = [];
          const blob = await vibe.files.upload(new Blob(["hello files"], {type: "text/plain"}),
            {meta: {name: "hello.txt"}, onProgress: (p) => progress.push(p.loaded)});
          const url = await vibe.files.url(blob.id);
          const text = await (await fetch(url)).text();
          const listed = (await vibe.files.list({limit: 10})).blobs.map((b) => b.id);
          await vibe.files.delete(blob.id);
          const after = (await vibe.files.list()).blobs.length;
          let error = null;
          try { await vibe.collection("notes").get("missing"); }
          catch (e) { error = {name: e.name, status: e.status, code: e.code}; }
          return {size: blob.size, meta: blob.meta, text, listed, id: blob.id, after,
                  progress: progress.length > 0, error};
        }"""
    )
    assert result["size"] == 11 and result["meta"] == {"name": "hello.txt"}
    assert result["text"] == "hello files" and result["listed"] == [result["id"]]
    assert result["after"] == 0 and result["progress"]
    assert result["error"] == {"name": "VibeError", "status": 404, "code": "not-found"}
    page.evaluate("() => window.vibe.listeners.disconnect()")
    until(lambda: page.text_content("#status") == "Logged out", what="agent disconnect")
    context.close()


def test_sdk_ignores_a_forged_redirect(
    browser: Any, server: VibedProcess, notes_site: StaticSite
) -> None:
    """An attacker links the person to the app with a code and a state the app never sent
    (login CSRF): the SDK does not exchange it and the app stays logged out."""
    context = browser.new_context()
    page = context.new_page()
    token_requests: list[str] = []
    page.on("request", lambda r: token_requests.append(r.url) if "/auth/token" in r.url else None)
    page.goto(
        f"{notes_site.origin}/?server={quote(server.url, safe='')}"
        "&code=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA&state=forged"
    )
    page.wait_for_selector("#login:not([hidden])")
    assert page.text_content("#status") == "Logged out"
    assert token_requests == []
    context.close()
