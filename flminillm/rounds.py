"""The federation's wiring, written once, as data: which step runs for whom, on what.

Both runners are built from these descriptions: `pipelines.federation` turns them into
Kubeflow Pipelines (tasks, ParallelFor, Collected) and `flminillm.inprocess` calls the same
steps in one process, in the same order, with the same inputs (the benchmarks use it).

    sample_clients -> ParallelFor client: local_sft -> client teach  (server rollouts)
      server generate -----------------------------^        |
                          server distill (Collected) <-------+
      ParallelFor client: client generate -> server teach -> client distill
                          evaluate (Collected) -> round manifest

Every task also receives the experiment (its first input); arguments name the round's
parameters (`STATE`, `ROUND`), an earlier task's output (`Out`), the outputs of a task of a
loop, gathered in a list (`Gather`), the loop's current item (`ITEM`) or the server's id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Param:
    """A parameter of the round pipeline (besides the experiment)."""

    name: str


@dataclass(frozen=True)
class Out:
    """The output of an earlier task (in a loop: of the same iteration)."""

    task: str


@dataclass(frozen=True)
class Gather:
    """The outputs of a task in a loop, one per iteration, in the loop's order."""

    task: str


@dataclass(frozen=True)
class _Marker:
    name: str


ITEM = _Marker("the loop's item")
SERVER = _Marker("the server's party id")
STATE = Param("state_json")  # the round manifest the round starts from
ROUND = Param("round_index")


@dataclass(frozen=True)
class Task:
    """One step (a recipe of flminillm.steps) with its arguments; `name` is its display name."""

    name: str
    step: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Loop:
    """The same tasks for every item of a task's list output (a KFP ParallelFor)."""

    name: str
    over: str
    body: tuple[Task, ...]


Wiring = tuple[Task | Loop, ...]

# prepare -> init every party's model -> evaluate (round 0): the set-up of a federation
SETUP: Wiring = (
    Task("prepare", "prepare"),
    # a runtime list: kfp.local resolves upstream outputs wrongly inside a ParallelFor over a
    # literal list (seen with kfp 2.17.3)
    Task("list_parties", "list_parties"),
    Loop("parties", over="list_parties", body=(
        Task("init_model", "init_model", {"state_json": Out("prepare"), "party_id": ITEM}),
    )),
    Task("evaluate-round-0", "evaluate", {
        "state_json": Out("prepare"), "round_index": 0, "update": "",
        "updates": Gather("init_model"),
    }),
)  # fmt: skip
SETUP_RESULT = "evaluate-round-0"

_R = {"state_json": STATE, "round_index": ROUND}
ROUND_TASKS: Wiring = (
    Task("sample_clients", "sample_clients", {"round_index": ROUND}),
    Task("server_generate", "generate", {**_R, "party_id": SERVER, "models_json": ""}),
    # 1. clients teach the server
    Loop("clients-teach", over="sample_clients", body=(
        Task("local_sft", "local_sft", {**_R, "client_id": ITEM}),
        Task("client_teach", "teach", {
            **_R, "teacher_id": ITEM, "models_json": Out("local_sft"),
            "rollouts_json": Out("server_generate"),
        }),
    )),
    Task("server_distill", "distill", {
        **_R, "student_id": SERVER, "models_json": "", "rollouts_json": Out("server_generate"),
        "teachings": Gather("client_teach"),
    }),
    # 2. the server teaches the clients
    Loop("server-teaches", over="sample_clients", body=(
        Task("client_generate", "generate", {
            **_R, "party_id": ITEM, "models_json": Out("server_distill"),
        }),
        Task("server_teach", "teach", {
            **_R, "teacher_id": SERVER, "models_json": Out("server_distill"),
            "rollouts_json": Out("client_generate"),
        }),
        Task("client_distill", "distill_one", {
            **_R, "student_id": ITEM, "models_json": Out("server_distill"),
            "rollouts_json": Out("client_generate"), "teaching": Out("server_teach"),
        }),
    )),
    Task("evaluate", "evaluate", {
        **_R, "update": Out("server_distill"), "updates": Gather("client_distill"),
    }),
)  # fmt: skip
ROUND_RESULT = "evaluate"


def tasks(wiring: Wiring) -> list[Task]:
    """Every task of `wiring`, loops flattened, in order."""
    return [t for item in wiring for t in (item.body if isinstance(item, Loop) else (item,))]


def tasks_per_round(n_clients: int) -> int:
    """Leaf tasks of one round with `n_clients` sampled clients."""
    return sum(len(item.body) * n_clients if isinstance(item, Loop) else 1 for item in ROUND_TASKS)


def setup_tasks(n_parties: int) -> int:
    return sum(len(item.body) * n_parties if isinstance(item, Loop) else 1 for item in SETUP)
