"""``/blob/*``: presigned uploads and downloads (issue 4). STUB: being built."""

from __future__ import annotations

from typing import Any

from attrs import define
from klein import Klein

from vibed.errors import install_error_handlers
from vibed.tokens import TokenIssuer

OPENAPI_PATHS: dict[str, Any] = {}
OPENAPI_SCHEMAS: dict[str, Any] = {}


@define(slots=False)
class BlobAPI:
    issuer: TokenIssuer

    app = Klein()
    install_error_handlers(app)
