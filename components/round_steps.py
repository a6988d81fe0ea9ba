"""One KFP component per recipe of `flminillm.steps`, derived from the step registry.

A component is a lightweight function whose body is two lines: import the invocation layer
and run the recipe (`flminillm.invoke.run_component`). KFP ships the function's source to
the task, so each one is written out here from the recipe's signature: the recipe's `cfg`
becomes the `experiment_json` input (the deployment reaches the task through its
environment) and its other parameters keep their names and types. On a cluster the task
runs in our image, which already holds flminillm and kfp; nothing is installed at run time.
"""

from __future__ import annotations

import inspect
import linecache
import typing
from dataclasses import dataclass
from typing import Any, List

from kfp import dsl

from flminillm.steps import STEPS, Step

DEFAULT_IMAGE = "ghcr.io/fl-minillm/flminillm:0.1.0"

_TYPES = {str: "str", int: "int", float: "float", list[str]: "List[str]"}
_OUTPUTS = {"json": "str", "list": "List[str]", "text": "str"}


def component_source(step: Step) -> str:
    """The source of `step`'s component function."""
    hints = typing.get_type_hints(step.fn)
    names = ["experiment_json", *list(inspect.signature(step.fn).parameters)[1:]]  # [0]: cfg
    params = ["experiment_json: str"]
    for name in names[1:]:
        if hints[name] not in _TYPES:
            raise TypeError(f"steps.{step.name}: parameter {name} has no KFP type")
        params.append(f"{name}: {_TYPES[hints[name]]}")
    kwargs = ", ".join(f"{n}={n}" for n in names)
    return (
        f"def {step.name}({', '.join(params)}) -> {_OUTPUTS[step.output]}:\n"
        f"    from flminillm.invoke import run_component\n\n"
        f"    return run_component({step.name!r}, dict({kwargs}))\n"
    )


def component_function(step: Step):
    """`step`'s component as a Python function whose source `inspect` can read (KFP
    reads it to build the task's command)."""
    source = component_source(step)
    filename = f"<flminillm component {step.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"List": List}
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return namespace[step.name]


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
        name: dsl.component(component_function(step), base_image=image, install_kfp_package=False)
        for name, step in STEPS.items()
    }
    return RoundComponents(image=image, ops=ops)
