"""Where a step's tensors live: the device from `engine.device`, and the precision there.

Every step puts its model on `device_for(cfg.engine)` and moves its inputs there when they
come out of the store (`to_device`); everything a step creates itself is made on the device
of the tensors it already has, never on a hard-coded one (tests/test_devices.py runs the
sampler, teacher scoring and a distill update with torch's default device set to `meta`,
so that any tensor created without a device fails). On a GPU the forward passes run under
bf16 autocast (`autocast`; fp32 weights, so the optimizer keeps fp32 master weights), or in
bf16 weights under DeepSpeed's bf16. On the CPU nothing changes: fp32, no autocast.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays cheap
    import torch  # (every KFP task imports the step registry, which imports this module)

    from flminillm.config import EngineConfig

T = TypeVar("T")


def device_for(engine: EngineConfig | None) -> torch.device:
    """`engine.device`: cpu, cuda (this process's local rank's GPU), or auto (cuda when a
    GPU is visible); no engine: the CPU. Asking for cuda on a machine without one is an
    error, not a fallback."""
    import torch

    want = "cpu" if engine is None else engine.device
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "engine.device: cuda was asked for but torch sees no GPU on this machine; "
            "use engine.device: auto (or cpu) here, or run the step on a GPU node"
        )
    import os

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def uses_bf16(engine: EngineConfig | None, device: torch.device) -> bool:
    """bf16 on a GPU unless `engine.bf16` is false; never on the CPU unless it is true."""
    flag = None if engine is None else engine.bf16
    return device.type == "cuda" if flag is None else bool(flag)


def autocast(
    engine: EngineConfig | None, device: torch.device
) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward passes on a GPU; nothing on the CPU (bit-identical)."""
    import torch

    if device.type == "cuda" and uses_bf16(engine, device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: T, device: torch.device) -> T:
    """Tensors (alone, or in a dict, tuple or dataclass such as a Rollout) moved to
    `device`; other values unchanged."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)  # type: ignore[return-value]
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}  # type: ignore[return-value]
    if isinstance(x, tuple):
        return tuple(to_device(v, device) for v in x)  # type: ignore[return-value]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        moved = {f.name: to_device(getattr(x, f.name), device) for f in dataclasses.fields(x)}
        return dataclasses.replace(x, **moved)  # type: ignore[return-value]
    return x


def to_host(x: T) -> T:
    """The inverse of `to_device` before anything is written to the store."""
    import torch

    return to_device(x, torch.device("cpu"))


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on `device` (sampling draws on the device of its logits)."""
    import torch

    return torch.Generator(device=device).manual_seed(seed)
