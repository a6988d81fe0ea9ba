"""The round steps: one function per step, read top to bottom (load, compute, save, record).

Each step takes JSON strings (the experiment config and small manifests of earlier steps),
reads models and messages from the content-addressed store, writes its outputs there and
returns a small manifest. Steps are seeded from (master seed, round, step, party), so the
same inputs give the same outputs and a pipeline cache can skip them on a rerun.

Roles are symmetric: `generate`, `teach` and `distill` serve both directions of a round
(clients teach the server, then the server teaches the clients).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from flminillm.config import ExperimentConfig, config_from_json
from flminillm.launch import launch, needs_launch, rank_world
from flminillm.stepserver import forwarded
from flminillm.store import Store, open_store

SERVER_ROLE = "server"
PUBLIC = "public"  # store scope of shared, public objects (tokenizer, public prompts, eval)
EXCHANGE = "exchange"  # store scope of the messages that cross party boundaries
FAULTS_ENV = "FLMINILLM_FAULTS"
RETRIES_ENV = "FLMINILLM_STEP_RETRIES"


class InjectedFault(RuntimeError):
    """A failure injected on purpose (FLMINILLM_FAULTS), to rehearse recovery."""


class TransientError(RuntimeError):
    """A failure worth retrying (I/O, network, an injected transient fault)."""


# ----------------------------------------------------------------------------------------
# shared plumbing
# ----------------------------------------------------------------------------------------
def _ctx(config_json: str) -> tuple[ExperimentConfig, Store]:
    threads = os.environ.get("FLMINILLM_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    cfg = config_from_json(config_json)
    return cfg, open_store_for(cfg)


def open_store_for(cfg: ExperimentConfig) -> Store:
    try:
        from flminillm.store import open_store_from_config
    except ImportError:  # pragma: no cover - older store module
        return open_store(cfg.store.uri)
    return open_store_from_config(cfg.store)


def parse_faults(spec: str) -> list[dict[str, Any]]:
    """`step:party:round[:times]`, comma-separated; `*` matches any party or round.
    times = how many executions fail (then the step succeeds: a transient fault);
    without it every execution fails."""
    faults = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not step:party:round[:times]")
        faults.append(
            {
                "step": parts[0],
                "party": parts[1],
                "round": parts[2],
                "times": int(parts[3]) if len(parts) == 4 else None,
            }
        )
    return faults


def maybe_inject_fault(store: Store, fed: str, step: str, party: str, round_index: int) -> None:
    """Fail this execution if FLMINILLM_FAULTS names it (for tests and recovery drills)."""
    for f in parse_faults(os.environ.get(FAULTS_ENV, "")):
        if (
            f["step"] != step
            or f["party"] not in ("*", party)
            or f["round"] not in ("*", str(round_index))
        ):
            continue
        if f["times"] is None:
            raise InjectedFault(f"injected fault in {step} of {party}, round {round_index}")
        name = f"{fed}/faults/{step}.{party}.{round_index}.json"
        seen = (store.list_records(name) or [{"count": 0}])[0]["count"]
        if seen < f["times"]:
            store.put_record(name, {"count": seen + 1})
            raise TransientError(
                f"injected transient fault {seen + 1}/{f['times']} in {step} of {party}"
            )


def _retrying(fn, label: str, attempts: int | None = None, backoff: float = 0.5):
    """Call fn(); retry transient errors with exponential backoff."""
    attempts = attempts or int(os.environ.get(RETRIES_ENV, "3"))
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (TransientError, ConnectionError, TimeoutError) as err:
            if attempt == attempts:
                raise
            delay = backoff * 2 ** (attempt - 1)
            print(f"{label}: attempt {attempt}/{attempts} failed ({err}); retrying in {delay:.1f}s")
            time.sleep(delay)


def _dropped(manifest: str | dict) -> bool:
    return bool(manifest) and bool(_loads(manifest).get("dropped"))


def _client_step(cfg: ExperimentConfig, round_index: int, label: str, client: str, fn) -> dict:
    """Run a client-side step with retries; if it still fails and the round can spare
    the client (more sampled than min_clients), the client drops out of the round."""
    try:
        return _retrying(fn, label)
    except Exception as err:
        sampled = len(sample_clients_ids(cfg, round_index))
        if sampled - 1 < cfg.sampling.min_clients:
            raise
        reason = f"{label}: {type(err).__name__}: {err}"
        print(f"client {client} drops out of round {round_index}: {reason}")
        return {"party": client, "dropped": client, "reason": reason}


def federation_id(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{cfg.digest()[:12]}"


def _loads(text: str | dict) -> dict:
    return text if isinstance(text, dict) else json.loads(text)


def _ref(store: Store, digest: str) -> dict[str, str]:
    return {"digest": digest, "uri": store.object_uri(digest)}


@contextlib.contextmanager
def step_record(
    cfg: ExperimentConfig, store: Store, round_index: int, step: str, party: str
) -> Iterator[dict[str, Any]]:
    """Collect a step's lineage (inputs, outputs, params, metrics) and write it to the
    store's ledger, also when the step fails, so that lineage shows what happened."""
    rec: dict[str, Any] = {
        "federation": federation_id(cfg),
        "round": round_index,
        "step": step,
        "party": party,
        "inputs": {},
        "outputs": {},
        "params": {},
        "metrics": {},
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
    }
    name = f"{rec['federation']}/round-{round_index:04d}/{step}.{party}.json"
    try:
        maybe_inject_fault(store, rec["federation"], step, party, round_index)
        yield rec
        rec["status"] = "succeeded"
    except BaseException as err:
        rec["status"] = "failed"
        rec["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        rec["duration_s"] = round(time.time() - rec["started"], 3)
        rank, world = rank_world()
        if world > 1:
            rec["params"]["world_size"] = world
        if rank == 0:  # under the launcher, one record per step
            store.put_record(name, rec)


def _load_tokenizer(store: Store, digest: str):
    from flminillm.tokenizer import load_tokenizer

    return load_tokenizer(str(store.scoped(PUBLIC).get_dir(digest)))


def _load_model(store: Store, party: str, digest: str):
    """A party's model: it lives under that party's prefix of the store."""
    from flminillm.models import load_model

    return load_model(store.scoped(party).get_dir(digest))


def _save_model(store: Store, party: str, model) -> str:
    from flminillm.models import save_model

    with tempfile.TemporaryDirectory(prefix="flminillm-model-") as tmp:
        save_model(model, tmp)
        return store.scoped(party).put_dir(tmp)


def _examples(store: Store, scope: str, digest: str):
    from flminillm.data import Example

    return [Example.from_dict(d) for d in store.scoped(scope).get_json(digest)]


def _seed(cfg: ExperimentConfig, *parts: object) -> int:
    from flminillm.training import derive_seed

    return derive_seed(cfg.seed, *parts)


# ----------------------------------------------------------------------------------------
# set-up: data, tokenizer, base models
# ----------------------------------------------------------------------------------------
@forwarded
def prepare(config_json: str) -> dict:
    """Generate the benchmark and the pre-training corpus; train (or load) the tokenizer."""
    from flminillm.data import build_benchmark, format_prompt, pretraining_corpus

    cfg, store = _ctx(config_json)
    public = store.scoped(PUBLIC)
    with step_record(cfg, store, 0, "prepare", "all") as rec:
        fbc = cfg.families_by_client()
        d = cfg.data
        bench = build_benchmark(
            fbc, d.n_train_per_family, d.n_test_per_family, d.n_public_per_family,
            d.n_eval_per_family, seed=cfg.seed, iid_mix=d.iid_mix,
        )  # fmt: skip
        corpus = pretraining_corpus(d.pretrain_docs, seed=cfg.seed)
        if cfg.tokenizer.name_or_path:
            from flminillm.tokenizer import load_tokenizer

            tok = load_tokenizer(cfg.tokenizer.name_or_path)
        else:
            from flminillm.tokenizer import train_tokenizer

            # public text only: the corpus and the public prompts, never private answers
            texts = corpus + [format_prompt(e.prompt) for e in bench.public_prompts]
            tok = train_tokenizer(texts, vocab_size=cfg.tokenizer.vocab_size)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            tok_digest = public.put_dir(tmp)

        def put(scope: Store, examples) -> str:
            return scope.put_json([e.to_dict() for e in examples])

        data = {
            "public": put(public, bench.public_prompts),
            "pretrain": public.put_json(corpus),
            "eval": {f: put(public, v) for f, v in bench.eval_sets.items()},
            "clients": {  # each client's private data under its own prefix
                c: {
                    "train": put(store.scoped(c), bench.client_train[c]),
                    "test": put(store.scoped(c), bench.client_test[c]),
                }
                for c in fbc
            },
        }
        manifest = {
            "kind": "round_manifest",
            "federation": federation_id(cfg),
            "round": -1,
            "tokenizer": tok_digest,
            "vocab_size": len(tok),
            "data": data,
            "families_by_client": fbc,
            "models": {},
            "history": [],
        }
        rec["outputs"] = {
            "tokenizer": _ref(public, tok_digest),
            "public_prompts": _ref(public, data["public"]),
            "pretrain_corpus": _ref(public, data["pretrain"]),
        }
        for c, dd in data["clients"].items():
            rec["outputs"][f"data.{c}.train"] = _ref(store.scoped(c), dd["train"])
            rec["outputs"][f"data.{c}.test"] = _ref(store.scoped(c), dd["test"])
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


@forwarded
def init_model(config_json: str, state_json: str, party_id: str) -> dict:
    """Build a party's model from config and pre-train it on the public corpus (or load it)."""
    from flminillm.models import build_model, count_parameters, load_model
    from flminillm.training import encode_docs, train_lm

    cfg, store = _ctx(config_json)
    state = _loads(state_json)
    spec = cfg.party(party_id).model
    public = store.scoped(PUBLIC)
    with step_record(cfg, store, 0, "init_model", party_id) as rec:
        tok = _load_tokenizer(store, state["tokenizer"])
        rec["inputs"]["tokenizer"] = _ref(public, state["tokenizer"])
        if spec.name_or_path:
            model = load_model(spec.name_or_path)
            stats: dict[str, float] = {}
        else:
            model = build_model(
                spec, len(tok), tok.pad_token_id, tok.eos_token_id, _seed(cfg, "init", party_id)
            )
            corpus = public.get_json(state["data"]["pretrain"])
            rows = encode_docs(tok, corpus, spec.max_positions)
            p = cfg.pretrain
            stats = train_lm(
                model, rows, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                pad_id=tok.pad_token_id, seed=_seed(cfg, "pretrain", party_id),
                warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
                max_grad_norm=p.max_grad_norm, progress=f"pretrain {party_id}", engine=cfg.engine,
            )  # fmt: skip
            rec["inputs"]["corpus"] = _ref(public, state["data"]["pretrain"])
        digest = _save_model(store, party_id, model)
        rec["outputs"]["model"] = _ref(store.scoped(party_id), digest)
        rec["params"] = {"family": spec.family, "parameters": count_parameters(model)}
        rec["metrics"] = stats
    return {"models": {party_id: digest}}


# ----------------------------------------------------------------------------------------
# round steps
# ----------------------------------------------------------------------------------------
def sample_clients_ids(cfg: ExperimentConfig, round_index: int) -> list[str]:
    ids = [c.id for c in cfg.clients]
    k = max(cfg.sampling.min_clients, math.ceil(cfg.sampling.fraction * len(ids)))
    rng = random.Random(_seed(cfg, "sample_clients", cfg.sampling.seed, round_index))
    return sorted(rng.sample(ids, min(k, len(ids))), key=ids.index)


@forwarded
def sample_clients(config_json: str, round_index: int) -> list[str]:
    """The clients that take part in this round (seeded, so reruns pick the same ones)."""
    cfg, store = _ctx(config_json)
    with step_record(cfg, store, round_index, "sample_clients", SERVER_ROLE) as rec:
        chosen = sample_clients_ids(cfg, round_index)
        rec["outputs"]["clients"] = chosen
    return chosen


@forwarded
def local_sft(config_json: str, state_json: str, round_index: int, client_id: str) -> dict:
    """Supervised fine-tuning on the client's private data (the MiniLLM starting point)."""
    from flminillm.training import encode_examples, train_lm

    cfg, store = _ctx(config_json)
    state = _loads(state_json)
    if needs_launch(cfg.engine):  # several GPUs: the ranks run this step, rank 0 answers
        args = [config_json, state_json, round_index, client_id]
        return launch("local_sft", args, cfg.engine.gpus_per_step)

    def run() -> dict:
        with step_record(cfg, store, round_index, "local_sft", client_id) as rec:
            tok = _load_tokenizer(store, state["tokenizer"])
            model = _load_model(store, client_id, state["models"][client_id])
            train_digest = state["data"]["clients"][client_id]["train"]
            s = cfg.local_sft
            rows = encode_examples(
                tok, _examples(store, client_id, train_digest),
                cfg.party(client_id).model.max_positions, s.prompt_loss,
            )  # fmt: skip
            steps = s.steps if round_index <= 1 else s.later_round_steps
            stats = train_lm(
                model, rows, steps=steps, batch_size=s.batch_size, lr=s.lr,
                pad_id=tok.pad_token_id, seed=_seed(cfg, "local_sft", round_index, client_id),
                warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                max_grad_norm=s.max_grad_norm, progress=f"round {round_index} local_sft {client_id}",
                engine=cfg.engine,
            )  # fmt: skip
            digest = _save_model(store, client_id, model)
            mine = store.scoped(client_id)
            rec["inputs"] = {
                "model": _ref(mine, state["models"][client_id]),
                "data": _ref(mine, train_digest),
            }
            rec["outputs"]["model"] = _ref(mine, digest)
            rec["params"] = {"steps": steps}
            rec["metrics"] = stats
        return {"party": client_id, "models": {client_id: digest}}

    return _client_step(cfg, round_index, "local_sft", client_id, run)


def _round_prompts(cfg: ExperimentConfig, store: Store, state: dict, round_index: int, party: str):
    """This round's public prompts for a student: (own share, teacher share)."""
    public = _examples(store, PUBLIC, state["data"]["public"])
    rng = random.Random(_seed(cfg, "prompts", round_index, party))
    n = min(cfg.generation.prompts_per_round, len(public))
    chosen = rng.sample(public, n)
    d = cfg.distill
    n_teacher = round(d.alpha * n) if d.teacher_mixed else 0
    return chosen[: n - n_teacher], chosen[n - n_teacher :]


def _model_for(models_json: str, state: dict, party: str) -> str:
    if models_json:
        models = _loads(models_json).get("models", {})
        if party in models:
            return models[party]
    return state["models"][party]


def _is_client(cfg: ExperimentConfig, party: str) -> bool:
    return party != cfg.server.id


@forwarded
def generate(
    config_json: str, state_json: str, round_index: int, party_id: str, models_json: str = ""
) -> dict:
    """The student samples responses to public prompts: the RolloutMessage for its teachers."""
    import torch

    from flminillm.data import format_prompt
    from flminillm.generation import encode_prompts, sample_batched
    from flminillm.messages import nbytes

    cfg, store = _ctx(config_json)
    state = _loads(state_json)
    g = cfg.generation
    earlier = _loads(models_json).get("dropped", {}) if models_json else {}
    if party_id in earlier:
        return {"party": party_id, "dropped": party_id, "reason": earlier[party_id]}

    def run() -> dict:
        with step_record(cfg, store, round_index, "generate", party_id) as rec:
            model_digest = _model_for(models_json, state, party_id)
            tok = _load_tokenizer(store, state["tokenizer"])
            model = _load_model(store, party_id, model_digest)
            own, ask = _round_prompts(cfg, store, state, round_index, party_id)
            max_prompt = cfg.party(party_id).model.max_positions - g.max_new_tokens
            pids, pmask = encode_prompts(
                tok, [format_prompt(e.prompt) for e in own] or [""], max_prompt
            )
            if not own:  # alpha = 1: every prompt of the round goes to the teachers
                pids, pmask = pids[:0], pmask[:0]
            gen = torch.Generator().manual_seed(_seed(cfg, "generate", round_index, party_id))
            r = sample_batched(
                model, pids, pmask, g.batch_size, max_new_tokens=g.max_new_tokens,
                eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, top_k=g.top_k,
                temperature=g.temperature, generator=gen,
            )  # fmt: skip
            aids, amask = encode_prompts(
                tok, [format_prompt(e.prompt) for e in ask] or [""], max_prompt
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
            exchange = store.scoped(EXCHANGE)
            digest = exchange.put_tensors(msg)
            size = nbytes(msg)
            rec["inputs"]["model"] = _ref(store.scoped(party_id), model_digest)
            rec["outputs"]["rollouts"] = _ref(exchange, digest)
            rec["metrics"] = {
                "n_rollouts": float(len(own)),
                "n_ask": float(len(ask)),
                "mean_response_tokens": float(r.response_mask.sum(1).float().mean()),
                "bytes_sent": float(size),
            }
        return {"party": party_id, "model": model_digest, "rollouts": digest, "bytes": size}

    if _is_client(cfg, party_id):
        return _client_step(cfg, round_index, "generate", party_id, run)
    return _retrying(run, f"generate {party_id}")


@forwarded
def teach(
    config_json: str,
    state_json: str,
    round_index: int,
    teacher_id: str,
    models_json: str,
    rollouts_json: str,
) -> dict:
    """The teacher scores the student's rollouts on their support and answers the
    teacher-share prompts itself: the TeachingMessage."""
    import torch

    from flminillm.attacks import adversaries, corrupt_teaching
    from flminillm.generation import prompt_logprob, sample_batched, score
    from flminillm.messages import nbytes, validate_rollouts

    cfg, store = _ctx(config_json)
    state = _loads(state_json)
    ro = _loads(rollouts_json)
    g = cfg.generation
    client = teacher_id if _is_client(cfg, teacher_id) else ro["party"]
    for upstream in (models_json, rollouts_json):
        if _dropped(upstream) and _loads(upstream)["dropped"] == client:
            return {"party": client, "dropped": client, "reason": _loads(upstream)["reason"]}

    def run() -> dict:
        label = f"{teacher_id}-to-{ro['party']}"
        with step_record(cfg, store, round_index, "teach", label) as rec:
            model_digest = _model_for(models_json, state, teacher_id)
            tok = _load_tokenizer(store, state["tokenizer"])
            model = _load_model(store, teacher_id, model_digest)
            exchange = store.scoped(EXCHANGE)
            msg = exchange.get_tensors(ro["rollouts"])
            validate_rollouts(msg, vocab_size=state["vocab_size"])
            scores, prompt_logp = score(
                model, msg["prompt_ids"].long(), msg["prompt_mask"].long(),
                msg["response_ids"].long(), msg["response_mask"].long(),
                msg["support_ids"].long(), batch_size=g.batch_size,
            )  # fmt: skip
            k = msg["support_ids"].shape[-1] - 1
            if msg["ask_prompt_ids"].shape[0]:
                gen = torch.Generator().manual_seed(
                    _seed(cfg, "teach", round_index, teacher_id, ro["party"])
                )
                own = sample_batched(
                    model, msg["ask_prompt_ids"].long(), msg["ask_prompt_mask"].long(),
                    g.batch_size, max_new_tokens=g.max_new_tokens, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, top_k=k, temperature=g.temperature, generator=gen,
                )  # fmt: skip
                own_ids, own_mask = own.response_ids, own.response_mask
                own_sup, own_logp = own.support_ids, own.support_logp * own.response_mask[..., None]
                own_prompt_logp = prompt_logprob(
                    model, msg["ask_prompt_ids"].long(), msg["ask_prompt_mask"].long(), g.batch_size
                )
            else:
                own_ids = torch.zeros(0, 1, dtype=torch.long)
                own_mask = torch.zeros(0, 1, dtype=torch.long)
                own_sup = torch.zeros(0, 1, k + 1, dtype=torch.long)
                own_logp = torch.zeros(0, 1, k + 1)
                own_prompt_logp = torch.zeros(0)
            teaching = {
                "scores": scores.float().contiguous(),
                "prompt_logp": prompt_logp.float().contiguous(),
                "own_prompt_logp": own_prompt_logp.float().contiguous(),
                "own_response_ids": own_ids.int(),
                "own_response_mask": own_mask.to(torch.uint8),
                "own_support_ids": own_sup.int(),
                "own_logp": own_logp.float().contiguous(),
            }
            mode = adversaries().get(teacher_id)
            if mode:  # benchmark fault injection: a faulty or malicious teacher
                teaching = corrupt_teaching(
                    teaching, mode, state["vocab_size"],
                    _seed(cfg, "adversary", round_index, teacher_id, ro["party"]),
                )  # fmt: skip
                rec["params"]["adversary"] = mode
            digest = exchange.put_tensors(teaching)
            size = nbytes(teaching)
            mask = msg["response_mask"].float()
            rec["inputs"] = {
                "model": _ref(store.scoped(teacher_id), model_digest),
                "rollouts": _ref(exchange, ro["rollouts"]),
            }
            rec["outputs"]["teaching"] = _ref(exchange, digest)
            rec["params"].update({"teacher": teacher_id, "student": ro["party"]})
            rec["metrics"] = {
                "bytes_received": float(nbytes(msg)),
                "bytes_sent": float(size),
                "student_seq_logp": float((scores[..., 0] * mask).sum(1).mean()),
            }
        return {
            "teacher": teacher_id,
            "student": ro["party"],
            "model": model_digest,
            "teaching": digest,
            "bytes": size,
        }

    return _client_step(cfg, round_index, "teach", client, run)


@forwarded
def distill(
    config_json: str,
    state_json: str,
    round_index: int,
    student_id: str,
    models_json: str,
    rollouts_json: str,
    teachings: list[str],
) -> dict:
    """The student's MiniLLM step: aggregate its teachers, then PPO reverse-KL updates
    (plus SeqKD on the selected teacher rollouts and the LM loss on its own data)."""
    from flminillm.distill_step import run_distill

    cfg, store = _ctx(config_json)
    state = _loads(state_json)
    ro = _loads(rollouts_json)
    if needs_launch(cfg.engine):  # several GPUs: the ranks run this step, rank 0 answers
        args = [config_json, state_json, round_index, student_id, models_json, rollouts_json]
        return launch("distill", [*args, list(teachings)], cfg.engine.gpus_per_step)
    if _dropped(ro):
        return {"party": student_id, "dropped": student_id, "reason": ro["reason"]}
    if ro["party"] != student_id:
        raise ValueError(f"rollouts belong to {ro['party']!r}, not to the student {student_id!r}")
    parsed = [_loads(t) for t in teachings if t]
    live = [t for t in parsed if not t.get("dropped")]
    dropped = {t["dropped"]: t["reason"] for t in parsed if t.get("dropped")}
    if _is_client(cfg, student_id):
        if dropped:
            return {"party": student_id, "dropped": student_id, "reason": dropped[student_id]}
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
            new_digest, metrics = run_distill(
                cfg, store, state, round_index, student_id, model_digest, ro, live
            )
            exchange = store.scoped(EXCHANGE)
            mine = store.scoped(student_id)
            rec["inputs"] = {
                "model": _ref(mine, model_digest),
                "rollouts": _ref(exchange, ro["rollouts"]),
                **{f"teaching.{t['teacher']}": _ref(exchange, t["teaching"]) for t in live},
            }
            rec["outputs"]["model"] = _ref(mine, new_digest)
            rec["params"] = {
                "teachers": ",".join(t["teacher"] for t in live),
                "dropped": ",".join(dropped),
            }
            rec["metrics"] = metrics
        models = {t["teacher"]: t["model"] for t in live if t["teacher"] != student_id}
        models[student_id] = new_digest
        return {
            "party": student_id,
            "models": models,
            "teachers": [t["teacher"] for t in live],
            "dropped": dropped,
        }

    if _is_client(cfg, student_id):
        return _client_step(cfg, round_index, "distill", student_id, run)
    return _retrying(run, f"distill {student_id}")


@forwarded
def evaluate(
    config_json: str,
    state_json: str,
    round_index: int,
    update: str = "",
    updates: list[str] | None = None,
) -> dict:
    """Score every party on every family's held-out set and write the round manifest."""
    from flminillm.evaluation import evaluate_model

    cfg, store = _ctx(config_json)
    prev = _loads(state_json)
    state = json.loads(json.dumps(prev))
    state["models"] = dict(prev["models"])
    dropped: dict[str, str] = {}
    for u in [_loads(x) for x in ([update] if update else []) + list(updates or [])]:
        if u.get("dropped") and isinstance(u["dropped"], str):
            dropped.setdefault(u["dropped"], u["reason"])  # keeps its previous model
            continue
        for client, reason in (u.get("dropped") or {}).items():
            dropped.setdefault(client, reason)
        state["models"].update(u["models"])
    with step_record(cfg, store, round_index, "evaluate", "all") as rec:
        tok = _load_tokenizer(store, state["tokenizer"])
        eval_sets = {f: _examples(store, PUBLIC, d) for f, d in state["data"]["eval"].items()}
        results = {}
        for party in [p.id for p in cfg.parties]:
            if party not in state["models"]:
                raise RuntimeError(f"round {round_index}: no model for party {party!r}")
            model = _load_model(store, party, state["models"][party])
            results[party] = evaluate_model(
                model, tok, eval_sets, batch_size=cfg.generation.batch_size,
                max_new_tokens=cfg.generation.eval_max_new_tokens,
            )  # fmt: skip
            rec["inputs"][f"model.{party}"] = _ref(store.scoped(party), state["models"][party])
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
        rec["outputs"]["round_manifest"] = _ref(store, state["manifest"])
        rec["params"] = {"dropped": json.dumps(dropped)}
    return state


@forwarded
def track(
    config_json: str,
    state_json: str,
    run_label: str = "",
    run_started: float = 0.0,
    run_tags: str = "{}",
) -> str:
    """Log the federation's lineage (ledger + round manifests) to MLflow; returns the run id.
    Runs last; `state_json` (the final manifest) only orders it after the rounds."""
    from flminillm.tracking import log_federation

    cfg, store = _ctx(config_json)
    if not cfg.tracking.enabled:
        return ""
    if os.environ.get("KFP_POD_NAME") and os.environ.get("MLFLOW_TRACKING_URI"):
        # on a cluster the tracking URI (and its credentials) come from a Kubernetes secret
        uri = os.environ["MLFLOW_TRACKING_URI"]
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})})
    return log_federation(
        cfg, store, run_label=run_label, run_started=run_started,
        extra_tags=json.loads(run_tags or "{}"),
    )  # fmt: skip
