// Type declarations for vibe-sdk (hand-written next to the plain ES modules; checked by tsc).

export type Scope = "data:*" | "blob:*" | `data:read:${string}` | `data:write:${string}`;

export type State = "loading" | "logged-in" | "logged-out";

export interface Identity {
  id: string;
  did?: string;
  publicKey?: string;
  email?: string;
  createdAt?: string;
}

/** Where the session (tokens) is kept. */
export interface SessionStore {
  get(key: string): any;
  set(key: string, value: any): void;
  remove(key: string): void;
}

/** What the SDK asks the agent for (docs/agent.md). */
export interface VibeAgentConnectOptions {
  scopes: string[];
  appName?: string | null;
  /** The server the app talks to: the agent uses an identity it holds on that server. */
  server?: string;
  /** "none": never open the agent's consent window (resolve with identity null instead). */
  prompt?: "none";
}

/** Why the agent refused: "no-identity" (none on that server), "denied", "needs-user-action",
 * "busy", "unreachable", "revoked", "key-mismatch", "bad-request". */
export interface VibeAgentError extends Error {
  readonly code: string;
}

/** The vibe agent extension's page API (window.vibe), when it is installed. */
export interface VibeAgent {
  connect(options: VibeAgentConnectOptions): Promise<{ identity?: Identity | null } | void>;
  readonly identity: Identity | null;
  /** force: renew now (the server refused the last token); null once access is gone. */
  getToken(options?: { force?: boolean }): Promise<string | null>;
  disconnect(): Promise<void>;
  on?(event: "identity" | "disconnect", listener: (...args: any[]) => void): unknown;
  addEventListener?(event: "identity" | "disconnect", listener: (...args: any[]) => void): void;
}

export interface VibeOptions {
  /** The Vibe Cloud server, e.g. "https://vibe.example.org". */
  server: string;
  /** What the app asks the person for. Writing a collection includes reading it. */
  scopes: Scope[];
  /** Where the authorization page sends the person back (default: this page). */
  redirectUri?: string;
  /** The app's origin (default: redirectUri's origin). */
  clientId?: string;
  /** A name shown on the consent page, as the app's own (unverified) claim. */
  appName?: string;
  /** "local" (default: localStorage, shared by tabs), "memory", or your own store. */
  store?: "local" | "memory" | SessionStore;
  /**
   * A page served by the Vibe Cloud server itself (its dashboard): the session is the
   * server's own login (refresh cookie, same origin), tokens carry the first-party scope and
   * stay in memory, `login()` goes to the server's log-in page, and `account` works.
   * `scopes` are ignored. Apps on other origins never use this.
   */
  firstParty?: boolean;
  /** The agent to use (default: window.vibe when present); false to never use it. */
  agent?: VibeAgent | false;
  fetch?: typeof fetch;
  WebSocket?: typeof WebSocket;
}

/** Everything the SDK reports: the server's problem type, an OAuth error code, or "network". */
export class VibeError extends Error {
  constructor(message: string, info?: { status?: number; type?: string; body?: unknown; cause?: unknown });
  readonly status: number;
  readonly type: string;
  readonly body: unknown;
  /** The last part of a problem type: "insufficient-scope", "conflict", ... */
  readonly code: string;
}

export interface Doc {
  _id: string;
  _rev: string;
  [field: string]: unknown;
}

export interface WriteResult {
  id: string;
  rev: string;
}

export interface Page<T = Doc> {
  docs: T[];
  bookmark: string | null;
}

export type Selector = Record<string, unknown>;
export type Sort = Array<string | Record<string, "asc" | "desc">>;

export interface PageOptions {
  limit?: number;
  bookmark?: string | null;
  fields?: string[] | string;
}

export interface QueryOptions extends PageOptions {
  sort?: Sort;
}

export interface Change<T = Doc> {
  collection: string;
  id: string;
  rev: string;
  deleted: boolean;
  /** The document as `get` returns it; null when deleted. */
  doc: T | null;
  /** Opaque: pass it back as `since` to resume after it. */
  seq: string;
}

export interface RealtimeError {
  type: "error" | "unsubscribed";
  code?: string;
  reason?: string;
  message?: string;
  collection?: string;
}

export interface SubscribeOptions {
  since?: string;
  onError?: (error: RealtimeError) => void;
}

export interface LiveOptions {
  query?: Selector;
  sort?: Sort;
  limit?: number;
}

export interface LiveSnapshot<T = Doc> {
  docs: T[];
  loading: boolean;
  error: VibeError | Error | null;
}

export interface LiveQuery<T = Doc> {
  readonly current: LiveSnapshot<T>;
  watch(listener: (snapshot: LiveSnapshot<T>) => void): () => void;
}

export interface Collection<T = Doc> {
  readonly name: string;
  create(doc: Record<string, unknown>): Promise<WriteResult>;
  get(id: string): Promise<T>;
  put(id: string, doc: Record<string, unknown>): Promise<WriteResult>;
  delete(id: string, rev: string): Promise<WriteResult & { deleted: true }>;
  list(options?: PageOptions): Promise<Page<T>>;
  query(selector: Selector, options?: QueryOptions): Promise<Page<T>>;
  ensureIndex(fields: string[]): Promise<{ name: string; fields: string[]; result: string }>;
  subscribe(onChange: (change: Change<T>) => void, options?: SubscribeOptions): () => void;
  live(options?: LiveOptions): LiveQuery<T>;
}

export interface BlobRecord {
  id: string;
  key: string;
  mime: string;
  size: number;
  meta: Record<string, unknown>;
  createdAt: string;
}

export interface Files {
  upload(
    file: Blob,
    options?: { mime?: string; meta?: Record<string, unknown>; onProgress?: (p: { loaded: number; total: number }) => void },
  ): Promise<BlobRecord>;
  url(id: string): Promise<string>;
  list(options?: { limit?: number; after?: string }): Promise<{ blobs: BlobRecord[]; next: string | null }>;
  delete(id: string): Promise<null>;
  /** Bytes taken by files and pending uploads, next to the quota (null: no quota). */
  usage(): Promise<StorageUsage>;
}

export interface StorageUsage {
  used: number;
  pending: number;
  quota: number | null;
  maxSize: number;
}

export interface CollectionInfo {
  name: string;
  count: number;
}

export interface SessionInfo {
  id: string;
  createdAt: string | null;
  lastUsedAt: string | null;
  userAgent: string | null;
  /** The session making this request. */
  current: boolean;
}

export interface GrantInfo {
  id: string;
  origin: string;
  scopes: string[];
  name: string | null;
  via: "consent" | "agent";
  createdAt: string;
  lastUsedAt: string | null;
}

/** The identity itself: first-party pages only (the routes need the `identity` scope). */
export interface Account {
  collections(): Promise<CollectionInfo[]>;
  sessions(): Promise<SessionInfo[]>;
  revokeSession(id: string): Promise<null>;
  logoutEverywhereElse(): Promise<{ revoked: number }>;
  changePassword(currentPassword: string, newPassword: string): Promise<{ revokedSessions: number }>;
  grants(): Promise<GrantInfo[]>;
  revokeGrant(id: string): Promise<null>;
  /** A one-time link that downloads everything the identity owns as a ZIP archive. */
  exportLink(): Promise<{ url: string; expiresAt: number }>;
  /** Deletes the identity and all it owns; the session ends. "pending": it finishes by itself. */
  deleteIdentity(password: string): Promise<{ state: "deleted" | "pending"; detail?: string }>;
}

export type RealtimeStatus = "closed" | "connecting" | "open" | "reconnecting";

export interface StateInfo {
  /** Why the session ended: "logout", "revoked", "deleted", "agent-disconnected". */
  reason?: string;
  error?: VibeError | null;
  /** After a login: where login({returnTo}) asked to go back to. */
  returnTo?: string | null;
}

export interface Vibe {
  readonly server: string;
  readonly scopes: string[];
  readonly clientId: string;
  readonly state: State;
  readonly identity: Identity | null;
  readonly lastError: VibeError | Error | null;
  readonly files: Files;
  readonly account: Account;
  init(): Promise<State>;
  login(options?: { prompt?: "none" | "consent"; returnTo?: string }): Promise<void>;
  logout(): Promise<void>;
  token(options?: { force?: boolean }): Promise<string | null>;
  request<T = any>(method: string, path: string, body?: unknown, options?: { headers?: Record<string, string> }): Promise<T>;
  collection<T = Doc>(name: string): Collection<T>;
  on(event: "state", listener: (state: State, info: StateInfo) => void): () => void;
  on(event: "identity", listener: (identity: Identity | null) => void): () => void;
  on(event: "realtime", listener: (status: RealtimeStatus) => void): () => void;
  destroy(): void;
}

export function createVibe(options: VibeOptions): Vibe;
export function memoryStore(): SessionStore;
export function localStore(storage?: Storage): SessionStore;
