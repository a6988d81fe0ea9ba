"""Several processes (GPUs) in one training step, through the DeepSpeed launcher.

When `engine.kind` is deepspeed and `engine.gpus_per_step` > 1, a training step (local_sft,
distill) does not train in its own process: it starts

    python -m deepspeed.launcher.runner --num_gpus N --module flminillm.invoke rank ARGS OUT

which runs the same recipe in N ranks (one per GPU; on a CPU-only machine N gloo processes,
which is how the tests run it). Every rank loads the same inputs from the store and trains
on its own share of each global batch (rank r takes micro-batches r, r+N, ... of the step's
seeded batch stream); DeepSpeed averages the gradients, so N ranks with micro-batch b take
the same optimizer steps as one process with b and N-step gradient accumulation. Rank 0
writes the lineage record and the step's output, which the calling step returns as its own.
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

from flminillm.ranks import LAUNCHED_ENV


def needs_launch(engine) -> bool:
    return (
        engine.kind == "deepspeed" and engine.gpus_per_step > 1 and not os.environ.get(LAUNCHED_ENV)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, payload: dict[str, Any], n: int, timeout: float | None = None) -> Any:
    """Run `python -m <module> rank ARGS OUT` in n ranks under the DeepSpeed launcher, with
    `payload` in the ARGS file; returns what rank 0 wrote to OUT (JSON)."""
    with tempfile.TemporaryDirectory(prefix="flminillm-launch-") as tmp:
        args_file, out_file = Path(tmp) / "args.json", Path(tmp) / "out.json"
        args_file.write_text(json.dumps(payload))
        cmd = [
            sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "--module", module, "rank", str(args_file), str(out_file),
        ]  # fmt: skip
        env = {**os.environ, LAUNCHED_ENV: "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(
                f"{payload.get('step', module)} under the DeepSpeed launcher ({n} ranks) failed "
                f"with exit code {proc.returncode}:\n{tail}"
            )
        return json.loads(out_file.read_text())
