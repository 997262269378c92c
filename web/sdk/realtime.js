// The realtime connection: one WebSocket per client for every subscribed collection. It
// reconnects by itself with backoff and resubscribes each collection with `since` = the last
// seq it delivered, so nothing is lost or repeated across a drop (docs/realtime.md).

const CLOSE_UNAUTHORIZED = 4001;
const CLOSE_TOKEN_EXPIRED = 4002;
const CLOSE_FORBIDDEN = 4003;
const CLOSE_REVOKED = 4004;
const CLOSE_TOO_SLOW = 4008;

export class Realtime {
  /**
   * @param {{url: string, getToken: (force?: boolean) => Promise<string|null>,
   *          onRevoked: () => void, onStatus?: (status: string) => void,
   *          WebSocket?: typeof WebSocket, minDelay?: number, maxDelay?: number}} options
   */
  constructor(options) {
    this.url = options.url;
    this.getToken = options.getToken;
    this.onRevoked = options.onRevoked;
    this.onStatus = options.onStatus || (() => {});
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.minDelay = options.minDelay ?? 500;
    this.maxDelay = options.maxDelay ?? 30000;
    /** @type {Map<string, {listeners: Set<Function>, errors: Set<Function>, seq: string|null, live: boolean}>} */
    this.collections = new Map();
    this.socket = null;
    this.authenticated = false;
    this.attempt = 0;
    this.timer = null;
    this.stopped = false;
    this.status = "closed";
    this._online = () => this._reconnectNow();
    this._offline = () => this._drop();
    if (globalThis.addEventListener) {
      globalThis.addEventListener("online", this._online);
      globalThis.addEventListener("offline", this._offline);
    }
  }

  /** Listen to a collection's changes; returns the function that stops listening. */
  subscribe(collection, listener, options = {}) {
    let entry = this.collections.get(collection);
    if (!entry) {
      entry = { listeners: new Set(), errors: new Set(), seq: options.since ?? null, live: false };
      this.collections.set(collection, entry);
      if (this.authenticated) this._send({ type: "subscribe", collection, ...since(entry) });
    }
    entry.listeners.add(listener);
    if (options.onError) entry.errors.add(options.onError);
    this.stopped = false;
    this._ensure();
    return () => {
      entry.listeners.delete(listener);
      if (options.onError) entry.errors.delete(options.onError);
      if (entry.listeners.size === 0 && this.collections.get(collection) === entry) {
        this.collections.delete(collection);
        if (this.authenticated) this._send({ type: "unsubscribe", collection });
        if (this.collections.size === 0) this.close();
      }
    };
  }

  /** A fresh access token for the open socket (sent before the old one expires). */
  tokenChanged(token) {
    if (this.authenticated && token) this._send({ type: "auth", token });
  }

  /** Close for good (logout, no more subscriptions). */
  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
    const socket = this.socket;
    this.socket = null;
    this.authenticated = false;
    if (socket) socket.close(1000, "done");
    this._status("closed");
  }

  destroy() {
    this.close();
    this.collections.clear();
    if (globalThis.removeEventListener) {
      globalThis.removeEventListener("online", this._online);
      globalThis.removeEventListener("offline", this._offline);
    }
  }

  _status(status) {
    if (status !== this.status) {
      this.status = status;
      this.onStatus(status);
    }
  }

  _ensure() {
    if (!this.socket && !this.timer && !this.stopped && this.collections.size) this._connect();
  }

  _reconnectNow() {
    if (this.stopped || !this.collections.size) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.attempt = 0;
    if (!this.socket) this._connect();
  }

  _drop() {
    // The browser says the network is gone: the socket may not notice for a long time.
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      this.authenticated = false;
      socket.close(4000, "offline");
      this._later();
    }
  }

  async _connect(force = false) {
    this._status("connecting");
    let token;
    try {
      token = await this.getToken(force);
    } catch {
      this._later();
      return;
    }
    if (this.stopped || this.socket) return;
    if (!token) {
      this._status("closed");
      return;
    }
    const socket = new this.WebSocket(this.url);
    this.socket = socket;
    socket.onopen = () => socket.send(JSON.stringify({ type: "auth", token }));
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this._handle(message);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.authenticated = false;
      for (const entry of this.collections.values()) entry.live = false;
      if (this.stopped) return;
      this._closed(event.code);
    };
  }

  _closed(code) {
    if (code === CLOSE_REVOKED) {
      this._status("closed");
      this.stopped = true;
      this.onRevoked();
      return;
    }
    if (code === CLOSE_UNAUTHORIZED || code === CLOSE_TOKEN_EXPIRED || code === CLOSE_FORBIDDEN) {
      // A fresh token may fix it; the backoff bounds the retries when it does not.
      this._later(true);
      return;
    }
    this._later(code === CLOSE_TOO_SLOW);
  }

  _later(forceToken = false) {
    if (this.stopped || this.timer) return;
    this._status("reconnecting");
    const base = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt);
    const delay = base / 2 + Math.random() * (base / 2);
    this.attempt += 1;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.socket && !this.stopped) this._connect(forceToken);
    }, delay);
  }

  _handle(message) {
    switch (message.type) {
      case "authenticated": {
        // Sent again after a token refresh on the same socket: subscribe only once.
        const first = !this.authenticated;
        this.authenticated = true;
        this.attempt = 0;
        this._status("open");
        if (first) {
          for (const [collection, entry] of this.collections) {
            this._send({ type: "subscribe", collection, ...since(entry) });
          }
        }
        break;
      }
      case "subscribed": {
        const entry = this.collections.get(message.collection);
        if (entry) {
          entry.live = true;
          if (entry.seq === null) entry.seq = message.seq;
        }
        break;
      }
      case "change": {
        const entry = this.collections.get(message.collection);
        if (!entry) break;
        entry.seq = message.seq;
        const change = {
          collection: message.collection,
          id: message.id,
          rev: message.rev,
          deleted: message.deleted,
          doc: message.doc,
          seq: message.seq,
        };
        for (const listener of [...entry.listeners]) {
          try {
            listener(change);
          } catch (error) {
            console.error("vibe: a change listener failed", error);
          }
        }
        break;
      }
      case "unsubscribed":
      case "error": {
        const entry = message.collection ? this.collections.get(message.collection) : null;
        if (message.type === "error" && message.code === "unavailable" && entry) {
          setTimeout(() => {
            if (this.authenticated && this.collections.get(message.collection) === entry) {
              this._send({ type: "subscribe", collection: message.collection, ...since(entry) });
            }
          }, 1000);
          break;
        }
        if (entry) {
          for (const onError of entry.errors) onError(message);
        }
        break;
      }
      default:
        break;
    }
  }

  _send(message) {
    if (this.socket && this.socket.readyState === 1) this.socket.send(JSON.stringify(message));
  }
}

function since(entry) {
  return entry.seq === null ? {} : { since: entry.seq };
}
