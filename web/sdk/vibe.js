// vibe-sdk: the browser SDK of Vibe Cloud (vibed). Plain ES modules, no build step:
//
//   import { createVibe } from "https://vibe.example.org/sdk/vibe.js";
//   const vibe = createVibe({ server: "https://vibe.example.org", scopes: ["data:write:notes"] });
//   await vibe.init();                       // finishes a login redirect or restores a session
//   if (vibe.state !== "logged-in") await vibe.login();
//   await vibe.collection("notes").create({ title: "Hello" });
//
// The app logs in with OAuth 2.1 (authorization code + PKCE S256, client_id = its origin) on
// the person's own Vibe Cloud, which shows a consent page; or, when the vibe agent extension is
// present (window.vibe), through the agent. docs/apps.md is the guide.
//
// Pages served by the Vibe Cloud server itself (its dashboard) use `firstParty: true`: the
// session is the server's own login (the httpOnly refresh cookie, same origin), tokens carry the
// first-party scope and stay in memory, and `vibe.account` manages the identity.

import { VibeError, errorFrom } from "./errors.js";
import { Realtime } from "./realtime.js";
import { localStore, memoryStore } from "./stores.js";

export { VibeError, localStore, memoryStore };

const REFRESH_MARGIN = 60_000; // refresh this long before the access token expires (ms)
const PENDING = "vibe.pending:";
const SESSION = "vibe.session:";

function b64url(bytes) {
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomToken(bytes = 32) {
  return b64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

async function challengeOf(verifier) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  return b64url(new Uint8Array(digest));
}

function isAgent(value) {
  return (
    value !== null &&
    typeof value === "object" &&
    typeof value.connect === "function" &&
    typeof value.getToken === "function"
  );
}

/**
 * Create a client for one Vibe Cloud server.
 * @param {import("./vibe").VibeOptions} options
 * @returns {import("./vibe").Vibe}
 */
export function createVibe(options) {
  return new VibeClient(options);
}

class VibeClient {
  constructor(options) {
    if (!options || typeof options.server !== "string") {
      throw new TypeError("createVibe needs { server: 'https://your-vibe-server' }");
    }
    const url = new URL(options.server);
    this.server = url.origin + url.pathname.replace(/\/+$/, "");
    this.scopes = [...(options.scopes || [])];
    this.appName = options.appName || null;
    this.redirectUri =
      options.redirectUri || (globalThis.location ? location.origin + location.pathname : "");
    this.clientId = options.clientId || new URL(this.redirectUri || this.server).origin;
    this.store =
      options.store === "memory"
        ? memoryStore()
        : options.store && typeof options.store === "object"
          ? options.store
          : globalThis.localStorage
            ? localStore()
            : memoryStore();
    this.firstParty = options.firstParty === true;
    if (this.firstParty) this.store = memoryStore(); // tokens never leave this tab's memory
    this.agentOption = this.firstParty ? false : options.agent;
    this.agent = null;
    this.fetchImpl = options.fetch || globalThis.fetch.bind(globalThis);
    this.key = SESSION + this.server;
    this.session = null;
    this.state = "loading";
    this.identity = null;
    this.lastError = null;
    this.listeners = new Map();
    this.refreshTimer = null;
    this.refreshing = null;
    this.realtime = new Realtime({
      url: this.server.replace(/^http/, "ws") + "/realtime",
      getToken: (force) => this.token({ force }),
      onRevoked: () => {
        // Through the agent: let it learn too (its renewal fails, it forgets the site).
        if (this.agent) this.agent.getToken({ force: true }).catch(() => {});
        this._ended("revoked");
      },
      onStatus: (status) => this._emit("realtime", status),
      WebSocket: options.WebSocket,
    });
    this.files = new Files(this);
    this.account = new Account(this);
    this.channel = null;
    if (this.firstParty && globalThis.BroadcastChannel) {
      // Tabs of the server's own pages share the login: a logout in one ends them all.
      this.channel = new BroadcastChannel(`vibe:${this.server}`);
      this.channel.onmessage = (event) => {
        if (!event.data || event.data.type !== "ended") return;
        if (this.session) this._ended(event.data.reason, false);
        // Already ended here (its socket was closed first): still say why, once known.
        else this._emit("state", this.state, { reason: event.data.reason });
      };
    }
    this._onStorage = (event) => {
      if (event.key === this.key) this._adoptStored();
    };
    if (globalThis.addEventListener) globalThis.addEventListener("storage", this._onStorage);
  }

  // -- events ---------------------------------------------------------------------------------

  /** Listen to "state" (state, info), "identity" (identity) or "realtime" (status). */
  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(listener);
    return () => this.listeners.get(event)?.delete(listener);
  }

  _emit(event, ...args) {
    for (const listener of [...(this.listeners.get(event) || [])]) {
      try {
        listener(...args);
      } catch (error) {
        console.error(`vibe: a ${event} listener failed`, error);
      }
    }
  }

  _setState(state, info = {}) {
    const changed = state !== this.state;
    this.state = state;
    if (info.error !== undefined) this.lastError = info.error;
    if (changed) this._emit("state", state, info);
  }

  _setIdentity(identity) {
    this.identity = identity;
    this._emit("identity", identity);
  }

  // -- start ----------------------------------------------------------------------------------

  /**
   * Finish a login redirect, or restore the session, or connect through the agent (silently:
   * an origin the person approved in the agent). Resolves with the state: "logged-in" or
   * "logged-out". A session the app already has (a redirect login) comes before the agent.
   */
  async init() {
    if (this.firstParty) return this._initFirstParty();
    const params = globalThis.location ? new URLSearchParams(location.search) : null;
    if (params && (params.has("code") || params.has("error")) && params.has("state")) {
      const pending = this._pending();
      if (pending && pending.state === params.get("state")) {
        this._cleanUrl(new URLSearchParams(params));
        sessionStorage.removeItem(PENDING + this.server);
        return this._finishLogin(params, pending);
      }
    }
    if (this._adoptStored(false)) {
      try {
        await this.token();
        await this._loadIdentity();
      } catch (error) {
        if (this.state === "logged-out") return this.state;
        // A network failure: keep the session, report the state we have.
        this.lastError = error;
      }
      if (this.session) this._setState("logged-in");
      return this.state;
    }
    const agent = this.agentOption === false ? null : this.agentOption || globalThis.vibe;
    if (isAgent(agent)) {
      const state = await this._useAgent(agent, { prompt: "none" });
      if (state !== null) return state;
    }
    this._setState("logged-out");
    return this.state;
  }

  async _initFirstParty() {
    try {
      await this.token({ force: true });
    } catch (error) {
      if (this.state !== "logged-out") this._setState("logged-out", { error });
      return this.state;
    }
    if (!this.session) {
      this._setState("logged-out");
      return this.state;
    }
    try {
      await this._loadIdentity();
    } catch (error) {
      if (this.state === "logged-out") return this.state;
      this.lastError = error;
    }
    if (this.session) this._setState("logged-in");
    return this.state;
  }

  _pending() {
    try {
      return JSON.parse(sessionStorage.getItem(PENDING + this.server) || "null");
    } catch {
      return null;
    }
  }

  _cleanUrl(params) {
    for (const name of ["code", "state", "iss", "error", "error_description"]) params.delete(name);
    const query = params.toString();
    history.replaceState(history.state, "", location.pathname + (query ? `?${query}` : "") + location.hash);
  }

  async _finishLogin(params, pending) {
    const iss = params.get("iss");
    if (iss !== null && iss.replace(/\/+$/, "") !== this.server) {
      const error = new VibeError("The answer came from another server (iss mismatch).", {
        type: "invalid_issuer",
      });
      this._setState("logged-out", { error });
      throw error;
    }
    if (params.has("error")) {
      const error = new VibeError(params.get("error_description") || params.get("error"), {
        type: params.get("error"),
      });
      this._setState("logged-out", { error });
      return this.state;
    }
    const answer = await this._tokenRequest({
      grant_type: "authorization_code",
      code: params.get("code"),
      redirect_uri: pending.redirectUri,
      code_verifier: pending.verifier,
    });
    this._save(answer);
    await this._loadIdentity();
    this._setState("logged-in", { returnTo: pending.returnTo || null });
    return this.state;
  }

  /**
   * Connect through the agent (window.vibe). prompt "none" (init) never shows the agent's
   * consent window: an origin the person has not approved yet stays logged out until
   * login(). Resolves with the state, or null when the agent has no identity on this server
   * (the SDK then uses the redirect flow). The agent names the requesting origin itself.
   */
  async _useAgent(agent, { prompt } = {}) {
    let result;
    try {
      result = await agent.connect({
        scopes: this.scopes,
        appName: this.appName,
        server: this.server,
        ...(prompt ? { prompt } : {}),
      });
    } catch (error) {
      if (error && error.code === "no-identity") {
        this.agent = null;
        return null;
      }
      const wrapped = new VibeError(error?.message || "The vibe agent refused.", {
        type: error?.code || "agent-error",
        cause: error,
      });
      this._setState("logged-out", { error: wrapped });
      if (prompt === "none") return this.state;
      throw wrapped;
    }
    if (this.agent !== agent) {
      this.agent = agent;
      const ended = (info) => this._ended((info && info.reason) || "agent-disconnected");
      const onIdentity = () => {
        if (!agent.identity) ended();
        else this._setIdentity(agent.identity);
      };
      if (typeof agent.on === "function") {
        agent.on("disconnect", ended);
        agent.on("identity", onIdentity);
      } else if (typeof agent.addEventListener === "function") {
        agent.addEventListener("disconnect", ended);
        agent.addEventListener("identity", onIdentity);
      }
    }
    const identity = (result && result.identity) || agent.identity || null;
    this._setIdentity(identity);
    this._setState(identity || (await agent.getToken()) ? "logged-in" : "logged-out");
    return this.state;
  }

  // -- login and logout --------------------------------------------------------------------------

  /**
   * Go to the server's authorization page (the person logs in and approves the app) and come
   * back to redirectUri. With prompt "none", come back at once, logged in or with an error.
   */
  async login(options = {}) {
    if (this.firstParty) {
      const back = options.returnTo || location.pathname + location.search + location.hash;
      location.assign(`${this.server}/login?next=${encodeURIComponent(back)}`);
      return new Promise(() => {}); // the page is leaving
    }
    const agent = this.agent || (this.agentOption === false ? null : this.agentOption || globalThis.vibe);
    if (isAgent(agent) && (await this._useAgent(agent)) !== null) return;
    const verifier = randomToken(48);
    const state = randomToken(16);
    sessionStorage.setItem(
      PENDING + this.server,
      JSON.stringify({
        verifier,
        state,
        redirectUri: this.redirectUri,
        returnTo: options.returnTo || null,
      }),
    );
    const query = new URLSearchParams({
      response_type: "code",
      client_id: this.clientId,
      redirect_uri: this.redirectUri,
      scope: this.scopes.join(" "),
      state,
      code_challenge: await challengeOf(verifier),
      code_challenge_method: "S256",
    });
    if (this.appName) query.set("client_name", this.appName);
    if (options.prompt) query.set("prompt", options.prompt);
    location.assign(`${this.server}/auth/authorize?${query}`);
    return new Promise(() => {}); // the page is leaving
  }

  /** End this app's session: the refresh token is revoked, the socket closed. */
  async logout() {
    const session = this.session;
    if (this.firstParty) {
      try {
        await this.fetchImpl(`${this.server}/auth/logout`, { method: "POST", credentials: "same-origin" });
      } catch {
        // Offline: the cookie stays, but this tab forgets its token.
      }
    } else if (this.agent) {
      await this.agent.disconnect?.();
    } else if (session) {
      try {
        await this._form("/auth/revoke", { token: session.refreshToken, token_type_hint: "refresh_token" });
      } catch {
        // Offline: the token is forgotten here anyway and expires on its own.
      }
    }
    this._ended("logout");
  }

  _ended(reason, tell = true) {
    if (tell && this.channel) this.channel.postMessage({ type: "ended", reason });
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    this.session = null;
    // Other tabs learn that (and why) the session ended from the store.
    this.store.set(this.key, { ended: reason });
    this.realtime.close();
    this._setIdentity(null);
    this._setState("logged-out", { reason, error: null });
  }

  // -- tokens ---------------------------------------------------------------------------------

  _adoptStored(emit = true) {
    const stored = this.store.get(this.key);
    if (!stored || typeof stored.refreshToken !== "string") {
      if (this.session && emit) this._ended((stored && stored.ended) || "logout");
      return false;
    }
    const previous = this.session;
    this.session = stored;
    this._schedule();
    if (previous && previous.accessToken !== stored.accessToken) {
      this.realtime.tokenChanged(stored.accessToken);
    }
    return true;
  }

  _save(answer) {
    this.session = {
      accessToken: answer.access_token,
      refreshToken: answer.refresh_token,
      expiresAt: Date.now() + answer.expires_in * 1000,
      scope: answer.scope,
    };
    this.store.set(this.key, this.session);
    this._schedule();
    this.realtime.tokenChanged(this.session.accessToken);
  }

  _schedule() {
    clearTimeout(this.refreshTimer);
    if (!this.session || !globalThis.setTimeout) return;
    const wait = Math.max(1000, this.session.expiresAt - Date.now() - REFRESH_MARGIN);
    this.refreshTimer = setTimeout(() => {
      this.token({ force: true }).catch(() => {});
    }, wait);
  }

  /**
   * A valid access token (refreshed when it is about to expire), or null when logged out.
   * Tabs of one app share the session: refreshes are serialised with a Web Lock and a tab
   * adopts the token another tab has just obtained instead of rotating it again.
   */
  async token({ force = false } = {}) {
    if (this.agent) return this.agent.getToken(force ? { force: true } : undefined);
    if (this.firstParty) return this._firstPartyToken(force);
    if (!this.session) return null;
    if (!force && this.session.expiresAt - Date.now() > REFRESH_MARGIN) {
      return this.session.accessToken;
    }
    if (!this.refreshing) {
      const used = this.session.refreshToken;
      const run = () => this._refresh(used);
      this.refreshing = (navigator.locks ? navigator.locks.request(`vibe-refresh:${this.server}`, run) : run())
        .finally(() => {
          this.refreshing = null;
        });
    }
    await this.refreshing;
    return this.session ? this.session.accessToken : null;
  }

  async _firstPartyToken(force) {
    if (!force && this.session && this.session.expiresAt - Date.now() > REFRESH_MARGIN) {
      return this.session.accessToken;
    }
    if (!this.refreshing) {
      // The refresh cookie is shared by the tabs and rotates on every use: one at a time.
      const run = () => this._refreshCookie();
      const lock = `vibe-refresh:${this.server}:first-party`;
      this.refreshing = (navigator.locks ? navigator.locks.request(lock, run) : run()).finally(() => {
        this.refreshing = null;
      });
    }
    await this.refreshing;
    return this.session ? this.session.accessToken : null;
  }

  async _refreshCookie() {
    let response;
    try {
      response = await this.fetchImpl(`${this.server}/auth/refresh`, { method: "POST", credentials: "same-origin" });
    } catch (cause) {
      throw new VibeError("The server cannot be reached.", { cause });
    }
    if (response.status === 401) {
      // No cookie, or the session ended (logged out, revoked elsewhere): logged out.
      if (this.session) this._ended("revoked");
      else this._setState("logged-out", { error: null });
      return;
    }
    if (!response.ok) throw await errorFrom(response);
    const answer = await response.json();
    this.session = { accessToken: answer.accessToken, expiresAt: Date.now() + answer.expiresIn * 1000 };
    this._schedule();
    this.realtime.tokenChanged(this.session.accessToken);
  }

  async _refresh(used) {
    const stored = this.store.get(this.key);
    if (stored && stored.refreshToken !== used && stored.expiresAt - Date.now() > REFRESH_MARGIN) {
      this._adoptStored(); // another tab refreshed meanwhile
      return;
    }
    const current = stored && typeof stored.refreshToken === "string" ? stored.refreshToken : used;
    try {
      this._save(await this._tokenRequest({ grant_type: "refresh_token", refresh_token: current }));
    } catch (error) {
      if (error instanceof VibeError && error.status >= 400 && error.status < 500) {
        this._ended("revoked"); // the grant or session is gone: log in again
      }
      throw error;
    }
  }

  async _tokenRequest(fields) {
    return this._form("/auth/token", fields);
  }

  async _form(path, fields) {
    const body = new URLSearchParams({ client_id: this.clientId, ...fields });
    let response;
    try {
      response = await this.fetchImpl(this.server + path, {
        method: "POST",
        headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body,
        credentials: "omit",
      });
    } catch (cause) {
      throw new VibeError("The server cannot be reached.", { cause });
    }
    if (!response.ok) throw await errorFrom(response);
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }

  async _loadIdentity() {
    if (!this.session && this.firstParty) return null;
    const me = await this.request("GET", "/me");
    this._setIdentity(me);
    return me;
  }

  // -- requests -------------------------------------------------------------------------------

  /**
   * An authorized request to the API; resolves with the parsed JSON (null for no body) or
   * rejects with a VibeError carrying the problem type. A 401 refreshes once and retries;
   * a second 401 means the access was revoked: the state becomes "logged-out".
   */
  async request(method, path, body, options = {}) {
    for (let attempt = 0; ; attempt += 1) {
      // Through the agent, the retry's token is the one its forced renewal just made.
      const token = await this.token({ force: attempt > 0 && !this.agent });
      if (!token) throw new VibeError("Not logged in.", { status: 401, type: "not-logged-in" });
      const headers = { Authorization: `Bearer ${token}`, ...(options.headers || {}) };
      let payload;
      if (body !== undefined && body !== null) {
        headers["Content-Type"] = "application/json";
        payload = JSON.stringify(body);
      }
      let response;
      try {
        response = await this.fetchImpl(this.server + path, {
          method,
          headers,
          body: payload,
          credentials: "omit",
        });
      } catch (cause) {
        throw new VibeError("The server cannot be reached.", { cause });
      }
      if (response.status === 401 && attempt === 0 && this.agent) {
        // The agent renews the app's token (or learns that its grant was revoked).
        if (await this.agent.getToken({ force: true })) continue;
        const error = await errorFrom(response);
        this._ended("revoked");
        throw error;
      }
      if (response.status === 401 && attempt === 0) {
        try {
          await this.token({ force: true });
        } catch (error) {
          if (this.state === "logged-out") throw await errorFrom(response);
          throw error;
        }
        continue;
      }
      if (response.status === 401) {
        const error = await errorFrom(response);
        this._ended("revoked");
        throw error;
      }
      if (!response.ok) throw await errorFrom(response);
      if (response.status === 204) return null;
      const text = await response.text();
      return text ? JSON.parse(text) : null;
    }
  }

  /** The documents of one collection. */
  collection(name) {
    return new Collection(this, name);
  }

  /** Stop timers and listeners (a single-page app tearing down). */
  destroy() {
    clearTimeout(this.refreshTimer);
    if (this.channel) this.channel.close();
    this.realtime.destroy();
    if (globalThis.removeEventListener) globalThis.removeEventListener("storage", this._onStorage);
  }
}

function enc(value) {
  return encodeURIComponent(value);
}

class Collection {
  constructor(client, name) {
    this.client = client;
    this.name = name;
    this.path = `/data/${enc(name)}`;
  }

  /** Create a document; the server picks its id. Resolves {id, rev}. */
  create(doc) {
    return this.client.request("POST", this.path, doc);
  }

  get(id) {
    return this.client.request("GET", `${this.path}/${enc(id)}`);
  }

  /** Create (no _rev) or update (with the current _rev) the document with this id. */
  put(id, doc) {
    return this.client.request("PUT", `${this.path}/${enc(id)}`, doc);
  }

  delete(id, rev) {
    return this.client.request("DELETE", `${this.path}/${enc(id)}?rev=${enc(rev)}`);
  }

  /** A page of documents in id order: {docs, bookmark}. */
  list(options = {}) {
    return this.client.request("GET", this.path + pageQuery(options));
  }

  /** A page of documents matching a Mango selector: {docs, bookmark}. */
  query(selector, options = {}) {
    return this.client.request("GET", this.path + pageQuery({ ...options, q: selector }));
  }

  /** Declare an index so queries can sort on these fields. */
  ensureIndex(fields) {
    return this.client.request("POST", `${this.path}/_index`, { fields });
  }

  /**
   * Call onChange for every change of the collection, from now (or after ``since``), across
   * reconnections: nothing lost, nothing repeated. Returns the function that stops it.
   */
  subscribe(onChange, options = {}) {
    return this.client.realtime.subscribe(this.name, onChange, options);
  }

  /**
   * A live result: the documents matching {query, sort, limit}, kept current as changes
   * arrive. ``watch(listener)`` returns an unsubscribe function; ``current`` is the latest
   * snapshot {docs, loading, error}. The React hooks are built on it.
   */
  live(options = {}) {
    return new LiveQuery(this, options);
  }
}

function pageQuery({ q, sort, limit, bookmark, fields } = {}) {
  const params = new URLSearchParams();
  if (q !== undefined && q !== null) params.set("q", typeof q === "string" ? q : JSON.stringify(q));
  if (sort !== undefined && sort !== null) params.set("sort", typeof sort === "string" ? sort : JSON.stringify(sort));
  if (limit !== undefined && limit !== null) params.set("limit", String(limit));
  if (bookmark) params.set("bookmark", bookmark);
  if (fields) params.set("fields", Array.isArray(fields) ? JSON.stringify(fields) : fields);
  const text = params.toString();
  return text ? `?${text}` : "";
}

class LiveQuery {
  constructor(collection, options) {
    this.collection = collection;
    this.options = options;
    this.current = { docs: [], loading: true, error: null };
    this.listeners = new Set();
    this.stop = null;
    this.timer = null;
    this.generation = 0;
  }

  watch(listener) {
    this.listeners.add(listener);
    if (this.listeners.size === 1) this._start();
    return () => {
      this.listeners.delete(listener);
      if (this.listeners.size === 0) this._stop();
    };
  }

  _start() {
    this.stop = this.collection.subscribe(() => this._soon(), {
      onError: (message) => this._set({ ...this.current, error: new VibeError(message.message, { type: message.code }) }),
    });
    this._load();
  }

  _stop() {
    if (this.stop) this.stop();
    this.stop = null;
    clearTimeout(this.timer);
  }

  _soon() {
    // Changes come in bursts: one read after the burst, not one per change.
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this._load(), 30);
  }

  async _load() {
    const generation = ++this.generation;
    const { query, sort, limit } = this.options;
    try {
      const page =
        query || sort
          ? await this.collection.query(query || {}, { sort, limit })
          : await this.collection.list({ limit });
      if (generation === this.generation) this._set({ docs: page.docs, loading: false, error: null });
    } catch (error) {
      if (generation === this.generation) this._set({ ...this.current, loading: false, error });
    }
  }

  _set(snapshot) {
    this.current = snapshot;
    for (const listener of [...this.listeners]) listener(snapshot);
  }
}

class Files {
  constructor(client) {
    this.client = client;
  }

  /**
   * Upload a File or Blob: a signed URL, the bytes straight to storage (progress reported),
   * then finalize. Resolves with the blob record {id, key, mime, size, meta, createdAt}.
   */
  async upload(file, options = {}) {
    const mime = options.mime || file.type || "application/octet-stream";
    const target = await this.client.request("POST", "/blob/upload-url", { mime, size: file.size });
    await put(target, file, options.onProgress);
    return this.client.request("POST", "/blob/finalize-upload", {
      id: target.id,
      meta: options.meta || (file.name ? { name: file.name } : {}),
    });
  }

  /** A short-lived signed URL to download the blob (for <img src>, a link...). */
  async url(id) {
    const answer = await this.client.request("GET", `/blob/download-url/${enc(id)}`, null, {
      headers: { Accept: "application/json" },
    });
    return answer.url;
  }

  /** A page of the identity's blobs: {blobs, next}. */
  list(options = {}) {
    const params = new URLSearchParams();
    if (options.limit) params.set("limit", String(options.limit));
    if (options.after) params.set("after", options.after);
    const text = params.toString();
    return this.client.request("GET", `/blob${text ? `?${text}` : ""}`);
  }

  delete(id) {
    return this.client.request("DELETE", `/blob/${enc(id)}`);
  }

  /** Bytes used by files (and pending uploads) next to the quota (null: none): {used, pending, quota, maxSize}. */
  usage() {
    return this.client.request("GET", "/blob/usage");
  }
}

/**
 * The identity itself (first-party pages only: these routes need the `identity` scope, which
 * apps never get): its collections, sessions, password, apps, export and deletion.
 */
class Account {
  constructor(client) {
    this.client = client;
  }

  /** The collections with their document counts: [{name, count}]. */
  async collections() {
    return (await this.client.request("GET", "/me/collections")).collections;
  }

  /** Signed-in browsers and devices: [{id, createdAt, lastUsedAt, userAgent, current}]. */
  async sessions() {
    return (await this.client.request("GET", "/me/sessions")).sessions;
  }

  revokeSession(id) {
    return this.client.request("DELETE", `/me/sessions/${enc(id)}`);
  }

  /** End every session but this one: {revoked}. */
  logoutEverywhereElse() {
    return this.client.request("DELETE", "/me/sessions");
  }

  /** The key is re-wrapped (same did:key) and the other sessions end: {revokedSessions}. */
  changePassword(currentPassword, newPassword) {
    return this.client.request("POST", "/me/password", { currentPassword, newPassword });
  }

  /** The apps the person allowed: [{id, origin, scopes, name, via, createdAt, lastUsedAt}]. */
  async grants() {
    return (await this.client.request("GET", "/me/grants")).grants;
  }

  revokeGrant(id) {
    return this.client.request("DELETE", `/me/grants/${enc(id)}`);
  }

  /** A one-time link {url, expiresAt} that downloads everything as a ZIP (open it at once). */
  exportLink() {
    return this.client.request("POST", "/me/export");
  }

  /**
   * Delete the identity and everything it owns; resolves {state: "deleted" | "pending"}
   * ("pending": it started and finishes by itself). The session ends either way.
   */
  async deleteIdentity(password) {
    const answer = await this.client.request("POST", "/me/delete", { password });
    this.client._ended("deleted");
    return answer && answer.state === "pending" ? answer : { state: "deleted" };
  }
}

function put(target, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(target.method || "PUT", target.url);
    for (const [name, value] of Object.entries(target.headers || {})) {
      if (name.toLowerCase() !== "content-length") xhr.setRequestHeader(name, value);
    }
    if (onProgress) {
      xhr.upload.onprogress = (event) => onProgress({ loaded: event.loaded, total: event.total || file.size });
    }
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve();
      else {
        let body = null;
        try {
          body = JSON.parse(xhr.responseText);
        } catch {
          body = null;
        }
        reject(new VibeError(body?.detail || `Upload failed (HTTP ${xhr.status})`, {
          status: xhr.status,
          type: body?.type,
          body,
        }));
      }
    };
    xhr.onerror = () => reject(new VibeError("The upload was interrupted."));
    xhr.send(file);
  });
}
