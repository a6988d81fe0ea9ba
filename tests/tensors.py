"""Small tensor helpers shared by the tests."""

import math

import torch


def log_probs(values: list[float]) -> torch.Tensor:
    """[1, 1, S] log-probabilities of the probabilities `values`."""
    return torch.tensor([[[math.log(v) for v in values]]], dtype=torch.float32)
