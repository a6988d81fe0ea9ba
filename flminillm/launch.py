"""Several processes (GPUs) in one training step, through the DeepSpeed launcher.

When `engine.kind` is deepspeed and `engine.gpus_per_step` > 1, the local_sft and distill
steps do not train in their own process: they start

    python -m deepspeed.launcher.runner --num_gpus N --module flminillm.launch STEP ARGS OUT

which runs the same step function in N ranks (one per GPU; on a CPU-only machine N gloo
processes, which is how the tests run it). Every rank loads the same inputs from the store
and trains on its own share of each global batch (rank r takes micro-batches r, r+N, ...
of the step's seeded batch stream); DeepSpeed averages the gradients, so N ranks with
micro-batch b take the same optimizer steps as one process with b and N-step gradient
accumulation. Rank 0 writes the lineage record and the step's output, which the calling
step returns as its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

LAUNCHED_ENV = "FLMINILLM_LAUNCHED"
STEPS = ("local_sft", "distill")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a launcher."""
    if not os.environ.get(LAUNCHED_ENV):
        return 0, 1
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def needs_launch(engine) -> bool:
    return (
        engine.kind == "deepspeed" and engine.gpus_per_step > 1 and not os.environ.get(LAUNCHED_ENV)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(step: str, args: list[Any], n: int, timeout: float | None = None) -> dict:
    """Run steps.<step>(*args) in n ranks under the DeepSpeed launcher; rank 0's output."""
    if step not in STEPS:
        raise ValueError(f"{step!r} cannot run under the launcher; steps that can: {STEPS}")
    with tempfile.TemporaryDirectory(prefix="flminillm-launch-") as tmp:
        args_file, out_file = Path(tmp) / "args.json", Path(tmp) / "out.json"
        args_file.write_text(json.dumps(args))
        cmd = [
            sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "--module", "flminillm.launch", step, str(args_file), str(out_file),
        ]  # fmt: skip
        env = {**os.environ, LAUNCHED_ENV: "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(
                f"{step} under the DeepSpeed launcher ({n} ranks) failed with exit code "
                f"{proc.returncode}:\n{tail}"
            )
        return json.loads(out_file.read_text())


def main(argv: list[str] | None = None) -> int:
    from flminillm import steps
    from flminillm.store import atomic_write_text

    # the launcher adds --local_rank=N (LOCAL_RANK is in the environment too)
    argv = [a for a in (argv or sys.argv[1:]) if not a.startswith("--local_rank")]
    step, args_file, out_file = argv
    if step not in STEPS:
        raise SystemExit(f"unknown step {step!r}; one of {STEPS}")
    args = json.loads(Path(args_file).read_text())
    out = getattr(steps, step)(*args)
    rank, _world = rank_world()
    if rank == 0:
        atomic_write_text(out_file, json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
