// The identity's key on this device: unwrapped once from GET /me/key with the password
// (docs/keys.md), kept as a non-extractable Ed25519 CryptoKey in the extension's IndexedDB.
// Nothing here ever returns the seed or the wrap key; both are zeroed once used.

import { scryptAsync } from "../vendor/noble-hashes/scrypt.js";
import { AgentError, b64decode, publicKeyOfDid } from "./util.js";

export const KDF = Object.freeze({ name: "scrypt", N: 32768, r: 8, p: 1, dkLen: 32 });

// WebCrypto imports an Ed25519 private key as PKCS#8: a fixed 16-byte header + the seed.
const PKCS8_ED25519 = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
const PROBE = new TextEncoder().encode("vibe-agent key check v1");

/**
 * Unwrap the answer of GET /me/key with the password and return a non-extractable signing
 * key, checked against the did:key the server names. AgentError codes: "unsupported-key"
 * (another format), "wrong-password" (the key does not open), "key-mismatch".
 */
export async function unwrapSigningKey(password, answer) {
  const kdf = answer && answer.kdf;
  if (!kdf || Object.keys(KDF).some((name) => kdf[name] !== KDF[name])) {
    throw new AgentError("unsupported-key", "The server keeps this key in a format this agent does not know; update the agent.");
  }
  const salt = b64decode(answer.salt);
  const blob = b64decode(answer.keyWrapped);
  if (salt.length !== 16 || blob.length !== 60) {
    throw new AgentError("unsupported-key", "The server sent a key this agent cannot read.");
  }
  const passwordBytes = new TextEncoder().encode(password);
  const wrapKeyBytes = await scryptAsync(passwordBytes, salt, { N: KDF.N, r: KDF.r, p: KDF.p, dkLen: KDF.dkLen });
  passwordBytes.fill(0);
  let seed;
  try {
    const wrapKey = await crypto.subtle.importKey("raw", wrapKeyBytes, { name: "AES-GCM" }, false, ["decrypt"]);
    seed = new Uint8Array(
      await crypto.subtle.decrypt({ name: "AES-GCM", iv: blob.slice(0, 12), tagLength: 128 }, wrapKey, blob.slice(12)),
    );
  } catch {
    throw new AgentError(
      "wrong-password",
      "This password does not open the identity's key (was it changed on another device a moment ago?). Try again.",
    );
  } finally {
    wrapKeyBytes.fill(0);
  }
  const pkcs8 = new Uint8Array(48);
  pkcs8.set(PKCS8_ED25519);
  pkcs8.set(seed, 16);
  seed.fill(0);
  let key;
  try {
    key = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, ["sign"]);
  } finally {
    pkcs8.fill(0);
  }
  await checkKeyMatches(key, answer.did);
  return key;
}

/** An AgentError "key-mismatch" unless ``key`` is the private key of ``did``. */
export async function checkKeyMatches(key, did) {
  const publicKey = await crypto.subtle.importKey("raw", publicKeyOfDid(did), { name: "Ed25519" }, false, ["verify"]);
  const signature = await crypto.subtle.sign("Ed25519", key, PROBE);
  if (!(await crypto.subtle.verify("Ed25519", publicKey, signature, PROBE))) {
    throw new AgentError("key-mismatch", `The key the server sent is not the key of ${did}; nothing was stored.`);
  }
}

export async function sign(key, bytes) {
  return new Uint8Array(await crypto.subtle.sign("Ed25519", key, bytes));
}

// -- IndexedDB: CryptoKeys per identity, and the agent's state --------------------------------
//
// The extension's own origin: no content script (they run in the pages' origins) and no web
// page can open it, unlike chrome.storage.local, which content scripts can read and write.

const DB = "vibe-agent";
const STORES = ["keys", "state"];

function open(version) {
  return new Promise((resolve, reject) => {
    const request = version ? indexedDB.open(DB, version) : indexedDB.open(DB);
    request.onupgradeneeded = () => {
      for (const name of STORES) {
        if (!request.result.objectStoreNames.contains(name)) request.result.createObjectStore(name);
      }
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function database() {
  const db = await open();
  if (STORES.every((name) => db.objectStoreNames.contains(name))) return db;
  // The database exists without a store (an older agent, or someone else's open): add it.
  const version = db.version + 1;
  db.close();
  return open(version);
}

async function run(store, mode, action) {
  const db = await database();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(store, mode);
      const request = action(tx.objectStore(store));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = tx.onabort = () => reject(tx.error || request.error);
    });
  } finally {
    db.close();
  }
}

export const keyStore = {
  put: (ref, key) => run("keys", "readwrite", (store) => store.put(key, ref)),
  get: (ref) => run("keys", "readonly", (store) => store.get(ref)),
  delete: (ref) => run("keys", "readwrite", (store) => store.delete(ref)),
};

/** The agent's state (identities, sites, blocked origins, notices): one record. */
export const stateStore = {
  get: () => run("state", "readonly", (store) => store.get("state")),
  put: (state) => run("state", "readwrite", (store) => store.put(state, "state")),
};
