"""Options of issue 11 refuse what they cannot do, with one line naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import self_signed

from vibed.config import OPTIONS, Config, ConfigError


def raw(**values: str) -> dict[str, str | None]:
    options: dict[str, str | None] = {name: default for name, default, _ in OPTIONS}
    options["couchdb"] = "http://127.0.0.1:5984/"
    options.update({k.replace("_", "-"): v for k, v in values.items()})
    return options


def self_signed_pem(tmp_path: Path) -> Path:
    """A PEM file with the harness's throwaway key and certificate (an ssl: endpoint)."""
    from cryptography.hazmat.primitives import serialization

    cert, key = self_signed()
    path = tmp_path / "tls.pem"
    path.write_bytes(
        key.to_cryptography_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.to_cryptography().public_bytes(serialization.Encoding.PEM)
    )
    return path


def test_workers_need_a_socket_they_can_share(tmp_path: Path) -> None:
    """--workers above 1 needs a tcp:/tcp6:/unix: port (workers adopt a bare socket, so no
    TLS endpoint); a count out of range is refused; one worker takes any endpoint."""
    assert Config.validate(raw(workers="4", port="tcp:0")).workers == 4
    assert Config.validate(raw(workers="2", port=f"unix:{tmp_path}/s")).workers == 2
    pem = self_signed_pem(tmp_path)
    assert Config.validate(raw(workers="1", port=f"ssl:0:privateKey={pem}")).workers == 1
    with pytest.raises(ConfigError, match="^--workers: .*tcp:"):
        Config.validate(raw(workers="2", port=f"ssl:0:privateKey={pem}"))
    for bad in ("0", "65", "two"):
        with pytest.raises(ConfigError, match="^--workers: "):
            Config.validate(raw(workers=bad))


def test_access_log_and_batch_window(tmp_path: Path) -> None:
    """--access-log takes '-', 'off' or a file in an existing directory; the realtime batch
    window is a whole number of milliseconds, 0 or more, and reaches the realtime settings."""
    assert Config.validate(raw(access_log="off")).access_log == "off"
    assert Config.validate(raw(access_log=str(tmp_path / "a.log"))).access_log.endswith("a.log")
    with pytest.raises(ConfigError, match="^--access-log: "):
        Config.validate(raw(access_log=str(tmp_path / "missing" / "a.log")))
    config = Config.validate(raw(realtime_batch_ms="0"))
    assert config.extra["realtime"]["batch_ms"] == 0.0
    with pytest.raises(ConfigError, match="^--realtime-batch-ms: "):
        Config.validate(raw(realtime_batch_ms="-1"))
