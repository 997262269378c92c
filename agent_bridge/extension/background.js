// The vibe agent's service worker: the only place that holds keys and tokens.
//
// Who may ask what (every message is judged by its sender, never by what it says):
// - the agent's own pages (popup.html, consent.html: sender.origin is this extension) manage
//   identities and decide consent requests;
// - content scripts relay a page's window.vibe calls (connect, getToken, disconnect);
//   the requesting origin is sender.origin, which the browser sets, never the page.
// No externally_connectable: no web page or other extension can message it directly.
//
// Kept: chrome.storage.local holds the identities (server, id, did, email), the sites each
// one approved (origin, grant id, scopes) and notices for the popup; IndexedDB holds one
// non-extractable Ed25519 CryptoKey per identity (lib/keys.js); chrome.storage.session
// (memory, gone with the browser, not readable by content scripts) holds access and app
// refresh tokens. The password and the seed are never stored. docs/agent.md has it all.

import { keyStore, sign, unwrapSigningKey } from "./lib/keys.js";
import { Server } from "./lib/server.js";
import {
  AgentError,
  cleanName,
  covers,
  describeScopes,
  normaliseScopes,
  normaliseServer,
  pageOriginAllowed,
} from "./lib/util.js";

const MARGIN = 60_000; // renew a token this long before it expires (ms)
const EXTENSION_ORIGIN = new URL(chrome.runtime.getURL("/")).origin;
const MAX_NOTICES = 20;

// -- stored state -------------------------------------------------------------------------

let queue = Promise.resolve();

/** Run ``change(state)`` alone (storage reads and writes of two messages never interleave). */
function update(change) {
  const run = queue.then(async () => {
    const state = await load();
    const result = await change(state);
    await chrome.storage.local.set(state);
    return result;
  });
  queue = run.catch(() => {});
  return run;
}

async function load() {
  const got = await chrome.storage.local.get(["identities", "active", "sites", "notices"]);
  return {
    identities: got.identities || [],
    active: got.active || null,
    sites: got.sites || {},
    notices: got.notices || [],
  };
}

function notice(state, text, kind = "info") {
  state.notices.unshift({ at: Date.now(), text, kind });
  state.notices.length = Math.min(state.notices.length, MAX_NOTICES);
}

const session = {
  get: async (name) => (await chrome.storage.session.get(name))[name] || null,
  set: (name, value) => chrome.storage.session.set({ [name]: value }),
  remove: (name) => chrome.storage.session.remove(name),
};
const appKey = (ref, origin) => `app ${ref} ${origin}`;
const firstPartyKey = (ref) => `fp ${ref}`;

function pageIdentity(identity) {
  return identity ? { id: identity.id, did: identity.did } : null;
}

// -- tokens ------------------------------------------------------------------------------

const inFlight = new Map();

/** One at a time per key: two tabs asking for a token share one refresh. */
function once(key, work) {
  if (!inFlight.has(key)) {
    inFlight.set(
      key,
      work().finally(() => inFlight.delete(key)),
    );
  }
  return inFlight.get(key);
}

/** A first-party token for ``identity``, always by DID challenge (the password is gone). */
function firstPartyToken(identity) {
  return once(firstPartyKey(identity.ref), async () => {
    const cached = await session.get(firstPartyKey(identity.ref));
    if (cached && cached.expiresAt - Date.now() > MARGIN) return cached.token;
    const key = await keyStore.get(identity.ref);
    if (!key) {
      throw new AgentError("no-key", `This device has no key for ${identity.email}; add the identity again.`);
    }
    let answer;
    try {
      answer = await new Server(identity.server).didLogin(identity.did, key, sign);
    } catch (error) {
      if (error.code === "key-rejected" || error.code === "wrong-audience") {
        await update((state) => {
          const found = state.identities.find((i) => i.ref === identity.ref);
          if (found) found.problem = error.message;
          notice(state, `${identity.email}: ${error.message}`, "error");
        });
      }
      throw error;
    }
    if (!answer || !answer.identity || answer.identity.id !== identity.id) {
      throw new AgentError("key-rejected", `${identity.server} logged this key in as another identity.`);
    }
    if (identity.problem) {
      await update((state) => {
        const found = state.identities.find((i) => i.ref === identity.ref);
        if (found) delete found.problem;
      });
    }
    await session.set(firstPartyKey(identity.ref), {
      token: answer.accessToken,
      expiresAt: answer.expiresAt * 1000,
    });
    return answer.accessToken;
  });
}

/**
 * ``call(token)`` with a first-party token; once more with a new one if the server refused
 * it (the person ended the agent's sessions, e.g. by changing the password elsewhere).
 */
async function asIdentity(identity, call) {
  try {
    return await call(await firstPartyToken(identity));
  } catch (error) {
    if (error.status !== 401) throw error;
    await session.remove(firstPartyKey(identity.ref));
    return call(await firstPartyToken(identity));
  }
}

function saveAppTokens(identity, origin, tokens) {
  return session.set(appKey(identity.ref, origin), {
    accessToken: tokens.access_token,
    refreshToken: tokens.refresh_token,
    expiresAt: Date.now() + tokens.expires_in * 1000,
  });
}

/**
 * The app token of ``origin`` (renewed before it expires), or null once its grant is gone.
 * ``force``: the server refused the token held (or closed the page's socket): renew it now,
 * which is also how the agent learns that the person revoked the grant.
 */
function appToken(identity, origin, site, { force = false } = {}) {
  return once(appKey(identity.ref, origin), async () => {
    const held = await session.get(appKey(identity.ref, origin));
    if (held && !force && held.expiresAt - Date.now() > MARGIN) return held.accessToken;
    const server = new Server(identity.server);
    let tokens = null;
    if (held && held.refreshToken) tokens = await server.refresh(origin, held.refreshToken);
    if (!tokens) {
      // No session here (the browser restarted) or it ended: a new one under the grant.
      const answer = await asIdentity(identity, (token) => server.grantTokens(token, site.grantId));
      tokens = answer && answer.tokens;
    }
    if (!tokens) {
      await revoked(identity, origin, site.grantId);
      return null;
    }
    await saveAppTokens(identity, origin, tokens);
    return tokens.access_token;
  });
}

/** The grant of ``origin`` is gone (revoked in the dashboard): forget it, tell its pages. */
async function revoked(identity, origin, grantId) {
  await session.remove(appKey(identity.ref, origin));
  await update((state) => {
    const sites = state.sites[identity.ref] || {};
    if (sites[origin] && sites[origin].grantId === grantId) {
      delete sites[origin];
      notice(state, `${origin} no longer has access to ${identity.email} (it was revoked). It will ask again next time.`, "warn");
    }
  });
  await tellPages(origin, { event: "disconnect", data: { reason: "revoked" } });
}

async function tellPages(origin, message) {
  let tabs = [];
  try {
    tabs = await chrome.tabs.query({});
  } catch {
    return;
  }
  for (const tab of tabs) {
    let tabOrigin = null;
    try {
      tabOrigin = new URL(tab.url || "").origin;
    } catch {
      continue;
    }
    if (tabOrigin === origin) {
      chrome.tabs.sendMessage(tab.id, { kind: "page-event", ...message }, { frameId: 0 }).catch(() => {});
    }
  }
}

// -- identities -------------------------------------------------------------------------------

/** Log in with the password once, fetch and unwrap the key, prove it by DID login, keep it. */
async function addIdentity({ server, email, password }) {
  const base = normaliseServer(server);
  if (typeof email !== "string" || !email.trim()) throw new AgentError("bad-request", "Enter your email address.");
  if (typeof password !== "string" || !password) throw new AgentError("bad-request", "Enter your password.");
  const api = new Server(base);
  const login = await api.login(email.trim(), password);
  const answer = await api.key(login.accessToken);
  if (!answer || answer.did !== login.identity.did) {
    throw new AgentError("key-mismatch", `The key ${base} sent is not this identity's did:key; nothing was stored.`);
  }
  const key = await unwrapSigningKey(password, answer);
  // From here on only the key: the first DID login proves the server takes it.
  const proof = await api.didLogin(login.identity.did, key, sign);
  if (!proof.identity || proof.identity.id !== login.identity.id) {
    throw new AgentError("key-mismatch", `${base} logged this key in as another identity; nothing was stored.`);
  }
  const identity = await update(async (state) => {
    let found = state.identities.find((i) => i.server === base && i.id === login.identity.id);
    if (!found) {
      found = { ref: crypto.randomUUID(), server: base, id: login.identity.id, addedAt: Date.now() };
      state.identities.push(found);
    }
    Object.assign(found, { did: login.identity.did, email: login.identity.email || email.trim() });
    delete found.problem;
    await keyStore.put(found.ref, key);
    state.active = found.ref;
    notice(state, `Added ${found.email} on ${base}. Your password was not kept: the key proves who you are.`);
    return found;
  });
  await session.set(firstPartyKey(identity.ref), {
    token: proof.accessToken,
    expiresAt: proof.expiresAt * 1000,
  });
  return publicIdentity(identity);
}

function publicIdentity(identity) {
  const { ref, server, id, did, email, problem = null } = identity;
  return { ref, server, id, did, email, problem };
}

async function forget(ref) {
  const state = await load();
  const identity = state.identities.find((i) => i.ref === ref);
  if (!identity) throw new AgentError("bad-request", "No such identity on this device.");
  const sites = Object.keys(state.sites[ref] || {});
  for (const origin of sites) {
    const held = await session.get(appKey(ref, origin));
    if (held && held.refreshToken) await new Server(identity.server).revoke(origin, held.refreshToken);
    await session.remove(appKey(ref, origin));
  }
  await session.remove(firstPartyKey(ref));
  await keyStore.delete(ref);
  await update((s) => {
    s.identities = s.identities.filter((i) => i.ref !== ref);
    delete s.sites[ref];
    if (s.active === ref) s.active = s.identities.length ? s.identities[0].ref : null;
    notice(s, `Forgot ${identity.email} on ${identity.server}: its key is gone from this device.`);
  });
  for (const origin of sites) await tellPages(origin, { event: "disconnect", data: { reason: "forgotten" } });
}

/** Remove a site's access: its grant is revoked on the server (as from the dashboard). */
async function removeSite(ref, origin) {
  const state = await load();
  const identity = state.identities.find((i) => i.ref === ref);
  const site = identity && (state.sites[ref] || {})[origin];
  if (!site) throw new AgentError("bad-request", "No such site.");
  const server = new Server(identity.server);
  await asIdentity(identity, (token) =>
    server.call("DELETE", `/me/grants/${encodeURIComponent(site.grantId)}`, { token }),
  ).catch((error) => {
    if (error.status !== 404) throw error;
  });
  await session.remove(appKey(ref, origin));
  await update((s) => {
    delete (s.sites[ref] || {})[origin];
    notice(s, `${origin} no longer has access to ${identity.email}.`);
  });
  await tellPages(origin, { event: "disconnect", data: { reason: "revoked" } });
}

// -- consent ----------------------------------------------------------------------------------

const pending = new Map(); // request id -> {origin, scopes, name, identity, windowId, settle}

function openConsent(request) {
  return new Promise((resolve, reject) => {
    const id = crypto.randomUUID();
    request.settle = (allow) => {
      pending.delete(id);
      if (request.windowId !== undefined) chrome.windows.remove(request.windowId).catch(() => {});
      if (allow) resolve();
      else reject(new AgentError("denied", "The person did not allow this site."));
    };
    pending.set(id, request);
    chrome.windows
      .create({ url: chrome.runtime.getURL(`consent.html#${id}`), type: "popup", width: 460, height: 640, focused: true })
      .then((win) => {
        request.windowId = win.id;
        if (!pending.has(id)) chrome.windows.remove(win.id).catch(() => {});
      })
      .catch(() => request.settle(false));
  });
}

chrome.windows.onRemoved.addListener((windowId) => {
  for (const request of pending.values()) if (request.windowId === windowId) request.settle(false);
});

// The consent window keeps a port open (and pings it) so this worker stays alive meanwhile.
chrome.runtime.onConnect.addListener((port) => {
  if (port.sender?.origin !== EXTENSION_ORIGIN || port.name !== "consent") return port.disconnect();
  port.onMessage.addListener(() => {});
});

// -- page calls (window.vibe, through the content script) -----------------------------------

function pickIdentity(state, server) {
  const candidates = server ? state.identities.filter((i) => i.server === server) : state.identities;
  return candidates.find((i) => i.ref === state.active) || candidates[0] || null;
}

function connectedIdentity(state, origin) {
  const active = state.identities.find((i) => i.ref === state.active);
  const order = active ? [active, ...state.identities.filter((i) => i !== active)] : state.identities;
  for (const identity of order) {
    const site = (state.sites[identity.ref] || {})[origin];
    if (site && site.connected) return { identity, site };
  }
  return null;
}

const page = {
  async connect(origin, payload, activation) {
    const options = payload && typeof payload === "object" ? payload : {};
    const scopes = normaliseScopes(options.scopes);
    let server = null;
    if (options.server != null) {
      try {
        server = normaliseServer(options.server);
      } catch {
        throw new AgentError("bad-request", "'server' must be the address of a Vibe Cloud server.");
      }
    }
    const silent = options.prompt === "none";
    const state = await load();
    const identity = pickIdentity(state, server);
    // Silently, an unknown site learns nothing (not even whether an identity is here).
    if (!identity && silent) return { identity: null };
    if (!identity) {
      throw new AgentError(
        "no-identity",
        server ? `The vibe agent holds no identity on ${server}.` : "Add an identity in the vibe agent first.",
      );
    }
    const site = (state.sites[identity.ref] || {})[origin];
    if (site && covers(site.scopes, scopes) && (site.connected || !silent)) {
      const token = await appToken(identity, origin, site);
      if (token) {
        if (!site.connected) {
          await update((s) => {
            const kept = (s.sites[identity.ref] || {})[origin];
            if (kept) kept.connected = true;
          });
        }
        return { identity: pageIdentity(identity) };
      }
    }
    if (silent) return { identity: null };
    if (!activation) {
      throw new AgentError(
        "needs-user-action",
        "The vibe agent asks the person only after a click: call connect() from a click handler.",
      );
    }
    for (const request of pending.values()) {
      if (request.origin === origin) throw new AgentError("busy", "The vibe agent is already asking about this site.");
    }
    const name = cleanName(options.appName);
    await openConsent({ origin, scopes, name, identity });
    const minted = await asIdentity(identity, (token) =>
      new Server(identity.server).mintGrant(token, origin, scopes, name),
    );
    const previous = await session.get(appKey(identity.ref, origin));
    if (previous && previous.refreshToken) await new Server(identity.server).revoke(origin, previous.refreshToken);
    await saveAppTokens(identity, origin, minted.tokens);
    await update((s) => {
      s.sites[identity.ref] = s.sites[identity.ref] || {};
      s.sites[identity.ref][origin] = {
        grantId: minted.grant.id,
        scopes: minted.grant.scopes,
        name,
        connected: true,
        approvedAt: Date.now(),
      };
      notice(s, `${origin} may now ${describeScopes(minted.grant.scopes).map(([t, c]) => (c ? `${t.toLowerCase()} ${c}` : t.toLowerCase())).join(", ")}.`);
    });
    return { identity: pageIdentity(identity) };
  },

  async getToken(origin, payload) {
    const found = connectedIdentity(await load(), origin);
    if (!found) return null;
    const force = Boolean(payload && payload.force);
    return appToken(found.identity, origin, found.site, { force });
  },

  async disconnect(origin) {
    const found = connectedIdentity(await load(), origin);
    if (!found) return null;
    const held = await session.get(appKey(found.identity.ref, origin));
    await session.remove(appKey(found.identity.ref, origin));
    await update((s) => {
      const site = (s.sites[found.identity.ref] || {})[origin];
      if (site) site.connected = false;
    });
    if (held && held.refreshToken) await new Server(found.identity.server).revoke(origin, held.refreshToken);
    return null;
  },
};

// -- the agent's own pages --------------------------------------------------------------------

const own = {
  async state() {
    const state = await load();
    return {
      identities: state.identities.map(publicIdentity),
      active: state.active,
      sites: Object.fromEntries(
        Object.entries(state.sites).map(([ref, sites]) => [
          ref,
          Object.entries(sites).map(([origin, site]) => ({ origin, scopes: site.scopes, name: site.name, connected: site.connected })),
        ]),
      ),
      notices: state.notices,
    };
  },
  add: (message) => addIdentity(message),
  async activate({ ref }) {
    await update((state) => {
      if (!state.identities.some((i) => i.ref === ref)) throw new AgentError("bad-request", "No such identity.");
      state.active = ref;
    });
    return null;
  },
  forget: ({ ref }) => forget(ref),
  removeSite: ({ ref, origin }) => removeSite(ref, origin),
  async clearNotices() {
    await update((state) => {
      state.notices = [];
    });
    return null;
  },
  async consent({ id }) {
    const request = pending.get(id);
    if (!request) throw new AgentError("expired", "This request is no longer open: go back to the page and try again.");
    return {
      origin: request.origin,
      name: request.name,
      scopes: describeScopes(request.scopes),
      identity: publicIdentity(request.identity),
    };
  },
  async decide({ id, allow }) {
    const request = pending.get(id);
    if (!request) throw new AgentError("expired", "This request is no longer open: go back to the page and try again.");
    request.settle(allow === true);
    return null;
  },
};

// -- messages ---------------------------------------------------------------------------------

function answer(promise, sendResponse) {
  promise.then(
    (result) => sendResponse({ result: result === undefined ? null : result }),
    (error) => {
      if (!(error instanceof AgentError)) console.error("vibe agent:", error);
      sendResponse({
        error:
          error instanceof AgentError
            ? error.toJSON()
            : { code: "agent-error", message: "The vibe agent failed unexpectedly; try again." },
      });
    },
  );
  return true; // the answer comes later
}

chrome.runtime.onMessage.addListener((message, sender, sendResponse) => {
  if (sender.id !== chrome.runtime.id || !message || typeof message !== "object") return false;
  if (sender.origin === EXTENSION_ORIGIN && (sender.url || "").startsWith(EXTENSION_ORIGIN + "/")) {
    const handler = Object.hasOwn(own, message.type) ? own[message.type] : null;
    if (!handler) return answer(Promise.reject(new AgentError("bad-request", "Unknown request.")), sendResponse);
    return answer(Promise.resolve().then(() => handler(message)), sendResponse);
  }
  // Anything else comes from a content script, that is, from a web page.
  const origin = sender.origin;
  if (message.kind !== "page" || !sender.tab || sender.frameId !== 0) return false;
  if (!pageOriginAllowed(origin)) {
    return answer(
      Promise.reject(new AgentError("insecure-origin", "The vibe agent serves https pages (and http on localhost) only.")),
      sendResponse,
    );
  }
  const handler = Object.hasOwn(page, message.type) ? page[message.type] : null;
  if (!handler) return answer(Promise.reject(new AgentError("bad-request", "The vibe agent has no such call.")), sendResponse);
  return answer(
    Promise.resolve().then(() => handler(origin, message.payload, message.activation === true)),
    sendResponse,
  );
});
