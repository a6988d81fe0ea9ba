"""`flminillm bench central`: one teacher, one warm-started student, one task set; every
method trains a copy of the student for the same optimizer steps and is scored on the
evaluation split (nothing is tuned on it). It isolates what the federated step's adaptations
(a top-k support, per-sequence teacher mixing) cost against MiniLLM as published (S = V,
per-token mixing), beside SFT, SeqKD, word-level KD, GKD and TRL's DistillationTrainer.
METHODS is the one list of methods; the per-seed models and each (method, seed) result are
kept in --workdir, so that --resume runs only what is missing. Report: docs/central.md.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from flminillm.artifacts import seed as derive
from flminillm.config import Config, DistillConfig, load_config
from flminillm.data import Example
from flminillm.devices import generator, to_device, to_host
from flminillm.distill import lm_loss, masked_mean, support_kl
from flminillm.generation import Rollout, encode_prompts, response_logits, sample_batched
from flminillm.store import atomic_write_bytes, atomic_write_text
from flminillm.update import Batch, as_floats, behaviour_logprobs, distill_epochs

METRICS = ("exact_match", "rouge_l", "reverse_kl", "forward_kl")
PAIR = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
# MiniLLM as in the paper and microsoft/LMOps (minillm/losses.py): per-token teacher mixing
# (alpha 0.2) with weights q / (0.8 q + 0.2 p), the single-step KL unweighted, returns
# length-normalised, discounted (0.95) and whitened, PPO clipping 0.2
MINILLM = dict(method="reverse_kl", alpha=0.2, teacher_mixed=True, prefix_iw=False,
               single_step=True, iw_single_step=False, length_norm=True, gamma=0.95,
               whiten_returns=True, tail_bucket=False, clip_eps=0.2, warmup_rounds=0)  # fmt: skip

# the federated step past its warm-up rounds (DistillConfig.for_round): MiniLLM's teacher-mixed
# share, SeqKD off; the central student is warm-started already
ON_POLICY = dict(alpha=0.2, warmup_rounds=0, seqkd_rounds=0)


def _on_policy(**update) -> Callable[[DistillConfig], DistillConfig]:
    """The distill section after the warm-up (ON_POLICY), with `update` on top."""
    return lambda d: d.model_copy(update={**ON_POLICY, **update})


@dataclass
class Setup:
    """One seed's shared setting: data, tokenizer, the teacher and the warm-started student."""

    cfg: Config  # the benchmark's config with this seed
    tok: Any
    style: Any
    train: list[Example]  # the labelled training set of every family
    eval_sets: dict[str, list[Example]]  # the evaluation split
    teacher: Any
    student: Any  # the warm start; each method trains a copy
    steps: int
    context: int  # the shorter context of the two models
    reference: dict  # the teacher's and the warm start's evaluation

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def encode(self, exs: list[Example], room: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts, cut to leave `room` positions (default: the longest answer
        generated) in the shorter context."""
        g = self.cfg.generation
        texts = [self.style.prompt(e.prompt) for e in exs] or [""]
        room = room or max(g.max_new_tokens, g.eval_max_new_tokens)
        ids, mask = encode_prompts(self.tok, texts, self.context - room)
        return ids[: len(exs)].to(self.device), mask[: len(exs)].to(self.device)

    def sample(self, model, exs, gen, *, top_k=1, temperature=1.0, new=0) -> Rollout:
        g, (ids, mask) = self.cfg.generation, self.encode(exs)
        return sample_batched(
            model, ids, mask, g.batch_size, max_new_tokens=new or g.max_new_tokens,
            eos_id=self.tok.eos_token_id, pad_id=self.tok.pad_token_id, top_k=top_k,
            temperature=temperature, generator=gen,
        )  # fmt: skip


def prompt_batches(s: Setup) -> Iterator[list[Example]]:
    """The training prompts every method sees, in one seeded order: endless batches."""
    rng = random.Random(derive(s.cfg, "central-prompts"))
    b = min(s.cfg.distill.batch_size, len(s.train))
    while True:
        order = list(s.train)
        rng.shuffle(order)
        yield from (order[i : i + b] for i in range(0, len(order) - b + 1, b))


def _pairs(r: Rollout) -> Batch:
    return {k: getattr(r, k) for k in PAIR}


@torch.no_grad()
def _with_teacher(s: Setup, b: Batch) -> Batch:
    """`b` with the teacher's full next-token logits on its responses [B, T, V]."""
    return {**b, "teacher_logits": response_logits(s.teacher, *(b[k] for k in PAIR)).float()}


def full_support(response_ids: torch.Tensor, teacher_logits: torch.Tensor):
    """MiniLLM's support S = V in the layout minillm_loss reads: the sampled token first,
    then the whole vocabulary (whose repeat of y_t is masked as a duplicate):
    ([B, T, V+1] ids, [B, T, V+1] teacher log-probs)."""
    b, t, v = teacher_logits.shape
    vocab = torch.arange(v, device=response_ids.device).expand(b, t, v)
    ids = torch.cat([response_ids[..., None], vocab], dim=-1)
    return ids, torch.log_softmax(teacher_logits.float(), -1).gather(-1, ids)


@torch.no_grad()
def sample_mixed(student, teacher, ids, mask, *, alpha, max_new_tokens, eos_id, pad_id, gen):
    """MiniLLM's teacher-mixed sampling: every token drawn from (1 - alpha) q + alpha p,
    both models with their KV cache: response ids and mask [N, T]."""
    models = (student.eval(), teacher.eval())
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True) for m in models]
    last, done, toks, keep = pos[:, -1], torch.zeros_like(pos[:, -1], dtype=torch.bool), [], []
    for _ in range(max_new_tokens):
        q, p = (torch.softmax(o.logits[:, -1].float(), -1) for o in outs)
        tok = torch.multinomial((1 - alpha) * q + alpha * p, 1, generator=gen).squeeze(-1)
        toks.append(torch.where(done, torch.full_like(tok, pad_id), tok))
        keep.append((~done).long())
        done = done | (toks[-1] == eos_id)
        if bool(done.all()):
            break
        mask, last = torch.cat([mask, mask.new_ones(len(tok), 1)], -1), last + 1
        outs = [m(input_ids=toks[-1][:, None], attention_mask=mask, position_ids=last[:, None],
                  past_key_values=o.past_key_values, use_cache=True)
                for m, o in zip(models, outs, strict=True)]  # fmt: skip
    return torch.stack(toks, 1), torch.stack(keep, 1)


# --- the methods ------------------------------------------------------------------------------
def _labelled(s: Setup, exs, gen, model) -> Batch:
    from flminillm.training import collate

    eos, cut = s.tok.eos_token_id, s.context - min(16, s.context // 2)  # keep some prompt
    rows = [((s.tok.encode(s.style.target(e.answer), add_special_tokens=False) + [eos])[:cut], 0)
            for e in exs]  # fmt: skip
    c = to_device(collate(rows, s.tok.pad_token_id), s.device)
    ids, mask = s.encode(exs, room=c["input_ids"].shape[1])
    return dict(zip(PAIR, (ids, mask, c["input_ids"], c["attention_mask"]), strict=True))


def _teacher_answers(s: Setup, exs, gen, model) -> Batch:
    return _pairs(s.sample(s.teacher, exs, gen, temperature=s.cfg.generation.temperature))


def _student_samples(s: Setup, exs, gen, model) -> Batch:
    return _with_teacher(s, _pairs(s.sample(model, exs, gen)))


def _lm(logits: torch.Tensor, b: Batch) -> torch.Tensor:
    return lm_loss(logits, b["response_ids"], b["response_mask"])


def token_kl(logits: torch.Tensor, b: Batch, reverse: bool) -> torch.Tensor:
    """Per-token KL over the full vocabulary, averaged over the response tokens: KL(q || p)
    (`reverse`) or KL(p || q); q: the student's logits [B, T, V], p: b["teacher_logits"]."""
    q, p = logits.float(), b["teacher_logits"]
    return masked_mean(support_kl(q, p) if reverse else support_kl(p, q), b["response_mask"])


def _engine(s: Setup, model):
    from flminillm.engine import make_engine

    d = s.cfg.distill
    return make_engine(model, d.lr, 0.0, d.max_grad_norm, s.cfg.engine)


def _token_level(data: Callable, loss: Callable) -> Callable:
    """A method of one step per batch of prompts: `data` makes the batch, `loss` scores the
    student's logits on it."""

    def train(s: Setup, model, name: str) -> dict:
        eng, gen, losses = _engine(s, model), generator(s.device, derive(s.cfg, name)), []
        stream = prompt_batches(s)
        for _ in range(s.steps):
            b = data(s, next(stream), gen, model)
            model.train()
            with eng.autocast():
                value = loss(response_logits(eng.model, *(b[k] for k in PAIR)), b)
            eng.backward(value)
            eng.step()
            losses.append(value.detach())
        return {"loss_first": float(losses[0]), "loss_last": float(losses[-1])}

    return train


def _minillm_batch(s: Setup, model, exs, d: DistillConfig, gen) -> Batch:
    """Rollouts of MiniLLM's per-token mixed sampling, with the full teacher distribution."""
    ids, mask = s.encode(exs)
    resp, rmask = sample_mixed(model, s.teacher, ids, mask, alpha=d.alpha, gen=gen,
                               max_new_tokens=s.cfg.generation.max_new_tokens,
                               eos_id=s.tok.eos_token_id, pad_id=s.tok.pad_token_id)  # fmt: skip
    b = _with_teacher(s, dict(zip(PAIR, (ids, mask, resp, rmask), strict=True)))
    sup, tlogp = full_support(resp, b.pop("teacher_logits"))
    return {**b, "support_ids": sup, "teacher_logp": tlogp * rmask[..., None],
            "from_teacher": torch.zeros(len(exs), dtype=torch.bool, device=s.device)}  # fmt: skip


def _federated_batch(s: Setup, model, exs, d: DistillConfig, gen) -> Batch:
    """The federation's message path with one teacher: the student's rollouts with its top-k
    support (generation.sample), the teacher's scores on it and its answers to a share alpha
    of the prompts (the teach step's teach_same), assembled as the distill step does."""
    from flminillm.aggregate import assemble_batch
    from flminillm.steps import teach_same

    g, n = s.cfg.generation, len(exs) - (round(d.alpha * len(exs)) if d.teacher_mixed else 0)
    r = s.sample(model, exs[:n], gen, top_k=g.top_k, temperature=g.temperature)
    aids, amask = s.encode(exs[n:])
    msg = to_host({**_pairs(r), "support_ids": r.support_ids, "ask_prompt_ids": aids,
                   "ask_prompt_mask": amask})  # fmt: skip
    teaching = teach_same(s.teacher, s.tok, msg, g, gen)
    return to_device(assemble_batch(msg, [teaching], torch.ones(1), d)[0], s.device)


def _with_top_k(make_batch: Callable, top_k: int | None = None) -> Callable:
    """make_batch with a support of top_k + 1 tokens (the student's sampled token and its
    top_k others) on its rollouts and on the teacher's answers; by default S = V
    (top_k = V - 1), where the tail bucket is empty."""

    def batch(s: Setup, model, exs, d: DistillConfig, gen) -> Batch:
        k = len(s.tok) - 1 if top_k is None else min(top_k, len(s.tok) - 1)
        g = s.cfg.generation.model_copy(update={"top_k": k})
        return make_batch(dataclasses.replace(s, cfg=s.cfg.model_copy(update={"generation": g})),
                          model, exs, d, gen)  # fmt: skip

    return batch


def _ppo(make_batch: Callable, hp: Callable[[DistillConfig], DistillConfig]) -> Callable:
    """A method of rollouts and PPO epochs (flminillm.update.distill_epochs, with the LM loss
    on the labelled data): each collection takes generation.prompts_per_round prompts (fewer
    at the end of the budget), as one federated round does."""

    def train(s: Setup, model, name: str) -> dict:
        from flminillm.training import batches, encode_examples

        d0, g, stream = hp(s.cfg.distill), s.cfg.generation, prompt_batches(s)
        eng, gen = _engine(s, model), generator(s.device, derive(s.cfg, name))
        rows = encode_examples(s.tok, s.train, s.context, s.cfg.local_sft.prompt_loss, s.style)
        lm = batches(rows, d0.batch_size, s.tok.pad_token_id, derive(s.cfg, name, "lm"))
        done, r, stats = 0, 0, []
        while done < s.steps:
            r, left = r + 1, s.steps - done
            d = d0.for_round(r)
            k = max(1, min(math.ceil(g.prompts_per_round / d.batch_size), left // d.epochs))
            d = d.model_copy(update={"epochs": min(d.epochs, left)})
            with eng.autocast():
                batch = make_batch(s, model, [e for _ in range(k) for e in next(stream)], d, gen)
                behaviour = behaviour_logprobs(model, batch, g.batch_size)
            model.train()
            stats.append(as_floats(distill_epochs(
                eng, batch, behaviour, d, order_seed=derive(s.cfg, name, "order", r),
                seqkd=d.seqkd_coef > 0 and r <= d.seqkd_rounds,
                lm_batches=lm if d.lm_coef else None,
            )))  # fmt: skip
            done += int(stats[-1]["updates"])
        return {"collections": r, "loss_first_collection": stats[0]["loss"],
                "loss_last_collection": stats[-1]["loss"]}  # fmt: skip

    return train


def _trl(s: Setup, model, name: str) -> dict:
    """TRL's DistillationTrainer with beta = 1: on-policy KL(student || teacher) per token over
    the full vocabulary (TRL 1.16: 0 = forward KL(teacher || student), 0.5 = JSD)."""
    import tempfile
    import warnings

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DistillationConfig, DistillationTrainer

    from flminillm.devices import uses_bf16

    d, stream = s.cfg.distill, prompt_batches(s)
    prompts = [s.style.prompt(e.prompt) for _ in range(s.steps) for e in next(stream)]
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DistillationConfig(
            output_dir=out, per_device_train_batch_size=len(prompts) // s.steps,
            max_steps=s.steps, max_completion_length=s.cfg.generation.max_new_tokens, beta=1.0,
            temperature=1.0, top_k=0, learning_rate=d.lr, lr_scheduler_type="constant",
            max_grad_norm=d.max_grad_norm, adam_beta2=0.95, weight_decay=0.0,
            bf16=uses_bf16(s.cfg.engine, s.device), gradient_checkpointing=False,
            use_cpu=s.device.type == "cpu", report_to=[], logging_steps=1, save_strategy="no",
            disable_dropout=True, shuffle_dataset=False, seed=derive(s.cfg, name),
            disable_tqdm=True,
        )  # fmt: skip
        trainer = DistillationTrainer(model=model, teacher_model=s.teacher, args=args,
                                      train_dataset=Dataset.from_dict({"prompt": prompts}),
                                      processing_class=s.tok)  # fmt: skip
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"loss_first": losses[0], "loss_last": losses[-1]}


@dataclass(frozen=True)
class Method:
    train: Callable[[Setup, Any, str], dict]  # (setup, the student's copy, name) -> statistics
    note: str  # what it is, and which library functions do it
    loss: Callable | None = None  # the per-batch loss of a one-step-per-batch method


def _tok(data: Callable, loss: Callable, note: str) -> Method:
    return Method(_token_level(data, loss), note, loss)


_rkl, _fkl = partial(token_kl, reverse=True), partial(token_kl, reverse=False)
METHODS: dict[str, Method] = {
    "sft": _tok(_labelled, _lm, "cross-entropy on the labelled answers, no teacher "
                "(distill.lm_loss)"),
    "seqkd": _tok(_teacher_answers, _lm, "cross-entropy on the teacher's answers to the same "
                  "prompts, sampled at generation.temperature (distill.lm_loss)"),
    "forward-kd": _tok(lambda s, e, g, m: _with_teacher(s, _teacher_answers(s, e, g, m)), _fkl,
                       "word-level KD: per-token KL(p‖q) over the full vocabulary on the "
                       "teacher's sampled answers (distill.support_kl, S = V)"),
    "gkd-forward": _tok(_student_samples, _fkl, "GKD, lambda 1: per-token KL(p‖q) over the full "
                        "vocabulary on the student's temperature-1 samples (distill.support_kl)"),
    "gkd-reverse": _tok(_student_samples, _rkl, "GKD, lambda 1: per-token KL(q‖p) over the full "
                        "vocabulary on the student's temperature-1 samples (distill.support_kl)"),
    "minillm": Method(_ppo(_minillm_batch, lambda d: d.model_copy(update=MINILLM)),
                      "MiniLLM as published: per-token mixed sampling (alpha 0.2, weights q / "
                      "(0.8 q + 0.2 p)), distill.minillm_loss with S = V (single-step KL "
                      "unweighted, gamma 0.95, length norm, whitening, PPO clip 0.2) and "
                      "lm_coef x LM loss, through update.distill_epochs"),
    "federated-step": Method(_ppo(_federated_batch, lambda d: d),
                             "the federation's step with the config's distill section: student "
                             "rollouts with their top-k support (generation.sample), the "
                             "teacher's scores and answers (steps.teach_same), aggregate."
                             "assemble_batch, update.distill_epochs"),
    "federated-step-a0.2": Method(_ppo(_federated_batch, _on_policy()),
                                  "the same after its warm-up (the schedule's second phase, "
                                  "distill.for_round past warmup_rounds): teacher-mixed share "
                                  "0.2, SeqKD off; the rest of the config's distill section"),
    # the remaining gap to minillm, one difference at a time (whatever is left after both is
    # the mixing: per sequence with prefix weights here, per token with q / (0.8 q + 0.2 p))
    "federated-step-a0.2-g0.95": Method(
        _ppo(_federated_batch, _on_policy(gamma=0.95)),
        "federated-step-a0.2 with MiniLLM's discount gamma 0.95"),
    "federated-step-a0.2-full": Method(
        _ppo(_with_top_k(_federated_batch), _on_policy()),
        "federated-step-a0.2 with the support S = V (generation.top_k = V - 1) on the "
        "student's rollouts and the teacher's answers"),
    **{f"federated-step-a0.2-k{k}": Method(
        _ppo(_with_top_k(_federated_batch, k), _on_policy()),
        f"federated-step-a0.2 with generation.top_k {k} (the sampled token, its top {k} others "
        "and the tail bucket): the scores' bytes grow with k") for k in (32, 128)},
    "federated-step-a0.2-full-g0.95": Method(
        _ppo(_with_top_k(_federated_batch), _on_policy(gamma=0.95)),
        "both: S = V and gamma 0.95; what is left to minillm is the mixing (per sequence, "
        "prefix weights) and minillm's unweighted single-step term"),
    "trl-distill": Method(_trl, "TRL DistillationTrainer, beta = 1.0: on-policy per-token "
                          "KL(q‖p) over the full vocabulary; same prompts, lr, Adam betas"),
}  # fmt: skip


# --- setting, evaluation ------------------------------------------------------------------------
@torch.no_grad()
def sampled_kl(s: Setup, a, b, tag: str) -> float:
    """Per-token KL(a || b) over the full vocabulary at a's temperature-1 samples of the
    evaluation prompts (one each), averaged over the sampled tokens."""
    exs, step = [e for v in s.eval_sets.values() for e in v], s.cfg.generation.batch_size
    r = s.sample(a.eval(), exs, generator(s.device, derive(s.cfg, "central-eval", tag)),
                 new=s.cfg.generation.eval_max_new_tokens)  # fmt: skip
    total = count = 0.0
    for i in range(0, len(exs), step):
        t = [getattr(r, k)[i : i + step] for k in PAIR]
        kl = support_kl(*(response_logits(m.eval(), *t).float() for m in (a, b)))
        total, count = total + float((kl * t[3]).sum()), count + float(t[3].sum())
    return total / max(count, 1.0)


def evaluate(s: Setup, model) -> dict:
    """Greedy EM and Rouge-L (flminillm.evaluation; mean over families), the per-token
    reverse KL(q || p) at the student's samples and forward KL(p || q) at the teacher's."""
    from flminillm.evaluation import evaluate_model

    g = s.cfg.generation
    fams = evaluate_model(model, s.tok, s.eval_sets, batch_size=g.batch_size,
                          max_new_tokens=g.eval_max_new_tokens, style=s.style)  # fmt: skip
    return {"exact_match": statistics.mean(f["exact_match"] for f in fams.values()),
            "rouge_l": statistics.mean(f["rouge_l"] for f in fams.values()),
            "reverse_kl": sampled_kl(s, model, s.teacher, "student"),
            "forward_kl": sampled_kl(s, s.teacher, model, "teacher"), "families": fams}  # fmt: skip


def central_config(cfg: Config, families: list[str], student_id: str) -> Config:
    """`cfg` with one client, the student's, holding every family: its training data is the
    pooled training data of the benchmark (generated per family, the same whoever holds it)."""
    data = cfg.model_dump(mode="json")
    student = next(c for c in data["clients"] if c["id"] == student_id)
    data.update(clients=[{**student, "families": families}])
    data["data"].update(families=families, iid_mix=0.0)
    data["sampling"]["min_clients"] = 1
    return Config.model_validate(data)


def build_setup(cfg: Config, families: list[str], student_id: str, steps: int, warm_steps: int,
                directory: Path, reuse: bool) -> Setup:  # fmt: skip
    """One seed's data, tokenizer and models: loaded from `directory` when `reuse` and a
    finished setup is there, else made as prepare / init_model / local_sft make them (the
    teacher fine-tuned on every family, the student warm-started) and saved there."""
    from flminillm.data import format_prompt, generate_benchmark
    from flminillm.devices import device_for
    from flminillm.models import build_model, load_model, save_model
    from flminillm.tokenizer import load_tokenizer, prompt_style, save_tokenizer, train_tokenizer
    from flminillm.training import encode_docs, encode_examples, train_lm

    done, device = directory / "setup.json", device_for(cfg.engine)
    bench, corpus = generate_benchmark(central_config(cfg, families, student_id))
    train = bench.client_train[student_id]
    specs = {"teacher": cfg.server.model, "student": cfg.party(student_id).model}
    if reuse and done.is_file():
        tok = load_tokenizer(directory / "tokenizer")
        models = {w: load_model(directory / w).to(device).eval() for w in specs}
    else:
        done.unlink(missing_ok=True)  # until all is saved again, nothing here is reusable
        texts = corpus + [format_prompt(e.prompt) for e in bench.public_prompts]
        tok, models = train_tokenizer(texts, vocab_size=cfg.tokenizer.vocab_size), {}
        for who, spec in specs.items():
            m = build_model(spec, len(tok), tok.pad_token_id, tok.eos_token_id,
                            derive(cfg, "init", who)).to(device)  # fmt: skip
            labelled = encode_examples(tok, train, spec.max_positions, cfg.local_sft.prompt_loss,
                                       prompt_style(tok, spec.chat_template))  # fmt: skip
            sft_steps = cfg.local_sft.steps if who == "teacher" else warm_steps
            for part, tc, rows, n in (
                ("pretrain", cfg.pretrain, encode_docs(tok, corpus, spec.max_positions),
                 cfg.pretrain.steps), ("sft", cfg.local_sft, labelled, sft_steps),
            ):  # fmt: skip
                train_lm(m, rows, steps=n, batch_size=tc.batch_size, lr=tc.lr,
                         pad_id=tok.pad_token_id, seed=derive(cfg, part, who),
                         warmup_steps=tc.warmup_steps, weight_decay=tc.weight_decay,
                         max_grad_norm=tc.max_grad_norm, engine=cfg.engine,
                         progress=f"seed {cfg.seed}: {part} {who}")  # fmt: skip
            models[who] = m.eval()
            save_model(m, directory / who)
        save_tokenizer(tok, directory / "tokenizer")
    s = Setup(cfg, tok, prompt_style(tok, specs["student"].chat_template), train,
              bench.eval_sets, models["teacher"], models["student"], steps,
              min(x.max_positions for x in specs.values()), {})  # fmt: skip
    if reuse and done.is_file():
        s.reference = json.loads(done.read_text())["reference"]
    else:  # written last: a setup.json marks a finished setup
        s.reference = {"teacher": evaluate(s, s.teacher), "warm-start": evaluate(s, s.student)}
        atomic_write_text(done, json.dumps({"reference": s.reference}))
    return s


def run_method(s: Setup, name: str) -> dict:
    """Train a copy of the warm start with method `name`, then evaluate it."""
    teacher = [p.detach().clone() for p in s.teacher.parameters()]
    model = copy.deepcopy(s.student)
    torch.manual_seed(derive(s.cfg, "central", name))
    t0 = time.perf_counter()
    stats = METHODS[name].train(s, model, name)
    t1 = time.perf_counter()
    result = evaluate(s, model.eval())
    pairs = list(zip(model.state_dict().values(), s.student.state_dict().values(), strict=True))
    moved = sum(float((a - b).pow(2).sum()) for a, b in pairs) / sum(
        float(b.pow(2).sum()) for _, b in pairs
    )
    return {"method": name, "seed": s.cfg.seed, "eval": result, "train": stats,
            "student_change": math.sqrt(moved), "train_seconds": t1 - t0,
            "eval_seconds": time.perf_counter() - t1, "teacher_unchanged": all(
                torch.equal(a, b) for a, b in zip(teacher, s.teacher.parameters(), strict=True)
            )}  # fmt: skip


# --- the benchmark and its report ---------------------------------------------------------------
def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _stat(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarise(records: list[dict], refs: dict[int, dict], names: list[str]) -> dict[str, Any]:
    """Mean and std over seeds of every metric: the teacher, the warm start, each method."""
    results: dict[str, Any] = {}
    for name in ["teacher", "warm-start", *names]:
        rows = ([r for r in records if r["method"] == name] if name in METHODS
                else [{"eval": refs[sd][name], "seed": sd} for sd in sorted(refs)])  # fmt: skip
        results[name] = {k: _stat([r["eval"][k] for r in rows]) for k in METRICS}
        results[name].update(seeds=[r["seed"] for r in rows], runs=rows,
                             note=METHODS[name].note if name in METHODS else "")  # fmt: skip
        if name in METHODS:
            for k in ("student_change", "train_seconds"):
                results[name][k] = _stat([r[k] for r in rows])
            results[name]["teacher_unchanged"] = all(r["teacher_unchanged"] for r in rows)
    return results


def run_central(
    config: Path, *, families: list[str] | None = None, student: str | None = None,
    seeds: int = 3, methods: list[str] | None = None, steps: int = 0, warm_steps: int = -1,
    out_dir: Path = Path("docs"), workdir: Path | None = None, resume: bool = False,
    console=None, command: str = "",
) -> dict:  # fmt: skip
    """Every method on seeds 0..seeds-1; writes central.{md,json,png} into out_dir. Default
    budget: one round of the distill step (distill.epochs x prompts_per_round / batch_size
    optimizer steps); default warm start: a quarter of local_sft.steps."""
    from importlib.metadata import version

    from tqdm import tqdm

    from flminillm.bench.harness import has_module
    from flminillm.bench.quality import _workdir, write_json
    from flminillm.data import FAMILIES

    base = load_config(config)
    fams, names = families or list(base.data.families), methods or list(METHODS)
    # default student: of the teacher's family (as MiniLLM distils GPT-2 XL into GPT-2), else
    # the first client's model
    same = [c.id for c in base.clients if c.model.family == base.server.model.family]
    sid = student or (same or [base.clients[0].id])[0]
    checks = {
        f"--families: unknown {sorted(set(fams) - set(FAMILIES))}": set(fams) <= set(FAMILIES),
        f"--methods: choose from {list(METHODS)}": set(names) <= set(METHODS),
        f"--student: no client {sid!r}": sid in [c.id for c in base.clients],
        "--resume needs --workdir": not resume or workdir is not None,
        "data.source must be benchmark": base.data.source == "benchmark",
        "trl-distill needs trl: pip install -e '.[bench]'": "trl-distill" not in names
        or has_module("trl"),
    }  # fmt: skip
    if not all(checks.values()):
        raise ValueError("; ".join(k for k, ok in checks.items() if not ok))
    d = base.distill
    steps = steps or d.epochs * math.ceil(base.generation.prompts_per_round / d.batch_size)
    warm = warm_steps if warm_steps >= 0 else max(1, base.local_sft.steps // 4)
    t0, records, refs = time.perf_counter(), [], {}
    meta: dict[str, Any] = {"resumed": [], "setups_built": [], "setups_loaded": []}
    with _workdir(workdir) as wd:
        root = wd / f"setup-{_key(base.experiment_dict(), fams, sid, warm)}"
        rdir = root / f"run-{_key(root.name, steps)}"
        bar = tqdm(total=seeds * len(names), desc="bench central", disable=console is None)
        for sd in range(seeds):
            sdir, out = root / f"s{sd}", {m: rdir / f"{m}-s{sd}.json" for m in names}
            todo = [m for m in names if not (resume and out[m].is_file())]
            for m in todo:  # a result of an earlier setup must not outlive a rerun
                out[m].unlink(missing_ok=True)
            for m in [m for m in names if m not in todo]:
                records.append(json.loads(out[m].read_text()))
                meta["resumed"].append(f"{m}-s{sd}")
                bar.update()
            if not todo and (sdir / "setup.json").is_file():
                refs[sd] = json.loads((sdir / "setup.json").read_text())["reference"]
                continue
            loaded = resume and (sdir / "setup.json").is_file()
            s = build_setup(
                base.model_copy(update={"seed": sd}), fams, sid, steps, warm, sdir, resume
            )
            meta["setups_loaded" if loaded else "setups_built"].append(sd)
            refs[sd] = s.reference
            for m in todo:
                records.append(run_method(s, m))
                atomic_write_bytes(out[m], json.dumps(records[-1]).encode())
                bar.update()
                e = records[-1]["eval"]
                bar.write(f"{m} seed {sd}: EM {100 * e['exact_match']:.1f}, Rouge-L "
                          f"{100 * e['rouge_l']:.1f}, KL(q‖p) {e['reverse_kl']:.3f}, "
                          f"KL(p‖q) {e['forward_kl']:.3f}")  # fmt: skip
        bar.close()
    results = summarise(records, refs, names)
    results["_meta"] = {
        **meta, "command": command or "flminillm bench central", "config": str(config),
        "families": fams, "student": sid, "teacher_model": base.server.model.model_dump(),
        "student_model": base.party(sid).model.model_dump(), "seeds": seeds, "steps": steps,
        "warm_steps": warm, "teacher_sft_steps": base.local_sft.steps, "distill": d.model_dump(),
        "top_k": base.generation.top_k, "minillm": MINILLM, "seconds": time.perf_counter() - t0,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "trl": version("trl") if has_module("trl") else None,
        "split": f"evaluation split ({base.data.n_eval_per_family} prompts per family)",
    }  # fmt: skip
    write_json(results, out_dir / "central.json")
    write_markdown(results, out_dir / "central.md")
    plot(results, out_dir / "central.png")
    return results


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def write_markdown(results: dict, path: Path) -> None:
    m, fed = results["_meta"], results["_meta"]["distill"]
    t, st = m["teacher_model"], m["student_model"]
    lines = [
        "# Centralised comparison: what the federated adaptations cost", "",
        f"Produced by `{m['command']}` in {m['seconds'] / 60:.1f} min on {m['cpu_count']} CPU "
        f"cores ({m['torch_threads']} torch threads; {len(m['resumed'])} (method, seed) runs "
        f"reused from the workdir). Config `{m['config']}`; families {', '.join(m['families'])}; "
        f"seeds 0..{m['seeds'] - 1}, mean ± std. Teacher: {t['family']} {t['hidden_size']}x"
        f"{t['num_layers']}, pre-trained, then {m['teacher_sft_steps']} SFT steps on every "
        f"family. Student (`{m['student']}`): {st['family']} {st['hidden_size']}x{st['num_layers']}"
        f", pre-trained, then a {m['warm_steps']}-step SFT warm start. Each method trains a copy "
        f"of it for {m['steps']} optimizer steps of {fed['batch_size']} sequences at lr "
        f"{fed['lr']} on the same training prompts in the same order; minillm and federated-step "
        "collect generation.prompts_per_round rollouts at a time and take "
        f"{fed['epochs']} PPO epochs over them, as a federated round does (so they see fewer "
        "distinct prompts in the same steps).", "",
        f"**Split**: every number is on the {m['split']}: no training, warm start or choice "
        "here has seen it. EM and Rouge-L of greedy answers (flminillm.evaluation, mean over "
        "families); KL(q‖p): per-token reverse KL over the full vocabulary at the student's "
        "temperature-1 samples of the evaluation prompts; KL(p‖q): forward KL at the teacher's "
        "samples (nats per token). *moved*: relative L2 distance of the student's weights from "
        "the warm start.", "",
        "| method | EM | Rouge-L | KL(q‖p) | KL(p‖q) | moved | train s | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in results.items():
        if name != "_meta":
            own = r["note"] and [_pm(r["student_change"], 1, 3), _pm(r["train_seconds"], 1, 0)]
            cells = [name if r["note"] else f"*{name}*", _pm(r["exact_match"]), _pm(r["rouge_l"]),
                     _pm(r["reverse_kl"], 1, 3), _pm(r["forward_kl"], 1, 3),
                     *(own or ["–", "–"]), str(len(r["seeds"]))]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "How each method is implemented (flminillm.bench.central.METHODS):", ""]
    lines += [f"- `{n}`: {r['note']}" for n, r in results.items() if n != "_meta" and r["note"]]
    lines += [
        "", f"federated-step's distill section: top-{m['top_k']} support, teacher share alpha "
        f"{fed['alpha']} of the sequences, prefix_iw {fed['prefix_iw']}, tail_bucket "
        f"{fed['tail_bucket']}, whiten_returns {fed['whiten_returns']}, lm_coef {fed['lm_coef']}, "
        f"seqkd_coef {fed['seqkd_coef']}. TRL {m['trl']}: `DistillationConfig.beta` "
        "interpolates the generalised JSD, 0 = forward KL(teacher‖student), 1 = reverse "
        "KL(student‖teacher) (trl/kernels/chunked_divergence.py); beta = 1 is thus on-policy "
        "reverse KL as gkd-reverse, with TRL's own sampling (transformers generate) and loss. "
        "TRL's training forward passes no position_ids: a GPT-2 student (absolute positions) "
        "is trained at other positions than it sampled at on left-padded prompts; Llama and "
        "Qwen2 (rotary) are unaffected.",
        "", "Per seed and per family: `central.json`; plot: `central.png`.",
    ]  # fmt: skip
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n != "_meta"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, keys, scale, label in ((axes[0], METRICS[:2], 100, "evaluation split (%)"),
                                   (axes[1], METRICS[2:], 1, "per-token KL (nats)")):  # fmt: skip
        for j, k in enumerate(keys):
            xs = [i + (j - 0.5) * 0.4 for i in range(len(names))]
            ax.bar(xs, [results[n][k]["mean"] * scale for n in names], 0.4, label=k,
                   yerr=[results[n][k]["std"] * scale for n in names], capsize=2)  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend()
    m = results["_meta"]
    fig.suptitle(f"bench central: {m['steps']} optimizer steps per method, {m['seeds']} seeds")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
