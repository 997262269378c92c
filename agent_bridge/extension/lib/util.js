// Small pure helpers of the vibe agent: encodings, did:key, origins, scopes, errors.
// No chrome.* here: the service worker and the extension's pages both import it.

/** An error the agent reports to a page or its own window: a stable code and a sentence. */
export class AgentError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "AgentError";
    this.code = code;
  }

  toJSON() {
    return { code: this.code, message: this.message };
  }
}

export function b64decode(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

export function b64url(bytes) {
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

function b58decode(text) {
  let value = 0n;
  for (const char of text) {
    const digit = B58.indexOf(char);
    if (digit < 0) throw new AgentError("bad-did", "Not base58.");
    value = value * 58n + BigInt(digit);
  }
  const bytes = [];
  while (value > 0n) {
    bytes.unshift(Number(value & 0xffn));
    value >>= 8n;
  }
  for (const char of text) {
    if (char !== "1") break;
    bytes.unshift(0);
  }
  return Uint8Array.from(bytes);
}

/** The 32-byte Ed25519 public key of a did:key (docs/keys.md), or an AgentError. */
export function publicKeyOfDid(did) {
  if (typeof did !== "string" || !/^did:key:z6Mk[1-9A-HJ-NP-Za-km-z]{44}$/.test(did)) {
    throw new AgentError("bad-did", "The server sent something that is not an Ed25519 did:key.");
  }
  const bytes = b58decode(did.slice("did:key:z".length));
  if (bytes.length !== 34 || bytes[0] !== 0xed || bytes[1] !== 0x01) {
    throw new AgentError("bad-did", "The server sent something that is not an Ed25519 did:key.");
  }
  return bytes.slice(2);
}

function isLoopback(host) {
  return (
    host === "localhost" ||
    host.endsWith(".localhost") ||
    /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host) ||
    host === "[::1]"
  );
}

/**
 * The server's base URL as the agent keeps it (origin + path, no trailing slash), from what
 * a person typed. https, or http on this machine only (a password must not cross a network
 * in the clear).
 */
export function normaliseServer(input) {
  let text = String(input || "").trim();
  if (!text) throw new AgentError("bad-server", "Enter your Vibe Cloud server's address.");
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
    text = (/^(localhost|127\.|\[::1\])/i.test(text) ? "http://" : "https://") + text;
  }
  let url;
  try {
    url = new URL(text);
  } catch {
    throw new AgentError("bad-server", `"${String(input).slice(0, 100)}" is not a web address.`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new AgentError("bad-server", "The server's address must start with https://.");
  }
  if (url.protocol === "http:" && !isLoopback(url.hostname)) {
    throw new AgentError(
      "bad-server",
      "Use https:// for this server: plain http is accepted only for this computer (localhost).",
    );
  }
  if (url.username || url.password || url.search || url.hash) {
    throw new AgentError("bad-server", "The server's address cannot have a user, query or fragment.");
  }
  return url.origin + url.pathname.replace(/\/+$/, "");
}

/** Whether a page of this origin may use the agent: https, or http on this machine. */
export function pageOriginAllowed(origin) {
  try {
    const url = new URL(origin);
    if (url.origin !== origin) return false;
    return url.protocol === "https:" || (url.protocol === "http:" && isLoopback(url.hostname));
  } catch {
    return false;
  }
}

const COLLECTION = /^[a-z][a-z0-9_-]{0,63}$/;

/** The scopes a page asked for, checked and normalised as the server does; an AgentError. */
export function normaliseScopes(scopes) {
  if (!Array.isArray(scopes) || scopes.length === 0 || scopes.length > 32) {
    throw new AgentError("bad-request", "Ask for 1 to 32 scopes, e.g. ['data:write:notes'].");
  }
  const out = new Set();
  for (const scope of scopes) {
    const [kind, action, name, ...rest] = typeof scope === "string" ? scope.split(":") : [];
    const ok =
      scope === "data:*" ||
      scope === "blob:*" ||
      (kind === "data" && (action === "read" || action === "write") && COLLECTION.test(name || "") && !rest.length);
    if (!ok) {
      throw new AgentError(
        "bad-request",
        `Unknown scope ${JSON.stringify(String(scope).slice(0, 80))}: ask for data:read:<collection>, ` +
          "data:write:<collection>, data:* or blob:*.",
      );
    }
    out.add(scope);
    if (action === "write") out.add(`data:read:${name}`);
  }
  if (out.has("data:*")) for (const scope of [...out]) if (scope.startsWith("data:") && scope !== "data:*") out.delete(scope);
  return [...out].sort();
}

/** Whether granted scopes allow everything requested (as vibed.oauth.covers). */
export function covers(granted, requested) {
  const have = new Set(granted);
  return requested.every((s) => have.has(s) || (s.startsWith("data:") && have.has("data:*")));
}

/** One line per thing the person allows, in words: [sentence, collection or null]. */
export function describeScopes(scopes) {
  const written = new Set(scopes.filter((s) => s.startsWith("data:write:")).map((s) => s.slice(11)));
  const lines = [];
  for (const scope of scopes) {
    if (scope === "data:*") lines.push(["Read, change and delete everything in all your collections", null]);
    else if (scope === "blob:*") lines.push(["Upload, download and delete your files", null]);
    else if (scope.startsWith("data:write:")) lines.push(["Read and change your", scope.slice(11)]);
    else if (!written.has(scope.slice(10))) lines.push(["Read your", scope.slice(10)]);
  }
  return lines;
}

/** A display name a page sent: untrusted text, printable, bounded, or null. */
export function cleanName(value) {
  if (typeof value !== "string") return null;
  const text = value.replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, "").trim();
  return text.slice(0, 60) || null;
}
