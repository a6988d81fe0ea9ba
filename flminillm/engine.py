"""The training engine: one small interface over plain torch and DeepSpeed.

`train_lm` (pre-training, local SFT) and `run_distill` (the MiniLLM step) drive the model
only through it::

    engine = make_engine(model, lr, weight_decay, max_grad_norm, cfg.engine)
    loss = loss_fn(engine.model, batch)
    engine.backward(loss)
    engine.step()        # at an accumulation boundary: clip, optimizer step, zero grads
    engine.save(directory)

`TorchEngine` is the default and is exactly the historical code path (AdamW with
betas (0.9, 0.95), global-norm clipping). `DeepSpeedEngine` wraps `deepspeed.initialize`
with a config built from `EngineConfig` (ZeRO stage 0-3, bf16 on GPU, gradient
accumulation, clipping); deepspeed is imported only when it is used (the import costs
seconds). On CPU it runs as a single gloo process, with the torch AdamW as its optimizer
(DeepSpeed's fused Adam needs compiled CUDA ops).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flminillm.config import EngineConfig


def make_optimizer(model, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters (all of them, or a LoRA model's adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


class Engine:
    """What the training loops use: `model`, `backward(loss)`, `step()`, `save(dir)`, and
    `autocast()` around forward passes (bf16 on a GPU, nothing on the CPU)."""

    model: torch.nn.Module
    gradient_accumulation_steps: int = 1
    device: torch.device = torch.device("cpu")
    bf16_autocast: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16_autocast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def step(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def hf_model(self):
        """The underlying Hugging Face model (unwrapped)."""
        return self.model

    def save(self, directory: str | Path) -> Path:
        """Safetensors + config.json through the Hugging Face model (never pickle)."""
        from flminillm.models import save_model

        return save_model(self.hf_model, directory)


class TorchEngine(Engine):
    """Plain torch: AdamW, global-norm clipping, optional gradient accumulation."""

    def __init__(
        self,
        model,
        lr: float,
        weight_decay: float,
        max_grad_norm: float,
        gradient_accumulation_steps: int = 1,
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.optimizer = make_optimizer(model, lr, weight_decay)
        self.scheduler = (
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda) if lr_lambda else None
        )
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        if self.gradient_accumulation_steps > 1:
            loss = loss / self.gradient_accumulation_steps
        loss.backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.gradient_accumulation_steps:
            return
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_single_process_env() -> None:
    """A launcher (deepspeed, torchrun) sets these; a plain `python` process gets rank 0 of 1."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)


def deepspeed_config(
    cfg: EngineConfig, max_grad_norm: float, micro_batch_size: int = 1, on_gpu: bool = False
) -> dict:
    """The DeepSpeed config dict that `EngineConfig` stands for."""
    bf16 = on_gpu if cfg.bf16 is None else cfg.bf16
    world = int(os.environ.get("WORLD_SIZE", "1"))
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload == "cpu":  # optimizer state (ZeRO 1-3) and, at stage 3, parameters
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * cfg.gradient_accumulation_steps * world,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        # the torch AdamW also steps offloaded state (DeepSpeedCPUAdam needs compiled ops)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    """`deepspeed.initialize` around the model, with the torch AdamW as optimizer."""

    def __init__(
        self,
        model,
        lr: float,
        weight_decay: float,
        max_grad_norm: float,
        cfg: EngineConfig,
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        import logging

        _ensure_single_process_env()
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.device = next(model.parameters()).device  # placed by the step (flminillm.devices)
        on_gpu = self.device.type == "cuda"
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
        self.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        optimizer = make_optimizer(model, lr, weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda else None
        self.config = deepspeed_config(cfg, max_grad_norm, on_gpu=on_gpu)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.config,
            dist_init_required=False,
        )
        self.model = self.engine
        self.zero_stage = cfg.zero_stage

    @property
    def hf_model(self):
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        # clips, steps the optimizer and the scheduler and zeroes grads at the
        # accumulation boundary; a no-op in between
        self.engine.step()

    def save(self, directory: str | Path) -> Path:
        if self.zero_stage == 3:  # parameters are partitioned: gather them first
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.hf_model.parameters())):
                return super().save(directory)
        return super().save(directory)


def make_engine(
    model,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    cfg: EngineConfig | None = None,
    lr_lambda: Callable[[int], float] | None = None,
) -> Engine:
    """The engine `cfg.kind` names (plain torch when `cfg` is None), on the device the model
    is on. With `cfg.gradient_checkpointing` the model recomputes activations in backward."""
    from flminillm.devices import uses_bf16

    if cfg is not None and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg is None or cfg.kind == "torch":
        ga = 1 if cfg is None else cfg.gradient_accumulation_steps
        eng: Engine = TorchEngine(model, lr, weight_decay, max_grad_norm, ga, lr_lambda)
        eng.device = next(model.parameters()).device
        eng.bf16_autocast = uses_bf16(cfg, eng.device)  # fp32 weights: fp32 master weights
        return eng
    return DeepSpeedEngine(model, lr, weight_decay, max_grad_norm, cfg, lr_lambda)
