"""The cluster side: `flminillm compile` output (caching, retries, resources, GPUs, node
selection, secrets, pipeline root, images) and the container images' contents.

No cluster and no docker engine here: the compiled YAML is checked as KFP would read it,
and the Dockerfiles are checked as text (images/check_image.py runs inside each build)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from flminillm.cli import main
from flminillm.config import ClusterConfig, StepResources, load_config

ROOT = Path(__file__).resolve().parents[1]
GPU = StepResources(
    cpu_request="2",
    cpu_limit="4",
    memory_request="8G",
    memory_limit="16G",
    gpus=1,
    accelerator="nvidia.com/gpu",
    node_selector={"nvidia.com/gpu.present": "true"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
)
SFT = StepResources(cpu_request="3", cpu_limit="6", memory_request="5G", memory_limit="7G")
DEFAULT = StepResources(cpu_request="500m", cpu_limit="1", memory_request="1G", memory_limit="3G")


def cluster_config(tiny_config, **changes):
    cluster = ClusterConfig(
        image="registry.example/flminillm:test",
        gpu_image="registry.example/flminillm-cuda:test",
        pipeline_root="s3://bucket/roots",
        retries=3,
        backoff_seconds=7,
        default_resources=DEFAULT,
        resources={"distill": GPU, "local_sft": SFT},
        s3_secret="s3-creds",
        mlflow_secret="mlflow-creds",
    )
    return tiny_config.model_copy(update={"cluster": cluster.model_copy(update=changes)})


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def compile_cli(cfg, tmp_path: Path, *extra: str) -> tuple[dict, dict, Path]:
    """Run `flminillm compile` on `cfg`; return (pipeline spec, platform spec, path)."""
    config = write_config(cfg, tmp_path / "experiment.yaml")
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--config", str(config), "-o", str(out), *extra]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 2, "expected the pipeline spec and a platform spec"
    return docs[0], docs[1], out


def executor_tasks(spec: dict):
    """(task name, task, executor label) for every task that runs a container, in the root
    DAG and in every sub-DAG (rounds, loops)."""
    components = spec["components"]
    dags = [spec["root"]["dag"]] + [c["dag"] for c in components.values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            comp = components[task["componentRef"]["name"]]
            if "executorLabel" in comp:
                yield name, task, comp["executorLabel"]


def step_of(executor: dict) -> str:
    """The step an executor runs: the component function (distill_one is a distill)."""
    args = executor["container"]["args"]
    fn = args[args.index("--function_to_execute") + 1]
    return {"distill_one": "distill"}.get(fn, fn)


def test_compiled_federation_carries_the_cluster_settings(tiny_config, tmp_path):
    from kfp import components

    cfg = cluster_config(tiny_config)
    spec, platform, path = compile_cli(cfg, tmp_path)
    assert components.load_component_from_file(str(path)).name == "fl-minillm-federation"
    assert spec["defaultPipelineRoot"] == "s3://bucket/roots"

    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = list(executor_tasks(spec))
    steps = {step_of(executors[label]) for _, _, label in tasks}
    assert steps == {
        "prepare", "list_parties", "init_model", "sample_clients", "local_sft",
        "generate", "teach", "distill", "evaluate", "track", "close_run",
    }  # fmt: skip
    logs = ("track", "close_run")  # the steps that close the federation's MLflow run
    for name, task, label in tasks:
        step = step_of(executors[label])
        # caching on (the MLflow steps always run), retries with exponential back-off
        assert task.get("cachingOptions", {}).get("enableCache", False) is (step not in logs), name
        assert task["retryPolicy"]["maxRetryCount"] == 3
        assert task["retryPolicy"]["backoffDuration"] == "7s"
        assert task["retryPolicy"]["backoffFactor"] == 2
        # resources per step, GPUs and the GPU image only where asked
        res = {"distill": GPU, "local_sft": SFT}.get(step, DEFAULT)
        container = executors[label]["container"]
        r = container["resources"]
        assert (r["resourceCpuRequest"], r["resourceCpuLimit"]) == (res.cpu_request, res.cpu_limit)
        assert (r["resourceMemoryRequest"], r["resourceMemoryLimit"]) == (
            res.memory_request,
            res.memory_limit,
        )
        # nothing is installed at run time: the image holds flminillm and kfp
        assert "pip install" not in " ".join(container["command"])
        pod = k8s[label]
        if step == "distill":
            assert container["image"] == "registry.example/flminillm-cuda:test"
            assert r["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert r["accelerator"]["resourceCount"] == "1"
            assert pod["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert pod["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
        else:
            assert container["image"] == "registry.example/flminillm:test"
            assert "accelerator" not in r
            assert "nodeSelector" not in pod and "tolerations" not in pod
        # secrets as environment variables: S3 everywhere; MLflow everywhere (every step
        # logs itself), required by the track step only
        env = {
            (s["secretName"], e["secretKey"]): (e["envVar"], s.get("optional", False))
            for s in pod["secretAsEnv"]
            for e in s["keyToEnv"]
        }
        assert env[("s3-creds", "AWS_ACCESS_KEY_ID")] == ("AWS_ACCESS_KEY_ID", False)
        assert env[("s3-creds", "AWS_SECRET_ACCESS_KEY")] == ("AWS_SECRET_ACCESS_KEY", False)
        assert env[("s3-creds", "AWS_ENDPOINT_URL")] == ("AWS_ENDPOINT_URL", False)
        uri = env[("mlflow-creds", "MLFLOW_TRACKING_URI")]
        assert uri == ("MLFLOW_TRACKING_URI", step not in logs)
        # and the deployment each task reads: the store and tracking, not the cluster
        task_env = {e["name"]: e["value"] for e in container.get("env", [])}
        deployed = json.loads(task_env["FLMINILLM_DEPLOYMENT"])
        assert deployed["store"] == json.loads(cfg.deployment_json())["store"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": "1000"}
    # the experiment travels as the default parameter; the deployment (store, tracking) in
    # every task's environment, which is not part of a cache key
    default = spec["root"]["inputDefinitions"]["parameters"]["experiment_json"]["defaultValue"]
    carried = json.loads(default)
    assert carried["name"] == "tiny"
    assert not {"cluster", "store", "tracking", "runner", "output_dir"} & set(carried)
    # the exit handler: close-run runs after the whole federation however it ended, and is
    # told how (KFP's task final status)
    root = spec["root"]["dag"]["tasks"]
    assert root["close-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["close-run"]["dependentTasks"] == ["exit-handler-1"]
    exit_dag = spec["components"][root["exit-handler-1"]["componentRef"]["name"]]["dag"]
    assert {"prepare", "fl-minillm-round", "track"} <= set(exit_dag["tasks"])
    closing = spec["components"][root["close-run"]["componentRef"]["name"]]
    assert closing["inputDefinitions"]["parameters"]["status"]["parameterType"] == (
        "TASK_FINAL_STATUS"
    )


def test_cache_keys_do_not_depend_on_deployment_settings(tiny_config, tmp_path):
    """Raising a step's memory (say after an OOM kill) and resubmitting must keep the steps'
    inputs, so that KFP's cache skips what already succeeded."""

    def config_default(cfg, sub):
        (tmp_path / sub).mkdir()
        spec, _, _ = compile_cli(cfg, tmp_path / sub)
        return spec["root"]["inputDefinitions"]["parameters"]["experiment_json"]["defaultValue"]

    bigger = DEFAULT.model_copy(update={"memory_limit": "30G"})
    a = config_default(cluster_config(tiny_config), "a")
    b = config_default(cluster_config(tiny_config, default_resources=bigger, retries=5), "b")
    assert a == b


def test_compile_round_and_no_cache(tiny_config, tmp_path):
    cfg = cluster_config(tiny_config)
    spec, platform, _ = compile_cli(cfg, tmp_path, "--round", "--no-cache")
    assert spec["pipelineInfo"]["name"] == "fl-minillm-round"
    assert spec["defaultPipelineRoot"] == "s3://bucket/roots"
    tasks = list(executor_tasks(spec))
    assert len(tasks) >= 8
    for name, task, label in tasks:
        assert not task.get("cachingOptions", {}).get("enableCache", False), name
        assert task["retryPolicy"]["maxRetryCount"] == 3
        assert label in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compile_refuses_unknown_steps_and_local_roots(tiny_config, tmp_path, capsys):
    cfg = cluster_config(tiny_config, resources={"distil": GPU})
    config = write_config(cfg, tmp_path / "bad.yaml")
    assert main(["compile", "--config", str(config), "-o", str(tmp_path / "p.yaml")]) == 2
    assert "cluster.resources: unknown steps ['distil']" in capsys.readouterr().err
    bad = GPU.model_copy(update={"tolerations": [{"key": "a", "tolerationSecond": "5"}]})
    cfg = cluster_config(tiny_config, resources={"teach": bad})
    config = write_config(cfg, tmp_path / "bad.yaml")
    assert main(["compile", "--config", str(config), "-o", str(tmp_path / "p.yaml")]) == 2
    assert "cluster.resources.teach.tolerations: unknown keys" in capsys.readouterr().err
    cfg = cluster_config(tiny_config, pipeline_root="/data/kfp")
    config = write_config(cfg, tmp_path / "bad.yaml")
    assert main(["compile", "--config", str(config), "-o", str(tmp_path / "p.yaml")]) == 2
    assert "cluster.pipeline_root" in capsys.readouterr().err


def test_local_pipeline_is_unchanged_without_the_hook(tiny_config, tmp_path):
    """The local runner path builds without any cluster option."""
    from kfp import compiler

    from pipelines.federation import build_federation_pipeline

    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_federation_pipeline(tiny_config), package_path=str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1  # no platform (Kubernetes) spec
    spec = docs[0]
    assert "defaultPipelineRoot" not in spec
    for _, task, label in executor_tasks(spec):
        assert "retryPolicy" not in task
        assert "resources" not in spec["deploymentSpec"]["executors"][label]["container"]


@pytest.mark.parametrize("name", ["demo.yaml", "demo-gpu.yaml"])
def test_example_cluster_configs_compile(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "cluster" / name)
    assert cfg.store.uri.startswith("s3://")
    assert cfg.tracking.uri.startswith("http://mlflow.flminillm.svc")
    out = tmp_path / "p.yaml"
    assert (
        main(["compile", "--config", str(ROOT / "configs" / "cluster" / name), "-o", str(out)]) == 0
    )
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    want = {cfg.cluster.image} | ({cfg.cluster.gpu_image} if "gpu" in name else set())
    assert images == want


def test_gpu_example_matches_the_gpu_overlay():
    """configs/cluster/demo-gpu.yaml schedules GPU steps where manifests/overlays/gpu's
    smoke test goes: same node selector and toleration, same image."""
    cfg = load_config(ROOT / "configs" / "cluster" / "demo-gpu.yaml")
    job = yaml.safe_load((ROOT / "manifests/overlays/gpu/gpu-smoke-test.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    for step in ("local_sft", "generate", "teach", "distill"):
        res = cfg.cluster.resources[step]
        assert res.gpus == 1
        assert res.node_selector == pod["nodeSelector"]
        assert res.tolerations == pod["tolerations"]
    assert pod["containers"][0]["image"] == cfg.cluster.gpu_image


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------
def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dependency_pins() -> dict[str, str]:
    from packaging.requirements import Requirement

    pins = {}
    for text in _pyproject()["project"]["dependencies"]:
        req = Requirement(text)
        pins[req.name.lower()] = str(req.specifier)
    return pins


def _pip_installs(dockerfile: str) -> list[str]:
    """The `pip install ...` commands of a Dockerfile's RUN lines, continuation-joined."""
    text = re.sub(r"\\\n", " ", dockerfile)
    return [m.group(0) for m in re.finditer(r"pip install [^&\n]*", text)]


@pytest.mark.parametrize("name,variant", [("Dockerfile", "cpu"), ("Dockerfile.cuda", "cu")])
def test_step_images_install_every_dependency(name, variant):
    text = (ROOT / "images" / name).read_text()
    installs = _pip_installs(text)
    pins = _dependency_pins()
    # torch first, the intended build and the project's pin
    torch = [c for c in installs if '"torch==' in c]
    assert len(torch) == 1 and f'"torch{pins["torch"]}"' in torch[0]
    assert "--index-url" in torch[0] and "download.pytorch.org/whl/" in torch[0]
    if variant == "cpu":
        assert "download.pytorch.org/whl/cpu" in torch[0]
    else:
        assert text.startswith("# syntax") and "FROM nvidia/cuda:" in text
    # deepspeed, pinned as in pyproject, built against that torch
    ds = [c for c in installs if "deepspeed" in c]
    assert len(ds) == 1 and "--no-build-isolation" in ds[0]
    assert f'"deepspeed{pins["deepspeed"]}"' in ds[0]
    assert installs.index(torch[0]) < installs.index(ds[0])
    # then the project itself: `pip install .` installs every [project].dependencies entry,
    # from pyproject.toml copied in before it; the build runs check_image.py to prove it
    assert any(re.fullmatch(r"pip install \.\s*", c) for c in installs), installs
    assert text.index("COPY pyproject.toml README.md") < text.index("pip install .")
    for pkg in ("flminillm", "components", "pipelines"):
        assert f"COPY {pkg} ./{pkg}" in text
    assert "check_image.py --torch" in text and "pip check" in text
    # any version the Dockerfile names explicitly agrees with pyproject.toml
    for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text):
        pkg, version = m.group(1).lower(), m.group(2)
        if pkg in pins:
            assert pins[pkg] == f"=={version}", (pkg, version)
    # runtime settings and a non-root user
    assert re.search(r"PYTHONUNBUFFERED=1", text)
    assert re.search(r"HF_HUB_OFFLINE=1", text)
    assert "USER 1000:1000" in text


def test_image_checker_and_build_context():
    sys.path.insert(0, str(ROOT / "images"))
    try:
        import check_image
    finally:
        sys.path.pop(0)
    # this environment was installed from pyproject.toml too: nothing is missing
    assert check_image.unmet_requirements() == []
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "flminillm/", "components/", "pipelines/"):
        assert f"!{needed}" in ignore, needed
    assert "!images/check_image.py" in ignore


def test_mlflow_image_matches_the_project():
    text = (ROOT / "images" / "Dockerfile.mlflow").read_text()
    pins = _dependency_pins()
    assert f'"mlflow{pins["mlflow"]}"' in text
    assert "psycopg2-binary==" in text and "boto3==" in text
    assert "USER 1000:1000" in text


def test_default_image_names_agree():
    """Makefile tags == ClusterConfig defaults == images the manifests run."""
    make = (ROOT / "Makefile").read_text()
    var = dict(re.findall(r"^(\w+) \?= (.+)$", make, flags=re.M))

    def expand(v: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: expand(var[m.group(1)]), v)

    assert expand(var["IMAGE"]) == ClusterConfig().image
    assert expand(var["GPU_IMAGE"]) == ClusterConfig().gpu_image
    mlflow = yaml.safe_load_all((ROOT / "manifests/base/mlflow.yaml").read_text())
    deploy = next(d for d in mlflow if d["kind"] == "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == expand(
        var["MLFLOW_IMAGE"]
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_images_fails_clearly_without_docker():
    proc = subprocess.run(
        ["make", "-s", "images", "DOCKER=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "no container engine is reachable" in proc.stderr
    assert "images/README.md" in proc.stderr


def test_a_failed_cluster_run_is_closed_in_mlflow(tiny_config, tmp_path, monkeypatch):
    """The exit handler's body (components/exit.py) against a real MLflow store: a pipeline
    that failed closes the federation run `flminillm submit` opened as FAILED with KFP's
    error; a cancelled one KILLED; a successful one is left to `track`. Without a run opened
    (submitted with tracking unreachable), the ledger is logged under a new FAILED run."""
    from kfp import dsl
    from mlflow.tracking import MlflowClient

    from components.exit import close_run
    from flminillm.invoke import DEPLOYMENT_ENV
    from flminillm.tracking import RUN_ENV, start_federation
    from tests.isolated import isolated_config

    cfg, _ = isolated_config(tiny_config, tmp_path, "closing")
    monkeypatch.setenv(DEPLOYMENT_ENV, cfg.deployment_json())
    client = MlflowClient(cfg.tracking.uri)

    def ended(state: str, error: str | None) -> dsl.PipelineTaskFinalStatus:
        return dsl.PipelineTaskFinalStatus(state, "runs/1", "fl-minillm-federation", 1, error)

    for state, error, status in (
        ("FAILED", "distill failed: out of memory", "FAILED"),
        ("CANCELLED", None, "KILLED"),
        ("SUCCEEDED", None, "RUNNING"),  # `track` closes a run that succeeded
    ):
        rid = start_federation(cfg, "submitted", 1.0)
        monkeypatch.setenv(RUN_ENV, rid)
        closed = close_run(cfg.experiment_json(), 1.0, ended(state, error))
        run = client.get_run(rid)
        assert run.info.status == status, state
        assert closed == ("" if state == "SUCCEEDED" else rid)
        if status != "RUNNING":
            assert run.data.tags["flminillm.error"] == (error or f"the pipeline ended {state}")
            assert close_run(cfg.experiment_json(), 1.0, ended(state, error)) == ""  # closed once
    monkeypatch.delenv(RUN_ENV)
    rid = close_run(cfg.experiment_json(), 1.0, ended("FAILED", "prepare failed"))
    assert client.get_run(rid).info.status == "FAILED"
