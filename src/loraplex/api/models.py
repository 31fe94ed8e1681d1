"""GET /v1/models: the base model, the embedding model, upstream models, assistants and adapters
(each alias a model of its own, so chat UIs list `legal@prod`), filtered to what the key may use;
GET /v1/models/{id}: one of them, or one version of an adapter (`legal@v2`), as the openai SDK's
`models.retrieve` asks.

What is listed is read from the store on each request (a new version appears without a restart);
adapters trained on another base architecture are left out. This module does not load adapters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import Depends, FastAPI

from loraplex.adapters import registry
from loraplex.adapters.names import ModelNotFound, not_found
from loraplex.assistants import store as assistants
from loraplex.engine.protocol import EngineClient
from loraplex.errors import UserError
from loraplex.gateway.gate import Gateway
from loraplex.gateway.keys import Key
from loraplex.knowledge import embedder

log = logging.getLogger(__name__)


def add_routes(
    app: FastAPI,
    engine: EngineClient,
    gw: Gateway,
    principal: Callable[..., Key | None],
    allowed: Callable[[Key | None, str], bool],
) -> None:
    created = int(time.time())

    @app.get("/v1/models")
    async def models(key: Key | None = Depends(principal)) -> dict[str, Any]:
        data = await asyncio.to_thread(model_list, engine, created, gw)
        return {"object": "list", "data": [m for m in data if allowed(key, m["id"])]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, key: Key | None = Depends(principal)) -> dict[str, Any]:
        # A missing model and one this key may not use get the same 404 (api/errors.py).
        if allowed(key, model_id):
            for m in await asyncio.to_thread(model_list, engine, created, gw):
                if m["id"] == model_id:
                    return m
                if m.get("kind") == "adapter" and model_id in m["versions"]:
                    return {**m, "id": model_id, "root": model_id, "version": int(model_id.rsplit("@v", 1)[1])}
        raise ModelNotFound(not_found(model_id))


def model_list(engine: EngineClient, created: int, gw: Gateway) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = [
        {
            "id": engine.base.id,
            "object": "model",
            "created": created,
            "owned_by": "loraplex",
            "max_model_len": engine.max_model_len,
        }
    ]
    data.append(
        {
            "id": embedder.BUILTIN,
            "object": "model",
            "created": created,
            "owned_by": "loraplex",
            "kind": "embedding",
            "dimensions": embedder.Multilingual.dim,
        }
    )
    for up in gw.config.upstreams:  # exact names only: a pattern names no model a client could pick
        for name in up.models:
            if not any(c in name for c in "*?["):
                data.append({"id": name, "object": "model", "created": created, "owned_by": up.base_url})
    shadowed = set()
    for name in assistants.names():
        try:
            found = assistants.find(name)
            if found is None:
                continue
            engine.adapters.resolve(found.spec)  # its adapters must be servable here
        except UserError as e:
            log.warning("assistant %s not listed: %s", name, e)
            continue
        shadowed.add(name)
        data.append(
            {
                "id": name,
                "object": "model",
                "created": int(_ts(found.created_at)) if found.created_at else created,
                "owned_by": "loraplex",
                "parent": engine.base.id,
                "kind": "assistant",
                "display_name": found.display_name or name,
                "name": found.display_name or name,  # what Open WebUI's model picker shows
                "description": found.description,
                "adapters": found.model,
                "knowledge": found.knowledge.base if found.knowledge else None,
                "defaults": found.sampling.model_dump(exclude_none=True),
            }
        )
    all_aliases = registry.all_aliases()
    for name, versions in registry.list_names():
        if name in shadowed:
            continue  # an assistant of the same name answers to it
        if engine.adapters.allowed is not None and name not in engine.adapters.allowed:
            continue
        ref = registry.AdapterRef(name, versions[-1], registry.store_root() / name / f"v{versions[-1]}")
        try:
            manifest = ref.manifest()
        except (OSError, ValueError):
            continue
        if manifest.get("base_model", {}).get("fingerprint", {}).get("architecture") not in (
            None,
            engine.base.fingerprint.get("architecture"),
        ):
            continue  # trained on another base: not servable here
        created_at = manifest.get("created_at")
        aliases = all_aliases.get(name, {})
        entry = {
            "id": name,
            "object": "model",
            "created": int(_ts(created_at)) if created_at else created,
            "owned_by": manifest.get("owner") or "loraplex",
            "parent": engine.base.id,
            "root": ref.id,
            "version": ref.version,
            "versions": [f"{name}@v{v}" for v in versions],
            "aliases": {a: f"{name}@v{v}" for a, v in aliases.items()},
            "description": manifest.get("description") or "",
            "kind": "adapter",
        }
        data.append(entry)
        # each alias is a model of its own, so chat UIs can offer `legal@prod` in their model menu
        for a, v in sorted(aliases.items()):
            data.append({**entry, "id": f"{name}@{a}", "root": f"{name}@v{v}", "version": v})
    return data


def _ts(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return time.time()
