"""Replay (training rounds only, no evaluation split): per teacher and round of stored runs,
the prompts asked more than once, and the largest sum of the teacher's claimed p(y | x)
over its distinct answers to one of them (flminillm.aggregate.group_claim_sums, as a log), with
how many repeated prompts exceed a sum of 1.05 and 1.5. docs/algorithm.md, "Claims that
add up", has what it gave on stop 32's and stop 34's runs.

    .venv/bin/python docs/replay/claim_sums.py CONFIG WORKDIR VARIANT SEED

CONFIG: the config the runs were made with (docs/replay/stop32.yaml for /work/def32; for
stop 34's runs configs/benchmark-temperature-1.yaml with `distill: {max_claim_sum: 0}`), WORKDIR a
`flminillm bench quality` workdir, VARIANT fl-minillm, liar-fluent, ..."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from flminillm.aggregate import group_claim_sums, repeated_prompts
from flminillm.artifacts import open_store_for
from flminillm.bench.paired import final_state
from flminillm.config import load_config
from flminillm.steps import EXCHANGE, _party_tokenizer, _teaching_for, vocab_of

torch.set_num_threads(1)
cfgp, wd, variant, seed = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cfg, state = final_state(load_config(cfgp), variant, seed, wd)
store = open_store_for(cfg)
ex = store.scoped(EXCHANGE)
sid = cfg.server.id
tok, _ = _party_tokenizer(cfg, store, state, sid)
vocab = vocab_of(state, sid)
fid = cfg.federation_id()
for r in range(1, cfg.rounds + 1):
    recs = store.list_records(f"{fid}/round-{r:04d}/distill.{sid}.json")
    if not recs:
        continue
    ins = recs[0]["inputs"]
    ro = ex.get_tensors(ins["rollouts"]["digest"])
    repeated = repeated_prompts(ro["ask_prompt_ids"], ro["ask_prompt_mask"])
    out = []
    for k, v in sorted(ins.items()):
        if not k.startswith("teaching."):
            continue
        name = k.split(".", 1)[1]
        msg, _ = _teaching_for(ex, state, sid, name, v["digest"], ro, tok, vocab)
        sums = group_claim_sums(msg, repeated)
        top = float(sums.max()) if repeated else float("-inf")
        over = {lim: int((sums > math.log(lim)).sum()) for lim in (1.05, 1.5)}
        out.append(f"{name}: repeated={len(repeated)} max_log_sum={top:.3f} "
                   f"over1.05={over[1.05]} over1.5={over[1.5]}")  # fmt: skip
    print(f"{variant} s{seed} r{r} | " + " | ".join(out))
