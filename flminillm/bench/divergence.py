"""How far a run's server is from the pooled one: the reverse and forward KL between the two
models' next-token distributions, on the evaluation prompts (issue 13; what MiniLLM's claim
is about: mode-seeking keeps a student from spreading mass where the teacher would not).

Reverse KL(server || pooled) is estimated on the server's own answers, forward KL(pooled ||
server) on the pooled model's, each along the sequence as the exact per-position KL over the
full vocabulary (the sum over every next token, not one sampled token's log-ratio), under
greedy decoding and under temperature-1 sampling (a mean over `samples` answers per prompt,
as MiniLLM evaluates). Numbers are per answer token (nats). Both models must share one
tokenizer: a run whose server tokenizer differs from the pooled run's has no entry.

`flminillm bench quality` computes them for every finished run of a seed that has a pooled
run, after the runs (a record beside the run's, so `--resume` reuses them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flminillm.generation import response_logits, sample_batched


@torch.no_grad()
def sequence_kl(
    q_model, p_model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
    max_new_tokens: int, eos_id: int, pad_id: int, batch_size: int, samples: int, seed: int,
) -> dict[str, float]:  # fmt: skip
    """KL(q || p) per answer token along q's own answers to the prompts [N, P]: "greedy"
    (one greedy answer each) and, with `samples` > 0, "sampled" (that many temperature-1
    answers each, full vocabulary, a generator seeded with `seed`)."""
    device = next(q_model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    out: dict[str, float] = {}
    runs: list[tuple[str, torch.Generator | None]] = [("greedy", None)]
    for i in range(samples):
        g = torch.Generator(device=device)
        g.manual_seed(seed + i)
        runs.append(("sampled", g))
    sums: dict[str, list[float]] = {"greedy": [0.0, 0.0], "sampled": [0.0, 0.0]}
    kw = {"max_new_tokens": max_new_tokens, "eos_id": eos_id, "pad_id": pad_id, "top_k": 1}
    for name, g in runs:
        r = sample_batched(
            q_model, prompt_ids, prompt_mask, batch_size, greedy=g is None, generator=g, **kw
        )
        for s in range(0, prompt_ids.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            args = (r.prompt_ids[sl], r.prompt_mask[sl], r.response_ids[sl], r.response_mask[sl])
            logq = torch.log_softmax(response_logits(q_model, *args).float(), -1)
            logp = torch.log_softmax(response_logits(p_model, *args).float(), -1)
            kl = (logq.exp() * (logq - logp)).sum(-1)  # [B, T]: exact, over the vocabulary
            m = r.response_mask[sl].float()
            sums[name][0] += float((kl * m).sum())
            sums[name][1] += float(m.sum())
    for name, (total, n) in sums.items():
        if n:
            out[name] = total / n
    return out


def final_state(store, fed: str) -> dict | None:
    """The round manifest of a finished run's last evaluated round (None if it has none)."""
    recs = [r for r in store.list_records(f"{fed}/round-") if r.get("step") == "evaluate"]
    recs = [r for r in recs if r.get("status") == "succeeded"]
    if not recs:
        return None
    last = max(recs, key=lambda r: int(r["round"]))
    return store.get_json(last["outputs"]["round_manifest"]["digest"])


def _with_rounds(store, fed: str) -> str:
    """The federation id whose round records a finished run's are: its own, or, for a result
    re-filed under a new config digest (`rekeyed_from`), the one it came from."""
    for _ in range(8):
        if store.list_records(f"{fed}/round-0000/"):
            return fed
        older = [r.get("rekeyed_from") for r in store.list_records(f"{fed}/bench-result.json")]
        if not older or not older[0]:
            return fed
        fed = older[0]
    return fed


def kl_to_pooled(cfg, pooled_cfg, samples: int) -> dict | None:
    """{"reverse": {"greedy", "sampled"}, "forward": {...}} between the server of the run of
    `cfg` and that of the pooled run `pooled_cfg` (same seed, same store), on the evaluation
    prompts; None where either has not finished or their tokenizers differ. Kept as a record
    beside the run's (`<federation>/kl-to-pooled.json`), reused when present."""
    from flminillm.artifacts import PUBLIC, load_examples, load_model, open_store_for
    from flminillm.steps import _party_tokenizer, tokenizer_of

    store = open_store_for(cfg)
    fed, key = cfg.federation_id(), f"{cfg.federation_id()}/kl-to-pooled.json"
    pooled_fed = pooled_cfg.federation_id()
    for rec in store.list_records(key):
        if rec.get("pooled") == pooled_fed and rec.get("samples") == samples:
            return rec["kl"]
    mine = final_state(store, _with_rounds(store, fed))
    theirs = final_state(store, _with_rounds(store, pooled_fed))
    sid = cfg.server.id
    if mine is None or theirs is None or tokenizer_of(mine, sid) != tokenizer_of(theirs, sid):
        return None
    tok, style = _party_tokenizer(cfg, store, mine, sid)
    prompts = [
        style.prompt(e.prompt)
        for d in mine["data"]["eval"].values()
        for e in load_examples(store, PUBLIC, d)
    ]
    from flminillm.evaluation import _context
    from flminillm.generation import encode_prompts

    server = load_model(store, sid, mine["models"][sid], cfg.engine)
    pooled = load_model(store, sid, theirs["models"][sid], cfg.engine)
    new = cfg.generation.eval_max_new_tokens
    ids, mask = encode_prompts(tok, prompts, _context(server) - new)
    kw = {"max_new_tokens": new, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
          "batch_size": cfg.generation.batch_size, "samples": samples, "seed": cfg.seed * 1000}  # fmt: skip
    kl = {
        "reverse": sequence_kl(server, pooled, ids, mask, **kw),
        "forward": sequence_kl(pooled, server, ids, mask, **kw),
    }
    store.put_record(key, {"pooled": pooled_fed, "samples": samples, "kl": kl})
    return kl


def add_kl_to_pooled(base, vs, grid: dict, workdir: Path, console=None) -> None:
    """Every finished run of a method or an ablation in `grid` (not the pooled ones, not
    FedAvg's: another server architecture is not what is compared; not the faults) gets
    "kl_pooled" (`kl_to_pooled`) where its seed has a pooled run."""
    from flminillm.bench.variants import variant_config

    pooled = next((v for v in vs if v.name == "pooled"), None)
    if pooled is None:
        return
    done = {r["seed"] for r in grid["runs"].get("pooled", [])}
    samples = base.generation.eval_samples or 5
    todo = [(v, r) for v in vs if v is not pooled and v.group in ("method", "ablation")
            and v.kind != "fedavg" for r in grid["runs"].get(v.name, []) if r["seed"] in done]  # fmt: skip
    for i, (v, r) in enumerate(todo):
        cfg = variant_config(base, v, r["seed"], workdir)
        if console is not None:
            console.print(f"KL to pooled {i + 1}/{len(todo)}: {v.name} seed {r['seed']}")
        kl = kl_to_pooled(cfg, variant_config(base, pooled, r["seed"], workdir), samples)
        if kl is not None:
            r["kl_pooled"] = kl
