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

Lookup hashes every prefix of the prompt incrementally (a chain of 64-bit hashes, ~0.1 us a token)
and checks an index holding every position of every entry, so a prompt that shares any prefix with
a stored one finds it, not only at block boundaries; the matched tokens are then compared, so a
hash collision cannot return the wrong keys. Entries are evicted least recently used first to stay
within `capacity_bytes`. Each entry is a copy (no block sharing as in vLLM's paged cache): simpler,
and at the sizes of this engine's models a few MiB per prompt.

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


@dataclass
class Entry:
    adapter: AdapterRequest
    ids: tuple[int, ...]
    k: torch.Tensor  # [layers, kv_heads, n, head_dim]
    v: torch.Tensor

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
        chain = _chain(adapter, ids[:-1])
        for n in range(len(chain), MIN_TOKENS - 1, -1):
            found = self._index.get(chain[n - 1])
            if found is None:
                continue
            eid, length = found
            entry = self._entries.get(eid)
            if entry is None or length != n or entry.adapter != adapter or list(entry.ids[:n]) != ids[:n]:
                continue  # evicted, or a hash collision
            self._entries.move_to_end(eid)
            return entry, n
        return None, 0

    def store(self, adapter: AdapterRequest, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the keys/values of `ids` (k, v: [layers, kv_heads, len(ids), head_dim], copied)."""
        n = len(ids)
        if n < MIN_TOKENS:
            return
        size = 2 * k.numel() * k.element_size()
        if size > self.capacity_bytes:
            return
        chain = _chain(adapter, ids)
        known = self._index.get(chain[-1])
        if known is not None and known[1] == n and known[0] in self._entries:
            self._entries.move_to_end(known[0])  # stored already (or a longer prompt holds it)
            return
        while self._entries and self.bytes + size > self.capacity_bytes:
            self._evict()
        eid, self._next = self._next, self._next + 1
        self._entries[eid] = Entry(adapter, tuple(ids), k.clone(), v.clone())
        self.bytes += size
        for i, h in enumerate(chain[MIN_TOKENS - 1 :], MIN_TOKENS):
            self._index[h] = (eid, i)  # a newer entry takes over the positions it shares

    def forget(self, adapter_name: str) -> None:
        """Drop the entries of every version of an adapter (it was unloaded)."""
        for eid in [e for e, entry in self._entries.items() if adapter_name in _names(entry.adapter)]:
            self._drop(eid)

    def _evict(self) -> None:
        eid = next(iter(self._entries))
        self._drop(eid)

    def _drop(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        self.bytes -= entry.nbytes
        for h in _chain(entry.adapter, entry.ids)[MIN_TOKENS - 1 :]:
            if self._index.get(h, (None,))[0] == eid:
                del self._index[h]


def _names(adapter: AdapterRequest) -> set[str]:
    return {names.name_of(ref) for ref, _ in adapter.parts}
