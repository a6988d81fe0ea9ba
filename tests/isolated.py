"""A test run's config with every output in its own directory."""

import json

import yaml


def isolated_config(base, tmp_path, name: str, **updates):
    """`base` with every output under tmp_path/name (and `updates`), written there as
    config.yaml: (config, its path)."""
    root = tmp_path / name
    cfg = base.model_copy(
        update={
            "output_dir": str(root / "out"),
            "store": base.store.model_copy(update={"uri": str(root / "store")}),
            "tracking": base.tracking.model_copy(update={"uri": f"sqlite:///{root}/mlflow.db"}),
            "runner": base.runner.model_copy(update={"pipeline_root": str(root / "kfp")}),
            **updates,
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.to_json())))
    return cfg, path


def inprocess_states(cfg) -> list[dict]:
    """The round manifests (0..R) of an uninterrupted run of `cfg` in this process, with the
    torch thread budget the local KFP runner gives each task (float sums depend on it), so
    their model digests equal a KFP run's: a reference that costs no KFP federation.
    MLflow off."""
    import os

    import torch

    from flminillm.inprocess import run_federation
    from flminillm.invoke import THREADS_ENV

    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    threads = torch.get_num_threads()
    os.environ[THREADS_ENV] = str(max(1, os.cpu_count() // cfg.runner.local_parallelism))
    try:
        return run_federation(cfg)
    finally:
        torch.set_num_threads(threads)
        del os.environ[THREADS_ENV]
