"""The vibe agent extension, built by ``make agent``'s builder and loaded unpacked into Debian's
chromium (Playwright, a persistent profile, ``--disable-extensions-except`` and
``--load-extension``, headless), against a real ``twistd vibed`` (issue 10, section 4).

What this chromium allows, found here: the extension loads in headless mode (Playwright's
``headless=True`` is the new headless of Chromium >= 132, the same as ``--headless=new``);
``--load-extension`` alone loads nothing, because Playwright passes ``--disable-extensions``
unless ``--disable-extensions-except`` names the extension. The toolbar popup cannot be
clicked headless, so the tests open ``popup.html`` in a tab; the consent window is a real
``chrome.windows.create`` popup window, which Playwright sees as a new page.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    ROOT,
    StaticSite,
    VibedProcess,
    free_port,
    need_browser,
    shot,
    until,
)
from conftest import PouchServer

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def sync_api() -> Any:
    return need_browser()


@pytest.fixture(scope="module")
def extension(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked extension, built as ``make agent`` builds it."""
    from agent_bridge.build import build

    unpacked, archive = build(tmp_path_factory.mktemp("agent"))
    assert archive.stat().st_size > 0
    return unpacked


@pytest.fixture(scope="module")
def couch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PouchServer]:
    # The server side is tested on both engines (test_agent_bridge.py); the extension's
    # tests, which cost a browser each, run once, on the embedded default.
    pouch = PouchServer(tmp_path_factory.mktemp("agent-pouchdb"))
    pouch.start()
    yield pouch
    pouch.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, couch: PouchServer) -> Iterator[VibedProcess]:
    vibed = VibedProcess(tmp_path_factory.mktemp("agent-vibed"), couch.url)
    yield vibed
    vibed.stop()


@pytest.fixture(scope="module")
def notes_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticSite]:
    site = StaticSite(
        ROOT / "web" / "examples" / "notes", tmp_path_factory.mktemp("notes") / "http.log"
    )
    yield site
    site.stop()


ATTACK_PAGE = """<!doctype html>
<meta charset="utf-8"><title>Not an attack, honest</title>
<button id="go">Go</button> <button id="wide">Everything</button> <button id="flood">Flood</button>
<script>
  // Everything the page sees on its window, including the agent's relay traffic.
  window.seen = [];
  addEventListener("message", (e) => window.seen.push(JSON.stringify(e.data)));
  // Without a click: the agent must not open its window.
  window.onload = () => window.vibe.connect({scopes: ["data:*"]}).then(
    (r) => { window.onloadResult = {ok: r}; },
    (e) => { window.onloadResult = {code: e.code, message: e.message}; });
  window.clicks = [];
  document.getElementById("go").onclick = () => {
    window.clicks.push(window.vibe.connect({scopes: ["data:write:loot"], appName: "Innocent",
                                          origin: "https://victim.example", prompt: "consent"})
      .then((r) => ({ok: r}), (e) => ({code: e.code, message: e.message})));
  };
  // A keydown anywhere (the person typing) is not a click: it must not open the window.
  window.keyResults = [];
  addEventListener("keydown", () => {
    window.keyResults.push(window.vibe.connect({scopes: ["data:*", "blob:*"]})
      .then((r) => ({ok: r}), (e) => ({code: e.code, message: e.message})));
  });
  window.wide = [];
  document.getElementById("wide").onclick = () => {
    window.wide.push(window.vibe.connect({scopes: ["data:*", "blob:*"]})
      .then((r) => ({ok: r}), (e) => ({code: e.code, message: e.message})));
  };
  // Refused? Ask again at once, within the same click, as often as it takes.
  window.floods = [];
  document.getElementById("flood").onclick = () => {
    const ask = () => window.vibe.connect({scopes: ["data:*", "blob:*"]});
    window.floods.push(ask().catch(() => ask()).catch(() => ask())
      .then((r) => ({ok: r}), (e) => ({code: e.code, message: e.message})));
  };
  // Without a click: does the person have an identity on this server?
  window.probe = (server) => window.vibe.connect({scopes: ["data:read:x"], server})
    .then((r) => ({ok: r}), (e) => ({code: e.code, message: e.message}));
  // Talk to the relay as window.vibe does, but with the agent's internal requests.
  window.relay = (type, payload) => new Promise((resolve) => {
    const id = "forged-" + Math.random();
    addEventListener("message", function on(e) {
      if (e.data && e.data.dir === "to-page" && e.data.id === id) {
        removeEventListener("message", on); resolve(e.data);
      }
    });
    postMessage({channel: "vibe-agent", dir: "to-agent", id, type, payload}, location.origin);
  });
</script>
"""


@pytest.fixture(scope="module")
def attack_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticSite]:
    root = tmp_path_factory.mktemp("attack")
    (root / "index.html").write_text(ATTACK_PAGE)
    site = StaticSite(root, root.parent / "attack-http.log")
    yield site
    site.stop()


class Agent:
    """A chromium profile with the extension loaded: its service worker, its pages."""

    def __init__(self, sync_api: Any, extension: Path, profile: Path) -> None:
        self.playwright = sync_api.sync_playwright().start()
        self.context = self.playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                *CHROMIUM_ARGS,
                f"--disable-extensions-except={extension}",
                f"--load-extension={extension}",
                # A plain-http site that is not this machine, served by a local server.
                "--host-resolver-rules=MAP plain.test 127.0.0.1",
            ],
        )
        workers = self.context.service_workers
        self.worker = workers[0] if workers else self.context.wait_for_event("serviceworker")
        self.id = self.worker.url.split("/")[2]
        self.errors: list[str] = []

    def page(self, url: str) -> Any:
        page = self.context.new_page()
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.goto(url)
        return page

    def popup(self) -> Any:
        page = self.page(f"chrome-extension://{self.id}/popup.html")
        page.wait_for_selector("#add")
        return page

    def add(self, server: str, email: str, password: str = PASSWORD) -> Any:
        """Add an identity in the popup; the popup page, showing the outcome."""
        popup = self.popup()
        popup.fill("input[name=server]", server)
        popup.fill("input[name=email]", email)
        popup.fill("input[name=password]", password)
        popup.click("button[type=submit]")
        popup.wait_for_selector("#messages .message", timeout=60_000)
        return popup

    def consent(self, click: Any) -> Any:
        """The consent window that ``click()`` opens."""
        with self.context.expect_page(timeout=20_000) as opened:
            click()
        window = opened.value
        window.wait_for_selector("#request:not([hidden])")
        return window

    def decide(self, window: Any, allow: bool | str) -> None:
        """Click Allow (True), Deny (False) or "block" (Block this site)."""
        # The window closes itself on the click.
        button = "#block" if allow == "block" else "#allow" if allow else "#deny"
        try:
            window.click(button, no_wait_after=True)
        except Exception as e:  # noqa: BLE001 (Playwright's TargetClosedError)
            if "closed" not in str(e):
                raise
        if not window.is_closed():
            window.wait_for_event("close", timeout=10_000)

    def storage(self) -> dict[str, Any]:
        """Everything the extension keeps: storage.local (which should hold nothing),
        storage.session, its state in IndexedDB and, for each key there, what the CryptoKey
        says of itself and whether it exports."""
        result: dict[str, Any] = self.worker.evaluate(
            """async () => {
              const open = () => new Promise((ok, no) => {
                const r = indexedDB.open("vibe-agent");
                r.onsuccess = () => ok(r.result); r.onerror = () => no(r.error);
              });
              const db = await open();
              const keys = !db.objectStoreNames.contains("keys") ? [] : await new Promise((ok) => {
                const out = [];
                const tx = db.transaction("keys");
                tx.objectStore("keys").openCursor().onsuccess = (e) => {
                  const c = e.target.result;
                  if (c) { out.push([c.key, c.value]); c.continue(); } else ok(out);
                };
              });
              const hasState = db.objectStoreNames.contains("state");
              const state = !hasState ? null : await new Promise((ok) => {
                const got = db.transaction("state").objectStore("state").get("state");
                got.onsuccess = () => ok(got.result || null);
              });
              db.close();
              const described = [];
              for (const [ref, key] of keys) {
                let exported = null;
                try { exported = await crypto.subtle.exportKey("pkcs8", key); }
                catch (e) { exported = e.name; }
                described.push({ref, type: key.type, extractable: key.extractable,
                                algorithm: key.algorithm.name, usages: key.usages,
                                exported: typeof exported === "string" ? exported : "EXPORTED",
                                json: JSON.stringify(key)});
              }
              return {local: await chrome.storage.local.get(null), state: state || {},
                      session: await chrome.storage.session.get(null), keys: described};
            }"""
        )
        return result

    def close(self) -> None:
        self.context.close()
        self.playwright.stop()


@pytest.fixture
def agent(sync_api: Any, extension: Path, tmp_path: Path) -> Iterator[Agent]:
    """A fresh profile with the extension installed."""
    browser = Agent(sync_api, extension, tmp_path / "profile")
    yield browser
    browser.close()


def note_titles(page: Any) -> list[str]:
    return [str(t) for t in page.locator("#notes li").all_text_contents()]


def server_log(server: VibedProcess) -> str:
    return server.process.log.read_text()


def logins(server: VibedProcess, idn: str) -> list[str]:
    """How ``idn`` got its first-party tokens, in order: "Password" or "DID challenge"."""
    pattern = re.compile(r"\] (Password|DID challenge) login: " + re.escape(idn))
    return pattern.findall(server_log(server))


# -- the whole journey ---------------------------------------------------------------------


def test_agent_journey_add_connect_write_revoke(
    agent: Agent, server: VibedProcess, notes_site: StaticSite
) -> None:
    """Install the extension, add an identity (password once, then the key: the server sees a
    DID challenge login for the next token, never the password again), the password and the
    seed are stored nowhere and the key is a non-extractable Ed25519 CryptoKey; the notes app
    on another origin logs in through window.vibe with the agent's consent window, writes and
    reads its collection; the grant is listed with the person's grants (via agent) and in
    their dashboard; revoked there, the app is refused within 5 s and the popup says so."""
    from vibed.keys import b64decode, b64url_encode, derive_wrap_key, unwrap_seed

    email, first_party = server.signup()
    _, me = server.call("GET", "/me", token=first_party)
    _, wrapped = server.call("GET", "/me/key", token=first_party)
    seed = unwrap_seed(wrapped["keyWrapped"], derive_wrap_key(PASSWORD, b64decode(wrapped["salt"])))

    empty = agent.popup()
    assert empty.is_hidden("#identities-section")
    shot(empty, "agent-popup-empty")
    popup = agent.add(server.url, email)
    assert "Added" in (popup.text_content("#messages") or ""), popup.text_content("#messages")
    popup.wait_for_selector("li.identity.active")
    assert me["did"] in (popup.text_content("#identities") or "")
    shot(popup, "agent-popup-identity")
    assert logins(server, me["id"]) == ["Password", "DID challenge"]
    _, sessions_before = server.call("GET", "/me/sessions", token=first_party)

    kept = agent.storage()
    dump = json.dumps(kept)
    for secret in (
        PASSWORD,
        wrapped["keyWrapped"],
        wrapped["salt"],
        seed.hex(),
        b64url_encode(seed),
    ):
        assert secret not in dump
    (key,) = kept["keys"]
    assert key["type"] == "private" and key["algorithm"] == "Ed25519"
    assert key["extractable"] is False and key["usages"] == ["sign"]
    assert key["exported"] == "InvalidAccessError" and key["json"] == "{}"
    assert [i["did"] for i in kept["state"]["identities"]] == [me["did"]]

    app = agent.page(f"{notes_site.origin}/?server={quote(server.url, safe='')}")
    app.wait_for_selector("#login:not([hidden])")
    assert app.text_content("#status") == "Logged out"  # init() never opens the agent's window
    window = agent.consent(lambda: app.click("#login"))
    assert window.text_content("#origin") == notes_site.origin
    assert "Notes (example)" in (window.text_content("#name") or "")
    assert "Read and change your notes" in (window.text_content("#scopes") or "")
    shot(window, "agent-consent")
    agent.decide(window, allow=True)
    app.wait_for_selector("#app:not([hidden])", timeout=20_000)
    assert app.url.startswith(notes_site.origin)  # no redirect: the agent did it
    assert me["did"] in (app.text_content("#who") or "")
    app.fill("#title", "Through the vibe agent")
    app.click("#new-note button")
    until(lambda: "Through the vibe agent" in note_titles(app), what="the note is listed")
    # A second tab of the same app is logged in without asking again.
    again = agent.page(app.url)
    again.wait_for_selector("#app:not([hidden])", timeout=20_000)
    until(lambda: "Through the vibe agent" in note_titles(again), what="the second tab reads")
    assert logins(server, me["id"]) == ["Password", "DID challenge"]
    # The agent's logins left no session behind: only the signup's is listed (its password
    # login it ended itself, its DID logins make none).
    _, sessions = server.call("GET", "/me/sessions", token=first_party)
    assert len(sessions["sessions"]) == 1 and sessions == sessions_before, sessions
    assert agent.storage()["local"] == {}  # nothing for a content script to read

    _, listed = server.call("GET", "/me/grants", token=first_party)
    (grant,) = listed["grants"]
    assert grant["origin"] == notes_site.origin and grant["via"] == "agent"
    assert grant["scopes"] == ["data:read:notes", "data:write:notes"]
    assert grant["name"] == "Notes (example)"
    popup.reload()
    popup.wait_for_selector("li.site")
    assert notes_site.origin in (popup.text_content("#sites") or "")

    # The person's dashboard, on the server's own site, lists it like any app; revoke there.
    dashboard = agent.page(server.url + "/login?next=%2Fdashboard%23apps")
    dashboard.fill("#email", email)
    dashboard.fill("#password", PASSWORD)
    dashboard.click("button[type=submit]")
    dashboard.wait_for_selector("#grants li", timeout=20_000)
    card = dashboard.text_content("#grants") or ""
    assert notes_site.origin in card and "Read and change your notes" in card
    assert "Notes (example)" in card
    shot(dashboard, "agent-dashboard-grant")
    dashboard.click(f"button[aria-label='Revoke {notes_site.origin}']")
    dashboard.click("text=Revoke access")
    dashboard.wait_for_selector("#grants-empty:not([hidden])")
    start = time.monotonic()

    def refused() -> bool:
        # The app learns it either from its realtime socket (closed with 4004) or from a
        # write refused with 401; either way it is logged out.
        if app.text_content("#status") == "Logged out":
            return True
        app.fill("#title", "after revoke", timeout=1000)
        app.click("#new-note button", timeout=1000)
        return False

    took = until(refused, within=5, what="the app is refused after the revoke")
    assert time.monotonic() - start < 5, took
    assert "revoked" in (app.text_content("#error") or "")
    popup.reload()
    popup.wait_for_selector("#notices li")
    until(
        lambda: "no longer has access" in (popup.text_content("#notices") or ""),
        what="the popup tells that the site lost its access",
        on_fail=lambda: json.dumps(agent.storage()["state"]) + app.text_content("#error"),
    )
    assert popup.locator("li.site").count() == 0
    shot(popup, "agent-popup-revoked")
    assert agent.errors == []


def test_sdk_example_uses_the_redirect_flow_when_the_agent_holds_no_identity(
    agent: Agent, server: VibedProcess, notes_site: StaticSite
) -> None:
    """The same example app, unchanged, with the extension installed but holding no identity
    on its server: window.vibe is there, the SDK falls back to the usual redirect to the
    server's log-in page (without the extension, tests/test_apps_browser.py runs it)."""
    app = agent.page(f"{notes_site.origin}/?server={quote(server.url, safe='')}")
    app.wait_for_selector("#login:not([hidden])")
    assert app.evaluate("() => typeof window.vibe.connect") == "function"
    app.click("#login")
    app.wait_for_url(f"{server.url}/login?**", timeout=20_000)
    assert agent.errors == []


# -- what a page cannot do -----------------------------------------------------------------


def test_a_page_cannot_read_the_key_forge_its_origin_or_skip_consent(
    agent: Agent, server: VibedProcess, attack_site: StaticSite
) -> None:
    """A hostile page: window.vibe has nothing but its five calls; chrome.runtime is not
    reachable from it; the agent's internal requests sent through the relay (state, add,
    forget, decide, consent) are refused; connect() without a click opens nothing; a forged
    origin in connect() is ignored (the consent window and the grant name the page's real
    origin); a forged approval does not approve and a second request while one is open is
    refused; denying rejects connect(). Nothing the page saw holds the key or the wrapped key."""
    from vibed.keys import b64decode, b64url_encode, derive_wrap_key, unwrap_seed

    email, first_party = server.signup()
    _, wrapped = server.call("GET", "/me/key", token=first_party)
    seed = unwrap_seed(wrapped["keyWrapped"], derive_wrap_key(PASSWORD, b64decode(wrapped["salt"])))
    agent.add(server.url, email)
    page = agent.page(attack_site.origin + "/")
    page.wait_for_function("() => window.onloadResult !== undefined")
    assert (
        page.evaluate("() => window.onloadResult") == {"ok": {"identity": None}}
        or page.evaluate("() => window.onloadResult.code") == "needs-user-action"
    )
    assert sorted(page.evaluate("() => Object.keys(window.vibe)")) == [
        "connect",
        "disconnect",
        "getToken",
        "identity",
        "off",
        "on",
    ]
    assert page.evaluate("() => Object.isFrozen(window.vibe)")
    assert page.evaluate("() => typeof chrome === 'undefined' || !chrome.runtime") is True
    for request in (
        ("state", {}),
        ("add", {"server": server.url, "email": email, "password": PASSWORD}),
        ("forget", {}),
        ("consent", {"id": "x"}),
        ("decide", {"id": "x", "allow": True}),
        ("removeSite", {}),
    ):
        answer = page.evaluate("([t, p]) => window.relay(t, p)", list(request))
        assert answer["error"]["code"] == "bad-request", (request, answer)

    # The forged origin is ignored: the window names the page's own.
    window = agent.consent(lambda: page.click("#go"))
    assert window.text_content("#origin") == attack_site.origin
    assert "Innocent" in (window.text_content("#name") or "")
    consent_id = window.url.split("#", 1)[1]
    forged = page.evaluate("(id) => window.relay('decide', {id, allow: true})", consent_id)
    assert forged["error"]["code"] == "bad-request"
    page.click("#go")  # asks again while the window is open
    busy = page.evaluate("() => window.clicks[1]")
    assert busy["code"] == "busy", busy
    shot(window, "agent-consent-attack")
    agent.decide(window, allow=False)
    outcome = page.evaluate("() => window.clicks[0]")
    assert outcome["code"] == "denied"
    _, listed = server.call("GET", "/me/grants", token=first_party)
    assert listed["grants"] == []

    # Denied, the site may not ask again for a while; the person can let it in the popup.
    page.reload()
    page.click("#go")
    assert page.evaluate("() => window.clicks[0]")["code"] == "denied"
    popup = agent.popup()
    popup.click(f"button[aria-label='Unblock {attack_site.origin}']")
    popup.wait_for_selector("#blocked-section", state="hidden")
    # Allowed this time: the grant names the real origin, whatever the page claimed.
    page.reload()
    window = agent.consent(lambda: page.click("#go"))
    agent.decide(window, allow=True)
    outcome = page.evaluate("() => window.clicks[0]")
    assert outcome["ok"]["identity"]["did"]
    _, listed = server.call("GET", "/me/grants", token=first_party)
    assert [g["origin"] for g in listed["grants"]] == [attack_site.origin]
    token = page.evaluate("() => window.vibe.getToken()")
    assert token and token.count(".") == 2
    seen = "\n".join(page.evaluate("() => window.seen"))
    for secret in (wrapped["keyWrapped"], wrapped["salt"], seed.hex(), b64url_encode(seed)):
        assert secret not in seen
    assert first_party not in seen

    # disconnect() ends the page's session; the approval stays: a click reconnects at once.
    page.evaluate("() => window.vibe.disconnect()")
    assert page.evaluate("() => window.vibe.getToken()") is None
    assert page.evaluate("() => window.vibe.identity") is None
    pages = len(agent.context.pages)
    page.click("#go")
    again = page.evaluate("() => window.clicks[window.clicks.length - 1]")
    assert again["ok"]["identity"]["did"] and len(agent.context.pages) == pages


def test_a_challenge_signed_for_one_server_is_refused_by_another(
    agent: Agent, server: VibedProcess, couch: PouchServer, tmp_path: Path
) -> None:
    """Two identities on two servers can be added and either made active. With the key the
    extension stored for the first (a non-extractable CryptoKey, used in its own
    service worker), a challenge of server B signed for server A's audience is refused by B;
    the same nonce's signature for B's audience is not needed to show that B takes the key
    (a fresh one is accepted). Both servers share one CouchDB, so only the audience differs."""
    email, _ = server.signup()
    agent.add(server.url, email)
    other = VibedProcess(tmp_path / "other", couch.url)
    try:
        # Several identities, on several servers; the last added is active, any can be.
        other_email, _ = other.signup()
        popup = agent.add(other.url, other_email)
        popup.wait_for_selector("li.identity >> nth=1")
        assert other_email in (popup.text_content("li.identity.active") or "")
        popup.click("li.identity:not(.active) >> text=Use this one")
        until(lambda: email in (popup.text_content("li.identity.active") or ""), what="switch")
        first = agent.storage()["state"]["identities"][0]
        did, ref = first["did"], first["ref"]
        script = """async ([signFor, base, did, ref]) => {
          const db = await new Promise((ok) => { const r = indexedDB.open("vibe-agent");
                                                  r.onsuccess = () => ok(r.result); });
          const key = await new Promise((ok) => {
            const got = db.transaction("keys").objectStore("keys").get(ref);
            got.onsuccess = () => ok(got.result); });
          const ch = await (await fetch(base + "/auth/challenge")).json();
          const aud = signFor || ch.aud;
          const msg = new TextEncoder().encode(`vibe-auth-v1\\naud:${aud}\\nnonce:${ch.nonce}`);
          const sig = new Uint8Array(await crypto.subtle.sign("Ed25519", key, msg));
          const b64 = btoa(String.fromCharCode(...sig)).replace(/\\+/g, "-")
            .replace(/\\//g, "_").replace(/=+$/, "");
          const r = await fetch(base + "/auth/response", {method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({did, nonce: ch.nonce, signature: b64})});
          return r.status;
        }"""
        assert agent.worker.evaluate(script, [server.url, other.url, did, ref]) == 401
        assert agent.worker.evaluate(script, [None, other.url, did, ref]) == 200
        assert agent.worker.evaluate(script, [None, server.url, did, ref]) == 200
    finally:
        other.stop()


# -- what a person is told -------------------------------------------------------------------


def _message(popup: Any) -> str:
    return str(popup.text_content("#messages .message") or "")


def _put(url: str, doc: dict[str, Any]) -> None:
    import urllib.request

    body = json.dumps(doc).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="PUT")
    urllib.request.urlopen(request).close()


def test_every_failure_is_a_clear_message(
    agent: Agent, server: VibedProcess, couch: PouchServer, notes_site: StaticSite
) -> None:
    """In the popup: a wrong password, an unreachable server, plain http to another machine,
    a server known by another address than its own, a wrapped key that is not the identity's
    did:key, each a sentence and nothing stored. A
    password changed elsewhere changes nothing (the key is re-wrapped, not replaced); a key
    the server no longer accepts (the identity's key replaced) is said in the popup and to
    the page, instead of failing silently."""
    import urllib.request

    from vibed.keys import b64decode, derive_wrap_key, wrap_seed

    email, first_party = server.signup()
    wrong = agent.add(server.url, email, "not the password")
    assert _message(wrong) == "The email or password is not right."
    port = free_port()
    unreachable = agent.add(f"http://127.0.0.1:{port}", email)
    assert _message(unreachable).startswith(f"Cannot reach http://127.0.0.1:{port}.")
    insecure = agent.add("http://vibe.example.org", email)
    assert "Use https://" in _message(insecure)
    renamed = server.url.replace("127.0.0.1", "localhost")
    elsewhere = agent.add(renamed, email)
    assert f"calls itself {server.url}" in _message(elsewhere), _message(elsewhere)
    shot(elsewhere, "agent-popup-wrong-address")
    # A wrapped key that is not the key of the identity's did:key (a broken or lying server).
    _, me = server.call("GET", "/me", token=first_party)
    doc_url = f"{couch.url}identities/{quote(me['id'], safe='')}"
    with urllib.request.urlopen(doc_url) as r:
        doc = json.load(r)
    kept_wrap = doc["keyWrapped"]
    wrap_key = derive_wrap_key(PASSWORD, b64decode(doc["salt"]))
    doc["keyWrapped"] = wrap_seed(bytes(range(32)), wrap_key)
    _put(doc_url, doc)
    mismatch = agent.add(server.url, email)
    assert f"is not the key of {me['did']}" in _message(mismatch), _message(mismatch)
    doc["keyWrapped"] = kept_wrap
    with urllib.request.urlopen(doc_url) as r:
        doc["_rev"] = json.load(r)["_rev"]
    _put(doc_url, doc)
    assert agent.storage()["state"].get("identities", []) == []
    assert agent.storage()["keys"] == []

    popup = agent.add(server.url, email)
    assert "Added" in _message(popup)

    # The password changed on another device (the dashboard re-wraps the same key and ends
    # every other first-party session, the agent's too): the agent goes on with its key.
    app = agent.page(f"{notes_site.origin}/?server={quote(server.url, safe='')}")
    app.wait_for_selector("#login:not([hidden])")
    window = agent.consent(lambda: app.click("#login"))
    agent.decide(window, allow=True)
    app.wait_for_selector("#app:not([hidden])", timeout=20_000)
    status, _ = server.call(
        "POST",
        "/me/password",
        {"currentPassword": PASSWORD, "newPassword": "a new long passphrase"},
        token=first_party,
    )
    assert status == 200
    # The app session gone too, as after a browser restart: a new one needs a first-party
    # token, and the one the agent holds was ended by the password change.
    agent.worker.evaluate(
        """async () => {
          const all = Object.keys(await chrome.storage.session.get(null));
          await chrome.storage.session.remove(all.filter((k) => k.startsWith("app ")));
        }"""
    )
    app.reload()
    app.wait_for_selector("#app:not([hidden])", timeout=20_000)
    app.fill("#title", "After the password change")
    app.click("#new-note button")
    until(lambda: "After the password change" in note_titles(app), what="the app goes on")
    assert logins(server, me["id"])[-1] == "DID challenge"

    # The identity's key replaced: the server no longer knows this did:key.
    pointer_url = f"{couch.url}identities/{quote('did:' + me['did'], safe='')}"
    with urllib.request.urlopen(pointer_url) as r:
        pointer = json.load(r)
    request = urllib.request.Request(f"{pointer_url}?rev={pointer['_rev']}", method="DELETE")
    urllib.request.urlopen(request).close()
    agent.worker.evaluate("() => chrome.storage.session.clear()")
    app.reload()
    # The page learns it too: the SDK is logged out with the agent's reason.
    app.wait_for_function(
        "() => window.notesApp.vibe.lastError && window.notesApp.vibe.lastError.type",
        timeout=20_000,
    )
    error = app.evaluate(
        "() => ({...window.notesApp.vibe.lastError, message: "
        "window.notesApp.vibe.lastError.message})"
    )
    assert error["type"] == "key-rejected", error
    # The page is told what happened in general terms; who and where stay in the popup.
    assert "fix it in the vibe agent" in error["message"], error
    for private in (email, server.url, me["did"], "127.0.0.1"):
        assert private not in error["message"], error
    assert app.text_content("#status") == "Logged out"
    popup.reload()
    popup.wait_for_selector("li.identity .message.error")
    problem = popup.text_content("li.identity .message.error") or ""
    assert "no longer accepts this device's key" in problem and "add it again" in problem
    shot(popup, "agent-popup-key-rejected")


# -- what the security review found ---------------------------------------------------------


def _grants(server: VibedProcess, token: str) -> list[dict[str, Any]]:
    status, listed = server.call("GET", "/me/grants", token=token)
    assert status == 200, listed
    return list(listed["grants"])


def test_the_consent_window_cannot_be_keyjacked_or_clickjacked(
    agent: Agent, server: VibedProcess, attack_site: StaticSite
) -> None:
    """A page that asks for everything from a keydown (the person typing) opens nothing. From
    a click, the window opens with nothing focused and Allow off: Enter, Space and a click on
    Allow at once (the keystroke or click meant for the page) allow nothing. Allow comes on
    only after the window has been visible and focused for a moment, goes off again when it
    loses focus, and a held key's repeats do not press it. The page gets 'denied' when the
    person denies, and no grant exists."""
    email, first_party = server.signup()
    agent.add(server.url, email)
    page = agent.page(attack_site.origin + "/")
    page.wait_for_function("() => window.onloadResult !== undefined")
    opened: list[Any] = []
    agent.context.on("page", lambda p: opened.append(p))
    page.keyboard.press("a")
    page.wait_for_function("() => window.keyResults.length === 1")
    assert page.evaluate("() => window.keyResults[0]")["code"] == "needs-user-action"

    window = agent.consent(lambda: page.click("#wide"))
    # At once, as the window opens: the keys and the click the page hoped to redirect.
    window.keyboard.press("Enter")
    window.keyboard.press("Space")
    window.click("#allow", force=True, no_wait_after=True)
    assert not window.is_closed()
    assert window.evaluate("() => document.activeElement.id || document.activeElement.tagName") in (
        "BODY",
        "deny",
    )
    assert _grants(server, first_party) == []
    shot(window, "agent-consent-wide")
    window.wait_for_selector("#allow:not([disabled])")
    # Focus lost: Allow is off at once, and comes back only a while after focus returns.
    window.evaluate("() => window.dispatchEvent(new Event('blur'))")
    assert window.is_disabled("#allow")
    window.evaluate("() => window.dispatchEvent(new Event('focus'))")
    assert window.is_disabled("#allow")
    window.wait_for_selector("#allow:not([disabled])")
    # A key held down from before: its repeats are ignored, even on a focused Allow.
    window.keyboard.down("Enter")
    window.evaluate("() => document.getElementById('allow').focus()")
    window.keyboard.down("Enter")
    window.keyboard.up("Enter")
    time.sleep(0.5)
    assert not window.is_closed() and _grants(server, first_party) == []
    agent.decide(window, allow=False)
    assert page.evaluate("() => window.wide[0]")["code"] == "denied"
    assert len(opened) == 1 and _grants(server, first_party) == []
    assert agent.errors == []


def test_a_page_cannot_flood_the_person_or_probe_for_identities(
    agent: Agent, server: VibedProcess, attack_site: StaticSite
) -> None:
    """Without a click, asking about a server the person has an identity on and about one
    they do not gets the same answer. One click opens at most one window: asking again at
    once after a Deny opens nothing, and so does every later click while the site waits
    (longer after each Deny). The popup lists it, and Unblock lets it ask again; 'Block this
    site' keeps it out until unblocked. Error messages name neither the person's email nor
    their server."""
    email, first_party = server.signup()
    agent.add(server.url, email)
    page = agent.page(attack_site.origin + "/")
    page.wait_for_function("() => window.onloadResult !== undefined")
    here = page.evaluate("(s) => window.probe(s)", server.url)
    elsewhere = page.evaluate("(s) => window.probe(s)", "https://nobody.example")
    assert here == elsewhere and here["code"] == "needs-user-action", (here, elsewhere)

    opened: list[Any] = []
    agent.context.on("page", lambda p: opened.append(p))
    window = agent.consent(lambda: page.click("#flood"))
    agent.decide(window, allow=False)
    flood = page.evaluate("() => window.floods[0]")
    assert flood["code"] in ("denied", "needs-user-action"), flood
    page.click("#flood")
    assert page.evaluate("() => window.floods[1]")["code"] in ("denied", "needs-user-action")
    page.click("#wide")  # one connect() per click: the site waits after a Deny
    assert page.evaluate("() => window.wide[0]")["code"] == "denied"
    time.sleep(1)
    assert len(opened) == 1
    for outcome in page.evaluate("() => Promise.all([...window.floods, ...window.wide])"):
        assert "ok" not in outcome, outcome
        assert outcome["code"] in ("denied", "needs-user-action"), outcome
        assert email not in outcome["message"] and server.url not in outcome["message"]

    popup = agent.popup()
    popup.wait_for_selector("#blocked li")
    assert attack_site.origin in (popup.text_content("#blocked") or "")
    assert "You denied it" in (popup.text_content("#blocked") or "")
    shot(popup, "agent-popup-blocked")
    popup.click(f"button[aria-label='Unblock {attack_site.origin}']")
    popup.wait_for_selector("#blocked-section", state="hidden")

    window = agent.consent(lambda: page.click("#flood"))
    agent.decide(window, allow="block")
    assert page.evaluate("() => window.floods[2]")["code"] in ("denied", "needs-user-action")
    time.sleep(3.5)  # past the per-origin gap: still blocked
    page.click("#wide")
    assert page.evaluate("() => window.wide[1]")["code"] == "denied"
    consents = [p for p in opened if "/consent.html" in p.url]
    assert len(consents) == 2 and _grants(server, first_party) == []
    popup.reload()
    popup.wait_for_selector("#blocked li")
    assert "until you unblock it" in (popup.text_content("#blocked") or "")
    assert agent.errors == []


def test_a_page_cannot_reach_another_sites_grant_or_exist_on_plain_http(
    agent: Agent,
    server: VibedProcess,
    notes_site: StaticSite,
    attack_site: StaticSite,
    extension: Path,
) -> None:
    """The agent keeps nothing in chrome.storage.local (which content scripts can read and
    write): a compromised page that writes a site record pointing its own origin at the notes
    app's grant there gets no token. Plain-http pages that are not this machine get no
    window.vibe; no other extension or page may message the agent. "Forget on this device"
    ends the app sessions it held."""
    email, first_party = server.signup()
    agent.add(server.url, email)
    app = agent.page(f"{notes_site.origin}/?server={quote(server.url, safe='')}")
    app.wait_for_selector("#login:not([hidden])")
    window = agent.consent(lambda: app.click("#login"))
    agent.decide(window, allow=True)
    app.wait_for_selector("#app:not([hidden])", timeout=20_000)
    kept = agent.storage()
    state = kept["state"] or kept["local"]  # (0.1.0 kept it in storage.local)
    ref = state["identities"][0]["ref"]
    site = state["sites"][ref][notes_site.origin]
    agent.worker.evaluate(
        """async ([state, ref, site, attacker]) => {
          // Exactly what a content script may do: write chrome.storage.local.
          await chrome.storage.local.set({identities: state.identities, active: state.active,
            sites: {[ref]: {[attacker]: {...site, connected: true}}}});
        }""",
        [state, ref, site, attack_site.origin],
    )
    page = agent.page(attack_site.origin + "/")
    page.wait_for_function("() => window.onloadResult !== undefined")
    assert page.evaluate("() => window.vibe.getToken()") is None
    assert page.evaluate(
        "() => window.vibe.connect({scopes: ['data:write:notes'], prompt: 'none'})"
    ) == {"identity": None}

    plain = agent.page(f"http://plain.test:{attack_site.port}/")
    assert plain.evaluate("() => typeof window.vibe") == "undefined"
    manifest = json.loads((extension / "manifest.json").read_text())
    assert manifest["externally_connectable"] == {"ids": []}
    for matches in [c["matches"] for c in manifest["content_scripts"]] + [
        manifest["host_permissions"]
    ]:
        assert "http://*/*" not in matches and "<all_urls>" not in matches

    held = agent.storage()["session"][f"app {ref} {notes_site.origin}"]["accessToken"]
    assert server.call("GET", "/data/notes", token=held)[0] == 200
    popup = agent.popup()
    popup.on("dialog", lambda dialog: dialog.accept())
    popup.click("text=Forget on this device")
    popup.wait_for_selector("#identities-section", state="hidden")
    until(
        lambda: server.call("GET", "/data/notes", token=held)[0] == 401,
        what="the app session the agent held ends when it is forgotten",
    )
    assert agent.storage()["state"]["identities"] == []
