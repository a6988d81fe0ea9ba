"""`flminillm bench gpu`: the GPU figures of docs/performance.md, in one prepared script.

On a GPU: a server of ~0.7B parameters built from config (Llama, bf16 autocast) and a
GPT-2 client of ~110M (and SmolLM2-135M when `make models` installed it); tokens/s of
sampling (KV cache), of teacher scoring and of the distill update, the update's MFU, peak
memory; the update under ZeRO-2 against plain torch; LoRA against full; our on-policy step
against TRL's DistillationTrainer on the same GPU. Every figure is also a ratio to a
baseline measured in the same run. `--tiny --device cpu` runs the same code at toy sizes
(tests/test_bench_gpu.py), so the script is known to work before a GPU is lent.

Only torch, transformers and this package are needed; deepspeed, peft and trl are used
when importable and reported as skipped otherwise. Results: a JSON file (`--out`) that
`flminillm bench perf` folds into docs/performance.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# bf16 dense peak of the GPU (H100/H200 SXM: 989 TFLOP/s), for MFU; `--peak-tflops` overrides
DEFAULT_PEAK_TFLOPS = 989.0

SIZES = {  # (family, hidden, layers, heads, intermediate)
    "server": ("llama", 1536, 24, 12, 4096),  # ~0.73B with a 32k vocabulary
    "client": ("gpt2", 768, 12, 12, None),  # ~110M (GPT-2 small, 32k vocabulary)
}
TINY = {"server": ("llama", 64, 2, 4, None), "client": ("gpt2", 32, 2, 2, None)}


def _build(shape, vocab: int, max_positions: int, seed: int = 0):
    from flminillm.config import ModelSpec
    from flminillm.models import build_model

    family, hidden, layers, heads, inter = shape
    spec = ModelSpec(
        family=family, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=inter, max_positions=max_positions,
    )  # fmt: skip
    return build_model(spec, vocab_size=vocab, pad_id=0, eos_id=1, seed=seed)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of `fn()` over `repeats` runs after one warm-up, and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def run_gpu_bench(
    device: str = "auto",
    tiny: bool = False,
    batch: int = 32,
    prompt_len: int = 64,
    new_tokens: int = 64,
    vocab: int = 32000,
    repeats: int = 3,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    with_trl: bool = True,
    with_deepspeed: bool = True,
) -> dict:
    from flminillm import devices
    from flminillm.config import DistillConfig, EngineConfig, LoraSpec
    from flminillm.devices import device_for
    from flminillm.engine import make_engine
    from flminillm.generation import sample, score
    from flminillm.models import add_lora, count_parameters
    from flminillm.update import behaviour_logprobs, update_step

    dev = device_for(EngineConfig(device=device))
    sizes = TINY if tiny else SIZES
    if tiny:
        batch, prompt_len, new_tokens, vocab, repeats = 4, 8, 6, 300, 1
    maxpos = prompt_len + new_tokens + 8
    engine_cfg = EngineConfig(device=dev.type)
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "vocab": vocab, "figures": {}, "skipped": {},
    }  # fmt: skip
    figs = result["figures"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (batch, prompt_len), generator=g).to(dev)
    mask = torch.ones_like(ids)

    def autocast():
        return devices.autocast(engine_cfg, dev)

    server = _build(sizes["server"], vocab, maxpos).to(dev)
    client = _build(sizes["client"], vocab, maxpos, seed=1).to(dev)
    n_server = count_parameters(server)
    result["parameters"] = {"server": n_server, "client": count_parameters(client)}

    # sampling with the KV cache (the client as student), and scoring (the server as teacher)
    gen = torch.Generator(device=dev).manual_seed(0)

    def do_sample(model):
        with autocast():
            return sample(model, ids, mask, max_new_tokens=new_tokens, eos_id=-1, pad_id=0,
                          top_k=8, generator=gen)  # fmt: skip

    for name, model in (("client", client), ("server", server)):
        _peak_reset(dev)
        t, r = _timed(lambda m=model: do_sample(m), dev, repeats)
        n_tok = int(r.response_mask.sum())
        figs[f"sample_{name}_tok_s"] = n_tok / t
        figs[f"sample_{name}_peak_gib"] = _peak_gib(dev)
    r = do_sample(client)

    def do_score():
        with autocast():
            return score(server, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask,
                         r.support_ids, batch_size=batch)  # fmt: skip

    t, (teacher_logp, _) = _timed(do_score, dev, repeats)
    figs["score_server_tok_s"] = int(r.response_mask.sum()) / t
    b = {
        "prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask,
        "response_ids": r.response_ids, "response_mask": r.response_mask,
        "support_ids": r.support_ids, "teacher_logp": teacher_logp,
        "from_teacher": torch.zeros(batch, dtype=torch.bool, device=dev),
    }  # fmt: skip
    tokens = batch * (prompt_len + new_tokens)  # every position goes through the model
    d = DistillConfig(teacher_mixed=False)

    def update_figures(label: str, model, cfg: EngineConfig, n_trainable: int) -> None:
        _peak_reset(dev)
        eng = make_engine(model, 1e-5, 0.0, 1.0, cfg)
        with eng.autocast():
            behaviour = behaviour_logprobs(eng.model, b)
        model.train()
        t, _ = _timed(lambda: update_step(eng, b, behaviour, d, has_teacher_rows=False), dev,
                      repeats)  # fmt: skip
        figs[f"update_{label}_tok_s"] = tokens / t
        figs[f"update_{label}_peak_gib"] = _peak_gib(dev)
        # forward + backward: 6 FLOPs per parameter per token (frozen LoRA bases still
        # do the backward through activations: 4 + 2 * trainable share)
        flops = (
            (4 * n_server + 2 * n_trainable) * tokens if label == "lora" else 6 * n_server * tokens
        )
        figs[f"update_{label}_mfu"] = flops / t / (peak_tflops * 1e12)

    update_figures("torch", server, engine_cfg, n_server)
    if not with_deepspeed:
        result["skipped"]["zero2"] = "not asked for (--no-deepspeed)"
    else:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            result["skipped"]["zero2"] = f"deepspeed not importable: {e}"
        else:
            fresh = _build(sizes["server"], vocab, maxpos).to(dev)
            ds = EngineConfig(device=dev.type, kind="deepspeed", zero_stage=2)
            update_figures("zero2", fresh, ds, n_server)
            figs["zero2_vs_torch"] = figs["update_zero2_tok_s"] / figs["update_torch_tok_s"]
            del fresh
    try:
        lora = add_lora(_build(sizes["server"], vocab, maxpos).to(dev), LoraSpec(r=16), "0" * 64)
        update_figures("lora", lora, engine_cfg, count_parameters(lora, trainable_only=True))
        figs["lora_vs_full"] = figs["update_lora_tok_s"] / figs["update_torch_tok_s"]
        figs["lora_peak_vs_full"] = figs["update_lora_peak_gib"] / max(
            figs["update_torch_peak_gib"], 1e-9
        )
        del lora
    except ImportError as e:
        result["skipped"]["lora"] = f"peft not importable: {e}"
    server = client = b = None  # free the GPU for TRL
    if with_trl:
        try:
            from flminillm.bench.trl_compare import bench_trl

            shape = (64, 2, 4) if tiny else (768, 12, 12)
            _, trl = bench_trl(steps=3 if tiny else 10, batch_size=batch,
                               new_tokens=min(new_tokens, 16), device=dev.type, shape=shape)  # fmt: skip
            figs["trl_ours_tok_s"], figs["trl_tok_s"] = trl["ours_tok_s"], trl["trl_tok_s"]
            figs["ours_vs_trl"] = trl["ours_tok_s"] / trl["trl_tok_s"]
        except ImportError as e:
            result["skipped"]["trl"] = f"trl not importable: {e}"
    return result


def markdown(result: dict | None) -> list[str]:
    """The GPU section of docs/performance.md: the figures, or that none were measured."""
    head = ["## GPU", ""]
    if result is None:
        return head + [
            "**No GPU was lent to the sessions that built this, so no GPU figure has been "
            "measured.** Every step places its model and tensors on `engine.device` (auto: "
            "the GPU when there is one) and runs its forward passes under bf16 autocast there; "
            "`tests/test_devices.py` runs the sampler, teacher scoring and a distill update with "
            "torch's default device set to `meta`, so a tensor created on a hard-coded device "
            "fails the suite. The script that measures the figures is ready and runs at toy "
            "sizes on the CPU in `tests/test_bench_gpu.py`:",
            "",
            "```bash",
            "flminillm bench gpu --out docs/gpu.json   # then: flminillm bench perf (folds it in)",
            "# on a machine with only torch and transformers: carry wheels of pydantic, pyyaml,",
            "# peft, deepspeed, trl, datasets, rich, then",
            "PYTHONPATH=.:/tmp/site python -m flminillm.cli bench gpu --out $OUT/gpu.json",
            "```",
            "",
            "It measures, on a ~0.73B Llama server built from config and a 110M GPT-2 client "
            "(bf16 autocast, batch 32, 64 prompt + 64 new tokens): sampling and scoring "
            "tokens/s, the distill update's tokens/s, MFU and peak memory, ZeRO-2 against plain "
            "torch, LoRA (r=16) against full, and our on-policy step against TRL's "
            "DistillationTrainer on the same GPU.",
            "",
        ]
    f = result["figures"]
    rows = [
        ("sampling, client (KV cache)", f"{f['sample_client_tok_s']:.0f} tok/s", ""),
        ("sampling, server (KV cache)", f"{f['sample_server_tok_s']:.0f} tok/s",
         f"peak {f['sample_server_peak_gib']:.1f} GiB"),
        ("teacher scoring, server", f"{f['score_server_tok_s']:.0f} tok/s", ""),
        ("distill update, server, torch", f"{f['update_torch_tok_s']:.0f} tok/s",
         f"MFU {f['update_torch_mfu']:.1%}, peak {f['update_torch_peak_gib']:.1f} GiB"),
    ]  # fmt: skip
    if "zero2_vs_torch" in f:
        rows.append(("distill update, ZeRO-2 / torch", f"{f['zero2_vs_torch']:.2f}x",
                     f"peak {f['update_zero2_peak_gib']:.1f} GiB"))  # fmt: skip
    if "lora_vs_full" in f:
        rows.append(("distill update, LoRA / full", f"{f['lora_vs_full']:.2f}x",
                     f"peak {f['lora_peak_vs_full']:.2f}x of full"))  # fmt: skip
    if "ours_vs_trl" in f:
        rows.append(("on-policy step, ours / TRL DistillationTrainer", f"{f['ours_vs_trl']:.2f}x",
                     ""))  # fmt: skip
    out = head + [
        f"Measured by `flminillm bench gpu` on {result['device']} (torch {result['torch']}); "
        f"server {result['parameters']['server'] / 1e6:.0f}M, client "
        f"{result['parameters']['client'] / 1e6:.0f}M parameters, batch {result['batch']}, "
        f"{result['prompt_len']} prompt + {result['new_tokens']} new tokens.",
        "", "| what | figure | note |", "|---|---|---|",
    ]  # fmt: skip
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    for k, why in result.get("skipped", {}).items():
        out.append(f"\n{k}: not measured ({why}).")
    return out + [""]


def load_result(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
