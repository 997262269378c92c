// The vibe agent's relay between window.vibe (page.js, in the page's world) and the
// service worker. It runs in the extension's isolated world: the page cannot change it.
// It forwards only the page API's calls, adds whether the person just clicked (user
// activation, which the page cannot fake), and nothing else: the service worker takes the
// origin from the browser (sender.origin), not from anything here.
//
// "Just clicked" means a trusted click (a mouse click, or Enter/Space on a button) within the
// page's transient activation, and each click counts for one connect() only: a keydown
// anywhere on the page (a person typing) opens nothing, and a page cannot reopen the
// consent window from the same click after the person closed or denied it.
(() => {
  "use strict";
  const CHANNEL = "vibe-agent";
  const CALLS = new Set(["connect", "getToken", "disconnect"]);
  const CLICK_WINDOW = 5000; // ms: Chrome's transient activation lasts about this long

  let lastClick = -Infinity;
  let clickSpent = true;
  window.addEventListener(
    "click",
    (event) => {
      if (!event.isTrusted) return;
      lastClick = performance.now();
      clickSpent = false;
    },
    true,
  );

  /** Whether this call may ask the person: a fresh click, which it then spends. */
  function spendClick(type, payload) {
    if (type !== "connect" || (payload && payload.prompt === "none")) return false;
    const fresh =
      Boolean(navigator.userActivation && navigator.userActivation.isActive) &&
      !clickSpent &&
      performance.now() - lastClick < CLICK_WINDOW;
    if (fresh) clickSpent = true;
    return fresh;
  }

  function reply(id, body) {
    window.postMessage({ channel: CHANNEL, dir: "to-page", id, ...body }, location.origin);
  }

  window.addEventListener("message", (event) => {
    if (event.source !== window) return;
    const message = event.data;
    if (!message || typeof message !== "object" || message.channel !== CHANNEL || message.dir !== "to-agent") return;
    const { id, type, payload } = message;
    if (typeof id !== "string" || id.length > 100) return;
    if (!CALLS.has(type)) {
      reply(id, { error: { code: "bad-request", message: "The vibe agent has no such call." } });
      return;
    }
    const activation = spendClick(type, payload);
    chrome.runtime.sendMessage({ kind: "page", type, payload, activation }).then(
      (answer) => reply(id, answer || { error: { code: "agent-error", message: "The vibe agent did not answer." } }),
      () => reply(id, { error: { code: "agent-unavailable", message: "The vibe agent was updated or restarted; reload the page." } }),
    );
  });

  chrome.runtime.onMessage.addListener((message, sender) => {
    if (sender.id !== chrome.runtime.id || sender.tab || !message || message.kind !== "page-event") return;
    window.postMessage({ channel: CHANNEL, dir: "to-page", event: message.event, data: message.data }, location.origin);
  });
})();
