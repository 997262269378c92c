"""``/data/*``: per-identity collections of JSON documents (issue 3). STUB: being built."""

from __future__ import annotations

from typing import Any

from attrs import define
from klein import Klein

from vibed.config import Config
from vibed.couch import CouchServer
from vibed.errors import install_error_handlers
from vibed.tokens import TokenIssuer

OPENAPI_PATHS: dict[str, Any] = {}
OPENAPI_SCHEMAS: dict[str, Any] = {}


@define(slots=False)
class DataAPI:
    couch: CouchServer
    issuer: TokenIssuer

    app = Klein()
    install_error_handlers(app)


def make_data_api(config: Config, couch: CouchServer, issuer: TokenIssuer) -> DataAPI:
    return DataAPI(couch=couch, issuer=issuer)
