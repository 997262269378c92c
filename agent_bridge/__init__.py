"""The vibe agent's side of the system.

The vibe agent is a Manifest V3 browser extension (its source is ``extension/``, built by
``make agent``) that holds an identity's Ed25519 key and proves the identity with it. This
package is what the daemon mounts for it (:class:`agent_bridge.api.AgentBridge`):

- ``GET /auth/challenge`` and ``POST /auth/response``: the DID challenge login;
- ``GET /me/key``: the wrapped key, fetched once after a password login and unwrapped in
  the extension (format: docs/keys.md);
- ``POST /agent/grants``: a grant for a page's origin (the one grant implementation,
  :mod:`vibed.grants`) and that app's tokens, after the person approved it in the extension.

docs/agent.md describes the protocol between page, extension and server.
"""
