"""infra/systemd/vibed.service: checked by `systemd-analyze verify`, its paths by the image.

The unit's layout (/opt/vibed venv, /opt/vibed/node_modules) is the image's, so the image is
a real install to check the paths and arguments of ExecStart against. There is no systemd
running as PID 1 here, so the unit itself is verified, not started.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, podman

UNIT = ROOT / "infra" / "systemd" / "vibed.service"


def unit_options() -> dict[str, list[str]]:
    """Every Key=value of the [Service] section (repeated keys kept in order)."""
    options: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            options.setdefault(key, []).append(value)
    return options


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: make test-infra installs Debian's systemd")
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing on the unit. ExecStart names /opt/vibed, which
    this machine lacks, so the copy verified here points at this checkout's twistd; the next
    test checks the real path in a real install (the image)."""
    twistd = ROOT / ".venv" / "bin" / "twistd"
    if not twistd.exists():
        pytest.fail("the project venv is missing: run `make install`")
    copy = tmp_path / "vibed.service"
    copy.write_text(UNIT.read_text().replace("/opt/vibed/bin/twistd", str(twistd)))
    done = verify(copy)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit with an unknown directive and a missing program does."""
    broken = tmp_path / "vibed.service"
    broken.write_text("[Service]\nExecStart=/nonexistent/twistd\nProtectSytem=strict\n")
    done = verify(broken)
    assert done.returncode != 0 or done.stderr.strip()


def test_unit_is_hardened_and_restarts() -> None:
    """A dedicated user, its state in StateDirectory, restart on failure, and the sandboxing a
    security reviewer looks for first."""
    options = unit_options()
    expected = {
        "User": "vibed",
        "StateDirectory": "vibed",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "KillMode": "mixed",
    }
    for key, value in expected.items():
        assert options.get(key, [None])[-1] == value, key


def test_execstart_runs_in_a_real_install(image: str) -> None:
    """ExecStart's program and arguments work where vibed is installed at /opt/vibed (the
    image): twistd takes them and lists vibed's options, and the embedded server is on the
    unit's PATH."""
    options = unit_options()
    argv = shlex.split(options["ExecStart"][-1])
    path = next(v.split("=", 1)[1] for v in options["Environment"] if v.startswith("PATH="))
    done = podman(
        "run", "--rm", "--network", "host", "--ulimit", "host",
        "-e", f"PATH={path}", "--entrypoint", argv[0], image, *argv[1:], "--help",
    )  # fmt: skip
    assert "--couchdb" in done.stdout
    found = podman(
        "run", "--rm", "--network", "host", "--ulimit", "host", "-e", f"PATH={path}",
        "--entrypoint", "sh", image, "-c", "command -v pouchdb-server && command -v node",
    ).stdout.split()  # fmt: skip
    assert found[0] == "/opt/vibed/node_modules/.bin/pouchdb-server" and found[1]
