"""loraplex: train LoRA assistants from domain Q&A data and serve many of them on one base model."""

__version__ = "0.1.0"
