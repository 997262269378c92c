// Uses every export of vibe-sdk as an app would; `tsc -p web/typecheck` checks the
// declarations (web/sdk/vibe.d.ts) against it.
import {
  createVibe,
  localStore,
  memoryStore,
  VibeError,
  type Account,
  type Change,
  type CollectionInfo,
  type GrantInfo,
  type SessionInfo,
  type StorageUsage,
  type Collection,
  type Doc,
  type Identity,
  type VibeAgentError,
  type LiveSnapshot,
  type Page,
  type RealtimeStatus,
  type SessionStore,
  type State,
  type StateInfo,
  type Vibe,
  type VibeAgent,
  type VibeOptions,
} from "vibe-sdk";

interface Note extends Doc {
  title: string;
  done?: boolean;
}

const options: VibeOptions = {
  server: "https://vibe.example.org",
  scopes: ["data:write:notes", "data:read:photos", "blob:*"],
  appName: "Notes",
  redirectUri: "https://notes.example/",
  store: "memory",
};
const vibe: Vibe = createVibe(options);
const stores: SessionStore[] = [memoryStore(), localStore(), localStore(sessionStorage)];
void stores;
const other = createVibe({ server: "http://localhost:3000", scopes: ["data:*"], agent: false, store: memoryStore() });
void other;

async function main(): Promise<void> {
  const state: State = await vibe.init();
  if (state === "logged-out") await vibe.login({ prompt: "consent", returnTo: "/notes" });
  const who: Identity | null = vibe.identity;
  console.log(who?.id, who?.did, vibe.server, vibe.clientId, vibe.scopes.length, vibe.lastError);
  const stop = vibe.on("state", (s: State, info: StateInfo) => console.log(s, info.reason, info.returnTo));
  vibe.on("identity", (identity) => console.log(identity?.id));
  vibe.on("realtime", (status: RealtimeStatus) => console.log(status));
  stop();

  const notes: Collection<Note> = vibe.collection<Note>("notes");
  const written = await notes.create({ title: "Hello" });
  const note: Note = await notes.get(written.id);
  await notes.put(note._id, { ...note, title: "Hello again" });
  const page: Page<Note> = await notes.list({ limit: 10, fields: ["title"] });
  const found = await notes.query({ done: false }, { sort: [{ title: "asc" }], limit: 5, bookmark: page.bookmark });
  await notes.ensureIndex(["title"]);
  const deleted = await notes.delete(found.docs[0]._id, found.docs[0]._rev);
  console.log(deleted.deleted);
  const unsubscribe = notes.subscribe(
    (change: Change<Note>) => console.log(change.id, change.rev, change.deleted, change.doc?.title, change.seq),
    { since: "0", onError: (error) => console.log(error.code) },
  );
  unsubscribe();
  const live = notes.live({ query: { done: false }, sort: ["title"], limit: 20 });
  const unwatch = live.watch((snapshot: LiveSnapshot<Note>) => console.log(snapshot.docs.length, snapshot.loading));
  console.log(live.current.error);
  unwatch();

  const file = new Blob(["hi"], { type: "text/plain" });
  const blob = await vibe.files.upload(file, { meta: { name: "hi.txt" }, onProgress: (p) => console.log(p.loaded / p.total) });
  const url: string = await vibe.files.url(blob.id);
  const listing = await vibe.files.list({ limit: 10, after: blob.id });
  console.log(url, listing.next, listing.blobs[0]?.size);
  await vibe.files.delete(blob.id);

  const token: string | null = await vibe.token({ force: true });
  const me = await vibe.request<Identity>("GET", "/me", undefined, { headers: { Accept: "application/json" } });
  console.log(token, me.id);
  try {
    await notes.get("missing");
  } catch (error) {
    if (error instanceof VibeError) console.log(error.status, error.type, error.code, error.body);
  }
  await vibe.logout();
  vibe.destroy();
}

// A page of the server itself (its dashboard): the first-party session and the account.
async function dashboard(): Promise<void> {
  const own = createVibe({ server: location.origin, scopes: [], firstParty: true });
  if ((await own.init()) !== "logged-in") return own.login({ returnTo: "/dashboard#data" });
  const account: Account = own.account;
  const collections: CollectionInfo[] = await account.collections();
  const sessions: SessionInfo[] = await account.sessions();
  const grants: GrantInfo[] = await account.grants();
  console.log(collections[0]?.count, sessions[0]?.current, sessions[0]?.userAgent, grants[0]?.scopes);
  await account.revokeSession(sessions[0].id);
  const { revoked } = await account.logoutEverywhereElse();
  const { revokedSessions } = await account.changePassword("old password", "new password");
  await account.revokeGrant(grants[0].id);
  const link = await account.exportLink();
  const usage: StorageUsage = await own.files.usage();
  console.log(revoked, revokedSessions, link.url, link.expiresAt, usage.quota ?? "none", usage.used);
  const deleted = await account.deleteIdentity("password");
  console.log(deleted.state === "pending" ? deleted.detail : "gone");
}
void dashboard;

const agent: VibeAgent = {
  identity: null,
  connect: async ({ scopes, appName, server, prompt }) => {
    console.log(scopes, appName, server, prompt === "none");
    const refusal = new Error("No identity on this server") as VibeAgentError;
    if (!server) throw refusal;
    console.log(refusal.code);
  },
  getToken: async () => null,
  disconnect: async () => {},
  on: (event, listener) => {
    console.log(event, listener);
  },
};
createVibe({ server: "https://vibe.example.org", scopes: ["data:read:notes"], agent });
void main;
