"""Where a federation's things live and how they are named: the store scopes, loading and
saving models, tokenizers and examples, references for the ledger, and seeds.

Every party's models and private data live under its own prefix of the store
(`parties/<party>/`); shared objects under `public`, exchanged messages under `exchange`.
"""

from __future__ import annotations

import hashlib
import tempfile
from typing import TYPE_CHECKING, Any

from flminillm.store import Store, open_store_from_config

if TYPE_CHECKING:
    from flminillm.config import DeploymentConfig, EngineConfig, ExperimentConfig, LoraSpec
    from flminillm.data import Example

PUBLIC = "public"  # store scope of shared, public objects (tokenizer, public prompts, eval)
EXCHANGE = "exchange"  # store scope of the messages that cross party boundaries


def open_store_for(cfg: DeploymentConfig) -> Store:
    return open_store_from_config(cfg.store)


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (master seed, step name, round, party)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def seed(cfg: ExperimentConfig, *parts: object) -> int:
    """A step's seed: from the experiment's master seed and the step's coordinates."""
    return derive_seed(cfg.seed, *parts)


def ref(store: Store, digest: str) -> dict[str, str]:
    """A ledger reference to an object: its digest and where it is stored."""
    return {"digest": digest, "uri": store.object_uri(digest)}


def load_tokenizer(store: Store, digest: str):
    from flminillm.tokenizer import load_tokenizer as load

    return load(str(store.scoped(PUBLIC).get_dir(digest)))


def save_tokenizer(store: Store, tok) -> str:
    with tempfile.TemporaryDirectory(prefix="flminillm-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        return store.scoped(PUBLIC).put_dir(tmp)


def load_model(
    store: Store,
    party: str,
    digest: str,
    engine: EngineConfig | None = None,
    lora: LoraSpec | None = None,
):
    """A party's model (it lives under that party's prefix of the store), on the device
    `engine` names. An adapter checkpoint is loaded onto its base model (by the base's
    digest, from the same prefix). With `lora`, the model is made ready to train adapters:
    a full checkpoint gets new adapters on it (itself the base), an adapter checkpoint keeps
    training its own."""
    from flminillm.devices import device_for
    from flminillm.models import load_model as load
    from flminillm.models import read_base

    scoped = store.scoped(party)
    path = scoped.get_dir(digest)
    base = read_base(path)
    if base is None:
        model = load(path)
        if lora is not None:
            from flminillm.models import add_lora

            model = add_lora(model, lora, base_digest=digest)
    else:
        from flminillm.models import load_adapters

        model = load_adapters(load(scoped.get_dir(base)), path, base, trainable=lora is not None)
    return model.to(device_for(engine))


def save_model(store: Store, party: str, model) -> str:
    """Safetensors into the party's prefix: the whole model, or (LoRA) only its adapters
    and the digest of their base, which is already in the store."""
    from flminillm.models import save_model as save

    with tempfile.TemporaryDirectory(prefix="flminillm-model-") as tmp:
        save(model, tmp)
        return store.scoped(party).put_dir(tmp)


def initial_model(store: Store, state: dict, party: str) -> str:
    """`party`'s model before the federation's first round (its round-0 model: pre-trained,
    or locally fine-tuned for a client), from a round manifest `state` and its history."""
    first = store.get_json(state["history"][0]) if state.get("history") else state
    # round 0's manifest, or one from before it (a step run outside a federation's rounds)
    if int(first.get("round", -1)) > 0 or party not in first.get("models", {}):
        raise ValueError(
            f"no round-0 model of {party!r} in the manifests (round {first.get('round')}): "
            "a federation started before round manifests kept their history; run it again"
        )
    return first["models"][party]


def last_rounds_models(
    store: Store, prev: dict, party: str, latest: str, round_index: int, k: int
) -> list[tuple[int, str]]:
    """[(round, model digest)] of `party` after each of the last `k` rounds up to
    `round_index` (whose model is `latest`), oldest first: from the previous round
    manifests (`prev`, the state before `round_index`, and its history), round 0's
    initial model never among them."""
    states = [store.get_json(h) for h in prev.get("history", [])] + [prev]
    out = [
        (int(st["round"]), st["models"][party])
        for st in states
        if round_index - k < int(st.get("round", -1)) < round_index
        and int(st["round"]) >= 1
        and party in st.get("models", {})
    ]
    return sorted(out) + [(round_index, latest)]


def average_models(store: Store, party: str, digests: list[str], engine=None) -> str:
    """The uniform average of `party`'s models (same architecture: one party's models
    along its own rounds), saved into its prefix; its digest. One model: itself. Adapter
    checkpoints (LoRA) are averaged by the weights they make, base + B A, and the average
    is saved as a whole model: averaging A and B apart gives mean(B) mean(A), which is not
    the mean of the products."""
    from flminillm.models import average_state_dicts, is_lora

    if len(set(digests)) == 1:
        return digests[0]
    last = {}

    def one_at_a_time():  # a running sum: two models in memory, not K + 1
        for d in digests:
            model = load_model(store, party, d, engine)
            last["model"] = model.merge_and_unload() if is_lora(model) else model
            yield last["model"].state_dict()

    avg = average_state_dicts(one_at_a_time(), [1.0] * len(digests))
    model = last["model"]
    own = model.state_dict()  # once: each call builds the whole dict
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in avg.items()})
    return save_model(store, party, model)


def model_refs(scoped: Store, digest: str, model) -> dict[str, dict[str, str]]:
    """The ledger's outputs for a saved model: the model and, for adapters, their base."""
    out = {"model": ref(scoped, digest)}
    base = getattr(model, "flminillm_base", None)
    if base is not None:
        out["base_model"] = ref(scoped, base)
    return out


def load_examples(store: Store, scope: str, digest: str) -> list[Example]:
    from flminillm.data import Example

    return [Example.from_dict(d) for d in store.scoped(scope).get_json(digest)]


def put_examples(store: Store, examples: list[Any]) -> str:
    return store.put_json([e.to_dict() for e in examples])
