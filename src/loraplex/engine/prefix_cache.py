"""Automatic prefix caching: the keys and values of prompts already prefilled, reused by later
prompts that start with the same tokens for the same adapter (vLLM's "automatic prefix caching").

What repeats in practice: the system prompt and the assistant's instructions of every request to
one model, the earlier turns of a chat (each turn resends them), and the passages an adapter
trained with retrieval is shown (assistants/faq.py: every question about one fact gets the same
passage after the same instructions). A hit copies those positions into the request's KV slot
and prefill starts after them.

    store(adapter, ids, k, v): after a prompt's prefill, its keys/values [layers, kv_heads, n, d]
    longest(adapter, ids) -> (entry, n): the longest stored prefix of `ids` (n <= len(ids) - 1:
                             the last prompt token is always computed, its logits start the answer)
    fill(entry, n, k, v):    its first n positions into a request's slot [layers, kv_heads, len, d]

Entries form a tree, as in SGLang's radix cache: a prompt is stored as only the positions that its
longest stored prefix lacks, with that entry as its parent. Why: a knowledge server's prompts are
the same instructions, one of a few hundred passages, then a question asked once. Stored whole,
each cost ~150 positions (3.5 MB in bf16 for SmolLM2) and a 256 MiB cache held 66 of faq_large's
100 passage prompts, so a third of the questions prefilled their passage again; stored as a tree,
the instructions are kept once, each passage once, and each question costs its own ~25 positions.
Only leaves are evicted (least recently used first), so a parent lives as long as any prompt that
extends it.

Lookup hashes every prefix of the prompt incrementally (a chain of 64-bit hashes, ~0.1 us a token)
and checks an index holding every position of every entry, so a prompt that shares any prefix with
a stored one finds it, not only at block boundaries; the matched tokens are then compared, so a
hash collision cannot return the wrong keys. Segments are copies, not blocks of the KV cache as in
vLLM's paged cache: simpler, and at the sizes of this engine's models a copy costs what a block
table would save.

The keys differ from a full prefill's in rounding only (other matmul shapes), as in vLLM. This
module does not run the model or decide what is worth caching (engine.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from loraplex.adapters import names
from loraplex.engine.lora import AdapterRequest

# A prefix shorter than this is not worth a lookup or an entry: the copy and the bookkeeping cost
# about what prefilling a few tokens costs.
MIN_TOKENS = 16


@dataclass(eq=False)
class Entry:
    """A stored prompt: positions [start, len(ids)) here, [0, start) in `parent` and its parents."""

    eid: int
    adapter: AdapterRequest
    ids: tuple[int, ...]  # the whole prompt, parents' positions included
    start: int
    parent: Entry | None
    k: torch.Tensor  # [layers, kv_heads, len(ids) - start, head_dim]
    v: torch.Tensor
    children: int = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _chain(adapter: AdapterRequest, ids: list[int] | tuple[int, ...]) -> list[int]:
    """hash of ids[:i+1] (with the adapter) for every i: one tuple hash per token."""
    h = hash(adapter.parts)
    out = []
    for t in ids:
        h = hash((h, t))
        out.append(h)
    return out


class PrefixCache:
    """Stored prompt prefixes per adapter, bounded by bytes; used by the engine thread only."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self._index: dict[int, tuple[int, int]] = {}  # prefix hash -> (entry id, prefix length)
        self._next = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, adapter: AdapterRequest, ids: list[int]) -> tuple[Entry | None, int]:
        """The entry holding the longest prefix of ids[:-1] stored for `adapter`, and its length."""
        if not self._entries or len(ids) <= MIN_TOKENS:
            return None, 0
        entry, n = self._find(adapter, ids[:-1], _chain(adapter, ids[:-1]))
        if entry is not None:
            self._touch(entry)
        return entry, n

    def fill(self, entry: Entry, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy the first `n` positions that `entry` and its parents hold into k, v [layers, kv_heads, len, d]."""
        e: Entry | None = entry
        while e is not None and n > 0:
            if n > e.start:
                k[:, :, e.start : n] = e.k[:, :, : n - e.start]
                v[:, :, e.start : n] = e.v[:, :, : n - e.start]
                n = e.start
            e = e.parent

    def store(self, adapter: AdapterRequest, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the keys/values of `ids` (k, v: [layers, kv_heads, len(ids), head_dim]): the positions
        past its longest stored prefix, copied."""
        n = len(ids)
        if n < MIN_TOKENS or not self.capacity_bytes:
            return
        chain = _chain(adapter, ids)
        parent, start = self._find(adapter, ids, chain)
        if parent is not None:
            self._touch(parent)
            if start == n:
                return  # stored already (or a longer prompt holds it)
        size = 2 * k[:, :, start:].numel() * k.element_size()
        pinned = _ancestors(parent)
        if sum(e.nbytes for e in pinned) + size > self.capacity_bytes:
            return  # it cannot fit beside the parents it reads: evict nothing for it
        while self.bytes + size > self.capacity_bytes and self._evict(pinned):
            pass
        if self.bytes + size > self.capacity_bytes:
            return
        eid, self._next = self._next, self._next + 1
        entry = Entry(eid, adapter, tuple(ids), start, parent, k[:, :, start:].clone(), v[:, :, start:].clone())
        self._entries[eid] = entry
        self.bytes += size
        if parent is not None:
            parent.children += 1
        for i in range(max(start + 1, MIN_TOKENS), n + 1):
            self._index[chain[i - 1]] = (eid, i)  # prefix lengths no stored entry held

    def forget(self, adapter_name: str) -> None:
        """Drop the entries of every version of an adapter (it was unloaded)."""
        gone = [e for e in self._entries.values() if adapter_name in _names(e.adapter)]
        for entry in sorted(gone, key=_depth, reverse=True):  # children before their parents
            self._drop(entry)

    def _find(self, adapter: AdapterRequest, ids: list[int], chain: list[int]) -> tuple[Entry | None, int]:
        for n in range(len(chain), MIN_TOKENS - 1, -1):
            found = self._index.get(chain[n - 1])
            if found is None:
                continue
            eid, length = found
            entry = self._entries.get(eid)
            if entry is None or length != n or entry.adapter != adapter or list(entry.ids[:n]) != list(ids[:n]):
                continue  # evicted, or a hash collision
            return entry, n
        return None, 0

    def _touch(self, entry: Entry | None) -> None:
        """Most recently used: the entry and every parent it reads."""
        for e in reversed(_ancestors(entry)):
            self._entries.move_to_end(e.eid)

    def _evict(self, pinned: list[Entry]) -> bool:
        """Drop the least recently used leaf that is not pinned; False when none is left."""
        keep = {e.eid for e in pinned}
        victim = next((e for e in self._entries.values() if not e.children and e.eid not in keep), None)
        if victim is None:
            return False
        self._drop(victim)
        return True

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry.eid]
        self.bytes -= entry.nbytes
        if entry.parent is not None:
            entry.parent.children -= 1
        chain = _chain(entry.adapter, entry.ids)
        for i in range(max(entry.start + 1, MIN_TOKENS), len(entry.ids) + 1):
            if self._index.get(chain[i - 1], (None,))[0] == entry.eid:
                del self._index[chain[i - 1]]


def _ancestors(entry: Entry | None) -> list[Entry]:
    """The entry and its parents, the entry first."""
    out = []
    while entry is not None:
        out.append(entry)
        entry = entry.parent
    return out


def _depth(entry: Entry) -> int:
    return len(_ancestors(entry))


def _names(adapter: AdapterRequest) -> set[str]:
    return {names.name_of(ref) for ref, _ in adapter.parts}
