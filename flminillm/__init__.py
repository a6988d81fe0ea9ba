"""FL-MiniLLM: federated knowledge distillation of generative language models."""

__version__ = "0.1.0"
