import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_config(tmp_path):
    """configs/tiny.yaml with every output under tmp_path."""
    from flminillm.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    return cfg.model_copy(
        update={
            "output_dir": str(tmp_path / "out"),
            "store": cfg.store.model_copy(update={"uri": str(tmp_path / "store")}),
            "tracking": cfg.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path}/mlflow.db"}),
            "runner": cfg.runner.model_copy(update={"pipeline_root": str(tmp_path / "kfp")}),
        }
    )
