"""Blob storage (issue 4): the BlobStore interface, its stores and the blob API. STUB."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.application.service import IService

from vibed.config import Config
from vibed.couch import CouchServer
from vibed.tokens import TokenIssuer
from vibed.web import BodyPolicy


@define
class BlobComponents:
    api: Any  # vibed.api.blob.BlobAPI (has .app, a Klein)
    services: list[IService] = field(factory=list)
    body_policies: dict[bytes, BodyPolicy] = field(factory=dict)


def make_blobs(
    config: Config,
    couch: CouchServer,
    issuer: TokenIssuer,
    reactor: Any,
    clock: Callable[[], float],
) -> BlobComponents:
    from vibed.api.blob import BlobAPI

    return BlobComponents(api=BlobAPI(issuer=issuer))
