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
