"""Which adapters are loaded, and where: model names -> store versions -> slots of the LoRA stacks.

* `resolve("legal:0.7+formal@v2:0.3")` turns a request's `model` field into an `AdapterRequest`
  of exact versions, at admission: a request keeps the version it started with even if a newer one
  is registered (or the old one unloaded) while it runs.
* `prepare` reads the adapter files (safetensors, hash-checked against the manifest) into host
  memory; it runs on the caller's thread, so a cold load never stalls the batch that is decoding.
  On CPU the stacks' slots are host memory too, so an adapter that enters a slot leaves the host
  cache (which then holds only what no slot holds: composition parts, evicted adapters) and a
  request for a loaded adapter reads nothing: 8 rank-16 all-linear adapters on SmolLM2 added
  249 MiB of RSS with a full fp32 host copy of each beside its bf16 slot, now 102 (slots: 80).
* `acquire`/`release` (engine thread only) put prepared weights into a stack slot, count the
  requests using each slot, and evict the least recently used unpinned slot nobody uses.

This module does not run the model and never joins a name to a path itself (the store does,
after `check_name`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from loraplex.adapters import names, registry
from loraplex.adapters.compat import check_compatible
from loraplex.adapters.names import ModelNotFound, ModelSpec, not_found
from loraplex.engine.lora import AdapterRequest, AdapterWeights, LoraStacks, SiteShapes
from loraplex.errors import UserError
from loraplex.models.load import BaseRef


def resolve_model(model: str | ModelSpec, base_names: tuple[str, ...], allowed: set[str] | None) -> AdapterRequest:
    """A request's `model` field (or a spec already parsed, an assistant's) -> exact adapter versions
    and weights (empty = the base); the engines (built-in and remote) share it so both read names
    the same way."""
    spec = model if isinstance(model, ModelSpec) else names.parse(model, base_names)
    model = str(model)
    parts: list[tuple[str, float]] = []
    for part in spec.parts:
        if allowed is not None and part.name not in allowed:
            raise ModelNotFound(not_found(model))
        try:
            ref = registry.resolve(part.ref)
        except UserError as e:
            if not registry.versions(part.name):  # the registry's message lists the store's path and names
                raise ModelNotFound(not_found(model)) from None
            raise ModelNotFound(f"the model {part.ref!r} does not exist: {e}") from None  # its versions, aliases
        parts.append((ref.id, part.weight))
    return AdapterRequest(tuple(parts))


def _variant(key: str) -> bool:
    """A composition (`a@v1:0.7+b@v2:0.3`), which holds a slot of its own, not one version's."""
    return "+" in key


class AdapterCache:
    def __init__(
        self,
        base: BaseRef,
        stacks: LoraStacks,
        n_layers: int,
        shapes: SiteShapes,
        base_names: tuple[str, ...],
        allowed: set[str] | None = None,
        host_capacity: int = 32,
    ):
        self.base, self.stacks, self.n_layers, self.shapes = base, stacks, n_layers, shapes
        self.base_names = base_names
        self.allowed = allowed  # None = every adapter in the store
        self.capacity = stacks.slots - 1  # slot 0 is the base
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self.refs: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.free = list(range(1, stacks.slots))
        self._host: OrderedDict[str, AdapterWeights] = OrderedDict()  # one adapter version -> weights
        self._host_capacity = host_capacity
        self._slots_in_host_memory = stacks.device == "cpu"  # a host copy of a slotted adapter is a duplicate
        self._lock = threading.Lock()
        self.loads = 0  # adapters read from disk, for metrics and tests

    # ------------------------------------------------------------------ names (any thread)

    def resolve(self, model: str | ModelSpec) -> AdapterRequest:
        return resolve_model(model, self.base_names, self.allowed)

    # ------------------------------------------------------------------ host weights (any thread)

    def _read(self, adapter_id: str) -> AdapterWeights:
        with self._lock:
            if adapter_id in self._host:
                self._host.move_to_end(adapter_id)
                return self._host[adapter_id]
        ref = registry.resolve(adapter_id)
        try:
            registry.verify(ref)
            check_compatible(ref, self.base)
        except UserError as e:
            raise UserError(f"adapter {ref.id} cannot be served: {e}") from None
        weights = AdapterWeights.from_dir(ref.path, self.n_layers, self.shapes, ref.id)
        with self._lock:
            self.loads += 1
            self._host[adapter_id] = weights
            while len(self._host) > self._host_capacity:
                self._host.popitem(last=False)
        return weights

    def prepare(self, req: AdapterRequest) -> AdapterWeights | None:
        """The request's (composed) weights in host memory; None for the base, and on CPU for an
        adapter a slot holds now (`acquire` reads it after all if it is evicted before admission)."""
        if not req.parts or (self._slots_in_host_memory and req.slot_key in self.slot_of):
            return None
        if len(req.parts) == 1:  # whatever its weight: the engine scales each row (LoraBatch)
            return self._read(req.parts[0][0])
        return AdapterWeights.combine([(self._read(name), w) for name, w in req.parts])

    def forget(self, name: str) -> int:
        """Drop host copies of every version of `name` (the next use re-reads the store)."""
        with self._lock:
            gone = [k for k in self._host if names.name_of(k) == name]
            for k in gone:
                del self._host[k]
        return len(gone)

    # ------------------------------------------------------------------ slots (engine thread only)

    def acquire(self, req: AdapterRequest, weights: AdapterWeights | None) -> int | None:
        """The slot serving `req` (0 = base), loading it if needed; None when every slot is busy.
        A weighted adapter (`hr@v1:0.5`) shares the plain version's slot (`req.slot_key`)."""
        key = req.slot_key
        if not key:
            return 0
        if key in self.slot_of:
            self.slot_of.move_to_end(key)
            self.refs[key] = self.refs.get(key, 0) + 1
            return self.slot_of[key]
        variants = [k for k in self.slot_of if _variant(k)]
        if _variant(key) and len(variants) >= max(1, self.capacity // 2):
            # compositions share at most half the slots: a client cycling through `a:0.1+b`,
            # `a:0.2+b`, ... replaces its own compositions, never the adapters others use
            if not self._evict(variants):
                return None
        elif not self.free and not self._evict(list(self.slot_of)):
            return None
        if weights is None:  # evicted since `prepare` found it loaded (rare): read it on this thread
            weights = self.prepare(req)
            assert weights is not None
        slot = self.free.pop()
        self.stacks.put(slot, weights)
        if self._slots_in_host_memory and len(req.parts) == 1:  # a composition's parts stay for the next mix
            with self._lock:
                self._host.pop(req.parts[0][0], None)
        self.slot_of[key] = slot
        self.refs[key] = 1
        return slot

    def release(self, req: AdapterRequest) -> None:
        if req.slot_key:
            self.refs[req.slot_key] -= 1

    def _evict(self, candidates: list[str]) -> bool:
        for key in candidates:  # least recently used first
            if self.refs.get(key, 0) == 0 and key not in self.pinned:
                self.free.append(self.slot_of.pop(key))
                self.refs.pop(key, None)
                return True
        return False

    def unload(self, name: str) -> list[str]:
        """Free the idle slots of every version/composition involving `name`; busy ones free when done."""
        gone = []
        for key in list(self.slot_of):
            if name in names.loose_names(key):  # keys are AdapterRequest.key: ids, weights, "+"
                self.pinned.discard(key)
                if self.refs.get(key, 0) == 0:
                    self.free.append(self.slot_of.pop(key))
                    self.refs.pop(key, None)
                    gone.append(key)
        return gone

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"key": k, "slot": s, "in_use": self.refs.get(k, 0), "pinned": k in self.pinned}
            for k, s in self.slot_of.items()
        ]
