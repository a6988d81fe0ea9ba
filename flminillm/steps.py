"""The round steps: one recipe per step, read top to bottom (load, compute, save, record),
and the step registry that everything else derives from.

A recipe takes the run's `Config` and small JSON manifests of earlier steps, reads models
and messages from the content-addressed store, writes its outputs there and returns a
small manifest. Recipes are seeded from (master seed, round, step, party), so the same
inputs give the same outputs and a pipeline cache can skip them on a rerun. How a recipe
is invoked (a KFP task, a warm fork of the step server, several ranks under the DeepSpeed
launcher, or a plain call in one process) is `flminillm.invoke`'s business, not theirs.

Roles are symmetric: `generate`, `teach` and `distill` serve both directions of a round
(clients teach the server, then the server teaches the clients).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from flminillm.artifacts import (
    EXCHANGE,
    PUBLIC,
    average_models,
    initial_model,
    last_rounds_models,
    load_examples,
    load_model,
    load_tokenizer,
    model_refs,
    open_store_for,
    put_examples,
    ref,
    save_model,
    save_tokenizer,
    seed,
)
from flminillm.config import Config, ExperimentConfig
from flminillm.devices import autocast, device_for, generator, to_device, to_host
from flminillm.faults import client_step, dropped_out, retrying
from flminillm.ledger import step_record
from flminillm.store import Store

SERVER_ROLE = "server"


# ----------------------------------------------------------------------------------------
# the registry: every recipe, with what its invokers need to know about it
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """A registered recipe. `output`: what the recipe returns and a KFP task passes on
    (json: a manifest dict, as JSON text; list: a list of strings; text: a string).
    `launchable`: may train in several ranks (`engine.gpus_per_step` > 1). `tracking`:
    writes to MLflow (on a cluster its pod gets the tracking secret). `form_of`: the step
    this one is another form of (its cluster settings and resources are that step's)."""

    name: str
    fn: Callable[..., Any]
    output: Literal["json", "list", "text"] = "json"
    launchable: bool = False
    tracking: bool = False
    form_of: str = ""

    @property
    def settings_name(self) -> str:
        """The name cluster settings (`cluster.resources`) know this step by."""
        return self.form_of or self.name


STEPS: dict[str, Step] = {}


def step(
    output: Literal["json", "list", "text"] = "json", launchable: bool = False,
    tracking: bool = False, form_of: str = "",
) -> Callable:  # fmt: skip
    """Register a recipe under its function's name."""

    def register(fn: Callable) -> Callable:
        STEPS[fn.__name__] = Step(fn.__name__, fn, output, launchable, tracking, form_of)
        return fn

    return register


# ----------------------------------------------------------------------------------------
# small helpers shared by the recipes
# ----------------------------------------------------------------------------------------
def _loads(text: str | dict) -> dict:
    return text if isinstance(text, dict) else json.loads(text)


def _dropped(manifest: str | dict) -> bool:
    return bool(manifest) and bool(_loads(manifest).get("dropped"))


def _is_client(cfg: ExperimentConfig, party: str) -> bool:
    return party != cfg.server.id


def _model_for(models_json: str, state: dict, party: str) -> str:
    if models_json:
        models = _loads(models_json).get("models", {})
        if party in models:
            return models[party]
    return state["models"][party]


def _as_client(cfg: ExperimentConfig, round_index: int, label: str, client: str, fn) -> dict:
    """A client's step: retried, and dropped out of the round if it still fails and the
    round can spare it (more clients sampled than sampling.min_clients)."""
    sampled = len(sample_clients_ids(cfg, round_index))
    return client_step(fn, label, client, round_index, sampled, cfg.sampling.min_clients)


# ----------------------------------------------------------------------------------------
# set-up: data, tokenizer, base models
# ----------------------------------------------------------------------------------------
@step()
def prepare(cfg: Config) -> dict:
    """Generate the benchmark and the pre-training corpus; train (or load) the tokenizer."""
    from flminillm.data import format_prompt

    store = open_store_for(cfg)
    public = store.scoped(PUBLIC)
    with step_record(cfg, store, 0, "prepare", "all") as rec:
        bench, corpus = _read_data(cfg)
        fbc = bench.families_by_client
        if cfg.tokenizer.name_or_path:
            from flminillm.tokenizer import load_tokenizer as load_pretrained_tokenizer

            tok = load_pretrained_tokenizer(cfg.tokenizer.name_or_path)
        else:
            from flminillm.tokenizer import train_tokenizer

            # public text only: the corpus and the public prompts, never private answers
            texts = corpus + [format_prompt(e.prompt) for e in bench.public_prompts]
            tok = train_tokenizer(texts, vocab_size=cfg.tokenizer.vocab_size)
        _check_special_tokens(tok, "tokenizer")
        tok_digest = save_tokenizer(store, tok)
        own = _own_tokenizers(cfg, store, corpus, bench.public_prompts)
        data = {
            "public": put_examples(public, bench.public_prompts),
            "pretrain": public.put_json(corpus),
            "eval": {f: put_examples(public, v) for f, v in held_out(cfg, bench).items()},
            "clients": {  # each client's private data under its own prefix
                c: {
                    "train": put_examples(store.scoped(c), bench.client_train[c]),
                    "test": put_examples(store.scoped(c), bench.client_test[c]),
                }
                for c in fbc
            },
        }
        manifest = {
            "kind": "round_manifest",
            "federation": cfg.federation_id(),
            "round": -1,
            "tokenizer": tok_digest,
            "vocab_size": len(tok),
            "data": data,
            "families_by_client": fbc,
            "models": {},
            "history": [],
        }
        if own:  # parties with a tokenizer of their own (the others use the shared one)
            manifest["tokenizers"] = {p.id: own.get(p.id, (tok_digest, len(tok)))[0]
                                      for p in cfg.parties}  # fmt: skip
            manifest["vocab_sizes"] = {p.id: own.get(p.id, (tok_digest, len(tok)))[1]
                                       for p in cfg.parties}  # fmt: skip
        rec["outputs"] = {
            "tokenizer": ref(public, tok_digest),
            "public_prompts": ref(public, data["public"]),
            "pretrain_corpus": ref(public, data["pretrain"]),
        }
        for c, dd in data["clients"].items():
            rec["outputs"][f"data.{c}.train"] = ref(store.scoped(c), dd["train"])
            rec["outputs"][f"data.{c}.test"] = ref(store.scoped(c), dd["test"])
        rec["params"] = {"families_by_client": json.dumps(fbc), "vocab_size": len(tok)}
        rec["metrics"] = {"n_public": len(bench.public_prompts), "n_pretrain_docs": len(corpus)}
        rec["datasets"] = {
            "public_prompts": {"digest": data["public"], "rows": len(bench.public_prompts)},
            **{
                f"{c}.train": {"digest": data["clients"][c]["train"], "rows": len(v)}
                for c, v in bench.client_train.items()
            },
        }
    return manifest


def _check_special_tokens(tok, field: str) -> None:
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise ValueError(
            f"{field}: the tokenizer has no {'eos' if tok.eos_token_id is None else 'pad'} token; "
            "generation needs an end-of-sequence token (and a pad token, which may equal it): "
            "use a tokenizer that defines eos_token, or one trained here (vocab_size)"
        )


def _own_tokenizers(cfg: Config, store: Store, corpus, public_prompts) -> dict[str, tuple]:
    """{party: (digest, vocab size)} of the parties with a tokenizer of their own: one given
    in `model.tokenizer`, or a loaded model's own."""
    from flminillm.data import format_prompt
    from flminillm.tokenizer import load_tokenizer as load_pretrained_tokenizer
    from flminillm.tokenizer import train_tokenizer

    out = {}
    for i, p in enumerate(cfg.parties):
        spec = p.model.tokenizer
        field = f"{'server' if i == 0 else f'clients[{i - 1}]'}.model.tokenizer"
        if spec is not None and spec.vocab_size:
            texts = corpus + [format_prompt(e.prompt) for e in public_prompts]
            tok = train_tokenizer(texts, vocab_size=spec.vocab_size)
        elif spec is not None or p.model.name_or_path:
            tok = load_pretrained_tokenizer(spec.name_or_path if spec else p.model.name_or_path)
        else:
            continue
        _check_special_tokens(tok, field)
        out[p.id] = (save_tokenizer(store, tok), len(tok))
    return out


def tokenizer_of(state: dict, party: str) -> str:
    """The digest of `party`'s tokenizer (its own, or the federation's shared one)."""
    return state.get("tokenizers", {}).get(party, state["tokenizer"])


def vocab_of(state: dict, party: str) -> int:
    return state.get("vocab_sizes", {}).get(party, state["vocab_size"])


def _party_tokenizer(cfg: ExperimentConfig, store: Store, state: dict, party: str):
    """(tokenizer, prompt style) of a party."""
    from flminillm.tokenizer import prompt_style

    tok = load_tokenizer(store, tokenizer_of(state, party))
    return tok, prompt_style(tok, cfg.party(party).model.chat_template)


def _teachers_across(cfg: ExperimentConfig, state: dict, student: str) -> bool:
    """Whether any possible teacher of `student` uses another tokenizer than it does."""
    teachers = [c.id for c in cfg.clients] if student == cfg.server.id else [cfg.server.id]
    mine = tokenizer_of(state, student)
    return any(tokenizer_of(state, t) != mine for t in teachers)


def _read_data(cfg: Config):
    """(Benchmark, pre-training corpus): generated, or read from the configured files."""
    from flminillm.data import Benchmark, generate_benchmark

    d = cfg.data
    if d.source == "benchmark":
        return generate_benchmark(cfg)
    from flminillm.datafiles import categories, load_examples_from, load_texts_from

    train, test = {}, {}
    for i, c in enumerate(cfg.clients):
        train[c.id] = load_examples_from(c.data.train, cfg.store, what=f"clients[{i}].data.train")
        test[c.id] = (
            load_examples_from(c.data.test, cfg.store, what=f"clients[{i}].data.test")
            if c.data.test else []
        )  # fmt: skip
    public = load_examples_from(d.public, cfg.store, need_response=False, what="data.public")
    public = [type(e)(family=e.family, prompt=e.prompt, answer="") for e in public]
    evals = load_examples_from(d.eval, cfg.store, what="data.eval")
    eval_sets = {f: [e for e in evals if e.family == f] for f in categories(evals)}
    vals = (
        load_examples_from(d.validation, cfg.store, what="data.validation") if d.validation else []
    )
    corpus = load_texts_from(d.pretrain, cfg.store) if d.pretrain else []
    bench = Benchmark(
        client_train=train, client_test=test, public_prompts=public, eval_sets=eval_sets,
        families_by_client={c: categories(v) for c, v in train.items()},
        val_sets={f: [e for e in vals if e.family == f] for f in categories(vals)},
    )  # fmt: skip
    return bench, corpus


def held_out(cfg: Config, bench) -> dict:
    """The held-out sets the evaluate step scores: the evaluation split, or the validation
    split when hyper-parameters are being chosen (data.evaluate_on: validation)."""
    return bench.val_sets if cfg.data.evaluate_on == "validation" else bench.eval_sets


@step(output="list")
def list_parties(cfg: Config) -> list[str]:
    """Every party id, server first (a runtime list for the pipeline's set-up loop)."""
    return [p.id for p in cfg.parties]


@step()
def init_model(cfg: Config, state_json: str, party_id: str) -> dict:
    """Build a party's model from config and pre-train it on the public corpus (or load it)."""
    from flminillm.models import build_model, count_parameters
    from flminillm.models import load_model as load_pretrained_model
    from flminillm.training import encode_docs, train_lm

    store = open_store_for(cfg)
    state = _loads(state_json)
    spec = cfg.party(party_id).model
    public = store.scoped(PUBLIC)
    with step_record(cfg, store, 0, "init_model", party_id) as rec:
        tok = load_tokenizer(store, tokenizer_of(state, party_id))
        rec["inputs"]["tokenizer"] = ref(public, tokenizer_of(state, party_id))
        if spec.name_or_path:
            model = load_pretrained_model(spec.name_or_path)
            stats: dict[str, float] = {}
        else:
            model = build_model(
                spec, len(tok), tok.pad_token_id, tok.eos_token_id, seed(cfg, "init", party_id)
            ).to(device_for(cfg.engine))
            corpus = public.get_json(state["data"]["pretrain"])
            rows = encode_docs(tok, corpus, spec.max_positions)
            p = cfg.pretrain
            stats = train_lm(
                model, rows, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                pad_id=tok.pad_token_id, seed=seed(cfg, "pretrain", party_id),
                warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
                max_grad_norm=p.max_grad_norm, progress=f"pretrain {party_id}", engine=cfg.engine,
            )  # fmt: skip
            rec["inputs"]["corpus"] = ref(public, state["data"]["pretrain"])
        digest = save_model(store, party_id, model)
        rec["outputs"]["model"] = ref(store.scoped(party_id), digest)
        rec["params"] = {"family": spec.family, "parameters": count_parameters(model)}
        rec["metrics"] = stats
    return {"models": {party_id: digest}}


# ----------------------------------------------------------------------------------------
# round steps
# ----------------------------------------------------------------------------------------
def sample_clients_ids(cfg: ExperimentConfig, round_index: int) -> list[str]:
    ids = [c.id for c in cfg.clients]
    k = max(cfg.sampling.min_clients, math.ceil(cfg.sampling.fraction * len(ids)))
    rng = random.Random(seed(cfg, "sample_clients", cfg.sampling.seed, round_index))
    return sorted(rng.sample(ids, min(k, len(ids))), key=ids.index)


@step(output="list")
def sample_clients(cfg: Config, round_index: int) -> list[str]:
    """The clients that take part in this round (seeded, so reruns pick the same ones)."""
    store = open_store_for(cfg)
    with step_record(cfg, store, round_index, "sample_clients", SERVER_ROLE) as rec:
        chosen = sample_clients_ids(cfg, round_index)
        rec["outputs"]["clients"] = chosen
    return chosen


@step(launchable=True)
def local_sft(cfg: Config, state_json: str, round_index: int, client_id: str) -> dict:
    """Supervised fine-tuning on the client's private data (the MiniLLM starting point)."""
    from flminillm.training import encode_examples, train_lm

    store = open_store_for(cfg)
    state = _loads(state_json)

    def run() -> dict:
        with step_record(cfg, store, round_index, "local_sft", client_id) as rec:
            tok, style = _party_tokenizer(cfg, store, state, client_id)
            spec = cfg.party(client_id).model
            model = load_model(store, client_id, state["models"][client_id], cfg.engine, spec.lora)
            train_digest = state["data"]["clients"][client_id]["train"]
            s = cfg.local_sft
            counts: dict[str, int] = {}
            rows = encode_examples(
                tok, load_examples(store, client_id, train_digest),
                cfg.party(client_id).model.max_positions, s.prompt_loss, style, counts,
            )  # fmt: skip
            if counts.get("truncated"):
                print(f"local_sft {client_id}: {counts['truncated']} of {len(rows)} examples are "
                      f"longer than the model's {spec.max_positions} positions; their last "
                      "tokens are kept")  # fmt: skip
            # the first fine-tuning is the full one, also for a client that missed round 1
            # (dropped out, not sampled): else it would never get it (state["fine_tuned"])
            first = (
                client_id not in state["fine_tuned"] if "fine_tuned" in state else round_index <= 1
            )
            steps = s.steps if first else s.later_round_steps
            stats = train_lm(
                model, rows, steps=steps, batch_size=s.batch_size, lr=s.lr,
                pad_id=tok.pad_token_id, seed=seed(cfg, "local_sft", round_index, client_id),
                warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                max_grad_norm=s.max_grad_norm, progress=f"round {round_index} local_sft {client_id}",
                engine=cfg.engine,
            )  # fmt: skip
            digest = save_model(store, client_id, model)
            mine = store.scoped(client_id)
            rec["inputs"] = {
                "model": ref(mine, state["models"][client_id]),
                "data": ref(mine, train_digest),
            }
            rec["outputs"].update(model_refs(mine, digest, model))
            rec["params"] = {"steps": steps}
            rec["metrics"] = {**stats, "truncated_examples": float(counts.get("truncated", 0))}
        return {"party": client_id, "models": {client_id: digest}}

    return _as_client(cfg, round_index, "local_sft", client_id, run)


def _round_prompts(cfg: ExperimentConfig, store: Store, state: dict, round_index: int, party: str):
    """This round's public prompts for a student: (own share, teacher share)."""
    public = load_examples(store, PUBLIC, state["data"]["public"])
    rng = random.Random(seed(cfg, "prompts", round_index, party))
    n = min(cfg.generation.prompts_per_round, len(public))
    chosen = rng.sample(public, n)
    d = cfg.distill.for_round(round_index)
    n_teacher = round(d.alpha * n) if d.teacher_mixed else 0
    own, ask = chosen[: n - n_teacher], chosen[n - n_teacher :]
    k = round(d.repeat_share * len(ask)) if party == cfg.server.id else 0
    if k and len(ask) > k:  # asked twice on purpose, for the server's claim-sum check
        rng = random.Random(seed(cfg, "repeats", round_index, party))
        ask = ask[: len(ask) - k] + [rng.choice(ask[: len(ask) - k]) for _ in range(k)]
        rng.shuffle(ask)
    return own, ask


@step()
def generate(
    cfg: Config, state_json: str, round_index: int, party_id: str, models_json: str = ""
) -> dict:
    """The student samples responses to public prompts: the RolloutMessage for its teachers."""
    import torch

    from flminillm.generation import encode_prompts, sample_batched
    from flminillm.messages import nbytes

    store = open_store_for(cfg)
    state = _loads(state_json)
    g = cfg.generation
    earlier = _loads(models_json).get("dropped", {}) if models_json else {}
    if party_id in earlier:
        return dropped_out(party_id, earlier[party_id])

    def run() -> dict:
        with step_record(cfg, store, round_index, "generate", party_id) as rec:
            model_digest = _model_for(models_json, state, party_id)
            tok, style = _party_tokenizer(cfg, store, state, party_id)
            model = load_model(store, party_id, model_digest, cfg.engine)
            device = next(model.parameters()).device
            own, ask = _round_prompts(cfg, store, state, round_index, party_id)
            max_prompt = cfg.party(party_id).model.max_positions - g.max_new_tokens
            pids, pmask = encode_prompts(
                tok, [style.prompt(e.prompt) for e in own] or [""], max_prompt
            )
            if not own:  # alpha = 1: every prompt of the round goes to the teachers
                pids, pmask = pids[:0], pmask[:0]
            gen = generator(device, seed(cfg, "generate", round_index, party_id))
            with autocast(cfg.engine, device):
                r = sample_batched(
                    model, pids.to(device), pmask.to(device), g.batch_size,
                    max_new_tokens=g.max_new_tokens, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, top_k=g.top_k, temperature=g.temperature,
                    generator=gen,
                )  # fmt: skip
            r = to_host(r)
            aids, amask = encode_prompts(
                tok, [style.prompt(e.prompt) for e in ask] or [""], max_prompt
            )
            if not ask:
                aids, amask = aids[:0], amask[:0]
            msg = {
                "prompt_ids": r.prompt_ids.int(),
                "prompt_mask": r.prompt_mask.to(torch.uint8),
                "response_ids": r.response_ids.int(),
                "response_mask": r.response_mask.to(torch.uint8),
                "support_ids": r.support_ids.int(),
                "ask_prompt_ids": aids.int(),
                "ask_prompt_mask": amask.to(torch.uint8),
            }
            if _teachers_across(cfg, state, party_id):  # some teacher reads text, not ids
                from flminillm.crosstok import rollout_text_fields

                msg.update(rollout_text_fields(
                    tok, [e.prompt for e in own], r.response_ids, r.response_mask,
                    [e.prompt for e in ask],
                ))  # fmt: skip
            exchange = store.scoped(EXCHANGE)
            digest = exchange.put_tensors(msg)
            size = nbytes(msg)
            rec["inputs"]["model"] = ref(store.scoped(party_id), model_digest)
            rec["outputs"]["rollouts"] = ref(exchange, digest)
            rec["metrics"] = {
                "n_rollouts": float(len(own)),
                "n_ask": float(len(ask)),
                "mean_response_tokens": float(r.response_mask.sum(1).float().mean()),
                "bytes_sent": float(size),
            }
        return {"party": party_id, "model": model_digest, "rollouts": digest, "bytes": size}

    if _is_client(cfg, party_id):
        return _as_client(cfg, round_index, "generate", party_id, run)
    return retrying(run, f"generate {party_id}")


@step()
def teach(
    cfg: Config,
    state_json: str,
    round_index: int,
    teacher_id: str,
    models_json: str,
    rollouts_json: str,
) -> dict:
    """The teacher scores the student's rollouts on their support and answers the
    teacher-share prompts itself: the TeachingMessage."""

    from flminillm.attacks import READS_PROMPTS, adversaries, corrupt_teaching, seed_key
    from flminillm.messages import nbytes, validate_rollouts

    store = open_store_for(cfg)
    state = _loads(state_json)
    ro = _loads(rollouts_json)
    g = cfg.generation
    client = teacher_id if _is_client(cfg, teacher_id) else ro["party"]
    for upstream in (models_json, rollouts_json):
        if _dropped(upstream) and _loads(upstream)["dropped"] == client:
            return dropped_out(client, _loads(upstream)["reason"])

    def run() -> dict:
        label = f"{teacher_id}-to-{ro['party']}"
        with step_record(cfg, store, round_index, "teach", label) as rec:
            model_digest = _model_for(models_json, state, teacher_id)
            tok, style = _party_tokenizer(cfg, store, state, teacher_id)
            model = load_model(store, teacher_id, model_digest, cfg.engine)
            device = next(model.parameters()).device
            exchange = store.scoped(EXCHANGE)
            msg = exchange.get_tensors(ro["rollouts"])
            validate_rollouts(msg, vocab_size=vocab_of(state, ro["party"]))
            gen = generator(device, seed(cfg, "teach", round_index, teacher_id, ro["party"]))
            across = tokenizer_of(state, teacher_id) != tokenizer_of(state, ro["party"])
            with autocast(cfg.engine, device):
                if across:  # text in, its own tokens' log-probs and their spans out
                    from flminillm.crosstok import teach_across

                    teaching = teach_across(
                        model, tok, style, msg, batch_size=g.batch_size,
                        max_prompt=cfg.party(teacher_id).model.max_positions - g.max_new_tokens,
                        sample_kw=dict(max_new_tokens=g.max_new_tokens, eos_id=tok.eos_token_id,
                                       pad_id=tok.pad_token_id, top_k=1,
                                       temperature=g.temperature, generator=gen),
                    )  # fmt: skip
                    seq_logp = (teaching["x_scores"] * teaching["x_score_mask"]).sum(1)
                else:
                    teaching = teach_same(model, tok, msg, g, gen)
                    seq_logp = (teaching["scores"][..., 0] * msg["response_mask"].float()).sum(1)
            mode = adversaries().get(teacher_id)
            if mode and not across:  # benchmark fault injection: a faulty or malicious teacher
                teaching = corrupt_teaching(
                    teaching, mode, vocab_of(state, ro["party"]),
                    seed(cfg, "adversary", round_index, seed_key(mode, teacher_id), ro["party"]),
                    ask_prompts=[  # (only the attacks of READS_PROMPTS read them)
                        tok.decode(ids[m.bool()], skip_special_tokens=True)
                        for ids, m in zip(msg["ask_prompt_ids"], msg["ask_prompt_mask"],
                                          strict=True)
                    ] if mode.startswith(READS_PROMPTS) else None,
                    encode=lambda a: tok.encode(style.target(a), add_special_tokens=False)
                    + [tok.eos_token_id],
                )  # fmt: skip
                rec["params"]["adversary"] = mode
            digest = exchange.put_tensors(teaching)
            size = nbytes(teaching)
            rec["inputs"] = {
                "model": ref(store.scoped(teacher_id), model_digest),
                "rollouts": ref(exchange, ro["rollouts"]),
            }
            rec["outputs"]["teaching"] = ref(exchange, digest)
            rec["params"].update({"teacher": teacher_id, "student": ro["party"]})
            rec["metrics"] = {
                "bytes_received": float(nbytes(msg)),
                "bytes_sent": float(size),
                "student_seq_logp": float(seq_logp.mean()) if seq_logp.numel() else 0.0,
            }
        return {
            "teacher": teacher_id,
            "student": ro["party"],
            "model": model_digest,
            "teaching": digest,
            "bytes": size,
        }

    return _as_client(cfg, round_index, "teach", client, run)


def teach_same(model, tok, msg: dict, g, gen) -> dict:
    """A teacher that shares the student's tokenizer: its log-probs on the student's support
    and its own answers, in token ids (the TeachingMessage)."""
    import torch

    from flminillm.generation import prompt_logprob, sample_batched, score

    device = next(model.parameters()).device
    on = {k: v.long().to(device) for k, v in msg.items() if not k.startswith("text_")}
    scores, prompt_logp = to_host(score(
        model, on["prompt_ids"], on["prompt_mask"], on["response_ids"], on["response_mask"],
        on["support_ids"], batch_size=g.batch_size,
    ))  # fmt: skip
    k = msg["support_ids"].shape[-1] - 1
    if msg["ask_prompt_ids"].shape[0]:
        own = sample_batched(
            model, on["ask_prompt_ids"], on["ask_prompt_mask"], g.batch_size,
            max_new_tokens=g.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
            top_k=k, temperature=g.temperature, generator=gen,
        )  # fmt: skip
        own_prompt_logp = prompt_logprob(
            model, on["ask_prompt_ids"], on["ask_prompt_mask"], g.batch_size
        ).cpu()
        own = to_host(own)
        own_ids, own_mask = own.response_ids, own.response_mask
        own_sup, own_logp = own.support_ids, own.support_logp * own.response_mask[..., None]
    else:
        own_ids = torch.zeros(0, 1, dtype=torch.long)
        own_mask = torch.zeros(0, 1, dtype=torch.long)
        own_sup = torch.zeros(0, 1, k + 1, dtype=torch.long)
        own_logp = torch.zeros(0, 1, k + 1)
        own_prompt_logp = torch.zeros(0)
    return {
        "scores": scores.float().contiguous(),
        "prompt_logp": prompt_logp.float().contiguous(),
        "own_prompt_logp": own_prompt_logp.float().contiguous(),
        "own_response_ids": own_ids.int(),
        "own_response_mask": own_mask.to(torch.uint8),
        "own_support_ids": own_sup.int(),
        "own_logp": own_logp.float().contiguous(),
    }


@step(launchable=True)
def distill(
    cfg: Config,
    state_json: str,
    round_index: int,
    student_id: str,
    models_json: str,
    rollouts_json: str,
    teachings: list[str],
) -> dict:
    """The student's MiniLLM step: aggregate its teachers, then PPO reverse-KL updates
    (plus SeqKD on the selected teacher rollouts and the LM loss on its own data)."""
    store = open_store_for(cfg)
    state = _loads(state_json)
    ro = _loads(rollouts_json)
    if _dropped(ro):
        return dropped_out(student_id, ro["reason"])
    if ro["party"] != student_id:
        raise ValueError(f"rollouts belong to {ro['party']!r}, not to the student {student_id!r}")
    parsed = [_loads(t) for t in teachings if t]
    live = [t for t in parsed if not t.get("dropped")]
    dropped = {t["dropped"]: t["reason"] for t in parsed if t.get("dropped")}
    if _is_client(cfg, student_id):
        if dropped:
            return dropped_out(student_id, dropped[student_id])
    elif len(live) < cfg.sampling.min_clients:
        lines = "; ".join(f"{c}: {r}" for c, r in dropped.items())
        with step_record(cfg, store, round_index, "distill", student_id) as rec:
            rec["params"] = {"dropped": ",".join(dropped)}
            raise RuntimeError(
                f"round {round_index}: only {len(live)} of {len(parsed)} sampled clients answered "
                f"the server, below sampling.min_clients={cfg.sampling.min_clients}. "
                f"Dropped: {lines}. Fix the cause and run `flminillm rerun`."
            )

    def run() -> dict:
        with step_record(cfg, store, round_index, "distill", student_id) as rec:
            model_digest = _model_for(models_json, state, student_id)
            replay = (
                not _is_client(cfg, student_id) and cfg.distill.for_round(round_index).stale_share
            )
            cache = stale_buffer(state.get("stale", {})) if replay else {}
            here = {t["teacher"] for t in live}
            absent = [c.id for c in cfg.clients if c.id not in here]  # dropped, or not sampled
            stale = {c: cache[c] for c in absent if c in cache}
            # absent with no past to replay or impute from (out of round 1, never sampled yet)
            unknown = sum(c not in cache for c in absent) if replay else 0
            new_digest, metrics, trained, taught = _distill(
                cfg, store, state, round_index, student_id, model_digest, ro["rollouts"], live,
                stale, unknown,
            )  # fmt: skip
            exchange = store.scoped(EXCHANGE)
            mine = store.scoped(student_id)
            rec["inputs"] = {
                "model": ref(mine, model_digest),
                # the round-0 model that judged the teachers' answers (plausibility_margin)
                **({"judge": ref(mine, taught["judge"])} if taught["judge"] else {}),
                "rollouts": ref(exchange, ro["rollouts"]),
                **{f"teaching.{t['teacher']}": ref(exchange, t["teaching"]) for t in live},
                **{
                    f"stale.{c}.r{e['round']}": ref(exchange, e["teaching"])
                    for c, es in stale.items()
                    for e in es
                },  # fmt: skip
            }
            rec["outputs"].update(model_refs(mine, new_digest, trained))
            rec["params"] = {
                "teachers": ",".join(t["teacher"] for t in live),
                "dropped": ",".join(dropped),
            }
            rec["metrics"] = metrics
        models = {t["teacher"]: t["model"] for t in live if t["teacher"] != student_id}
        models[student_id] = new_digest
        # what a later round replays if one of these teachers is absent then (evaluate keeps it)
        latest = {
            t["teacher"]: {"round": round_index, "teaching": t["teaching"], "index": i,
                           "rollouts": taught["rollouts"], "choice": taught["choice"]}
            for i, t in enumerate(live)
        }  # fmt: skip
        return {
            "party": student_id,
            "models": models,
            "teachers": [t["teacher"] for t in live],
            "dropped": dropped,
            **({} if _is_client(cfg, student_id) else {"stale": latest}),
            **(
                {"contest_evidence": {str(round_index): taught["contest_evidence"]}}
                if "contest_evidence" in taught
                else {}
            ),  # fmt: skip
        }

    if _is_client(cfg, student_id):
        return _as_client(cfg, round_index, "distill", student_id, run)
    return retrying(run, f"distill {student_id}")


def stale_buffer(cache: dict, latest: dict | None = None) -> dict[str, list[dict]]:
    """The server's replay buffer for absent teachers: {client: [entry per round it took
    part in, oldest first]}, with this round's `latest` {client: entry} appended. A round
    manifest written when the buffer held the latest entry alone ({client: entry}) reads as
    a buffer of one."""
    out = {c: list(v) if isinstance(v, list) else [v] for c, v in cache.items()}
    for c, e in (latest or {}).items():
        out[c] = [*(x for x in out.get(c, []) if x["round"] != e["round"]), e]
    return out


def kept_before(
    store, student_id: str, cache: dict, names: list[str], round_index: int
) -> list[list[int]]:
    """Per teacher (`names`), how many of its answers the student kept in each round before
    `round_index` it took part in, from the server's replay buffer (`stale_buffer`: the
    round manifest's `stale`, each entry's `choice`): what `distill.dependence_bar` needs
    before it judges a teacher (the student has learned from it)."""
    buffer = stale_buffer(cache)
    read: dict[str, Any] = {}  # a round's choice tensor, read once for all its teachers
    out = []
    for name in names:
        counts = []
        for entry in buffer.get(name, []):
            if int(entry["round"]) < round_index:
                key = entry["choice"]
                if key not in read:
                    read[key] = store.scoped(student_id).get_tensors(key)["choice"]
                counts.append(int((read[key] == int(entry["index"])).sum()))
        out.append(counts)
    return out


def pooled_evidence(evidence: dict, names: list[str], round_index: int, rounds: int):
    """The contest counts (`flminillm.aggregate.contest_counts`) of the `rounds` - 1 rounds
    before `round_index`, summed per pair of this round's teachers `names`: [2, M, M] long
    (`distill.contest_bar_rounds`). `evidence`: the round manifest's `contest_evidence`,
    {round: {"teachers": [...], "counts": [2, M', M']}}; a pair counts in the rounds where
    both took part. Counts that are not a [2, M', M'] table of non-negative integers for
    distinct teachers, or contests above the wins they contest, are an error."""
    import torch

    m = len(names)
    out = torch.zeros(2, m, m, dtype=torch.long)
    for r in range(max(1, round_index - rounds + 1), round_index):
        entry = evidence.get(str(r))
        if entry is None:
            continue
        there = list(entry["teachers"])
        counts = torch.tensor(entry["counts"], dtype=torch.long)
        k = len(there)
        if (
            len(set(there)) != k
            or counts.shape != (2, k, k)
            or bool((counts < 0).any())
            or bool((counts[1] > counts[0]).any())
        ):
            raise ValueError(
                f"round {r}'s contest_evidence: counts of shape {tuple(counts.shape)} for "
                f"teachers {there}, a teacher twice, or contests above the wins they contest; "
                f"expected [2, {k}, {k}] non-negative counts for distinct teachers. The "
                f"round manifest is corrupt: rerun round {r}"
            )
        at = [there.index(n) if n in there else -1 for n in names]
        for j, a in enumerate(at):
            for i, b in enumerate(at):
                if a >= 0 and b >= 0 and i != j:
                    out[:, j, i] += counts[:, a, b]
    return out


def _teaching_for(exchange, state: dict, student_id: str, teacher: str, digest: str, rollouts,
                  tok, vocab: int) -> tuple[dict, bool]:  # fmt: skip
    """A teacher's message on `rollouts`, validated, in the student's token space; and
    whether it came from another tokenizer (its log-probs then cover the sampled token)."""
    from flminillm.messages import validate_teaching

    msg = exchange.get_tensors(digest)
    across = tokenizer_of(state, teacher) != tokenizer_of(state, student_id)
    if across:
        from flminillm.crosstok import to_student_space
        from flminillm.messages import validate_cross_teaching

        validate_cross_teaching(msg, rollouts)
        msg = to_student_space(msg, rollouts, tok)  # its log-probs on our tokens
    validate_teaching(msg, rollouts, vocab)
    return msg, across


def _distill(
    cfg: Config, store: Store, state: dict, round_index: int, student_id: str,
    model_digest: str, rollouts_digest: str, teachings_manifests: list[dict],
    stale: dict[str, list[dict]] | None = None,
    unknown: int = 0,
) -> tuple[str, dict[str, float], Any, dict]:  # fmt: skip
    """The distill step's work: the student's rollouts and its teachers' messages in (and
    `stale`: absent teachers' earlier answers, `stale_buffer`: replayed, `distill.stale_share`,
    and standing in for them in selection; `unknown`: how many absent clients have no past,
    `unknown_domain`), its updated model
    (digest and the model itself), the update's statistics and what it was taught (the
    rollouts, whose answers were kept: `ask_choice`, and the model that judged them:
    `judge`, None where the plausibility check did not run) out."""
    import torch

    from flminillm.aggregate import (
        DEPENDENCE_ROUNDS,
        MIN_COHERENCE,
        MIN_DEPENDENCE_WINS,
        assemble_batch,
        claim_sums,
        coherence,
        distinct_prompts,
        implausible_teachers,
        imputed_quantile,
        lost_prompts,
        overclaiming_teachers,
        own_quantiles,
        prompt_claim_sums,
        quarantine,
        replay_rows,
        selection_stats,
        similar_prompts,
        stale_part,
    )  # fmt: skip
    from flminillm.engine import make_engine
    from flminillm.messages import MessageError, validate_rollouts
    from flminillm.ranks import rank_world
    from flminillm.training import batches, encode_examples
    from flminillm.update import (
        answer_logprob,
        as_floats,
        behaviour_logprobs,
        distill_epochs,
        distill_lr,
    )  # fmt: skip

    d = cfg.distill.for_round(round_index)
    vocab = vocab_of(state, student_id)
    tok, style = _party_tokenizer(cfg, store, state, student_id)
    exchange = store.scoped(EXCHANGE)
    rollouts = exchange.get_tensors(rollouts_digest)
    validate_rollouts(rollouts, vocab)
    teachings, foreign = [], []
    for t in teachings_manifests:
        msg, x = _teaching_for(exchange, state, student_id, t["teacher"], t["teaching"], rollouts,
                               tok, vocab)  # fmt: skip
        teachings.append(msg)
        foreign.append(bool(x))
    across = sum(foreign)
    # a teacher whose claims contradict its own support (a broken one) counts by its answers
    # alone, as hard labels; its scores and claims are dropped (flminillm.aggregate.quarantine)
    coherent = [coherence(t) for t in teachings]
    trusted = [c >= MIN_COHERENCE for c in coherent]
    sent = teachings
    teachings = [
        t if ok else quarantine(t, d.quarantine_quantile)
        for t, ok in zip(teachings, trusted, strict=True)
    ]
    # drop-out without loss: the absent teachers' answers the server kept before (stale),
    # drawn from every round each took part in (flminillm.aggregate.replay_rows)
    extra, rivals = [], None
    for c, entries in sorted((stale or {}).items()):
        loaded = []
        for entry in entries:
            old = exchange.get_tensors(entry["rollouts"])
            validate_rollouts(old, vocab)
            msg, x = _teaching_for(exchange, state, student_id, c, entry["teaching"], old, tok,
                                   vocab)  # fmt: skip
            choice = store.scoped(student_id).get_tensors(entry["choice"])["choice"]
            if choice.shape != (old["ask_prompt_ids"].shape[0],):
                raise MessageError(f"stale choice of {c}: shape {tuple(choice.shape)} != [A]")
            if x:  # sampled-token supports only, as for a fresh teacher of another tokenizer
                across += 1
            if coherence(msg) < MIN_COHERENCE:
                msg = quarantine(msg, d.quarantine_quantile)
            loaded.append((old, msg, choice, entry["index"]))
        rows = replay_rows([(ch, i) for _, _, ch, i in loaded], d.stale_share,
                           seed(cfg, "stale", round_index, c))  # fmt: skip
        extra += [stale_part(old, msg, r) for (old, msg, _, _), r in zip(loaded, rows, strict=True)]
        # where it would have won this round's prompts under rank selection, the present
        # teachers' guesses are left out: its replayed answers teach its domain
        # (flminillm.aggregate.imputed_quantile)
        past = [
            (old["ask_prompt_ids"], old["ask_prompt_mask"],
             own_quantiles(msg, d.posterior_weights, d.tie_rank == "low"),
             lost_prompts(choice, index))
            for old, msg, choice, index in loaded
        ]  # fmt: skip
        mine = imputed_quantile(rollouts["ask_prompt_ids"], rollouts["ask_prompt_mask"], past)
        rivals = mine if rivals is None else torch.maximum(rivals, mine)
    if across:
        # a teacher of another tokenizer scores the sampled token only: no single-step KL on
        # a support, so the immediate reward joins the return (still the exact reverse-KL
        # policy gradient); every support is the sampled token alone
        d = d.model_copy(update={"single_step": False})
        rollouts = {**rollouts, "support_ids": rollouts["support_ids"][..., :1]}
        teachings = [
            {**t, "scores": t["scores"][..., :1], "own_support_ids": t["own_support_ids"][..., :1],
             "own_logp": t["own_logp"][..., :1]}
            for t in teachings
        ]  # fmt: skip
        extra = [{**p, "support_ids": p["support_ids"][..., :1],
                  "teacher_logp": p["teacher_logp"][..., :1]} for p in extra]  # fmt: skip
    lora = cfg.party(student_id).model.lora
    # peer review by the student's own LM as it was before the federation (fluent in the
    # prompts' language, taught no family by anyone): a teacher whose likelier answers it
    # finds less likely than random tokens is barred for the round
    # (aggregate.implausible_teachers)
    barred, gaps, judge, judge_digest = None, None, None, None
    implausible = None
    if (
        d.plausibility_margin > 0
        and not _is_client(cfg, student_id)  # a client's one teacher is the server
        and rollouts["ask_prompt_ids"].shape[0]
    ):
        judge_digest = initial_model(store, state, student_id)
        judge = load_model(store, student_id, judge_digest, cfg.engine, lora)
        at = next(judge.parameters()).device
        with autocast(cfg.engine, at):
            lm = torch.stack([
                answer_logprob(judge, rollouts, t, cfg.generation.batch_size, at)
                for t in teachings
            ])  # fmt: skip
        barred_t, gap_t = implausible_teachers(lm, vocab, d.plausibility_margin)
        barred, gaps = barred_t.tolist(), gap_t.tolist()
        implausible = barred
        if judge_digest != model_digest:
            del judge  # one model in memory at a time
            judge = None
    # claims that add up: a teacher whose claimed probabilities of its different answers to
    # one prompt (asked twice in the round) sum above max_claim_sum is barred for the round,
    # as an implausible one is (aggregate.claim_sums); judged on what it sent
    sums, overclaimed = None, None
    if (
        d.max_claim_sum > 0
        and not _is_client(cfg, student_id)
        and rollouts["ask_prompt_ids"].shape[0]
    ):
        sums_t = claim_sums(sent, rollouts["ask_prompt_ids"], rollouts["ask_prompt_mask"])
        overclaimed = overclaiming_teachers(sums_t, d.max_claim_sum).tolist()
        sums = sums_t.tolist()
        barred = [bool(a) or b for a, b in zip(barred or [False] * len(sent), overclaimed,
                                               strict=True)]  # fmt: skip
    # and on prompts: a teacher whose claimed p(x) over the round's distinct prompts sum
    # above max_prompt_claim_sum is barred alike (aggregate.prompt_claim_sums)
    psums, poverclaimed = None, None
    if d.max_prompt_claim_sum > 0 and not _is_client(cfg, student_id):
        texts = [
            tok.decode(ids[m.bool()], skip_special_tokens=True)
            for key in ("prompt", "ask_prompt")
            for ids, m in zip(rollouts[f"{key}_ids"], rollouts[f"{key}_mask"], strict=True)
        ]  # fmt: skip
        psums_t = prompt_claim_sums(sent, distinct_prompts(texts))
        poverclaimed = overclaiming_teachers(psums_t, d.max_prompt_claim_sum).tolist()
        psums = psums_t.tolist()
        barred = [bool(a) or b for a, b in zip(barred or [False] * len(sent), poverclaimed,
                                               strict=True)]  # fmt: skip
    model = judge if judge is not None else load_model(
        store, student_id, model_digest, cfg.engine, lora
    )  # fmt: skip
    device = next(model.parameters()).device
    weights = torch.tensor([cfg.party(t["teacher"]).weight for t in teachings_manifests])
    # does each teacher's answer depend on its prompt, as far as the student has learned?
    # its log q(y | x) against log q(y | x') for the most similar other prompt x'
    # (aggregate.dependence_bar; a client's one teacher is never judged)
    dependence = None
    names = [t["teacher"] for t in teachings_manifests]
    n_ask = rollouts["ask_prompt_ids"].shape[0]
    if d.dependence_bar > 0 and len(teachings) > 1 and n_ask:
        # judged only once the student has learned from it: a teacher absent so far (not
        # sampled, dropped out), or kept in one round only, can look like one whose answers
        # do not depend on their prompts (aggregate.DEPENDENCE_ROUNDS); a teacher not judged
        # is a row of NaN, and is not scored
        known = kept_before(store, student_id, state.get("stale", {}), names, round_index)
        judged = [sum(k >= MIN_DEPENDENCE_WINS for k in c) >= DEPENDENCE_ROUNDS for c in known]
        dependence = torch.full((len(teachings), n_ask), float("nan"))
        if any(judged):
            near = similar_prompts(rollouts["ask_prompt_ids"], rollouts["ask_prompt_mask"])
            elsewhere = {**rollouts, "ask_prompt_ids": rollouts["ask_prompt_ids"][near],
                         "ask_prompt_mask": rollouts["ask_prompt_mask"][near]}  # fmt: skip
            bs = cfg.generation.batch_size
            with autocast(cfg.engine, device):
                for i, ok in enumerate(judged):
                    if ok:
                        dependence[i] = answer_logprob(
                            model, rollouts, teachings[i], bs, device
                        ) - answer_logprob(model, elsewhere, teachings[i], bs, device)
    # drop-out without loss, for the absent clients with no past: their domain's size, as
    # their share of the clients, is left out where the present teachers are least sure
    # (flminillm.aggregate.unknown_domain); a teacher barred for the round (by any bar)
    # counts as one where distill.barred_as_absent says so
    # the contest bar's evidence pooled over rounds: the server's, whose teachers contest
    pooled = d.contest_bar_on and d.contest_bar_rounds > 1 and not _is_client(cfg, student_id)
    earlier = None
    if pooled:
        earlier = pooled_evidence(state.get("contest_evidence", {}), names, round_index,
                                  d.contest_bar_rounds)  # fmt: skip
    batch, info = assemble_batch(rollouts, teachings, weights, d, extra=extra, trusted=trusted,
                                 rivals=rivals, barred=barred,
                                 unknown_share=unknown / len(cfg.clients),
                                 barred_share=1 / len(cfg.clients) if d.barred_as_absent else 0.0,
                                 foreign=foreign, contest_earlier=earlier,
                                 dependence=dependence)  # fmt: skip
    choice = store.scoped(student_id).put_tensors({"choice": info["ask_choice"].int()})
    chosen = selection_stats(
        info["teacher_index"], sent, names,
        int(info["n_rejected"]), coherent=coherent, n_reserved=int(info["n_reserved"]),
        n_invariant=int(info["n_invariant"]),
        flagged=info["flagged"].tolist() if d.invariance_share > 0 else None,
        n_implausible=int(info["n_implausible"]), gaps=gaps, barred=implausible,
        n_by_claim=int(info["n_by_claim"]), n_contested=int(info["n_contested"]),
        contesting=info["contesting"].tolist() if d.contest_quantile < 1.0 else None,
        contest_barred=info["contest_barred"].tolist() if d.contest_bar_on else None,
        sums=sums, overclaimed=overclaimed,
        prompt_sums=psums, prompt_overclaimed=poverclaimed,
        dependence=info["dependence"].tolist() if dependence is not None else None,
        dependence_barred=info["dependence_barred"].tolist() if dependence is not None else None,
    )  # fmt: skip

    from_teacher = batch["from_teacher"]
    batch = to_device(batch, device)
    torch.manual_seed(seed(cfg, "distill", round_index, student_id))
    with autocast(cfg.engine, device):  # q_old, before updates, as the update will see it
        behaviour = behaviour_logprobs(model, batch, cfg.generation.batch_size)

    lm_batches = None
    if student_id in state["data"]["clients"] and d.lm_coef > 0:
        own = load_examples(store, student_id, state["data"]["clients"][student_id]["train"])
        rows = encode_examples(
            tok, own, cfg.party(student_id).model.max_positions, cfg.local_sft.prompt_loss, style
        )
        if rows:
            lm_seed = seed(cfg, "lm", round_index, student_id)
            lm_batches = batches(rows, d.batch_size, tok.pad_token_id, lm_seed)

    rank, world = rank_world()
    schedule = distill_lr(d, int(batch["prompt_ids"].shape[0]), world,
                          cfg.engine.gradient_accumulation_steps)  # fmt: skip
    engine = make_engine(model, d.lr, 0.0, d.max_grad_norm, cfg.engine, lr_lambda=schedule)
    model.train()
    stats = distill_epochs(
        engine, batch, behaviour, d, seqkd=d.seqkd_coef > 0 and round_index <= d.seqkd_rounds,
        order_seed=seed(cfg, "distill-order", round_index, student_id), lm_batches=lm_batches,
        rank=rank, world=world,
    )  # fmt: skip
    model.eval()
    metrics = as_floats(stats)
    metrics["n_student_rollouts"] = float(int((~from_teacher).sum()))
    metrics["n_teacher_rollouts"] = float(int(from_teacher.sum()))
    metrics["bytes_received"] = float(sum(t["bytes"] for t in teachings_manifests))
    metrics.update(chosen)
    taught = {"rollouts": rollouts_digest, "choice": choice, "judge": judge_digest}
    if pooled:  # this round's contest counts, for a later round's bar (`pooled_evidence`)
        taught["contest_evidence"] = {
            "teachers": names, "counts": info["contest_evidence"].tolist()
        }  # fmt: skip
        for name, v in zip(names, info["contest_pooled"].tolist(), strict=True):
            metrics[f"contest_pooled.{name}"] = v  # the lowest pooled share among its peers
    return save_model(store, student_id, engine.hf_model), metrics, engine.hf_model, taught


@step(launchable=True, form_of="distill")
def distill_one(
    cfg: Config,
    state_json: str,
    round_index: int,
    student_id: str,
    models_json: str,
    rollouts_json: str,
    teaching: str,
) -> dict:
    """`distill` with a single teacher (a pipeline cannot make a list of one task output)."""
    return distill(cfg, state_json, round_index, student_id, models_json, rollouts_json,
                   [teaching])  # fmt: skip


@step()
def evaluate(
    cfg: Config, state_json: str, round_index: int, update: str, updates: list[str]
) -> dict:
    """Score every party on every family's held-out set and write the round manifest."""
    from flminillm.attacks import backdoor_targets
    from flminillm.evaluation import evaluate_model

    store = open_store_for(cfg)
    prev = _loads(state_json)
    state = json.loads(json.dumps(prev))
    state["models"] = dict(prev["models"])
    dropped: dict[str, str] = {}
    # each teacher's teachings of the server, one per round it took part in, kept across
    # rounds (distill.stale_share)
    state["stale"] = stale_buffer(
        prev.get("stale", {}), _loads(update).get("stale", {}) if update else {}
    )
    # the server's contest counts per round (distill.contest_bar_rounds)
    evidence = _loads(update).get("contest_evidence", {}) if update else {}
    if evidence or prev.get("contest_evidence"):
        state["contest_evidence"] = {**prev.get("contest_evidence", {}), **evidence}
    for u in [_loads(x) for x in ([update] if update else []) + list(updates)]:
        if u.get("dropped") and isinstance(u["dropped"], str):
            dropped.setdefault(u["dropped"], u["reason"])  # keeps its previous model
            continue
        for client, reason in (u.get("dropped") or {}).items():
            dropped.setdefault(client, reason)
        state["models"].update(u["models"])
    # the clients that have had their first, full local fine-tuning: the ones whose model
    # changed in a round (a client that dropped out or was not sampled keeps its model)
    state["fine_tuned"] = sorted(
        set(prev.get("fine_tuned", []))
        | {
            c.id
            for c in cfg.clients
            if round_index >= 1 and state["models"].get(c.id) != prev["models"].get(c.id)
        }
    )
    with step_record(cfg, store, round_index, "evaluate", "all") as rec:
        server = cfg.server.id
        k = cfg.distill.server_average
        if round_index == cfg.rounds and k > 1 and server in state["models"]:
            # the federation's server: its weights averaged over the last k rounds
            tail = last_rounds_models(store, prev, server, state["models"][server],
                                      round_index, k)  # fmt: skip
            for r, d in tail:
                rec["inputs"][f"average.{server}.round{r}"] = ref(store.scoped(server), d)
            state["models"][server] = average_models(
                store, server, [d for _, d in tail], cfg.engine
            )
            rec["params"]["server_average"] = str(len(tail))
            # the federation's final server is this step's product, not any round's
            rec["outputs"][f"model.{server}.averaged"] = ref(
                store.scoped(server), state["models"][server]
            )
        eval_sets = {f: load_examples(store, PUBLIC, d) for f, d in state["data"]["eval"].items()}
        targets = backdoor_targets()  # a benchmark backdoor's answers, once for every party
        results = {}
        for party in [p.id for p in cfg.parties]:
            if party not in state["models"]:
                raise RuntimeError(f"round {round_index}: no model for party {party!r}")
            model = load_model(store, party, state["models"][party], cfg.engine)
            tok, style = _party_tokenizer(cfg, store, state, party)
            with autocast(cfg.engine, next(model.parameters()).device):
                results[party] = evaluate_model(
                    model, tok, eval_sets, batch_size=cfg.generation.batch_size,
                    max_new_tokens=cfg.generation.eval_max_new_tokens, style=style,
                    samples=cfg.generation.eval_samples if round_index == cfg.rounds else 0,
                    seed=cfg.seed * 1000 + round_index, targets=targets,
                )  # fmt: skip
            rec["inputs"][f"model.{party}"] = ref(store.scoped(party), state["models"][party])
            for fam, m in results[party].items():
                for k, v in m.items():
                    rec["metrics"][f"{party}.{fam}.{k}"] = v
        state["round"] = round_index
        state["eval"] = results
        state["dropped"] = dropped
        if prev.get("round", -1) >= 0:
            state["history"] = prev.get("history", []) + [prev["manifest"]]
        state.pop("manifest", None)
        state["manifest"] = store.put_json(state)
        rec["outputs"]["round_manifest"] = ref(store, state["manifest"])
        rec["params"]["dropped"] = json.dumps(dropped)
    return state


@step(output="text", tracking=True)
def track(cfg: Config, state_json: str, run_label: str, run_started: float, run_tags: str) -> str:
    """Close the federation's MLflow run with its summary (results, final manifest, the
    steps that came from the cache); the steps logged themselves as they finished. Without a
    run to close (FLMINILLM_MLFLOW_RUN unset: not tracked while running), log the whole tree
    from the ledger. Runs last (`state_json`, the final manifest, orders it); returns the
    run id."""
    import os

    from flminillm.tracking import RUN_ENV, finish_federation, log_federation

    if not cfg.tracking.enabled:
        return ""
    store = open_store_for(cfg)
    run_id = os.environ.get(RUN_ENV)
    if run_id:
        finish_federation(cfg, store, run_id, run_started)
        return run_id
    return log_federation(
        cfg, store, run_label=run_label, run_started=run_started,
        extra_tags=json.loads(run_tags or "{}"),
    )  # fmt: skip
