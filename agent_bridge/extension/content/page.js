// window.vibe: the vibe agent's API for web pages (runs in the page's own world, MAIN).
//
// It holds nothing secret: every call goes, through the agent's isolated content script
// (bridge.js), to the agent's service worker, which learns the page's origin from the
// browser. Pages get app tokens for their own origin and never the key (docs/agent.md).
(() => {
  "use strict";
  if (window.top !== window || "vibe" in window) return;
  const CHANNEL = "vibe-agent";
  const origin = location.origin;
  const post = window.postMessage.bind(window);
  const pending = new Map();
  const listeners = new Map();
  let identity = null;
  let counter = 0;

  function agentError(error) {
    const e = new Error((error && error.message) || "The vibe agent failed.");
    e.name = "VibeAgentError";
    e.code = (error && error.code) || "agent-error";
    return e;
  }

  function call(type, payload) {
    return new Promise((resolve, reject) => {
      counter += 1;
      const id = `${counter}.${Math.random().toString(36).slice(2)}`;
      pending.set(id, { resolve, reject });
      post({ channel: CHANNEL, dir: "to-agent", id, type, payload }, origin);
    });
  }

  function emit(event, ...args) {
    for (const listener of [...(listeners.get(event) || [])]) {
      try {
        listener(...args);
      } catch (error) {
        console.error(`vibe agent: a ${event} listener failed`, error);
      }
    }
  }

  window.addEventListener("message", (event) => {
    if (event.source !== window || event.origin !== origin) return;
    const message = event.data;
    if (!message || message.channel !== CHANNEL || message.dir !== "to-page") return;
    if (message.event === "disconnect") {
      identity = null;
      emit("disconnect", { reason: (message.data && message.data.reason) || "disconnected" });
      return;
    }
    const waiting = pending.get(message.id);
    if (!waiting) return;
    pending.delete(message.id);
    if (message.error) waiting.reject(agentError(message.error));
    else waiting.resolve(message.result);
  });

  const api = {
    /** The identity this page is connected to ({id, did}), or null. */
    get identity() {
      return identity;
    },
    /**
     * Ask for access: {scopes, appName?, server?, prompt?}. Resolves {identity}; with
     * prompt "none", identity null instead of asking. The agent's own window asks the
     * person, and only after a click on the page.
     */
    async connect(options = {}) {
      const scopes = Array.isArray(options.scopes) ? options.scopes.map(String) : options.scopes;
      const result = await call("connect", {
        scopes,
        appName: typeof options.appName === "string" ? options.appName : null,
        server: typeof options.server === "string" ? options.server : null,
        prompt: options.prompt === "none" ? "none" : null,
      });
      const before = identity;
      identity = (result && result.identity) || null;
      if (identity && (!before || before.id !== identity.id)) emit("identity", identity);
      return { identity };
    },
    /**
     * An access token for this page's app session (renewed by the agent before it expires),
     * or null when not connected. {force: true}: renew now (the server refused the last one);
     * null, and a "disconnect" event, when the person revoked the access.
     */
    getToken(options = {}) {
      return call("getToken", { force: Boolean(options && options.force) });
    },
    /** End this page's app session; the person's approval stays (connect() comes back silently). */
    async disconnect() {
      await call("disconnect", {});
      identity = null;
    },
    /** "identity" (identity) or "disconnect" ({reason}: "revoked", "forgotten"); returns an unsubscribe function. */
    on(event, listener) {
      if (!listeners.has(event)) listeners.set(event, new Set());
      listeners.get(event).add(listener);
      return () => listeners.get(event).delete(listener);
    },
    off(event, listener) {
      listeners.get(event)?.delete(listener);
    },
  };
  Object.defineProperty(window, "vibe", { value: Object.freeze(api), enumerable: true });
})();
