"""How a recipe of `flminillm.steps` is invoked: the one place that knows the ways.

- `run_component(name, kwargs)`: the body of every KFP component. Its inputs are the
  experiment (JSON text, hashed into the task's cache key) and the manifests of earlier
  tasks; the deployment (where the store is, the tracking server) comes from the task's
  environment, FLMINILLM_DEPLOYMENT, so that it never changes a cache key: a run that
  moves, or whose pods get other resources, keeps its cached steps.
- `call(name, cfg, **kwargs)`: run a recipe from Python with a whole `Config`: in a warm
  fork of the step server when one serves this run (the local runner), else here.
- `run_here`: here, or in `engine.gpus_per_step` ranks under the DeepSpeed launcher when the
  step trains and the engine asks for several GPUs.

`python -m flminillm.invoke serve PATH PARENT` is the step server's process and
`python -m flminillm.invoke rank ARGS OUT` a launched rank's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flminillm import launch, ledger, stepserver
from flminillm.config import (
    Config,
    ConfigError,
    DeploymentConfig,
    deployment_from_json,
    experiment_from_json,
)
from flminillm.steps import STEPS, Step

DEPLOYMENT_ENV = "FLMINILLM_DEPLOYMENT"
THREADS_ENV = "FLMINILLM_TORCH_THREADS"  # the local runner's torch thread budget per task


def spec(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise ValueError(f"unknown step {name!r}; steps: {', '.join(STEPS)}") from None


# ----------------------------------------------------------------------------------------
# the deployment in the environment
# ----------------------------------------------------------------------------------------
def deployment_from_env() -> DeploymentConfig:
    text = os.environ.get(DEPLOYMENT_ENV)
    if not text:
        raise ConfigError(
            f"{DEPLOYMENT_ENV} is not set: a step run as a pipeline task reads its deployment "
            "(store, tracking) from it. `flminillm run` sets it for the local runner and "
            "`flminillm compile` / `submit` on every task of a cluster pipeline"
        )
    return deployment_from_json(text)


@contextlib.contextmanager
def env_set(name: str, value: str | None) -> Iterator[None]:
    """Environment variable `name` set to `value` while the block runs (None: left as it
    is), restored after."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def deployment_env(cfg: DeploymentConfig) -> contextlib.AbstractContextManager:
    """FLMINILLM_DEPLOYMENT set to `cfg`'s deployment while the block runs (restored after)."""
    return env_set(DEPLOYMENT_ENV, cfg.deployment_json())


# ----------------------------------------------------------------------------------------
# invocation
# ----------------------------------------------------------------------------------------
def encode_output(step: Step, out: Any) -> Any:
    """What a KFP task returns for a recipe's output: JSON text for a manifest."""
    return json.dumps(out) if step.output == "json" else out


def run_component(name: str, kwargs: dict[str, Any]) -> Any:
    """A KFP component's body: the experiment from its input, the deployment from the
    environment, the recipe's output as the task's output."""
    kwargs = dict(kwargs)
    exp = experiment_from_json(kwargs.pop("experiment_json"))
    cfg = Config.join(exp, deployment_from_env())
    return encode_output(spec(name), call(name, cfg, **kwargs))


def call(name: str, cfg: Config, **kwargs: Any) -> Any:
    """Run the recipe `name`: in a fork of the step server when FLMINILLM_STEP_SERVER names
    one (the task's environment, working directory and output go with it), else here."""
    path = os.environ.get(stepserver.ENV)
    if path:
        payload = {"step": name, "config": cfg.to_json(), "kwargs": kwargs}
        try:
            return stepserver.call(path, payload)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            print(f"step server at {path} unreachable ({e}); running {name} here",
                  file=sys.stderr)  # fmt: skip
    return run_here(name, cfg, **kwargs)


def run_here(name: str, cfg: Config, **kwargs: Any) -> Any:
    """Run the recipe in this process, or in several ranks when it trains on several GPUs."""
    step = spec(name)
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if step.launchable and launch.needs_launch(cfg.engine):
        payload = {"step": name, "config": cfg.to_json(), "kwargs": kwargs}
        return launch.launch("flminillm.invoke", payload, cfg.engine.gpus_per_step)
    return _run_recipe(step, cfg, kwargs)


def close_federation_run(
    experiment_json: str, run_started: float, state: str, error: str = ""
) -> str:
    """The cluster pipeline's exit handler (components/exit.py): when the pipeline ended in
    `state` other than SUCCEEDED, close the federation's MLflow run (FLMINILLM_MLFLOW_RUN,
    opened by `flminillm submit`) FAILED, or KILLED for a cancelled one, with what the rounds
    it reached logged and `error` as its `flminillm.error` tag; without a run opened, log the
    whole tree from the ledger under a new run with that status. Returns the run id ('' when
    nothing was closed: success, tracking off, or a run already closed)."""
    from flminillm.artifacts import open_store_for
    from flminillm.tracking import (
        RUN_ENV,
        client_for,
        finish_federation,
        log_federation,
        tracking_uri,
    )  # fmt: skip

    cfg = Config.join(experiment_from_json(experiment_json), deployment_from_env())
    if not cfg.tracking.enabled or state.upper() == "SUCCEEDED":
        return ""
    status = "KILLED" if state.upper().startswith("CANCEL") else "FAILED"
    error = error or f"the pipeline ended {state}"
    store = open_store_for(cfg)
    run_id = os.environ.get(RUN_ENV)
    if not run_id:
        return log_federation(cfg, store, run_started=run_started, status=status, error=error)
    if client_for(tracking_uri(cfg)).get_run(run_id).info.status != "RUNNING":
        return ""
    finish_federation(cfg, store, run_id, run_started, status, error)
    return run_id


# set by the local runner, which logs each finished step to MLflow from its own process
# (one MLflow store for the whole run instead of one per forked step: 1.6 s per step)
RUNNER_LOGS_ENV = "FLMINILLM_RUNNER_LOGS_STEPS"


def _run_recipe(step: Step, cfg: Config, kwargs: dict[str, Any]) -> Any:
    """The recipe itself; with a federation run to track (FLMINILLM_MLFLOW_RUN), its ledger
    records also go to MLflow as they are written."""
    from flminillm.tracking import RUN_ENV

    run_id = os.environ.get(RUN_ENV)
    if not (run_id and cfg.tracking.enabled) or os.environ.get(RUNNER_LOGS_ENV):
        return step.fn(cfg, **kwargs)  # (the local runner logs its steps itself)
    with ledger.listening(lambda rec: _track(cfg, run_id, rec)):
        return step.fn(cfg, **kwargs)


def _track(cfg: Config, run_id: str, rec: dict) -> None:
    """Log a step's record to MLflow; a tracking failure never fails the step."""
    from flminillm.artifacts import open_store_for
    from flminillm.tracking import log_step

    try:
        log_step(cfg, open_store_for(cfg), run_id, rec)
    except Exception as e:  # noqa: BLE001 - the step's result matters more than its log
        print(f"warning: could not log {rec['step']}.{rec['party']} to MLflow: "
              f"{type(e).__name__}: {e}", file=sys.stderr)  # fmt: skip


def _from_payload(payload: dict) -> tuple[str, Config, dict]:
    from flminillm.config import config_from_json

    return payload["step"], config_from_json(payload["config"]), payload["kwargs"]


def _serve_call(payload: dict) -> Any:
    """The step server's handler, in a forked child."""
    name, cfg, kwargs = _from_payload(payload)
    return run_here(name, cfg, **kwargs)


# what every step imports: the step server imports it once, its forked children inherit it
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_tokenizers",
    "transformers.integrations.accelerate",  # imports deepspeed, which imports mlflow
    "deepspeed",
    "mlflow",
    "flminillm.aggregate",
    "flminillm.data",
    "flminillm.distill",
    "flminillm.engine",
    "flminillm.evaluation",
    "flminillm.generation",
    "flminillm.models",
    "flminillm.steps",
    "flminillm.store",
    "flminillm.tokenizer",
    "flminillm.training",
    "flminillm.update",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
)


def warm_steps(enabled: bool = True):
    """A step server for the duration of a local run (see flminillm.stepserver)."""
    return stepserver.step_server(enabled, module=__name__)


def main(argv: list[str] | None = None) -> int:
    # the DeepSpeed launcher adds --local_rank=N (LOCAL_RANK is in the environment too)
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    command = argv.pop(0)
    if command == "serve":  # the step server
        path, parent = argv[0], int(argv[1]) if len(argv) > 1 else None
        stepserver.serve(path, parent, handler=_serve_call, preload=PRELOAD)
        return 0
    if command == "rank":  # one rank of a launched step
        from flminillm.ranks import rank_world
        from flminillm.store import atomic_write_text

        args_file, out_file = argv
        name, cfg, kwargs = _from_payload(json.loads(Path(args_file).read_text()))
        out = _run_recipe(spec(name), cfg, kwargs)
        if rank_world()[0] == 0:
            atomic_write_text(out_file, json.dumps(out))
        return 0
    raise SystemExit("usage: python -m flminillm.invoke serve PATH [PARENT] | rank ARGS OUT")


if __name__ == "__main__":
    sys.exit(main())
