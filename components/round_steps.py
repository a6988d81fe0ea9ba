"""One component per round step (see ../shared/DESIGN.md: the round as a DAG)."""

from dataclasses import dataclass
from typing import Any

from kfp import dsl

DEFAULT_IMAGE = "ghcr.io/fl-minillm/flminillm:0.1.0"


def prepare(config_json: str) -> str:
    import json

    from flminillm import steps

    return json.dumps(steps.prepare(config_json))


def list_parties(config_json: str) -> list[str]:
    from flminillm.config import config_from_json

    return [p.id for p in config_from_json(config_json).parties]


def init_model(config_json: str, state_json: str, party_id: str) -> str:
    import json

    from flminillm import steps

    return json.dumps(steps.init_model(config_json, state_json, party_id))


def sample_clients(config_json: str, round_index: int) -> list[str]:
    from flminillm import steps

    return steps.sample_clients(config_json, round_index)


def local_sft(config_json: str, state_json: str, round_index: int, client_id: str) -> str:
    import json

    from flminillm import steps

    return json.dumps(steps.local_sft(config_json, state_json, round_index, client_id))


def generate(
    config_json: str, state_json: str, round_index: int, party_id: str, models_json: str
) -> str:
    import json

    from flminillm import steps

    return json.dumps(steps.generate(config_json, state_json, round_index, party_id, models_json))


def teach(
    config_json: str,
    state_json: str,
    round_index: int,
    teacher_id: str,
    models_json: str,
    rollouts_json: str,
) -> str:
    import json

    from flminillm import steps

    return json.dumps(
        steps.teach(config_json, state_json, round_index, teacher_id, models_json, rollouts_json)
    )


def distill(
    config_json: str,
    state_json: str,
    round_index: int,
    student_id: str,
    models_json: str,
    rollouts_json: str,
    teachings: list[str],
) -> str:
    import json

    from flminillm import steps

    return json.dumps(
        steps.distill(
            config_json, state_json, round_index, student_id, models_json, rollouts_json, teachings
        )
    )


def distill_one(
    config_json: str,
    state_json: str,
    round_index: int,
    student_id: str,
    models_json: str,
    rollouts_json: str,
    teaching: str,
) -> str:
    import json

    from flminillm import steps

    return json.dumps(
        steps.distill(
            config_json, state_json, round_index, student_id, models_json, rollouts_json, [teaching]
        )
    )


def evaluate(
    config_json: str, state_json: str, round_index: int, update: str, updates: list[str]
) -> str:
    import json

    from flminillm import steps

    return json.dumps(steps.evaluate(config_json, state_json, round_index, update, updates))


def track(
    config_json: str, state_json: str, run_label: str, run_started: float, run_tags: str
) -> str:
    from flminillm import steps

    return steps.track(config_json, state_json, run_label, run_started, run_tags)


STEP_FUNCTIONS = {
    f.__name__: f
    for f in (
        prepare,
        list_parties,
        init_model,
        sample_clients,
        local_sft,
        generate,
        teach,
        distill,
        distill_one,
        evaluate,
        track,
    )
}


@dataclass(frozen=True)
class RoundComponents:
    """The components of a federation, all built for one container image."""

    image: str
    ops: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.ops[name]
        except KeyError:
            raise AttributeError(name) from None


def build_components(image: str = DEFAULT_IMAGE) -> RoundComponents:
    """Lightweight components running in `image` (which holds flminillm; nothing is
    installed at run time)."""
    ops = {
        name: dsl.component(fn, base_image=image, install_kfp_package=False)
        for name, fn in STEP_FUNCTIONS.items()
    }
    return RoundComponents(image=image, ops=ops)
