"""Experiment configuration: pydantic models read from YAML.

Field descriptions are the user documentation (`flminillm config-schema` prints them).
Every model forbids unknown keys so that a typo fails loudly with the field's path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PartyId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]


def canonical_json(data: Any) -> str:
    """Sorted keys, no spaces: the same text for the same data (what digests are taken of)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


class ConfigError(ValueError):
    """A configuration problem, with the path of every bad field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Strict):
    """LoRA adapters (peft) on a party's model: only the adapters train in local_sft and
    distill, and its checkpoints hold the adapters plus the digest of the base model."""

    r: int = Field(8, ge=1, le=1024, description="Rank of each adapter.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (the update is alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj], or [c_attn] for GPT-2), "
        "or all-linear.",
    )


class PartyTokenizer(_Strict):
    """A party's own tokenizer, instead of the federation's shared one."""

    vocab_size: int | None = Field(
        None, ge=300, le=262144,
        description="Train the party its own byte-level BPE of this size on the public text.",
    )  # fmt: skip
    name_or_path: str | None = Field(
        None,
        description="Load it (local directory, hub name, or a .gguf / package: file whose "
        "tokenizer transformers reads).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> PartyTokenizer:
        if (self.vocab_size is None) == (self.name_or_path is None):
            raise ValueError("tokenizer: give exactly one of vocab_size or name_or_path")
        return self


class ModelSpec(_Strict):
    """A causal LM: either built from these hyper-parameters or loaded from `name_or_path`."""

    family: Literal["gpt2", "llama", "qwen2"] = Field(
        "gpt2", description="Hugging Face model family to build from config."
    )
    hidden_size: int = Field(128, ge=8, le=16384, description="Width of the residual stream.")
    num_layers: int = Field(2, ge=1, le=128, description="Number of transformer blocks.")
    num_heads: int = Field(
        4, ge=1, le=256, description="Attention heads (must divide hidden_size)."
    )
    intermediate_size: int | None = Field(
        None, ge=8, description="MLP width; default 4x hidden (gpt2) or ~2.75x (llama/qwen2)."
    )
    max_positions: int = Field(
        128, ge=16, le=131072, description="Longest sequence the model sees."
    )
    name_or_path: str | None = Field(
        None,
        description="Load weights from a local directory or a hub name instead of building "
        "(same code path: transformers' from_pretrained).",
    )
    lora: LoraSpec | None = Field(
        None,
        description="Train LoRA adapters instead of every weight (local_sft and distill).",
    )
    tokenizer: PartyTokenizer | None = Field(
        None,
        description="The party's own tokenizer. Empty: the model's own when it is loaded "
        "(name_or_path), else the federation's shared one. Parties with different tokenizers "
        "exchange text and character offsets (docs/algorithm.md, 'Across tokenizers').",
    )
    chat_template: bool = Field(
        True,
        description="Format prompts with the tokenizer's chat template when it has one "
        "(else the benchmark's 'Q: ... A:' format).",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.name_or_path is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads}); change one of them"
            )
        return self


FIELD_PRESETS: dict[str, dict[str, Any]] = {
    # prompt fields are joined with a newline (the empty ones left out)
    "prompt_response": {"prompt": ["prompt"], "response": "response", "category": "category"},
    "alpaca": {"prompt": ["instruction", "input"], "response": "output", "category": "category"},
    "dolly": {"prompt": ["instruction", "context"], "response": "response", "category": "category"},
    "flminillm": {"prompt": ["prompt"], "response": "answer", "category": "family"},
    "text": {"prompt": ["text"], "response": None, "category": None},
}


class FieldMap(_Strict):
    """Which JSON fields of a record hold the prompt, the response and the category."""

    prompt: list[str] = Field(
        default_factory=lambda: ["prompt"],
        min_length=1,
        description="Field(s) whose text makes the prompt, joined with a newline when several "
        "are non-empty (Alpaca: [instruction, input]).",
    )
    response: str | None = Field(
        "response", description="Field of the response (empty: a prompt-only set)."
    )
    category: str | None = Field(
        "category",
        description="Optional field naming the record's category (task family); results are "
        "reported per category. Records without it count as category 'all'.",
    )


class DataFile(_Strict):
    """A data set in a party's storage: JSON lines at a local path or s3://bucket/key."""

    uri: str = Field(
        description="Local path (relative: from the working directory) or s3://bucket/key of "
        "a JSONL file (one JSON object per line), read with the store's S3 settings."
    )
    fields: (
        Literal["auto", "prompt_response", "alpaca", "dolly", "flminillm", "text"] | FieldMap
    ) = Field(
        "auto",
        description="Field mapping: a preset (prompt_response: prompt/response/category; "
        "alpaca: instruction+input/output; dolly: instruction+context/response/category; "
        "flminillm: prompt/answer/family; text: text) or an explicit {prompt, response, "
        "category}; auto picks the preset from the first record's keys.",
    )


class PartyData(_Strict):
    """A client's private data, when `data.source` is files."""

    train: DataFile = Field(description="The client's private training set (prompt + response).")
    test: DataFile | None = Field(None, description="The client's private test set (optional).")


class PartyConfig(_Strict):
    """One participant of the federation."""

    id: PartyId = Field(description="Unique party id: lowercase letters, digits, '-' or '_'.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The party's own model.")
    families: list[str] | None = Field(
        None,
        description="Task families whose private data this client holds (clients only). "
        "Leave empty to split data.families across clients automatically (non-IID, disjoint).",
    )
    weight: float = Field(
        1.0, gt=0, description="Weight of this party as a teacher in the mixture."
    )
    data: PartyData | None = Field(
        None, description="The client's own data files (data.source: files; clients only)."
    )


class DataConfig(_Strict):
    """Where the data comes from: the procedurally generated benchmark (default) or files."""

    source: Literal["benchmark", "files"] = Field(
        "benchmark",
        description="benchmark: generated from the fields below; files: each client's "
        "`data`, and `public`, `eval` (and `pretrain` for models built from config) here.",
    )
    public: DataFile | None = Field(
        None, description="Public prompt pool (files): prompts only; responses are ignored."
    )
    eval: DataFile | None = Field(
        None, description="Evaluation set (files): prompt, response, optional category."
    )
    validation: DataFile | None = Field(
        None,
        description="Validation set (files), disjoint from `eval`: where hyper-parameters are "
        "chosen (evaluate_on: validation).",
    )
    evaluate_on: Literal["eval", "validation"] = Field(
        "eval",
        description="Which held-out set the evaluate step scores: eval (the reported split) or "
        "validation (for choosing hyper-parameters: `flminillm bench tune`; never report it).",
    )
    pretrain: DataFile | None = Field(
        None,
        description="Pre-training corpus (files) for models built from config: one document "
        "per record (fields: text).",
    )

    families: list[str] = Field(
        default_factory=lambda: [
            "country_code",
            "currency",
            "compare",
            "successor",
            "repeat",
            "first_letter",
        ],
        min_length=1,
        description="Task families of the benchmark (see flminillm.data.FAMILIES).",
    )
    n_train_per_family: int = Field(300, ge=1, description="Private training examples per family.")
    n_test_per_family: int = Field(40, ge=1, description="Private test examples per family.")
    n_public_per_family: int = Field(
        64, ge=1, description="Public prompts (no answers) per family."
    )
    n_eval_per_family: int = Field(50, ge=1, description="Held-out evaluation examples per family.")
    n_val_per_family: int = Field(
        0, ge=0,
        description="Validation examples per family, disjoint from the evaluation ones (0: no "
        "validation split; needed by evaluate_on: validation and `flminillm bench tune`).",
    )  # fmt: skip
    pretrain_docs: int = Field(3000, ge=1, description="Documents in the pre-training corpus.")
    iid_mix: float = Field(
        0.0, ge=0, le=1,
        description="Non-IID severity: share of each client's training data drawn from all "
        "families instead of its own (0 = disjoint families, 1 = IID).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _validation_exists(self) -> DataConfig:
        if self.evaluate_on == "validation":
            if self.source == "benchmark" and self.n_val_per_family == 0:
                raise ValueError(
                    "data.evaluate_on is validation but data.n_val_per_family is 0: set "
                    "n_val_per_family (e.g. 50) so that a validation split exists"
                )
            if self.source == "files" and self.validation is None:
                raise ValueError(
                    "data.evaluate_on is validation but data.validation is not set: give the "
                    "validation file as {uri: path-or-s3-uri, fields: auto}"
                )
        return self

    @field_validator("families")
    @classmethod
    def _known_families(cls, v: list[str]) -> list[str]:
        from flminillm.data import FAMILIES

        unknown = [f for f in v if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; allowed: {sorted(FAMILIES)}")
        if len(set(v)) != len(v):
            raise ValueError("families must not repeat")
        return v


class TokenizerConfig(_Strict):
    vocab_size: int = Field(1024, ge=300, le=262144, description="BPE vocabulary size.")
    name_or_path: str | None = Field(
        None, description="Load a tokenizer (local directory or hub name) instead of training one."
    )


class TrainConfig(_Strict):
    """Supervised training: pre-training of base models or local SFT."""

    steps: int = Field(200, ge=0, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(3e-3, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class LocalSFTConfig(TrainConfig):
    later_round_steps: int = Field(
        20,
        ge=0,
        description="SFT steps on own data in a client's later rounds (refresh); its first "
        "round (round 1, or the first it takes part in) runs the full `steps`.",
    )
    prompt_loss: bool = Field(
        True,
        description="Also train on prompt tokens, so that a client's model knows which prompts "
        "are its domain (used to weight teachers by their prompt likelihood).",
    )


class SamplingConfig(_Strict):
    """Which clients take part in a round."""

    fraction: float = Field(1.0, gt=0, le=1, description="Share of clients sampled each round.")
    min_clients: int = Field(1, ge=1, description="A round fails below this many live clients.")
    seed: int = Field(0, description="Seed of the client sampler.")


class GenerationConfig(_Strict):
    prompts_per_round: int = Field(
        96, ge=1, description="Public prompts each student answers per round (its rollouts)."
    )
    max_new_tokens: int = Field(12, ge=1, le=4096)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    top_k: int = Field(
        8, ge=1, le=1024, description="Size of the top-k support scored by the teacher per token."
    )
    batch_size: int = Field(64, ge=1)
    eval_max_new_tokens: int = Field(10, ge=1)
    eval_samples: int = Field(
        0, ge=0, le=64,
        description="Temperature-1 samples per evaluation prompt besides the greedy answer, "
        "after the last round (MiniLLM evaluates the mean over 5): metrics "
        "sampled_exact_match / sampled_rouge_l.",
    )  # fmt: skip


class DistillConfig(_Strict):
    """The MiniLLM reverse-KL step (see docs/algorithm.md)."""

    method: Literal["reverse_kl", "forward_kl"] = Field(
        "reverse_kl",
        description="reverse_kl: MiniLLM policy gradient; forward_kl: the forward-KL/SeqKD "
        "baseline (student fits the teachers' top-k distributions on every scored sequence).",
    )
    alpha: float = Field(
        0.25, ge=0, le=1, description="Teacher-mixed sampling: share of rollouts from teachers."
    )
    teacher_mixed: bool = Field(True, description="Use teacher rollouts with importance weights.")
    single_step: bool = Field(
        True, description="Exact per-token KL term (single-step decomposition)."
    )
    length_norm: bool = Field(True, description="Length-normalise the long-horizon reward.")
    iw_single_step: bool = Field(
        True,
        description="Weight the single-step KL by the clipped importance weights (MiniLLM). "
        "false: the support KL at full weight on every visited prefix, teachers' sequences "
        "included (docs/benchmark.md).",
    )
    prefix_iw: bool = Field(
        False,
        description="Importance weights of the sampling actually done: 1 on the student's own "
        "sequences, the clipped prefix ratio q_old/p on a teacher's (the single-step KL "
        "weighted by the prefix only); false: MiniLLM's per-token mixture weight.",
    )
    whiten_returns: bool = Field(
        False, description="Whiten the returns over each mini-batch (as MiniLLM does)."
    )
    tail_bucket: bool = Field(
        False,
        description="Support KLs (single-step reverse KL, forward KL) over the support plus "
        "one bucket for the rest of the vocabulary, instead of renormalised on the support.",
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clipping.")
    iw_clip: float = Field(
        3.0, ge=1, description="Upper clip of the mixed-sampling importance weight."
    )
    gamma: float = Field(1.0, gt=0, le=1, description="Discount of future rewards.")
    epochs: int = Field(2, ge=1, description="PPO epochs over each round's rollouts.")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, lt=1)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="Learning rate over each distill step's updates: constant, or cosine "
        "decay to 10% of lr at the step's last update (flminillm.training.lr_schedule, no "
        "warm-up): each round ends at a quieter point.",
    )
    server_average: int = Field(
        1,
        ge=1,
        le=100,
        description="The server's final model: the uniform average of its weights after "
        "each of the last K rounds (1: the last round's model). Only the final round's "
        "model is averaged (the evaluate step of round `rounds`); training goes on from "
        "the unaveraged weights, so rounds before are unchanged.",
    )
    max_grad_norm: float = Field(1.0, gt=0)
    lm_coef: float = Field(0.5, ge=0, description="Weight of the LM loss on the party's own data.")
    seqkd_coef: float = Field(
        1.0, ge=0, description="Weight of cross-entropy on selected teacher rollouts (SeqKD)."
    )
    seqkd_rounds: int = Field(
        1000, ge=0, description="Rounds (from the first) in which the SeqKD term is on."
    )
    warmup_rounds: int = Field(
        0,
        ge=0,
        description="The schedule MiniLLM assumes (students start from an SFT model): for "
        "this many rounds the student learns from its teachers' answers (teacher share "
        "`warmup_alpha`, SeqKD on); after them it takes on-policy reverse-KL steps with the "
        "teacher share `alpha` (MiniLLM: 0.2) and SeqKD off. 0: no schedule (alpha and "
        "seqkd_rounds as given).",
    )
    warmup_alpha: float = Field(
        1.0, ge=0, le=1, description="Teacher share during the warm-up rounds."
    )

    @model_validator(mode="after")
    def _claim_sum(self) -> DistillConfig:
        for name, what in (("max_claim_sum", "claims on one prompt"),
                           ("max_prompt_claim_sum", "claims on a round's prompts")):  # fmt: skip
            value = getattr(self, name)
            if 0 < value < 1:
                raise ValueError(
                    f"{name} {value}: an honest teacher's {what} may sum to 1, so a limit "
                    "below 1 bars honest teachers; set it to 1 or more (1.5 leaves room for "
                    "float error), or 0 to turn the check off"
                )
        return self

    @property
    def contest_bar_on(self) -> bool:
        """Whether `contest_bar` bars anyone: a share above 0 and the contest on."""
        return self.contest_bar > 0 and self.contest_quantile < 1

    @model_validator(mode="after")
    def _bar_needs_contests(self) -> DistillConfig:
        # a bar set with the contest off is a mistake; the default bar is inert then
        set_bar = "contest_bar" in self.model_fields_set and self.contest_bar > 0
        if set_bar and self.contest_quantile >= 1.0:
            raise ValueError(
                f"contest_bar {self.contest_bar} reads the peer contest, which is off "
                "(contest_quantile 1); set contest_quantile below 1 (e.g. 0.75) or "
                "contest_bar: 0"
            )
        if not self.contest_leave_out and self.contest_bar == 0 and self.contest_quantile < 1:
            raise ValueError(
                "contest_bar 0 with contest_leave_out false: the contests would do nothing; "
                "set contest_leave_out: true (the contest as a filter), contest_bar above 0 "
                "(e.g. 0.25), or contest_quantile: 1 (the contest off)"
            )
        if self.contest_min_judged > 0 and self.contest_bar_over == "wins":
            raise ValueError(
                f"contest_min_judged {self.contest_min_judged} counts the wins a peer judged, "
                "which contest_bar_over 'wins' does not read; set contest_bar_over: "
                "judged-veto (or judged), or contest_min_judged: 0"
            )
        return self

    @model_validator(mode="after")
    def _sure_band(self) -> DistillConfig:
        if self.selection != "rank" or self.joint_quantile == 1.0:
            return self
        if self.joint_quantile <= self.quarantine_quantile:
            raise ValueError(
                f"joint_quantile ({self.joint_quantile}) must be above quarantine_quantile "
                f"({self.quarantine_quantile}): a quarantined teacher ranks every prompt at "
                "that quantile and would compete by its claims among the sure; raise "
                "joint_quantile or set it to 1 (rank alone)"
            )
        if self.invariance_share == 0:
            raise ValueError(
                f"joint_quantile {self.joint_quantile} needs the input-invariance check "
                "(invariance_share > 0): among the sure a backdoor's certain claims outbid the "
                "family's expert, and only that check rules its answers out; set "
                "joint_quantile: 1 (rank alone) where invariance_share is 0"
            )
        if self.joint_quantile < self.invariance_quantile:
            raise ValueError(
                f"joint_quantile ({self.joint_quantile}) must not be below "
                f"invariance_quantile ({self.invariance_quantile}): a backdoor that wins among "
                "the sure by its claims must be where the input-invariance check judges; "
                "raise joint_quantile (or lower invariance_quantile)"
            )
        return self

    def for_round(self, round_index: int) -> DistillConfig:
        """The settings of round `round_index` (1-based) under the warm-up schedule."""
        if self.warmup_rounds == 0:
            return self
        if round_index <= self.warmup_rounds:
            return self.model_copy(update={"alpha": self.warmup_alpha, "seqkd_rounds": 10**6})
        return self.model_copy(update={"seqkd_rounds": 0})

    aggregation: Literal["mixture", "capped_mixture", "median", "trimmed_mean"] = Field(
        "mixture",
        description="How several teachers' probabilities are combined: mixture "
        "(posterior-weighted), capped_mixture (the same with each teacher's mean weight at most "
        "`cap`: bounded influence of one lying teacher), median, trimmed_mean.",
    )
    selection: Literal["joint", "rank"] = Field(
        "rank",
        description="How one teacher's answer is chosen per teacher-share prompt: joint (the "
        "highest claimed log p(x) + log p(y | x): the mixture's likeliest component) or rank "
        "(the highest quantile of that claim among the teacher's own claims, so that no "
        "teacher's self-reported likelihood outbids another's: docs/algorithm.md).",
    )
    min_claim: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Reject a kept teacher answer whose teacher claims less than this mean "
        "per-token probability for it (geometric mean of p(y_t | x, y_<t)): where no teacher "
        "present knows a prompt (its expert dropped out of the round), the student learns "
        "nothing from the prompt instead of the best guess of teachers that do not know it. "
        "0 keeps every answer. Bounded by `max_rejected`.",
    )
    max_rejected: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="What makes `min_claim` scale-free: at most this share of a round's "
        "teacher answers is rejected. Where more of them claim less than `min_claim` "
        "(teachers unsure everywhere: barely trained, or long open-ended answers with many "
        "valid wordings), the floor falls to this quantile of the kept answers' claims, so "
        "the student still learns from the surer part. 1 leaves `min_claim` absolute.",
    )
    stale_share: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Drop-out without loss: where a client is absent from a round (dropped "
        "out, or not sampled), the server replays this share times as many answers of that "
        "client as it kept in the client's latest round, drawn at random from those it kept "
        "in every round the client took part in (stale); 0 replays nothing. 1 was chosen on "
        "the validation split under 30% drop-out (docs/tune-dropout; again in stop 35 under "
        "the routing below, docs/tune-dropout-routing). Under rank selection the absent "
        "client's domain (its quantiles where it won, `imputed_quantile`) is left to its "
        "replayed answers; an absent client with no past gets its share of the clients "
        "reserved where the present teachers are least sure (`unknown_domain`). 0 replays and "
        "reserves nothing.",
    )
    invariance_share: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="The input-invariance check (STRIP-like, against a backdoor: one wrong "
        "answer for every prompt of a family, docs/algorithm.md): a teacher's answer given "
        "word for word to a set of prompts is ruled out on all of them where, on the part "
        "that it and another teacher both rank above `invariance_quantile` of their own "
        "claims, more than this share of a round's teacher-share prompts, the other teacher "
        "answers differently (at least max(3, n/8) distinct answers on those n prompts, and "
        "the same answer on fewer than half). 0: off. 0.05 was set a priori, not tuned: above "
        "any one right answer's share in the benchmarks' families, below a backdoor's (every "
        "prompt of its family).",
    )
    plausibility_margin: float = Field(
        1.0,
        ge=0.0,
        description="Peer review by the student's own LM as it was before the federation "
        "(its round-0 model: fluent in the prompts' language, taught no family by anyone): "
        "a teacher whose likelier answers (the 90th percentile over its answers of the "
        "judge's mean per-token log q0(y | x)) score more than this margin, in nats per "
        "token, below a uniformly random token (log 1/V) is implausible for the round: the "
        "prompts it would win leave the batch and its scores leave the mixture. Catches "
        "random-token answers whatever their author claims, and any number of colluders; a "
        "fluent wrong answer passes (rank selection bounds it). 0: off. 1 was set from the "
        "training rounds' messages of stop 31's runs (honest teachers at least 0.6 above "
        "log 1/V, random-token liars at least 2.2 below; docs/algorithm.md), not from any "
        "evaluation split.",
    )
    max_claim_sum: float = Field(
        1.5,
        ge=0.0,
        description="Claims that add up: where a prompt is asked more than once in a round, "
        "a teacher's distinct answers to it are disjoint outcomes of one distribution, so "
        "the probabilities it claims for them (exp of the sum of its log-probs of each "
        "answer's tokens) sum to at most 1. A teacher whose claims on some prompt sum above "
        "this limit is barred for the round, as an implausible one is (plausibility_margin). "
        "Catches a liar that claims certainty for different answers to one prompt; a liar "
        "whose lie is a function of the prompt, or that claims less, passes (rank selection "
        "bounds it). Reads only prompts that come twice in a round (the benchmark's public "
        "pools repeat; a deduplicated pool gives it nothing to read). 0: off; otherwise at "
        "least 1. 1.5 leaves float error room: honest teachers' sums were at most 1 (exp "
        "-0.001) on every training round of stop 32's and stop 34's runs, the certain liars' "
        "at least 3 (docs/algorithm.md), set before any run with it.",
    )
    max_prompt_claim_sum: float = Field(
        1.5,
        ge=0.0,
        description="Prompt claims that add up: a teacher's claimed log p(x) leaves out the "
        "first token, which every party's prompt format makes the same, and no distinct "
        "prompt of a round begins another (those that might are left out), so an honest "
        "teacher's claimed probabilities of a round's distinct prompts sum to at most 1. A "
        "teacher whose claims sum above this limit is barred for the round, as an "
        "overclaiming one is (max_claim_sum). Catches a liar that claims to know every "
        "prompt (p(x) = 1, to win the mixture's weight and the selection); a liar that "
        "claims what its model would passes. 0: off; otherwise at least 1. 1.5 is float "
        "error room, as for max_claim_sum, set from the inequality, not tuned.",
    )
    repeat_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of the server's teacher-share prompts of each round replaced by "
        "copies of others of the round (seeded, in random places): prompts asked twice on purpose, so "
        "that the claim-sum check (max_claim_sum) has something to read where the public "
        "pool has no repeats of its own. 0: off (the benchmarks' pools repeat; their runs "
        "keep it off). A liar that spots the copies and answers them alike passes.",
    )
    joint_quantile: float = Field(
        0.75,
        gt=0.0,
        le=1.0,
        description="Under rank selection, where teachers rank a prompt above this quantile "
        "of their own claims (each is sure of it, by its own standard), they compete on it by "
        "their claims, as joint selection does; elsewhere by rank. Rank alone hands a family "
        "to a teacher that holds few families and a look-alike of it (it ranks the look-alike "
        "just below its own domain, above where a holder of several families ranks its own); "
        "among the sure, the holder's claim on its own answer is the higher. A flat-claiming "
        "liar (quantile 0.5), a quarantined teacher (`quarantine_quantile`) and an "
        "uninformed guess are never among the sure; a backdoor focused on a family is, and "
        "the input-invariance check judges exactly there (so this must not be below "
        "`invariance_quantile`, and needs `invariance_share` > 0). 1: rank alone (as before "
        "stop 33). 0.75 is "
        "`invariance_quantile`'s value, set before any run; not tuned (docs/algorithm.md). "
        "Not used with `aggregation: capped_mixture`'s selection cap.",
    )
    invariance_quantile: float = Field(
        0.75,
        gt=0.0,
        lt=1.0,
        description="Where the input-invariance check judges a teacher's repeated answer: "
        "on the prompts that it and the other teacher both rank above this quantile of "
        "their own claims. Under rank selection a backdoor wins a family's prompts only by "
        "ranking them above the family's expert, who ranks its own families at its top "
        "(each client holds about a quarter of the prompts or less in the benchmarks); an "
        "honest teacher's collapsed guess on other families' prompts ranks lower and is not "
        "judged (docs/algorithm.md). 0.75 was set from the training rounds' messages of "
        "stop 29's runs (docs/results.md), not from any evaluation split.",
    )
    tie_rank: Literal["mean", "low"] = Field(
        "low",
        description="Under rank selection, where a teacher's tied claims rank among its own: "
        "at their mean rank, or at their lowest ('low'). A teacher that claims one number "
        "for everything ranks every answer at 0.5 with 'mean', and wins wherever the others "
        "all rank a prompt below their median (the `spread` liar, docs/results.md); with "
        "'low' at 0: one claim for everything tells nothing. Honest teachers tie only on "
        "the same answer to copies of one prompt. 'low' was chosen on the validation split "
        "(`bench tune` groups tie_rank under the spread liar and tie_rank-clean, "
        "docs/tune-ties) by a rule written before the run.",
    )
    barred_wins: Literal["leave", "next"] = Field(
        "next",
        description="The prompts a teacher barred for the round (by any bar: implausible, "
        "overclaiming, contest- or dependence-barred) would have won: 'leave', left out of "
        "the batch (`implausible`); 'next', kept with the answer of the teacher that wins without it (judged by "
        "`min_claim` as any kept answer: where no teacher present knows the prompt it is "
        "rejected). A liar whose claims rank at random would win about a third of the "
        "prompts, the honest families' among them: left out, they cost the honest "
        "families what the liar no longer can (the 3-client noisy liar barred in every "
        "round still costs 4.5-6 points, docs/results.md stop 41); a liar with one claim "
        "for everything wins none, and the honest teachers' answers are learned "
        "everywhere (its cost 1.8). 'next' is the default since stop 42, chosen on both "
        "shapes' validation splits by the rule written before its runs "
        "(docs/tune-barred-next: 44.8 against 'leave''s 43.8 under the noisy liar; "
        "docs/tune-barred-next-5clients: 43.4 against 39.2; clean the same runs on both); "
        "'leave' is what every run before stop 42 measured.",
    )
    barred_as_absent: bool = Field(
        False,
        description="Count a teacher barred for the round (by any bar: implausible, "
        "overclaiming, contest- or dependence-barred; before stop 50 the first two only) as "
        "an absent client with no past: its share of the clients (1 / number of clients) "
        "of the prompts, where the present teachers are least sure, is left out "
        "(`unknown_domain`), as for a client that never took part, after its would-be wins "
        "went where `barred_wins` says. Without it the honest teachers' guesses at its "
        "families are learned where they pass `min_claim` (docs/results.md, stops 38 and "
        "50). False: off, the default: tried on the validation split under the consistent "
        "liar at temperature 1 (`bench tune` groups barred_as_absent and "
        "barred_as_absent-clean, docs/tune-barred), it scored 0.9 below off there; under "
        "the contesting liar at 0.7 with every bar (barred_as_absent_t07, "
        "docs/tune-barred-t07 and -5clients), 0.3 above on 3 clients and 0.08 below on 5 "
        "(the same clean), which its rule rejects.",
    )
    contest_quantile: float = Field(
        0.75,
        gt=0.0,
        le=1.0,
        description="Under rank selection, peer contest: where another teacher ranks a "
        "prompt above this quantile of its own claims (it is sure of it, by its own "
        "standard) and finds the kept answer unlikely (its probability of that answer "
        "through the first token where their answers part, below `contest_p`: read from "
        "its own support there, or bounded by its support's tail mass), it contests it: "
        "evidence for `contest_bar` (the default), and with `contest_leave_out` the prompt "
        "is left out (`contested`): neither answer is learned. Evidence a liar does not write: the "
        "honest teachers' own distributions on its answers. Barred and quarantined "
        "teachers cannot contest; a liar that contests removes at most the prompts it "
        "ranks above this quantile (data lost, not poisoned; a contested prompt counts as "
        "lost for every teacher, so a liar's contests also shrink an absent expert's imputed "
        "domain, `imputed_quantile`). Teachers of another tokenizer cannot contest (their "
        "supports are the sampled token alone). Rank selection's rule (as "
        "tie_rank): under `selection: joint` it does nothing. 1: off. 0.75, the default "
        "since stop 40, for `contest_bar`'s evidence (with `contest_leave_out` off: as a "
        "filter it did not beat off on the validation split under the noisy liar, "
        "docs/tune-contest, and where two clients' families look alike, the 5-client "
        "benchmark, honest teachers contest each other on 8-20% of a round's prompts).",
    )
    contest_bar: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Bar for the round a teacher at least two of whose peers each contest "
        "more than this share of the prompts it won (`contest_quantile`'s contests, read "
        "before its scores count: `contest_bar` in flminillm/aggregate.py). A liar that "
        "contests is one peer and cannot bar an honest teacher alone (two colluding ones "
        "could). Needs contest_quantile < 1. 0: off. 0.25 of the wins each peer could judge "
        "(`contest_bar_over` 'judged-veto') is the default since stop 48 (below). 0.05 of "
        "all its wins (`contest_bar_over` 'wins'; read from validation federations' training "
        "messages before any run with the bar) with `contest_bar_peers` 'all' and "
        "`contest_leave_out` off was the default from stop 40 to 47: the one setting that "
        "passed the rule written before the runs on both shapes' validation splits under "
        "the noisy liar (docs/tune-contest-bar-kept: 41.5 against off's 39.0; "
        "docs/tune-contest-bar-5clients: 39.2 against 32.8; clean the same runs as off on "
        "both); under the teachers' temperature 0.7 it let the contesting liar through "
        "(docs/results.md, stop 45). With 'two' and the filter it bars honest look-alike "
        "teachers on the 5-client shape (clean 36.7 against 41.3).",
    )
    contest_bar_peers: Literal["two", "all"] = Field(
        "all",
        description="Whose contests bar a teacher (`contest_bar`): 'two', any two of its "
        "peers; 'all', every peer that may contest (not barred, quarantined or of another "
        "tokenizer; at least two). In the 3-client benchmark the same; where two clients' "
        "families look alike (the 5-client benchmark) honest teachers contest each other "
        "and 'two' barred an honest one (docs/results.md, stop 40). 'all': the default "
        "since stop 40 (`contest_bar`).",
    )
    contest_bar_rounds: int = Field(
        6,
        ge=1,
        description="The rounds whose contests `contest_bar` also reads pooled: this one and "
        "up to n - 1 before it, per pair of teachers over the rounds where the peer could "
        "contest the teacher's wins (the server carries each round's counts in the round "
        "manifest, `contest_evidence`). A teacher is barred where this round's shares are "
        "above `contest_bar`, as with 1, or where the pooled ones are: a liar whose "
        "contests sit just under the share in one round and above it in others is barred in "
        "both, and one that behaved in earlier rounds is still barred by this round's. "
        "1: this round only. 6 (every round so far in the 6-round benchmarks) is the "
        "default since stop 41, chosen by the rule written before its runs on both shapes' "
        "validation splits (docs/tune-contest-bar-either: 43.8 against this round only's "
        "41.5 under the noisy liar; docs/tune-contest-bar-either-5clients: 39.2, level, the "
        "same runs; clean the same runs as this round only on both).",
    )
    contest_bar_over: Literal["wins", "judged", "judged-veto"] = Field(
        "judged-veto",
        description="What a peer's contest share of a teacher is a share of (`contest_bar`): "
        "'wins', every prompt the teacher won; 'judged', only the wins the peer ranked above "
        "`contest_quantile` among its own claims (those it could contest: it was sure of "
        "them), so that a liar's wins on families no peer knows do not dilute the share; "
        "under 'all' (`contest_bar_peers`) a peer that judged none of the teacher's wins "
        "then abstains (every other that judged some, at least two); 'judged-veto', the "
        "same shares, but under 'all' a peer that judged none votes against the bar, as "
        "every peer that may contest votes under 'wins' (two contesting colluders cannot "
        "bar an honest teacher whose other peers had nothing of it to judge). "
        "'judged-veto' at `contest_bar` 0.25 is the default since stop 48: the one candidate "
        "that passed the rule written before its runs on both shapes' validation splits "
        "under the contesting liar at temperature 0.7 (docs/tune-contest-bar-t07: 46.1 "
        "against 'wins' at 0.05's 43.1; docs/tune-contest-bar-t07-5clients: 45.4 against "
        "44.8; clean the same runs on both), then every attack of the defence table on the "
        "evaluation split (docs/defence-contest-veto). 'wins': what the bar read before.",
    )
    contest_min_judged: int = Field(
        0,
        ge=0,
        description="Under `contest_bar_over` 'judged' or 'judged-veto': the fewest of a "
        "teacher's wins a peer must have judged (this round, or pooled over "
        "`contest_bar_rounds` for the pooled bar) for its share to count; with fewer it is "
        "taken as a peer that judged none (abstains under 'judged', votes against the bar "
        "under 'judged-veto'). 0 (or 1): one is enough. Stop 48 found two honest look-alike "
        "teachers of the 5-client benchmark barred in a clean federation's first round "
        "(evaluation seed 1) on 1-6 judged wins per peer (1 of 2, 2 of 2, 6 of 6), where the "
        "contesting liars are judged on 13-35 each. Tried at stop 49 (`CONTEST_MIN_GRID` in "
        "flminillm/bench/tune.py): 3 and 5 let the contesting liar through a round on the "
        "5-client validation split (docs/tune-contest-min-5clients), so it stays 0.",
    )
    contest_leave_out: bool = Field(
        False,
        description="Leave the contested prompts out of the batch (`contest_quantile`: the "
        "contest as a filter). False: the contests are only `contest_bar`'s evidence, and "
        "a contested answer is learned unless its teacher is barred (where honest teachers "
        "contest each other's right answers, the filter loses them: docs/results.md, stop "
        "40). Needs contest_bar > 0 when off. Off: the default since stop 40 "
        "(`contest_bar`).",
    )
    dependence_bar: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Bar for the round a teacher whose answers the student finds no likelier "
        "after their own prompts than after similar other prompts: per teacher, the mean "
        "over the prompts it won of the student's log q(y | x) - log q(y | x') (nats per "
        "token; x' the most similar other prompt of the round, by the tokens it shares at "
        "its start and end), barred where below this share of its peers' median, once that "
        "median is at least `dependence_min` (the student, before the round, has learned "
        "to tell prompts apart from its peers' answers). Catches answers moved from another "
        "prompt of their family (the fluent, consistent and noisy liars), also on families "
        "only the liar holds, where no peer can contest; not a wrong answer that depends on "
        "its prompt. Needs two teachers or more (a client's one teacher is never judged). "
        "0: off. `dependence_bar` in flminillm/aggregate.py.",
    )
    dependence_min: float = Field(
        0.5,
        gt=0.0,
        description="The peers' median dependence (nats per token) below which "
        "`dependence_bar` judges nobody: in a first round the student has learned nothing "
        "and every teacher's answers are as likely after any prompt.",
    )
    contest_p: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="The probability below which a sure teacher contests the kept answer "
        "(`contest_quantile`).",
    )
    quarantine_quantile: float = Field(
        0.65,
        gt=0.0,
        lt=1.0,
        description="Under rank selection, the quantile at which a quarantined teacher's "
        "answers rank on every prompt (one whose claims contradict its own support, a "
        "broken model: its claims say nothing of where it is right, docs/algorithm.md): it "
        "wins the prompts where every other teacher claims less than this quantile of its own "
        "claims. Higher gives its domain back to it and hands it more of the others'. "
        "0.65 was chosen on the validation split with a broken client (docs/tune-quarantine: "
        "0.5, 0.65, 0.8).",
    )
    posterior_weights: bool = Field(
        True,
        description="Weight each teacher per sequence by its likelihood of the prompt and the "
        "prefix (the exact conditional of a mixture of teacher LMs); else fixed weights.",
    )
    trim: float = Field(0.2, ge=0, lt=0.5, description="Share trimmed at each end (trimmed_mean).")
    cap: float = Field(
        0.5, gt=0, le=1, description="Largest mean mixture weight of one teacher (capped_mixture)."
    )


class EngineConfig(_Strict):
    """How training steps run: plain torch (default) or DeepSpeed (docs/performance.md)."""

    kind: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="torch: AdamW in plain PyTorch (the default); deepspeed: deepspeed.initialize "
        "with the ZeRO stage below (imported only when chosen).",
    )
    zero_stage: int = Field(
        0, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3 (kind: deepspeed only)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where every step runs (models, batches, sampling, scoring, losses, "
        "evaluation): auto = the GPU when one is visible, else the CPU; cuda without a GPU is "
        "an error.",
    )
    bf16: bool | None = Field(
        None,
        description="bf16 mixed precision: autocast with fp32 weights (torch) or bf16 weights "
        "with fp32 master weights (deepspeed). Empty: on on a GPU, off (fp32) on the CPU.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass of local_sft / distill / "
        "pre-training (less memory, about a third more compute).",
    )
    offload: Literal["none", "cpu"] = Field(
        "none",
        description="DeepSpeed ZeRO offload to CPU memory: the optimizer state (zero_stage "
        ">= 1) and, at zero_stage 3, the parameters, for a student that does not fit one GPU.",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step (both kinds)."
    )
    gpus_per_step: int = Field(
        1,
        ge=1,
        le=64,
        description="Data-parallel processes (GPUs) per local_sft / distill step. More than 1 "
        "runs the step under the DeepSpeed launcher, one rank per GPU (gloo processes on CPU); "
        "kind: deepspeed with zero_stage 0-2.",
    )

    @model_validator(mode="after")
    def _several_gpus_need_deepspeed(self) -> EngineConfig:
        if self.gpus_per_step > 1 and self.kind != "deepspeed":
            raise ValueError("gpus_per_step: more than 1 needs kind: deepspeed")
        if self.offload != "none" and (self.kind != "deepspeed" or self.zero_stage == 0):
            raise ValueError(
                "offload: cpu needs kind: deepspeed and zero_stage 1-3 (3 also offloads the "
                "parameters); set offload: none or change the engine"
            )
        if self.gpus_per_step > 1 and self.zero_stage == 3:
            raise ValueError(
                "gpus_per_step: more than 1 is supported with zero_stage 0-2 (every rank holds "
                "the whole model, rank 0 saves it); with zero_stage 3 use gpus_per_step: 1"
            )
        return self


class StoreConfig(_Strict):
    uri: str = Field(
        "runs/store",
        description="Artifact store: a local directory (relative paths: from the working "
        "directory) or s3://bucket/prefix. S3 credentials come from the environment "
        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never from this file.",
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO), e.g. http://minio.flminillm:9000."
    )
    region: str = Field("us-east-1", description="S3 region name.")
    multipart_threshold_mb: int = Field(
        64, ge=5, description="Objects larger than this are uploaded in parts."
    )


class TrackingConfig(_Strict):
    uri: str = Field(
        "sqlite:///runs/mlflow.db",
        description="MLflow tracking URI (sqlite file by default; http://host:port for a server).",
    )
    experiment: str = Field("fl-minillm", min_length=1)
    enabled: bool = True


class RunnerConfig(_Strict):
    cache: bool = Field(True, description="Reuse outputs of steps whose inputs did not change.")
    local_parallelism: int = Field(
        2,
        ge=1,
        le=64,
        description="Local runner only: clients' steps run this many at a time, each with "
        "cpu_count / local_parallelism torch threads (a cluster runs them all at once).",
    )
    pipeline_root: str = Field("runs/kfp", description="Where the local KFP runner writes outputs.")
    warm_steps: bool = Field(
        True,
        description="Local runner only: each task's step runs in a fork of one warm process "
        "that imported torch and transformers once (flminillm/stepserver.py), instead of "
        "importing them again in every task process. Results are the same; false to turn it off.",
    )


class StepResources(_Strict):
    """Kubernetes resources of one step's pod (cluster runs only)."""

    cpu_request: str = Field("1", description="CPU request, e.g. '500m' or '2'.")
    cpu_limit: str = Field("2", description="CPU limit.")
    memory_request: str = Field("2G", description="Memory request, e.g. '4G'.")
    memory_limit: str = Field("4G", description="Memory limit.")
    gpus: int = Field(0, ge=0, le=16, description="GPUs for this step (accelerator_limit).")
    accelerator: str | None = Field(
        None, description="Accelerator type, e.g. 'nvidia.com/gpu' (needed when gpus > 0)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pod must match (kfp-kubernetes)."
    )
    tolerations: list[dict[str, str]] = Field(
        default_factory=list,
        description="Tolerations, each {key, operator, value, effect} (kfp-kubernetes).",
    )

    @model_validator(mode="after")
    def _gpu_needs_type(self) -> StepResources:
        if self.gpus and not self.accelerator:
            raise ValueError("accelerator: set it (e.g. 'nvidia.com/gpu') when gpus > 0")
        return self


class ClusterConfig(_Strict):
    """How the pipeline runs on Kubernetes with Kubeflow Pipelines (compile / submit)."""

    image: str = Field(
        "ghcr.io/fl-minillm/flminillm:0.1.0",
        description="Container image of every step (images/Dockerfile); holds flminillm and kfp.",
    )
    gpu_image: str = Field(
        "ghcr.io/fl-minillm/flminillm-cuda:0.1.0",
        description="Image of steps that ask for GPUs (images/Dockerfile.cuda).",
    )
    pipeline_root: str = Field(
        "s3://flminillm/pipelines", description="KFP pipeline root for task outputs."
    )
    caching: bool = Field(True, description="KFP caching of steps (reruns skip what succeeded).")
    retries: int = Field(2, ge=0, le=20, description="Retries of a failed step.")
    backoff_seconds: int = Field(30, ge=0, description="First retry delay; doubles each retry.")
    default_resources: StepResources = Field(default_factory=StepResources)
    resources: dict[str, StepResources] = Field(
        default_factory=dict,
        description="Per-step overrides, keyed by step name (the recipes of flminillm.steps: "
        "`flminillm steps` lists them).",
    )
    s3_secret: str = Field(
        "flminillm-s3",
        description="Kubernetes secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )
    mlflow_secret: str = Field(
        "flminillm-mlflow",
        description="Kubernetes secret with MLFLOW_TRACKING_URI (and credentials if any).",
    )
    experiment: str = Field("fl-minillm", description="KFP experiment name used by submit.")
    namespace: str | None = Field(
        None,
        description="Kubernetes namespace of the runs in multi-user Kubeflow (your profile's); "
        "leave empty for a standalone Kubeflow Pipelines install.",
    )
    service_account: str = Field(
        "",
        description="Service account of the pipeline's pods (manifests/ creates "
        "'flminillm-pipeline'); empty: KFP's default runner account.",
    )


# Options added after federations had been run, with the default that behaves as before:
# left out of the experiment (its JSON and digest) while at that default, so that a new
# option keeps the ids of existing federations and the pipeline cache of their steps.
LATE_OPTIONS: dict[str, dict[str, Any]] = {
    "distill": {
        "lr_schedule": "constant",
        "server_average": 1,
        "plausibility_margin": 0.0,
        "joint_quantile": 1.0,
        "max_claim_sum": 0.0,
        "max_prompt_claim_sum": 0.0,
        "tie_rank": "mean",
        "repeat_share": 0.0,
        "contest_quantile": 1.0,
        "contest_bar": 0.0,
        "contest_bar_peers": "two",
        "contest_leave_out": True,
        "contest_bar_rounds": 1,
        "contest_bar_over": "wins",
        "contest_min_judged": 0,
        "barred_as_absent": False,
        "barred_wins": "leave",
        "contest_p": 0.05,
        "dependence_bar": 0.0,
        "dependence_min": 0.5,
    }
}
# Options that change nothing while another is at a value: left out of the experiment then,
# whatever their defaults (the peer contest's own options while the contest is off), so that
# a federation run with the contest off keeps its id when they change.
INERT_OPTIONS: dict[str, dict[tuple[str, Any], tuple[str, ...]]] = {
    "distill": {
        ("contest_quantile", 1.0): (
            "contest_p",
            "contest_bar",
            "contest_bar_peers",
            "contest_leave_out",
            "contest_bar_rounds",
            "contest_bar_over",
            "contest_min_judged",
        ),
        ("contest_bar", 0.0): (
            "contest_bar_peers",
            "contest_bar_rounds",
            "contest_bar_over",
            "contest_min_judged",
        ),
        ("dependence_bar", 0.0): ("dependence_min",),
    }
}


class ExperimentConfig(_Strict):
    """What determines a federation's results: parties, data, training, generation, the
    distill step, seeds and rounds. Hashed: its digest names the federation, its JSON is
    what every step receives (and so what a pipeline cache keys on)."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = Field(0, description="Master seed; every step derives its own from it.")
    rounds: int = Field(2, ge=1, le=10000)
    server: PartyConfig
    clients: list[PartyConfig] = Field(min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pretrain: TrainConfig = Field(default_factory=TrainConfig)
    local_sft: LocalSFTConfig = Field(default_factory=LocalSFTConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="Training engine of pre-training, local SFT and distill steps.",
    )

    def _check_files(self) -> None:
        missing = [f"clients[{i}].data.train" for i, c in enumerate(self.clients) if c.data is None]
        missing += [f"data.{k}" for k in ("public", "eval") if getattr(self.data, k) is None]
        built = [p.id for p in self.parties if p.model.name_or_path is None]
        if built and self.pretrain.steps > 0 and self.data.pretrain is None:
            missing.append(f"data.pretrain (the models of {built} are built from config)")
        if missing:
            raise ValueError(
                "data.source is files, so these files are needed: "
                + ", ".join(missing)
                + "; give each as {uri: path-or-s3-uri, fields: auto}"
            )
        if any(c.families for c in self.clients):
            raise ValueError(
                "clients[*].families: with data.source: files a client's families are the "
                "categories of its training file; remove families"
            )

    @model_validator(mode="after")
    def _check_parties(self) -> ExperimentConfig:
        ids = [self.server.id] + [c.id for c in self.clients]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(
                f"clients[*].id / server.id: party ids must be unique; repeated: {dup}"
            )
        if self.server.families:
            raise ValueError("server.families: must be empty, the server holds no private data")
        if self.server.data is not None:
            raise ValueError("server.data: must be empty, the server holds no private data")
        if self.data.source == "files":
            self._check_files()
            return self
        with_files = [c.id for c in self.clients if c.data is not None]
        if with_files:
            raise ValueError(
                f"clients[*].data (given for {with_files}): data files are read only with "
                "data.source: files; set it, or remove the clients' data"
            )
        if self.sampling.min_clients > len(self.clients):
            raise ValueError(
                f"sampling.min_clients: {self.sampling.min_clients} exceeds the number of "
                f"clients ({len(self.clients)}); lower it or add clients"
            )
        explicit = [c for c in self.clients if c.families]
        if explicit and len(explicit) != len(self.clients):
            raise ValueError(
                "clients[*].families: give families either for every client or for none"
            )
        if explicit:
            held = [f for c in self.clients for f in c.families or []]
            extra = sorted(set(held) - set(self.data.families))
            if extra:
                raise ValueError(f"clients[*].families: families not in data.families: {extra}")
            twice = sorted({f for f in held if held.count(f) > 1})
            if twice:
                raise ValueError(
                    f"clients[*].families: must be disjoint (non-IID); shared: {twice}"
                )
        elif len(self.data.families) < len(self.clients):
            raise ValueError(
                f"data.families: {len(self.clients)} clients need at least as many families "
                f"({len(self.data.families)} given)"
            )
        return self

    # -- derived views ---------------------------------------------------------------
    @property
    def parties(self) -> list[PartyConfig]:
        return [self.server, *self.clients]

    def party(self, party_id: str) -> PartyConfig:
        for p in self.parties:
            if p.id == party_id:
                return p
        raise KeyError(f"no party {party_id!r}; parties: {[p.id for p in self.parties]}")

    def families_by_client(self) -> dict[str, list[str]]:
        """Each client's task families: from config (benchmark). With data from files they
        are the categories of its training file, known once `prepare` has read it: {}."""
        if self.data.source == "files":
            return {}
        if self.clients[0].families:
            return {c.id: list(c.families or []) for c in self.clients}
        from flminillm.data import partition_families

        return partition_families(
            list(self.data.families), [c.id for c in self.clients], seed=self.seed
        )

    @property
    def experiment(self) -> ExperimentConfig:
        """The experiment alone (a Config also carries its deployment)."""
        return ExperimentConfig.model_validate(restore_late_options(self.experiment_dict()))

    def experiment_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", include=set(ExperimentConfig.model_fields))
        for section, fields in LATE_OPTIONS.items():
            for name, default in fields.items():
                if data[section].get(name) == default:
                    del data[section][name]
        for section, rules in INERT_OPTIONS.items():
            for (name, value), inert in rules.items():
                if getattr(getattr(self, section), name) == value:
                    for other in inert:
                        data[section].pop(other, None)
        return data

    def experiment_json(self) -> str:
        """The canonical JSON of the experiment: what steps receive and what is hashed."""
        return canonical_json(self.experiment_dict())

    def digest(self) -> str:
        """sha256 of the experiment: the same wherever and however it is run."""
        return hashlib.sha256(self.experiment_json().encode()).hexdigest()

    def federation_id(self) -> str:
        return f"{self.name}-{self.digest()[:12]}"


class DeploymentConfig(_Strict):
    """Where and how a federation runs: store, tracking, runner, cluster, output directory.
    Not hashed: moving a run, changing its tracking server or its pods' resources leaves
    its federation id and its cached steps as they are."""

    output_dir: str = Field("runs/demo", description="Where results.json and plots go.")
    store: StoreConfig = Field(default_factory=StoreConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def deployment(self) -> DeploymentConfig:
        """The deployment alone (a Config also carries its experiment)."""
        return DeploymentConfig.model_validate(self.deployment_dict())

    def deployment_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", include=set(DeploymentConfig.model_fields))

    def deployment_json(self) -> str:
        return canonical_json(self.deployment_dict())

    def resolved(self, base_dir: Path) -> Self:
        """Make relative paths absolute against `base_dir`, so every step sees the same paths."""

        def fix(p: str) -> str:
            if "://" in p or Path(p).is_absolute():
                return p
            return str((base_dir / p).resolve())

        uri = self.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + fix(uri[len("sqlite:///") :])
        return self.model_copy(
            update={
                "output_dir": fix(self.output_dir),
                "store": self.store.model_copy(update={"uri": fix(self.store.uri)}),
                "tracking": self.tracking.model_copy(update={"uri": uri}),
                "runner": self.runner.model_copy(
                    update={"pipeline_root": fix(self.runner.pipeline_root)}
                ),
            }
        )


class Config(ExperimentConfig, DeploymentConfig):
    """What a config file holds: the experiment and its deployment, side by side (one flat
    mapping; `experiment` and `deployment` give each part alone)."""

    @classmethod
    def join(cls, experiment: ExperimentConfig, deployment: DeploymentConfig) -> Config:
        return cls.model_validate({**experiment.experiment_dict(), **deployment.deployment_dict()})

    def to_json(self) -> str:
        """The whole config (experiment and deployment) as JSON."""
        return canonical_json(self.model_dump(mode="json"))


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling (see `flminillm config-schema`)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        if not loc:  # a cross-field check: its message starts with the fields it concerns
            lines.append(f"  - {msg}")
        elif e["type"] in ("missing", "extra_forbidden"):
            lines.append(f"  - {loc}: {msg}")
        else:
            lines.append(f"  - {loc}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path) -> Config:
    """Read a YAML experiment; relative paths are resolved against the working directory.

    `extends: <path>` (relative to this file) starts from another config: mappings are
    merged key by key, anything else (lists, values) is replaced by this file's."""
    return parse_config(_read_yaml(Path(path), ()), str(path)).resolved(Path.cwd())


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict:
    if not path.is_file():
        via = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{via}")
    if path.resolve() in chain:
        raise ConfigError(f"config {path}: `extends` loops back to itself")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"config {path}: extends must be the path of a config file")
    return deep_merge(_read_yaml(path.parent / parent, (*chain, path.resolve())), data)


def deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over` on top: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(base.get(k), dict)
        out[k] = deep_merge(base[k], v) if both else v
    return out


def config_from_json(text: str) -> Config:
    """A whole Config from `Config.to_json()`."""
    return parse_config(json.loads(text), "<json>")


def restore_late_options(data: dict[str, Any]) -> dict[str, Any]:
    """`experiment_dict`'s inverse: an option it left out (LATE_OPTIONS at the value that
    behaves as before, INERT_OPTIONS while inert) comes back at that value, not at a default
    changed since. Without this a config that pins an old value (the as-measured configs,
    the `-undefended` variants) would run its steps, which parse the experiment JSON, with
    the new default."""
    out = json.loads(json.dumps(data))
    for section, fields in LATE_OPTIONS.items():
        part = out.setdefault(section, {})
        for name, old in fields.items():
            part.setdefault(name, old)
    return out


def experiment_from_json(text: str) -> ExperimentConfig:
    """An experiment from `experiment_json()` (what a step receives)."""
    try:
        return ExperimentConfig.model_validate(restore_late_options(json.loads(text)))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "<experiment json>")) from None


def deployment_from_json(text: str) -> DeploymentConfig:
    try:
        return DeploymentConfig.model_validate_json(text)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "<deployment json>")) from None
