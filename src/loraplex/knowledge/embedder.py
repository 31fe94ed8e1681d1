"""Dense vectors for a knowledge base, from an embedding model already on this machine.

An embedder is a local Hugging Face encoder directory (sentence-transformers layout or plain: e.g.
bge-small-zh-v1.5 or multilingual-e5-small, fetched by the user; nothing is downloaded here). Its
weights load from safetensors only. Pooling follows the directory's sentence-transformers config
(`1_Pooling/config.json`: CLS, mean or last token), mean pooling without one; vectors are
L2-normalised, so a dot product is the cosine similarity.

Why not the sentence-transformers package: reading one pooling flag and averaging is ten lines,
and the package would add scikit-learn and SciPy to every install for them.

This module does not store or rank vectors (store.py does).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from loraplex.errors import UserError

MAX_TOKENS = 512


class Embedder:
    def __init__(self, path: str | Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path).expanduser().resolve()
        config = self.path / "config.json"
        if not config.is_file():
            raise UserError(f"embedder {path}: not a model directory (no config.json)")
        if not any(self.path.glob("*.safetensors")):
            raise UserError(f"embedder {path}: no .safetensors weights (pickled weights are not loaded)")
        self.pooling = "mean"
        pooling_file = self.path / "1_Pooling" / "config.json"
        if pooling_file.is_file():
            flags = json.loads(pooling_file.read_text())
            if flags.get("pooling_mode_cls_token"):
                self.pooling = "cls"
            elif flags.get("pooling_mode_lasttoken"):
                self.pooling = "last"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model: Any = AutoModel.from_pretrained(self.path, use_safetensors=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"embedder {path}: cannot load it: {e}") from None
        self.model.eval()
        self.tokenizer.padding_side = "right"  # last-token pooling reads the last real position
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.dim = int(self.model.config.hidden_size)
        # what the vectors depend on: a base indexed with one model is searched with the same one
        self.fingerprint = hashlib.sha256(config.read_bytes() + self.pooling.encode()).hexdigest()[:16]

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(
                    texts[i : i + batch], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                elif self.pooling == "last":
                    last = enc["attention_mask"].sum(1) - 1  # right padding: the last real token
                    pooled = hidden[torch.arange(hidden.shape[0]), last]
                else:
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
