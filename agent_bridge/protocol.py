"""What the agent and the server agree on, byte for byte (no daemon imports: the tests and
tools use it too)."""

from __future__ import annotations


def challenge_message(aud: str, nonce: str) -> bytes:
    """The exact bytes an agent signs to answer a challenge (docs/auth.md)::

    vibe-auth-v1\\naud:<aud>\\nnonce:<nonce>
    """
    return f"vibe-auth-v1\naud:{aud}\nnonce:{nonce}".encode()
