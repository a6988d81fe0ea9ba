"""KFP pipelines: wiring only (tasks, ParallelFor, Collected); no computation."""

from pipelines.federation import build_federation_pipeline, build_round_pipeline

__all__ = ["build_federation_pipeline", "build_round_pipeline"]
