"""infra/helm/vibe: rendered by Helm's own Go SDK (helm-python-sdk, no helm binary), validated
against the schemas of a current Kubernetes (kubernetes-validate, strict) and scanned by
checkov, for the default and the production values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, podman

CHART = ROOT / "infra" / "helm" / "vibe"
KUBERNETES = kubernetes_validate.latest_version()
BIN = Path(sys.executable).parent
PRODUCTION = yaml.safe_load((CHART / "values-production.yaml").read_text())


def render(
    values: dict[str, Any] | None = None, namespace: str = "staging"
) -> list[dict[str, Any]]:
    """Every object the chart renders (as `helm template vibe infra/helm/vibe` would)."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(
            values=values or {}, name="vibe", namespace=namespace, is_install=True
        )
    objects = []
    for name, text in rendered.items():
        if name.endswith(".txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("values", [{}, PRODUCTION], ids=["default", "production"])
def test_renders_valid_kubernetes_objects(values: dict[str, Any]) -> None:
    """Both value sets render, and every object validates strictly (no unknown field) against
    the newest Kubernetes schemas kubernetes-validate ships."""
    objects = render(values)
    assert {o["kind"] for o in objects} >= {
        "Deployment", "Service", "Ingress", "PodDisruptionBudget", "StatefulSet",
        "ConfigMap", "Job", "NetworkPolicy", "ServiceAccount",
    }  # fmt: skip
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_validation_would_catch_a_bad_object() -> None:
    """kubernetes-validate really checks: a Deployment with a misspelt field is refused."""
    deployment = by_kind(render(), "Deployment")[0]
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_helm_lint_reports_no_error() -> None:
    """`helm lint` (the SDK's) finds no error in the chart, with either value set."""
    for values in ({}, PRODUCTION):
        report = helm.lint(CHART, values, kube_version=f"v{KUBERNETES}")
        assert not report["errors"] and all(m["severity"] < 3 for m in report["messages"]), report


def test_vibed_deployment_is_what_the_issue_asks() -> None:
    """2 replicas spread over nodes, non-root and read-only, readiness on /readyz and liveness
    on /healthz, resources set, the shared JWT key from a Secret, CouchDB and S3 credentials
    from Secrets (never a value), and a PodDisruptionBudget."""
    objects = render(PRODUCTION, namespace="prod")
    (deployment,) = by_kind(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    )
    assert pod["affinity"]["podAntiAffinity"]
    (vibed,) = pod["containers"]
    assert vibed["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert vibed["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert vibed["resources"]["limits"] and vibed["resources"]["requests"]
    assert vibed["securityContext"]["readOnlyRootFilesystem"] is True
    assert vibed["securityContext"]["allowPrivilegeEscalation"] is False
    env = env_of(vibed)
    assert env["VIBE_PUBLIC_URL"] == "https://vibe.cloud"
    assert env["COUCHDB_PASSWORD"]["secretKeyRef"]["name"] == "vibe-prod-couchdb-auth"
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "vibe-prod-s3"
    assert "$(COUCHDB_PASSWORD)" in env["VIBE_COUCHDB"]
    jwt = next(v for v in pod["volumes"] if v["name"] == "jwt")
    assert jwt["secret"]["secretName"] == "vibe-prod-jwt"
    (pdb, _) = sorted(by_kind(objects, "PodDisruptionBudget"), key=lambda o: o["metadata"]["name"])
    assert pdb["spec"]["minAvailable"] == 1
    # No Secret object: the chart references secrets, it never holds one.
    assert not by_kind(objects, "Secret")
    assert not any(
        "password" in json.dumps(o).lower() and "secretKeyRef" not in json.dumps(o)
        for o in objects
        if o["kind"] == "ConfigMap"
    )


def test_couchdb_is_a_three_pod_statefulset_with_its_cookie_from_a_secret() -> None:
    """CouchDB runs as 3 pods with persistent volumes; admin, session secret and cluster
    cookie come from the Secret; a hook Job joins the nodes; only vibed and the peers may
    reach it."""
    objects = render(PRODUCTION, namespace="prod")
    (sts,) = by_kind(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["volumeClaimTemplates"]
    env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    for name, key in (("COUCHDB_ERLANG_COOKIE", "cookie"), ("COUCHDB_PASSWORD", "adminPassword")):
        assert env[name]["secretKeyRef"] == {"name": "vibe-prod-couchdb-auth", "key": key}
    (job,) = by_kind(objects, "Job")
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    policy = next(
        p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "vibe-couchdb"
    )
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "couchdb"


def test_ingress_has_tls_from_cert_manager_for_vibe_cloud() -> None:
    """The Ingress serves vibe.cloud over TLS with a certificate cert-manager issues."""
    (ingress,) = by_kind(render(PRODUCTION, namespace="prod"), "Ingress")
    assert (
        ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt-prod"
    )
    assert ingress["spec"]["tls"][0]["hosts"] == ["vibe.cloud"]
    assert ingress["spec"]["rules"][0]["host"] == "vibe.cloud"


def test_ci_image_tag_reaches_the_pods() -> None:
    """`--set image.tag=<sha>` (what CI passes) is the image every vibed container runs."""
    values = helm.parse_set_string("image.tag=0123abc")
    (deployment,) = by_kind(render(values), "Deployment")
    images = {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    images |= {c["image"] for c in deployment["spec"]["template"]["spec"]["initContainers"]}
    assert images == {"rg.fr-par.scw.cloud/vibe/vibed:0123abc"}


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"jwt": {"existingSecret": ""}}, "jwt.existingSecret is required"),
        ({"couchdb": {"auth": {"existingSecret": ""}}}, "couchdb.auth.existingSecret is required"),
        ({"s3": {"existingSecret": ""}}, "s3.existingSecret is required"),
        (
            {"couchdb": {"auth": {"adminPassword": "admin"}}},
            "couchdb.auth.adminPassword: secrets are not values",
        ),
        ({"couchdb": {"enabled": False}}, "couchdb.externalUrl is required"),
    ],
)
def test_missing_secret_or_inline_password_stops_the_install_naming_it(
    values: dict[str, Any], named: str
) -> None:
    """A values file without a secret reference, or with a password written into it, does not
    render: the error names the value to fix."""
    with pytest.raises(helm.HelmError, match=named.replace(".", r"\.")):
        render(values)


def test_checkov_finds_nothing_in_the_rendered_chart(tmp_path: Path) -> None:
    """checkov's Kubernetes checks pass on the production manifests (each skip is an
    annotation in the chart with its reason)."""
    out = tmp_path / "manifests"
    out.mkdir()
    for i, obj in enumerate(render(PRODUCTION, namespace="prod")):
        (out / f"{i:02d}-{obj['kind']}.yaml").write_text(yaml.safe_dump(obj))
    done = subprocess.run(
        [str(BIN / "checkov"), "-d", str(out), "--framework", "kubernetes", "--compact",
         "--skip-download",
         "--quiet", "--output", "json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    summary = report["summary"] if isinstance(report, dict) else report[0]["summary"]
    failed = [] if isinstance(report, list) else report["results"]["failed_checks"]
    assert summary["failed"] == 0, json.dumps(
        [(c["check_id"], c["check_name"], c["resource"]) for c in failed], indent=1
    )
    assert summary["passed"] > 50


def test_check_secrets_init_container_refuses_weak_values(image: str, tmp_path: Path) -> None:
    """The init container's script (run here in the vibed image, as in the pod) stops on a
    weak CouchDB password naming its Secret and key, and passes good values."""
    (deployment,) = by_kind(render(PRODUCTION, namespace="prod"), "Deployment")
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    key = tmp_path / "jwt.pem"
    key.write_text(
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"
    )
    # The container runs as vibed's user, as in the pod (where the Secret volume is readable).
    tmp_path.chmod(0o755)
    key.chmod(0o644)
    env = {
        "COUCHDB_PASSWORD_NAME": "Secret vibe-prod-couchdb-auth, key adminPassword",
        "COUCHDB_COOKIE_NAME": "Secret vibe-prod-couchdb-auth, key cookie",
        "COUCHDB_COOKIE": "0123456789abcdef0123",
        "JWT_NAME": "Secret vibe-prod-jwt",
        "VIBE_JWT_KEY_FILE": "/keys/jwt.pem",
        "S3_NAME": "Secret vibe-prod-s3",
        "AWS_ACCESS_KEY_ID": "SCWXXXXXXXXXXXXXXXXX",
        "AWS_SECRET_ACCESS_KEY": "abcdefabcdefabcdefabcdef",
    }

    def run(password: str) -> subprocess.CompletedProcess[str]:
        args = [
            "run",
            "--rm",
            "--network",
            "none",
            "--ulimit",
            "host",
            "-v",
            f"{tmp_path}:/keys:ro",
        ]
        for name, value in {**env, "COUCHDB_PASSWORD": password}.items():
            args += ["-e", f"{name}={value}"]
        return podman(
            *args,
            "--entrypoint",
            init["command"][0],
            image,
            *init["command"][1:],
            *init["args"],
            check=False,
        )

    good = run("0123456789abcdef0123456789")
    assert good.returncode == 0, good.stderr
    weak = run("changeme")
    assert weak.returncode == 1
    assert "Secret vibe-prod-couchdb-auth, key adminPassword is too weak" in weak.stderr
