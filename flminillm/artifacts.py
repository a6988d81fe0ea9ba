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
    from flminillm.config import DeploymentConfig, ExperimentConfig
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


def load_model(store: Store, party: str, digest: str):
    """A party's model: it lives under that party's prefix of the store."""
    from flminillm.models import load_model as load

    return load(store.scoped(party).get_dir(digest))


def save_model(store: Store, party: str, model) -> str:
    from flminillm.models import save_model as save

    with tempfile.TemporaryDirectory(prefix="flminillm-model-") as tmp:
        save(model, tmp)
        return store.scoped(party).put_dir(tmp)


def load_examples(store: Store, scope: str, digest: str) -> list[Example]:
    from flminillm.data import Example

    return [Example.from_dict(d) for d in store.scoped(scope).get_json(digest)]


def put_examples(store: Store, examples: list[Any]) -> str:
    return store.put_json([e.to_dict() for e in examples])
