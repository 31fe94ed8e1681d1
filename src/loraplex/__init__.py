"""loraplex: train LoRA assistants from domain Q&A data and serve many of them on one base model."""

from loraplex.cpu_isa import hold_torch

__version__ = "0.1.0"

hold_torch()  # LORAPLEX_CPU_ISA: PyTorch reads its instruction-set limits once, when it loads
