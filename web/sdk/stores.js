// Where the SDK keeps an app's session (tokens): swappable, like any auth store.

/** Keeps the session in memory: gone when the page reloads. */
export function memoryStore() {
  const data = new Map();
  return {
    get: (key) => (data.has(key) ? data.get(key) : null),
    set: (key, value) => void data.set(key, value),
    remove: (key) => void data.delete(key),
  };
}

/**
 * Keeps the session in localStorage (shared by the app's tabs, survives reloads). Tokens in
 * localStorage are readable by any script on the app's origin: the refresh token rotates on
 * every use and a stolen one is detected when both copies are used.
 */
export function localStore(storage = globalThis.localStorage) {
  return {
    get(key) {
      const raw = storage.getItem(key);
      if (raw === null) return null;
      try {
        return JSON.parse(raw);
      } catch {
        return null;
      }
    },
    set: (key, value) => storage.setItem(key, JSON.stringify(value)),
    remove: (key) => storage.removeItem(key),
  };
}
