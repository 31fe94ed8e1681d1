"""Routes that change or report on the server, for admin keys (and feedback, for any key).

POST /v1/feedback; adapters loaded/unloaded/reloaded (vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter, and /admin/adapters/*); aliases moved or rolled back; usage, keys and the
audit log. Every change leaves an audit row, refused or not. The routes parse, call the registry,
engine or request log once, and shape JSON; they hold no logic of those.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI

from loraplex.adapters import names, registry
from loraplex.adapters.names import ModelNotFound, not_found
from loraplex.api.errors import APIError, translate
from loraplex.api.schemas import AliasRequest, FeedbackRequest, LoadAdapterRequest, UnloadAdapterRequest
from loraplex.engine.protocol import EngineClient
from loraplex.errors import UserError
from loraplex.gateway import feedback
from loraplex.gateway.gate import Gateway
from loraplex.gateway.keys import Key
from loraplex.gateway.log import audit_rows, summary


def add_routes(
    app: FastAPI,
    engine: EngineClient,
    gw: Gateway,
    principal: Callable[..., Key | None],
    admin: Callable[..., Key | None],
) -> None:
    @app.post("/v1/feedback")
    async def give_feedback(req: FeedbackRequest, key: Key | None = Depends(principal)) -> dict[str, Any]:
        item = gw.recent.get(req.id)
        if item is None:
            row = await asyncio.to_thread(gw.log.lookup, req.id)
            if row is not None and row["response"] and row["status"] < 400:
                prompt = json.loads(row["prompt"])
                messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
                item = feedback.Answered(row["key"], row["served"], messages, tuple(json.loads(row["response"])))
        # another key's response is as unknown as a missing one
        if item is None or (key is not None and item.key != key.name):
            raise APIError(404, f"no recent response with id {req.id!r}", param="id", code="response_not_found")
        if req.choice >= len(item.answers):
            raise APIError(400, f"choice {req.choice}: the response has {len(item.answers)}", param="choice")
        fid = await asyncio.to_thread(
            feedback.record, gw.db, req.id, item, req.choice, req.rating, req.comment, req.correction
        )
        return {"id": fid, "object": "feedback", "response_id": req.id, "model": item.served, "rating": req.rating}

    async def audited(key: Key | None, action: str, target: str, detail: Any, work: Any) -> Any:
        status = 200
        try:
            return await asyncio.to_thread(work)
        except Exception as e:  # noqa: BLE001
            err = translate(e)
            status = err.status
            raise err from None
        finally:
            await asyncio.to_thread(gw.log.audit, key.name if key else None, action, target, detail, status)

    @app.post("/v1/load_lora_adapter")
    @app.post("/admin/adapters/load")
    async def load_adapter(req: LoadAdapterRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        def work() -> str:
            if req.lora_path is not None:
                stored = registry.resolve(_one_adapter_version(engine, req.lora_name)).path
                # NUL: no such path, and Path.resolve would raise a bare "embedded null byte"
                if "\x00" in req.lora_path or Path(req.lora_path).resolve() != stored.resolve():
                    raise APIError(
                        422,
                        f"lora_path {req.lora_path!r} is not the store's directory of {req.lora_name!r}: this "
                        "server loads adapters by name from its store",
                        param="lora_path",
                    )
            return engine.load_adapter(req.lora_name, req.pin)

        loaded = await audited(key, "load", req.lora_name, {"pin": req.pin}, work)
        return {"loaded": loaded, "pinned": req.pin}

    @app.post("/v1/unload_lora_adapter")
    @app.post("/admin/adapters/unload")
    async def unload_adapter(req: UnloadAdapterRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        def work() -> list[str]:
            return engine.unload_adapter(_one_adapter(engine, req.lora_name))

        return {"unloaded": await audited(key, "unload", req.lora_name, None, work)}

    @app.post("/admin/adapters/reload")
    async def reload_adapter(req: LoadAdapterRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        """Drop every loaded version of the adapter and load what its name resolves to now."""

        def work() -> dict[str, Any]:
            name = _one_adapter(engine, req.lora_name)
            return {"unloaded": engine.unload_adapter(name), "loaded": engine.load_adapter(req.lora_name, req.pin)}

        return await audited(key, "reload", req.lora_name, {"pin": req.pin}, work)

    @app.post("/admin/aliases")
    async def move_alias(req: AliasRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            if req.rollback:
                old, new = registry.rollback(req.name, req.alias)
                return {"alias": f"{req.name}@{req.alias}", "from": f"{req.name}@v{old}", "to": f"{req.name}@v{new}"}
            if req.version is None:
                raise UserError("give a version to point the alias at, or rollback: true")
            ref = registry.tag(f"{req.name}@v{req.version}", req.alias)
            return {"alias": f"{req.name}@{req.alias}", "to": ref.id}

        detail = {"version": req.version, "rollback": req.rollback}
        return await audited(key, "alias", f"{req.name}@{req.alias}", detail, work)

    @app.get("/admin/usage")
    async def usage(
        by: Literal["adapter", "key"] = "adapter", since: float | None = None, key: Key | None = Depends(admin)
    ) -> Any:
        await asyncio.to_thread(gw.log.flush)
        rows = await asyncio.to_thread(summary, gw.db, since, by)
        await asyncio.to_thread(gw.log.audit, key.name if key else None, "usage", by, {"since": since}, 200)
        return {"object": "list", "by": by, "data": rows}

    @app.get("/admin/keys")
    async def key_list(key: Key | None = Depends(admin)) -> Any:
        from loraplex.gateway import keys as key_store

        await asyncio.to_thread(gw.log.flush)
        use = {r["name"]: r for r in await asyncio.to_thread(summary, gw.db, None, "key")}
        data = [
            {
                "name": k.name,
                "models": list(k.models),
                "admin": k.admin,
                "rpm": k.rpm,
                "tpm": k.tpm,
                "expires": k.expires,
                "revoked": k.revoked,
                "usage": use.get(k.name),
            }
            for k in await asyncio.to_thread(key_store.list_keys, gw.db)
        ]
        await asyncio.to_thread(gw.log.audit, key.name if key else None, "keys", None, None, 200)
        return {"object": "list", "data": data}

    @app.get("/admin/audit")
    async def audit(limit: int = 100, key: Key | None = Depends(admin)) -> Any:
        return {"object": "list", "data": await asyncio.to_thread(audit_rows, gw.db, min(max(limit, 1), 10_000))}


def _one_adapter_version(engine: EngineClient, lora_name: str) -> str:
    """The adapter version (`NAME@vN`) a load/unload/reload request names, read by the parser
    requests use (a malformed name is a 400, a missing one a 404): `hr@../../x` must not act on `hr`."""
    parts = engine.adapters.resolve(lora_name).parts
    if not parts:  # `base`, `default`: no adapter has that name
        raise ModelNotFound(not_found(lora_name))
    if len(parts) != 1:
        raise APIError(
            400, f"lora_name {lora_name!r}: name one adapter (not the base or a composition)", param="lora_name"
        )
    return parts[0][0]


def _one_adapter(engine: EngineClient, lora_name: str) -> str:
    """The adapter name (every version of it) an unload/reload request acts on."""
    return names.name_of(_one_adapter_version(engine, lora_name))
