"""Replay (training rounds only, no evaluation split): how hard each holder's answers pull
on the server, per family: the single-step tail KL of the server's model at the start of
the round to the teacher's log-probs on its answers, and the gradient of that KL on the
server's logits (norm per token), with the teacher's claimed p of its answer tokens and
its rest mass. docs/benchmark.md, "A floor under the teachers' claims (stop 35, dropped)".

    .venv/bin/python docs/replay/claim_pull.py docs/replay/stop32.yaml WORKDIR VARIANT SEED [ROUNDS]

WORKDIR: a `flminillm bench quality` workdir holding the runs (stop 32's: /work/def32);
VARIANT: fl-minillm, liar-fluent, ...; ROUNDS: comma-separated (default 1,3,5)."""

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from flminillm.artifacts import load_model, open_store_for
from flminillm.bench.paired import final_state
from flminillm.config import load_config
from flminillm.data import family_of_prompt
from flminillm.distill import _log1mexp, _support_mask, tail_kl
from flminillm.steps import EXCHANGE, _party_tokenizer, _teaching_for, vocab_of

torch.set_num_threads(1)
cfgp, wd, variant, seed = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rounds = [int(x) for x in sys.argv[5].split(",")] if len(sys.argv) > 5 else [1, 3, 5]
cfg, state = final_state(load_config(cfgp), variant, seed, wd)
store = open_store_for(cfg)
ex = store.scoped(EXCHANGE)
sid = cfg.server.id
tok, _ = _party_tokenizer(cfg, store, state, sid)
vocab = vocab_of(state, sid)
fid = cfg.federation_id()
holders = {f: c for c, fs in cfg.families_by_client().items() for f in fs}
for r in rounds:
    rec = store.list_records(f"{fid}/round-{r:04d}/distill.{sid}.json")[0]
    ins = rec["inputs"]
    model = load_model(store, sid, ins["model"]["digest"], cfg.engine).eval()
    ro = ex.get_tensors(ins["rollouts"]["digest"])
    pid, pm = ro["ask_prompt_ids"].long(), ro["ask_prompt_mask"].long()
    fams = [family_of_prompt(tok.decode(i[m > 0])) or "?" for i, m in zip(pid, pm, strict=True)]
    out = defaultdict(list)
    for k, v in sorted(ins.items()):
        if not k.startswith("teaching."):
            continue
        name = k.split(".", 1)[1]
        msg, _ = _teaching_for(ex, state, sid, name, v["digest"], ro, tok, vocab)
        rows = [i for i, f in enumerate(fams) if holders.get(f) == name]
        if not rows:
            continue
        rows = torch.tensor(rows)
        ids = msg["own_response_ids"][rows].long()
        mask = msg["own_response_mask"][rows].long()
        sup = msg["own_support_ids"][rows].long()
        tlp = msg["own_logp"][rows].float()
        x = torch.cat([pid[rows], ids], 1)
        am = torch.cat([pm[rows], mask], 1)
        pos = (am.cumsum(1) - 1).clamp(min=0)
        logits = (
            model(input_ids=x, attention_mask=am, position_ids=pos)
            .logits.float()[:, pid.shape[1] - 1 : -1]
            .detach()
            .requires_grad_(True)
        )
        lq = torch.log_softmax(logits, -1).gather(-1, sup.clamp(min=0))
        kl = tail_kl(lq, tlp, _support_mask(sup))
        (kl * mask).sum().backward()
        g = logits.grad.norm(dim=-1)  # per position
        m = mask.bool()
        rest = _log1mexp(
            torch.logsumexp(tlp.masked_fill(~_support_mask(sup), -1e9).double(), -1)
        ).float()
        for i, row in enumerate(rows.tolist()):
            f = fams[row]
            out[(name, f)].append(
                (
                    kl[i][m[i]].mean().item(),
                    g[i][m[i]].mean().item(),
                    tlp[i, :, 0][m[i]].mean().item(),
                    rest[i][m[i]].mean().item(),
                )
            )
    for (name, f), v in sorted(out.items()):
        t = torch.tensor(v)
        print(
            f"{variant} s{seed} r{r} {name:6s} {f:13s} n={len(v):3d} kl={t[:, 0].mean():6.3f} grad={t[:, 1].mean():6.3f} p_tok={t[:, 2].mean():7.3f} rest={t[:, 3].mean():7.2f}"
        )
