"""Cluster settings of the compiled pipelines: what Kubeflow Pipelines on Kubernetes needs
and the local runner ignores (caching, retries, resources, GPUs, node selection, secrets,
the pipeline root, the deployment each task reads). All of it comes from the config's
deployment (`cluster`, `store`, `tracking`; flminillm.config.DeploymentConfig).

The pipelines stay wiring only: `pipelines.federation` calls a task hook on every task it
creates with the step's name, and `cluster_task_hook` sets the step's options there. The
pipeline's parameter is the experiment alone, so changing a step's resources, retries or
image, or compiling on another machine, keeps every task's cache key.
"""

from __future__ import annotations

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import build_components
from components.exit import build_exit_component
from flminillm.config import ClusterConfig, Config, DeploymentConfig, StepResources
from flminillm.invoke import DEPLOYMENT_ENV
from flminillm.steps import STEPS
from flminillm.tracking import RUN_ENV
from pipelines.federation import TaskHook, build_federation_pipeline, build_round_pipeline

# secret key -> environment variable. boto3 reads all three (AWS_ENDPOINT_URL points it at
# MinIO or any S3-compatible store; for AWS S3 set it to the regional endpoint).
S3_SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
}
MLFLOW_SECRET_ENV = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
# basic-auth credentials of an MLflow server, used when the secret has them
MLFLOW_SECRET_ENV_OPTIONAL = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
# the images' user (images/Dockerfile, images/Dockerfile.cuda)
IMAGE_UID = 1000


def step_resources(cluster: ClusterConfig, step: str) -> StepResources:
    """The step's resources: `cluster.resources[step]`, else `cluster.default_resources`."""
    return cluster.resources.get(step, cluster.default_resources)


def settings_names() -> list[str]:
    """The step names that cluster settings (`cluster.resources`) accept."""
    return list(dict.fromkeys(s.settings_name for s in STEPS.values()))


def check_cluster_config(cluster: ClusterConfig) -> None:
    """Refuse settings that would compile to a pipeline that cannot run."""
    known = settings_names()
    unknown = sorted(set(cluster.resources) - set(known))
    if unknown:
        raise ValueError(f"cluster.resources: unknown steps {unknown}; allowed: {', '.join(known)}")
    allowed = {"key", "operator", "value", "effect"}
    for step, res in [("default_resources", cluster.default_resources), *cluster.resources.items()]:
        for t in res.tolerations:
            if set(t) - allowed:
                raise ValueError(
                    f"cluster.resources.{step}.tolerations: unknown keys {sorted(set(t) - allowed)}; "
                    f"allowed: {sorted(allowed)}"
                )
    if not cluster.pipeline_root.startswith(("s3://", "gs://", "minio://")):
        raise ValueError(
            f"cluster.pipeline_root: {cluster.pipeline_root!r} must be an object-store URI "
            "(s3://bucket/prefix) that the cluster's pods can reach"
        )


def task_deployment(dep: DeploymentConfig) -> str:
    """The deployment a cluster task reads (FLMINILLM_DEPLOYMENT): where the store is and
    how it tracks; the cluster section itself only shapes the compiled pipeline."""
    return dep.deployment.model_copy(update={"cluster": ClusterConfig()}).deployment_json()


def cluster_task_hook(
    dep: DeploymentConfig, caching: bool | None = None, mlflow_run: str | None = None
) -> TaskHook:
    """A task hook setting the deployment's cluster options on every task, and the
    deployment in its environment. `caching` overrides `cluster.caching` (False: every step
    runs again). `mlflow_run`: the federation's MLflow run, opened by `submit`, under which
    every step logs itself when it finishes."""
    cluster = dep.cluster
    enable_caching = cluster.caching if caching is None else caching
    deployment = task_deployment(dep)

    def hook(task: dsl.PipelineTask, step: str) -> None:
        if step not in STEPS or STEPS[step].form_of:
            raise ValueError(f"unknown step {step!r} (known: {', '.join(settings_names())})")
        res = step_resources(cluster, step)
        task.set_caching_options(enable_caching)
        task.set_env_variable(DEPLOYMENT_ENV, deployment)  # not part of the cache key
        if mlflow_run:
            task.set_env_variable(RUN_ENV, mlflow_run)
        if cluster.retries:
            task.set_retry(
                num_retries=cluster.retries,
                backoff_duration=f"{cluster.backoff_seconds}s",
                backoff_factor=2,
            )
        task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
        task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
        if res.gpus:
            task.set_accelerator_type(res.accelerator).set_accelerator_limit(res.gpus)
            task.set_container_image(cluster.gpu_image)
        for key, value in res.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for toleration in res.tolerations:
            kubernetes.add_toleration(task, **toleration)
        kubernetes.use_secret_as_env(
            task, secret_name=cluster.s3_secret, secret_key_to_env=S3_SECRET_ENV
        )
        # every step logs itself to MLflow when the secret is there; `track` needs it
        kubernetes.use_secret_as_env(
            task, secret_name=cluster.mlflow_secret, secret_key_to_env=MLFLOW_SECRET_ENV,
            optional=not STEPS[step].tracking,
        )  # fmt: skip
        kubernetes.use_secret_as_env(
            task,
            secret_name=cluster.mlflow_secret,
            secret_key_to_env=MLFLOW_SECRET_ENV_OPTIONAL,
            optional=True,
        )
        kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_non_root=True)

    return hook


def build_cluster_pipeline(
    cfg: Config, round_only: bool = False, caching: bool | None = None,
    mlflow_run: str | None = None,
):  # fmt: skip
    """The federation (or single-round) pipeline with `cfg.cluster`'s settings on every task
    and `cfg.cluster.pipeline_root` as its default pipeline root."""
    cluster = cfg.cluster
    check_cluster_config(cluster)
    # every component runs in cluster.image; the hook moves GPU steps to cluster.gpu_image
    ops = build_components(cluster.image)
    hook = cluster_task_hook(cfg, caching, mlflow_run)
    if round_only:
        return build_round_pipeline(cfg.experiment, ops, task_hook=hook,
                                    pipeline_root=cluster.pipeline_root)  # fmt: skip
    # a failed or cancelled run closes its MLflow run too (components/exit.py)
    return build_federation_pipeline(
        cfg.experiment, ops, task_hook=hook, pipeline_root=cluster.pipeline_root,
        exit_op=build_exit_component(cluster.image),
    )  # fmt: skip


def compile_pipeline(
    cfg: Config,
    package_path: str | Path,
    round_only: bool = False,
    caching: bool | None = None,
    mlflow_run: str | None = None,
) -> Path:
    """Compile the cluster pipeline to KFP YAML at `package_path`."""
    path = Path(package_path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_cluster_pipeline(cfg, round_only, caching, mlflow_run)
    compiler.Compiler().compile(pipeline, package_path=str(path))
    return path
