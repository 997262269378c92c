// Type declarations for vibe-react (hand-written; checked by tsc).
import type { ReactNode } from "react";
import type { Doc, Identity, LiveSnapshot, Selector, Sort, State, Vibe, VibeError } from "vibe-sdk";

export function VibeProvider(props: { client: Vibe; children?: ReactNode }): ReactNode;
export function useVibe(): Vibe;
export function useIdentity(): {
  state: State;
  identity: Identity | null;
  login: Vibe["login"];
  logout: Vibe["logout"];
};
export function useCollection<T = Doc>(
  name: string,
  options?: { query?: Selector; sort?: Sort; limit?: number },
): LiveSnapshot<T>;
export function useDocument<T = Doc>(
  name: string,
  id: string | null | undefined,
): { doc: T | null; loading: boolean; error: VibeError | Error | null };
