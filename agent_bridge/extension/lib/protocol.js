// What the agent and the server agree on, byte for byte (agent_bridge/protocol.py).

/** The exact bytes signed to answer a challenge: "vibe-auth-v1\naud:<aud>\nnonce:<nonce>". */
export function challengeMessage(aud, nonce) {
  return new TextEncoder().encode(`vibe-auth-v1\naud:${aud}\nnonce:${nonce}`);
}
