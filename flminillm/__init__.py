"""FL-MiniLLM: federated knowledge distillation of generative language models."""

import os

# quiet third-party progress bars and advice in step logs; our own progress is shown instead
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
