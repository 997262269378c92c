// The vibe agent's popup: add an identity (server, email, password), choose the active one,
// forget one on this device, see and remove the sites each one allowed. All the work is the
// service worker's; this page only asks it. textContent only: nothing here is markup.

const $ = (id) => document.getElementById(id);

async function ask(type, fields = {}) {
  const answer = await chrome.runtime.sendMessage({ type, ...fields });
  if (!answer) throw Object.assign(new Error("The vibe agent did not answer."), { code: "agent-error" });
  if (answer.error) throw Object.assign(new Error(answer.error.message), { code: answer.error.code });
  return answer.result;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node[name] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function say(text, kind = "info") {
  $("messages").replaceChildren(el("p", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status", textContent: text }));
}

async function act(button, work) {
  button.disabled = true;
  try {
    await work();
  } catch (error) {
    say(error.message, "error");
  } finally {
    button.disabled = false;
    await render();
  }
}

async function render() {
  const state = await ask("state");
  const active = state.identities.find((i) => i.ref === state.active) || null;
  $("identities-section").hidden = state.identities.length === 0;
  $("identities").replaceChildren(
    ...state.identities.map((identity) => {
      const isActive = identity.ref === state.active;
      const use = el("button", { type: "button", textContent: "Use this one", hidden: isActive });
      use.addEventListener("click", () => act(use, () => ask("activate", { ref: identity.ref })));
      const forget = el("button", { type: "button", class: "danger", textContent: "Forget on this device" });
      forget.addEventListener("click", () => {
        if (!confirm(`Remove the key of ${identity.email} from this device? You can add it again with your password.`)) return;
        act(forget, async () => {
          await ask("forget", { ref: identity.ref });
          say(`${identity.email}: forgotten on this device.`);
        });
      });
      return el(
        "li",
        { class: isActive ? "active identity" : "identity" },
        el("div", { class: "row" }, el("strong", { textContent: identity.email }), isActive ? el("span", { class: "badge", textContent: "active" }) : null),
        el("p", { class: "muted small", textContent: identity.server }),
        el("p", { class: "mono", textContent: identity.did, title: "This identity's did:key" }),
        identity.problem ? el("p", { class: "message error", role: "alert", textContent: identity.problem }) : null,
        el("div", { class: "row" }, use, forget),
      );
    }),
  );
  const sites = active ? state.sites[active.ref] || [] : [];
  $("sites-section").hidden = !active;
  $("sites-who").textContent = active ? active.email : "";
  $("sites").replaceChildren(
    ...(sites.length
      ? sites.map((site) => {
          const remove = el("button", { type: "button", class: "danger", textContent: "Remove access" });
          remove.addEventListener("click", () => act(remove, () => ask("removeSite", { ref: active.ref, origin: site.origin })));
          return el(
            "li",
            { class: "site" },
            el("strong", { textContent: site.origin }),
            site.name ? el("span", { class: "muted small", textContent: ` calls itself “${site.name}”` }) : null,
            el("p", { class: "mono", textContent: site.scopes.join(" ") }),
            el("p", { class: "muted small", textContent: site.connected ? "Connected" : "Allowed, not connected now" }),
            el("div", { class: "row" }, remove),
          );
        })
      : [el("li", { class: "muted", textContent: "No site has asked yet." })]),
  );
  $("blocked-section").hidden = state.blocked.length === 0;
  $("blocked").replaceChildren(
    ...state.blocked.map((block) => {
      const unblock = el("button", { type: "button", textContent: "Unblock" });
      unblock.setAttribute("aria-label", `Unblock ${block.origin}`);
      unblock.addEventListener("click", () =>
        act(unblock, async () => {
          await ask("unblock", { origin: block.origin });
          say(`${block.origin} may ask again.`);
        }),
      );
      const until =
        block.until === null
          ? "Blocked until you unblock it."
          : `You denied it; it may ask again after ${new Date(block.until).toLocaleTimeString()}.`;
      return el(
        "li",
        { class: "site blocked" },
        el("strong", { textContent: block.origin }),
        el("span", { class: "muted small until", textContent: until }),
        el("div", { class: "row" }, unblock),
      );
    }),
  );
  $("notices-section").hidden = state.notices.length === 0;
  $("notices").replaceChildren(
    ...state.notices.map((n) => el("li", { class: `notice ${n.kind}`, textContent: n.text })),
  );
}

$("add").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const button = form.querySelector("button[type=submit]");
  const fields = Object.fromEntries(new FormData(form));
  $("progress").textContent = "Logging in and unlocking your key on this device…";
  act(button, async () => {
    try {
      const identity = await ask("add", fields);
      form.reset();
      say(`Added ${identity.email}. From now on this device proves it is you with its key.`);
    } finally {
      form.elements.password.value = "";
      $("progress").textContent = "";
    }
  });
});

$("clear-notices").addEventListener("click", (event) => act(event.currentTarget, () => ask("clearNotices")));

// Live: a site revoked, approved or blocked meanwhile shows at once (the service worker bumps
// stateVersion in storage.session, which only the extension's own pages can see).
chrome.storage.onChanged.addListener((changes, area) => {
  if (area === "session" && changes.stateVersion) render().catch(() => {});
});

render().catch((error) => say(error.message, "error"));
