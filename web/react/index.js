// vibe-react: React hooks over vibe-sdk. The SDK is the single source of truth: every hook
// reads an SDK store through useSyncExternalStore and adds no logic of its own.

import {
  createElement,
  createContext,
  useCallback,
  useContext,
  useEffect,
  useMemo,
  useState,
  useSyncExternalStore,
} from "react";

const VibeContext = createContext(null);

/** Makes a vibe client (from createVibe) available to the hooks below; calls init() once. */
export function VibeProvider({ client, children }) {
  useEffect(() => {
    if (client.state === "loading") client.init().catch(() => {});
  }, [client]);
  return createElement(VibeContext.Provider, { value: client }, children);
}

/** The vibe client of the nearest VibeProvider. */
export function useVibe() {
  const client = useContext(VibeContext);
  if (!client) throw new Error("useVibe: wrap the app in <VibeProvider client={...}>");
  return client;
}

function useClientValue(event, read) {
  const client = useVibe();
  const subscribe = useCallback((notify) => client.on(event, notify), [client, event]);
  return useSyncExternalStore(subscribe, () => read(client));
}

/** {state, identity, login, logout}: re-renders when either changes. */
export function useIdentity() {
  const client = useVibe();
  const state = useClientValue("state", (c) => c.state);
  const identity = useClientValue("identity", (c) => c.identity);
  return useMemo(
    () => ({
      state,
      identity,
      login: (options) => client.login(options),
      logout: () => client.logout(),
    }),
    [client, state, identity],
  );
}

/**
 * The documents of a collection matching {query, sort, limit}, live: {docs, loading, error}.
 * Options are compared by value, so an inline object does not restart the subscription.
 */
export function useCollection(name, options = {}) {
  const client = useVibe();
  const state = useClientValue("state", (c) => c.state);
  const key = JSON.stringify([name, options.query ?? null, options.sort ?? null, options.limit ?? null]);
  const live = useMemo(() => {
    if (state !== "logged-in") return null;
    const [collection, query, sort, limit] = JSON.parse(key);
    return client.collection(collection).live({
      query: query ?? undefined,
      sort: sort ?? undefined,
      limit: limit ?? undefined,
    });
  }, [client, key, state]);
  const subscribe = useCallback((notify) => (live ? live.watch(notify) : () => {}), [live]);
  return useSyncExternalStore(subscribe, () => (live ? live.current : IDLE));
}

const IDLE = Object.freeze({ docs: Object.freeze([]), loading: false, error: null });

/** One document, live: {doc, loading, error}; doc is null when it does not exist (any more). */
export function useDocument(name, id) {
  const client = useVibe();
  const state = useClientValue("state", (c) => c.state);
  const [snapshot, setSnapshot] = useState({ key: null, doc: null, loading: true, error: null });
  const key = `${name}/${id}`;
  useEffect(() => {
    if (state !== "logged-in" || !id) return undefined;
    let current = true;
    const set = (value) => current && setSnapshot({ key, ...value });
    setSnapshot({ key, doc: null, loading: true, error: null });
    const collection = client.collection(name);
    const stop = collection.subscribe((change) => {
      if (change.id === id) set({ doc: change.doc, loading: false, error: null });
    });
    collection.get(id).then(
      // A change that arrived meanwhile is newer than this read: keep it.
      (doc) => current && setSnapshot((s) => (s.key === key && !s.loading ? s : { key, doc, loading: false, error: null })),
      (error) =>
        set(error && error.status === 404 ? { doc: null, loading: false, error: null } : { doc: null, loading: false, error }),
    );
    return () => {
      current = false;
      stop();
    };
  }, [client, name, id, key, state]);
  if (snapshot.key !== key) return LOADING;
  return snapshot;
}

const LOADING = Object.freeze({ doc: null, loading: true, error: null });
