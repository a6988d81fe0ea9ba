import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contend on a busy machine).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# --- S3 (a real moto server process on 127.0.0.1) ----------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server process, started once per test session."""
    from tests.s3_server import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Fake credentials in the environment and a fresh, empty bucket: yields (endpoint, bucket)."""
    from tests.s3_server import apply_fake_aws_env, s3_client, unique_bucket_name

    apply_fake_aws_env(monkeypatch, tmp_path)
    bucket = unique_bucket_name()
    s3_client(s3_server).create_bucket(Bucket=bucket)
    yield s3_server, bucket
