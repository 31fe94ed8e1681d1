"""Silence library chatter (per-tensor progress bars, deprecation notices) on the CLI's output.

Through environment variables that transformers and huggingface_hub read when they are imported,
so commands that never load a model (`adapters list`) do not pay ~0.6 s to import transformers.
"""

import os
import warnings


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow this too
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Consider using tensor.detach.*")
