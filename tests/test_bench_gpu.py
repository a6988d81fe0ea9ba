"""`flminillm bench gpu` at toy sizes on the CPU: the prepared GPU script runs end to end,
so that a lent GPU's minutes go to measuring, not to debugging."""

import json

from flminillm.bench.gpu import markdown
from flminillm.cli import main


def test_bench_gpu_runs_at_toy_sizes_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    args = ["bench", "gpu", "--tiny", "--device", "cpu", "--no-trl", "--no-deepspeed"]
    assert main([*args, "--out", str(out)]) == 0  # (ZeRO-2 on CPU: tests/test_engine.py)
    result = json.loads(out.read_text())
    f = result["figures"]
    for key in ("sample_client_tok_s", "sample_server_tok_s", "score_server_tok_s",
                "update_torch_tok_s", "update_torch_mfu", "lora_vs_full"):  # fmt: skip
        assert f[key] > 0, key
    assert result["parameters"]["server"] > result["parameters"]["client"]
    text = "\n".join(markdown(result))
    assert "LoRA / full" in text and "zero2: not measured (not asked for" in text
    assert "wrote" in capsys.readouterr().out
    assert "No GPU was lent" in "\n".join(markdown(None))
