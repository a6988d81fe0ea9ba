"""Which rank of a multi-process (multi-GPU) step this process is."""

from __future__ import annotations

import os

LAUNCHED_ENV = "FLMINILLM_LAUNCHED"  # set by flminillm.launch in every rank it starts


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a launcher."""
    if not os.environ.get(LAUNCHED_ENV):
        return 0, 1
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
