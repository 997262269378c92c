"""infra/terraform: no terraform binary can be installed here, so the HCL is parsed with
python-hcl2 (every resource the seed names exists, every variable is documented and used)
and scanned by checkov with its own checks plus ours for Scaleway (infra/terraform/checkov)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hcl2
import pytest
from conftest import ROOT

TERRAFORM = ROOT / "infra" / "terraform"
BIN = Path(sys.executable).parent


def parsed() -> dict[str, list[Any]]:
    """All blocks of all .tf files, merged by block type."""
    merged: dict[str, list[Any]] = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as f:
            for key, blocks in hcl2.load(f).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for block in parsed().get("resource", []):
        for rtype, named in block.items():
            for name, body in named.items():
                found[(rtype, name)] = body
    return found


def unquote(value: Any) -> Any:
    """An attribute's value: python-hcl2 gives attributes as one-element lists."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value.strip('"') if isinstance(value, str) else value


def test_every_resource_the_seed_names_exists() -> None:
    """VPC, private network, public gateway with NAT, Kapsule cluster vibe-prod, bucket
    vibe-objects, load balancer vibe-lb, outputs web_url and api_url."""
    found = resources()
    kinds = {rtype for rtype, _ in found}
    assert kinds >= {
        "scaleway_vpc", "scaleway_vpc_private_network", "scaleway_vpc_public_gateway",
        "scaleway_vpc_gateway_network", "scaleway_k8s_cluster", "scaleway_k8s_pool",
        "scaleway_object_bucket", "scaleway_lb", "scaleway_lb_ip",
    }  # fmt: skip
    assert unquote(found[("scaleway_k8s_cluster", "prod")]["name"]) == "vibe-prod"
    assert unquote(found[("scaleway_lb", "vibe")]["name"]) == "vibe-lb"
    assert unquote(found[("scaleway_vpc_gateway_network", "vibe")]["enable_masquerade"]) is True
    bucket = unquote(found[("scaleway_object_bucket", "objects")]["name"])
    variables = {name: body for block in parsed()["variable"] for name, body in block.items()}
    assert bucket == "${var.bucket_name}"
    assert unquote(variables["bucket_name"]["default"]) == "vibe-objects"
    outputs = {name for block in parsed()["output"] for name in block}
    assert {"web_url", "api_url"} <= outputs


def test_every_variable_is_documented_typed_and_used() -> None:
    """Each variable has a description and a type and is referenced (var.NAME) somewhere; no
    reference names an undeclared variable; region and sizes are variables."""
    variables = {name: body for block in parsed()["variable"] for name, body in block.items()}
    text = "\n".join(p.read_text() for p in TERRAFORM.glob("*.tf") if p.name != "variables.tf")
    used = set(re.findall(r"\bvar\.([A-Za-z_][A-Za-z0-9_]*)", text))
    for name, body in variables.items():
        assert body.get("description"), f"variable {name} has no description"
        assert body.get("type"), f"variable {name} has no type"
        assert name in used, f"variable {name} is declared but never used"
    assert used <= set(variables), f"undeclared: {used - set(variables)}"
    assert {"region", "zone", "node_type", "node_min_size", "node_max_size", "lb_type"} <= set(
        variables
    )


def test_outputs_are_documented_and_secrets_marked_sensitive() -> None:
    """Every output says what it is; the secret key output is sensitive."""
    outputs = {name: body for block in parsed()["output"] for name, body in block.items()}
    for name, body in outputs.items():
        assert body.get("description"), name
    assert unquote(outputs["vibed_s3_secret_key"].get("sensitive")) is True


def checkov(directory: Path) -> dict[str, Any]:
    done = subprocess.run(
        [str(BIN / "checkov"), "-d", str(directory), "--framework", "terraform",
         "--external-checks-dir", str(TERRAFORM / "checkov"), "--skip-download",
         "--output", "json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert isinstance(report, dict) and "summary" in report, (
        done.stdout[:2000] + done.stderr[-2000:]
    )
    return report


def test_checkov_passes_with_the_scaleway_checks() -> None:
    """checkov (its Terraform checks and our Scaleway ones) finds nothing, and really ran
    our checks on the resources."""
    report = checkov(TERRAFORM)
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert report["summary"]["failed"] == 0, failed
    assert report["summary"]["parsing_errors"] == 0
    ran = {c["check_id"] for c in report["results"]["passed_checks"]}
    assert len({c for c in ran if c.startswith("CKV2_VIBE_")}) == 10


@pytest.mark.parametrize(
    ("old", "new", "check"),
    [
        ('acl    = "private"', 'acl    = "public-read"', "CKV2_VIBE_1"),
        ("public_ip_disabled = true", "public_ip_disabled = false", "CKV2_VIBE_4"),
        ("allowed_origins = var.blob_cors_origins", 'allowed_origins = ["*"]', "CKV2_VIBE_3"),
    ],
)
def test_checkov_catches_a_weakened_setup(tmp_path: Path, old: str, new: str, check: str) -> None:
    """The scan can fail: a public bucket, nodes with public IPs, or CORS for any origin is
    reported by the check made for it."""
    copy = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, copy, ignore=shutil.ignore_patterns("checkov"))
    changed = False
    for path in copy.glob("*.tf"):
        text = path.read_text()
        if old in text:
            path.write_text(text.replace(old, new))
            changed = True
    assert changed, old
    report = checkov(copy)
    assert check in {c["check_id"] for c in report["results"]["failed_checks"]}
