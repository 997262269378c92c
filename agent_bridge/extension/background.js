// The vibe agent's service worker: the only place that holds keys and tokens.
//
// Who may ask what (every message is judged by its sender, never by what it says):
// - the agent's own pages (popup.html, consent.html: sender.origin is this extension) manage
//   identities and decide consent requests;
// - content scripts relay a page's window.vibe calls (connect, getToken, disconnect);
//   the requesting origin is sender.origin, which the browser sets, never the page.
// externally_connectable lists no extension and no page: nothing outside can message it.
//
// Kept: the extension's IndexedDB (its own origin: no content script or page can open it)
// holds one non-extractable Ed25519 CryptoKey per identity and the agent's state: the
// identities (server, id, did, email), the sites each one approved (origin, grant id,
// scopes), the origins blocked and notices for the popup (lib/keys.js). chrome.storage.session
// (memory, gone with the browser, trusted contexts only) holds access and app refresh tokens
// and a counter the popup watches. chrome.storage.local holds nothing: content scripts can
// read and write it. The password and the seed are never stored. docs/agent.md has it all.

import { keyStore, sign, stateStore, unwrapSigningKey } from "./lib/keys.js";
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
/** After the n-th Deny (or a window closed unanswered) in a row, the origin waits this long. */
const COOLDOWNS = [60_000, 10 * 60_000, 60 * 60_000, 24 * 60 * 60_000];
/** At most one consent window per origin this often, whatever the page claims (ms). */
const PROMPT_GAP = 3_000;
/** An Allow sooner than this after the window opened is not a person's (consent.js waits too). */
const ALLOW_DELAY = 750;

// Trusted contexts only (the default for session storage; said explicitly).
chrome.storage.session.setAccessLevel?.({ accessLevel: "TRUSTED_CONTEXTS" }).catch(() => {});

// -- stored state -------------------------------------------------------------------------

let queue = Promise.resolve();

/** Run ``change(state)`` alone (storage reads and writes of two messages never interleave). */
function update(change) {
  const run = queue.then(async () => {
    const state = await load();
    const result = await change(state);
    await stateStore.put(state);
    // The popup re-renders on this (storage.session: trusted contexts only).
    await chrome.storage.session.set({ stateVersion: Date.now() + Math.random() });
    return result;
  });
  queue = run.catch(() => {});
  return run;
}

let migrated = Promise.resolve();

// Once, on an update from 0.1.0 (which kept its state in storage.local): move it where pages
// cannot reach. storage.local is emptied on every install or update and never read otherwise
// (a compromised page could have written anything there).
chrome.runtime.onInstalled.addListener(({ reason }) => {
  migrated = (async () => {
    const old = reason === "update" ? await chrome.storage.local.get(null) : {};
    if (old && Array.isArray(old.identities) && !(await stateStore.get())) {
      const { identities, active = null, sites = {}, notices = [] } = old;
      await stateStore.put({ identities, active, sites, notices, blocked: {} });
    }
    await chrome.storage.local.clear();
  })().catch((error) => console.error("vibe agent: moving the state failed", error));
});

async function load() {
  await migrated;
  const got = (await stateStore.get()) || {};
  return {
    identities: got.identities || [],
    active: got.active || null,
    sites: got.sites || {},
    blocked: got.blocked || {},
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
      const answer = await asIdentity(identity, (token) =>
        server.grantTokens(token, site.grantId, origin, site.scopes),
      );
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
  let key;
  let proof;
  try {
    const answer = await api.key(login.accessToken);
    if (!answer || answer.did !== login.identity.did) {
      throw new AgentError("key-mismatch", `The key ${base} sent is not this identity's did:key; nothing was stored.`);
    }
    key = await unwrapSigningKey(password, answer);
    // From here on only the key: the first DID login proves the server takes it.
    proof = await api.didLogin(login.identity.did, key, sign);
  } finally {
    // The password login's session is not needed (the key is): end it, whatever happened,
    // so that it is not left among the person's sessions for 30 days.
    await api.logout(login.accessToken);
  }
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

const pending = new Map(); // request id -> {origin, scopes, name, identity, windowId, openedAt, settle}
const lastPrompt = new Map(); // origin -> when its last consent window opened (ms)

/** Open the consent window; resolves "allow", "deny", "block" or "dismissed" (closed). */
function openConsent(request) {
  return new Promise((resolve) => {
    const id = crypto.randomUUID();
    request.openedAt = Date.now();
    request.settle = (decision) => {
      if (!pending.has(id)) return;
      pending.delete(id);
      if (request.windowId !== undefined) chrome.windows.remove(request.windowId).catch(() => {});
      resolve(decision);
    };
    pending.set(id, request);
    chrome.windows
      .create({ url: chrome.runtime.getURL(`consent.html#${id}`), type: "popup", width: 460, height: 660, focused: true })
      .then((win) => {
        request.windowId = win.id;
        if (!pending.has(id)) chrome.windows.remove(win.id).catch(() => {});
      })
      .catch(() => request.settle("dismissed"));
  });
}

chrome.windows.onRemoved.addListener((windowId) => {
  for (const request of pending.values()) if (request.windowId === windowId) request.settle("dismissed");
});

// The consent window keeps a port open (and pings it) so this worker stays alive meanwhile.
chrome.runtime.onConnect.addListener((port) => {
  if (port.sender?.origin !== EXTENSION_ORIGIN || port.name !== "consent") return port.disconnect();
  port.onMessage.addListener(() => {});
});

/** The block of ``origin`` still in force ({until: ms | null for "until unblocked"}), or null. */
function blockOf(state, origin) {
  const block = state.blocked[origin];
  if (!block) return null;
  if (block.until === null || block.until > Date.now()) return block;
  return null;
}

/** Record a Deny (or a window closed unanswered): the origin waits longer each time. */
function denied(state, origin, decision) {
  const previous = state.blocked[origin] || { denials: 0 };
  if (decision === "block") {
    state.blocked[origin] = { until: null, denials: previous.denials, at: Date.now() };
    notice(state, `${origin} is blocked: it cannot ask again until you unblock it here.`, "warn");
    return;
  }
  const denials = previous.denials + 1;
  const wait = COOLDOWNS[Math.min(denials, COOLDOWNS.length) - 1];
  state.blocked[origin] = { until: Date.now() + wait, denials, at: Date.now() };
}

function deniedError() {
  return new AgentError("denied", "The person did not allow this site.");
}

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
    const site = identity && (state.sites[identity.ref] || {})[origin];
    if (site && covers(site.scopes, scopes) && (site.connected || !silent)) {
      // Approved before (this origin already knows the identity): no window.
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
    // Whether an identity is here on that server is said only after a click: silently, and
    // without a click, every page gets the same answer whatever the agent holds.
    if (silent) return { identity: null };
    if (!activation) {
      throw new AgentError(
        "needs-user-action",
        "The vibe agent asks the person only after a click: call connect() from a click handler.",
      );
    }
    if (!identity) throw new AgentError("no-identity", "The vibe agent holds no identity for this server.");
    if (blockOf(state, origin)) throw deniedError();
    for (const request of pending.values()) {
      if (request.origin === origin) throw new AgentError("busy", "The vibe agent is already asking about this site.");
    }
    // One window per gesture (content/bridge.js spends the click), and per origin at most
    // one every PROMPT_GAP even if a compromised page claims clicks it did not get.
    if (Date.now() - (lastPrompt.get(origin) || 0) < PROMPT_GAP) {
      throw new AgentError("busy", "The vibe agent just asked about this site; wait a moment.");
    }
    lastPrompt.set(origin, Date.now());
    const name = cleanName(options.appName);
    const decision = await openConsent({ origin, scopes, name, identity });
    lastPrompt.set(origin, Date.now());
    if (decision !== "allow") {
      await update((s) => denied(s, origin, decision));
      throw deniedError();
    }
    const minted = await asIdentity(identity, (token) =>
      new Server(identity.server).mintGrant(token, origin, scopes, name),
    );
    if (!minted || !minted.grant || minted.grant.origin !== origin) {
      throw new AgentError("server-refused", `${identity.server} answered for another site than ${origin}.`);
    }
    const previous = await session.get(appKey(identity.ref, origin));
    if (previous && previous.refreshToken) await new Server(identity.server).revoke(origin, previous.refreshToken);
    await saveAppTokens(identity, origin, minted.tokens);
    // What the tokens carry: the scopes asked (and shown), even when a wider grant was reused.
    const carried = String(minted.tokens.scope || "").split(" ").filter(Boolean);
    await update((s) => {
      delete s.blocked[origin];
      s.sites[identity.ref] = s.sites[identity.ref] || {};
      s.sites[identity.ref][origin] = {
        grantId: minted.grant.id,
        scopes: carried.length ? carried : scopes,
        name,
        connected: true,
        approvedAt: Date.now(),
      };
      notice(s, `${origin} may now ${describeScopes(carried.length ? carried : scopes).map(([t, c]) => (c ? `${t.toLowerCase()} ${c}` : t.toLowerCase())).join(", ")}.`);
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

// What a page is told when a call fails: the code, and a sentence that names no email, server
// or anything else of the person's (the details go to the popup's notices).
const PAGE_SAFE = new Set(["bad-request", "insecure-origin", "needs-user-action", "busy", "denied", "no-identity"]);
const PAGE_MESSAGES = {
  unreachable: "The vibe agent cannot reach the server right now; try again later.",
  unavailable: "The server cannot serve this right now; try again in a moment.",
  "too-many-requests": "Too many requests for now; try again later.",
  "key-rejected": "The vibe agent can no longer prove who the person is to this server; the person can fix it in the vibe agent.",
  "wrong-audience": "The vibe agent can no longer prove who the person is to this server; the person can fix it in the vibe agent.",
  "no-key": "The vibe agent can no longer prove who the person is to this server; the person can fix it in the vibe agent.",
};
const PAGE_GENERIC = "The vibe agent could not do this; the person can see why in the vibe agent.";

async function pageError(origin, error) {
  if (!(error instanceof AgentError)) {
    console.error("vibe agent:", error);
    return { code: "agent-error", message: PAGE_GENERIC };
  }
  if (PAGE_SAFE.has(error.code)) return error.toJSON();
  // The person sees the details (key-rejected and friends already noted theirs).
  if (!["key-rejected", "wrong-audience"].includes(error.code)) {
    const text = `${origin}: ${error.message}`;
    await update((state) => {
      if (!state.notices.length || state.notices[0].text !== text) notice(state, text, "error");
    }).catch(() => {});
  }
  return { code: error.code, message: PAGE_MESSAGES[error.code] || PAGE_GENERIC };
}

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
      blocked: Object.entries(state.blocked)
        .filter(([origin]) => blockOf(state, origin))
        .map(([origin, block]) => ({ origin, until: block.until })),
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
  async unblock({ origin }) {
    await update((state) => {
      if (!state.blocked[origin]) throw new AgentError("bad-request", "This site is not blocked.");
      delete state.blocked[origin];
      lastPrompt.delete(origin);
      notice(state, `${origin} may ask again.`);
    });
    return null;
  },
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
  async decide({ id, decision }) {
    const request = pending.get(id);
    if (!request) throw new AgentError("expired", "This request is no longer open: go back to the page and try again.");
    if (!["allow", "deny", "block"].includes(decision)) throw new AgentError("bad-request", "Allow, deny or block.");
    if (decision === "allow" && Date.now() - request.openedAt < ALLOW_DELAY) {
      throw new AgentError("too-soon", "Read the request first, then choose.");
    }
    request.settle(decision);
    return null;
  },
};

// -- messages ---------------------------------------------------------------------------------

function answer(promise, sendResponse, origin = null) {
  promise.then(
    (result) => sendResponse({ result: result === undefined ? null : result }),
    async (error) => {
      if (origin !== null) {
        sendResponse({ error: await pageError(origin, error) });
        return;
      }
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
      origin,
    );
  }
  const handler = Object.hasOwn(page, message.type) ? page[message.type] : null;
  if (!handler) return answer(Promise.reject(new AgentError("bad-request", "The vibe agent has no such call.")), sendResponse, origin);
  return answer(
    Promise.resolve().then(() => handler(origin, message.payload, message.activation === true)),
    sendResponse,
    origin,
  );
});

// No other extension and no web page may message the agent (externally_connectable lists
// none); should a message arrive anyway, it is refused, never handled.
chrome.runtime.onMessageExternal.addListener(() => false);
chrome.runtime.onConnectExternal.addListener((port) => port.disconnect());
