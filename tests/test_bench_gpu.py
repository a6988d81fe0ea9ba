"""`flminillm bench gpu` at toy sizes on the CPU: the prepared GPU script runs end to end,
so that a lent GPU's minutes go to measuring, not to debugging."""

import json

from flminillm.bench.gpu import markdown
from flminillm.cli import main


def test_bench_gpu_runs_at_toy_sizes_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--tiny", "--device", "cpu", "--no-trl", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    f = result["figures"]
    for key in ("sample_client_tok_s", "sample_server_tok_s", "score_server_tok_s",
                "update_torch_tok_s", "update_torch_mfu", "zero2_vs_torch", "lora_vs_full"):  # fmt: skip
        assert f[key] > 0, key
    assert result["parameters"]["server"] > result["parameters"]["client"]
    text = "\n".join(markdown(result))
    assert "ZeRO-2 / torch" in text and "LoRA / full" in text
    assert "wrote" in capsys.readouterr().out
    assert "No GPU was lent" in "\n".join(markdown(None))
