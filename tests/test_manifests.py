"""manifests/: every overlay renders with kustomize (`kubectl kustomize`, offline), each
object validates against the Kubernetes 1.31 schema (kubernetes-validate, strict), every
pod is hardened and sized, and no secret holds a real value."""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flminillm.config import ClusterConfig
from pipelines.cluster import MLFLOW_SECRET_ENV, S3_SECRET_ENV

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = sorted(p.parent.name for p in (ROOT / "manifests/overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.31.0"
# Secret keys whose values are not secret (names, addresses); every other value must be a
# CHANGE-ME placeholder
NON_SECRET_KEYS = {"POSTGRES_USER", "POSTGRES_DB", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed"
)


@functools.cache
def render(path: str) -> tuple[dict, ...]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] not in POD_KINDS:
        return None
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def secrets(objs) -> dict[str, dict[str, str]]:
    return {
        o["metadata"]["name"]: {
            k: base64.b64decode(v).decode() for k, v in (o.get("data") or {}).items()
        }
        | dict(o.get("stringData") or {})
        for o in objs
        if o["kind"] == "Secret"
    }


def test_overlays_exist():
    assert {"dev", "gpu", "kfp-standalone"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schema(overlay):
    import kubernetes_validate

    objs = render(f"manifests/overlays/{overlay}")
    assert objs
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(p) for p in err.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {err.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened_sized_and_probed(overlay):
    objs = render(f"manifests/overlays/{overlay}")
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, what
        assert pod_sc.get("seccompProfile") == {"type": "RuntimeDefault"}, what
        assert spec.get("automountServiceAccountToken") is False, what
        long_running = obj["kind"] not in ("Job", "CronJob")
        for c in spec.get("initContainers", []) + spec["containers"]:
            name = f"{what} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert sc.get("readOnlyRootFilesystem") is True, name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), name
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), name
            if long_running:
                assert "readinessProbe" in c and "livenessProbe" in c, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_placeholders_and_references_resolve(overlay):
    objs = render(f"manifests/overlays/{overlay}")
    found = secrets(objs)
    assert found
    for name, data in found.items():
        for key, value in data.items():
            if key in NON_SECRET_KEYS:
                continue
            assert value.startswith("CHANGE-ME"), f"secret {name}: {key} is not a placeholder"
    # every secretKeyRef of a pod names a secret and key of this rendering
    for obj in objs:
        spec = pod_spec(obj)
        for c in (spec or {}).get("containers", []):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in found.get(ref["name"], {}), (obj["metadata"], ref)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pipeline_pods_find_their_secrets_and_account(overlay):
    """The secrets and keys pipelines/cluster.py maps into the steps' environment exist,
    with the names the config defaults to, beside the pipeline's service account."""
    objs = render(f"manifests/overlays/{overlay}")
    found = secrets(objs)
    cluster = ClusterConfig()
    assert set(S3_SECRET_ENV) <= set(found[cluster.s3_secret])
    assert set(MLFLOW_SECRET_ENV) <= set(found[cluster.mlflow_secret])
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    assert ("ServiceAccount", "flminillm-pipeline") in by_kind
    role = by_kind[("Role", "flminillm-pipeline")]
    secret_rule = next(r for r in role["rules"] if "secrets" in r["resources"])
    assert {cluster.s3_secret, cluster.mlflow_secret} <= set(secret_rule["resourceNames"])
    assert secret_rule["verbs"] == ["get"]
    binding = by_kind[("RoleBinding", "flminillm-pipeline")]
    assert binding["roleRef"]["name"] == "flminillm-pipeline"
    namespace = "kubeflow" if overlay == "kfp-standalone" else "flminillm"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "flminillm-pipeline", "namespace": namespace}
    ]
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == namespace, o["metadata"]


def test_base_runs_the_services():
    objs = render("manifests/overlays/dev")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for name in ("minio", "postgres", "mlflow"):
        assert ("Deployment", name) in kinds and ("Service", name) in kinds
    assert ("PersistentVolumeClaim", "minio-data") in kinds
    assert ("PersistentVolumeClaim", "postgres-data") in kinds
    assert ("Job", "minio-buckets") in kinds
    mlflow = next(
        o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"
    )
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--backend-store-uri postgresql://" in args
    assert "--artifacts-destination s3://" in args
    assert "--host 0.0.0.0" in args


def test_dev_is_small_and_gpu_keeps_services_off_gpu_nodes():
    def deployments(path):
        return {o["metadata"]["name"]: o for o in render(path) if o["kind"] == "Deployment"}

    def mem(q: str) -> int:
        units = {"Mi": 2**20, "Gi": 2**30}
        return int(q[:-2]) * units[q[-2:]]

    dev, gpu = deployments("manifests/overlays/dev"), deployments("manifests/overlays/gpu")
    for name, d in dev.items():
        assert d["spec"]["replicas"] == 1
        small = d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        full = gpu[name]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert mem(small["memory"]) < mem(full["memory"]), name
        assert "affinity" not in d["spec"]["template"]["spec"]
    for name, d in gpu.items():
        terms = d["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.present", name
    objs = render("manifests/overlays/gpu")
    job = next(o for o in objs if o["metadata"]["name"] == "gpu-smoke-test")
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and pod["tolerations"]
    quota = next(o for o in objs if o["kind"] == "ResourceQuota")
    assert "requests.nvidia.com/gpu" in quota["spec"]["hard"]


def test_kfp_launcher_finds_the_pipeline_root():
    """Standalone KFP: the launcher's s3 provider uses the secret the steps get."""
    objs = render("manifests/overlays/kfp-standalone")
    cm = next(
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kfp-launcher"
    )
    s3 = yaml.safe_load(cm["data"]["providers"])["s3"]["default"]
    ref = s3["credentials"]["secretRef"]
    cluster = ClusterConfig()
    assert ref["secretName"] == cluster.s3_secret
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(secrets(objs)[cluster.s3_secret])
    assert cluster.pipeline_root.startswith("s3://")
    endpoint = secrets(objs)[cluster.s3_secret]["AWS_ENDPOINT_URL"]
    assert endpoint.endswith("//" + s3["endpoint"])  # the same MinIO as the steps use
