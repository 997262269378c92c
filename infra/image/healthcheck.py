"""The image's HEALTHCHECK: exit 0 when vibed answers ``GET /healthz`` on its own port.

The port comes from ``VIBE_PORT`` (a Twisted endpoint string, ``tcp:3000`` by default), so a
container started with another port, or on the host's network, is still checked correctly.
Only the standard library: this runs every 30 s and must stay cheap.
"""

import os
import re
import ssl
import sys
import urllib.request


def target(endpoint: str) -> str:
    """The /healthz URL of a Twisted server endpoint string (tcp:3000, ssl:port=443:...)."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", endpoint)]
    host, port = "127.0.0.1", "3000"
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if not _ and part.isdigit():
            port = part
        elif key == "port":
            port = value
        elif key == "interface" and value not in ("", "0.0.0.0", "::"):  # noqa: S104
            host = f"[{value}]" if ":" in value else value
    scheme = "https" if parts[0] == "ssl" else "http"
    return f"{scheme}://{host}:{port}/healthz"


def main() -> int:
    url = target(os.environ.get("VIBE_PORT", "tcp:3000"))
    # Liveness, not identity: vibed's own TLS certificate may be one no CA vouches for.
    context = ssl._create_unverified_context()  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:  # noqa: S310
            return 0 if response.status == 200 else 1
    except Exception as e:  # noqa: BLE001  (any failure is "unhealthy", said in one line)
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
