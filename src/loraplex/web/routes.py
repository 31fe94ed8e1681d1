"""The web app's routes: the page at `/`, its static files, and its own small JSON API for
conversations (`/ui/api/...`), behind the same API keys as `/v1`.

The page itself talks to the public API like any client: `/v1/models`, streamed
`/v1/chat/completions`, `/v1/feedback`. Static files are plain HTML/CSS/JS shipped in the package
(marked and DOMPurify vendored under static/vendor), so nothing needs Node at run time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import fastapi
from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from loraplex.api.errors import APIError
from loraplex.api.schemas import JsonInt, MaybeFloat
from loraplex.gateway.gate import Gateway
from loraplex.gateway.keys import Key
from loraplex.web import conversations, dashboard
from loraplex.web.jobs import JOB_ID, Jobs, TrainSettings

if TYPE_CHECKING:
    from loraplex.engine.protocol import EngineClient

ConversationId = Annotated[str, fastapi.Path(pattern=conversations.ID_RE.pattern)]  # checked and documented
JobId = Annotated[str, fastapi.Path(pattern=JOB_ID)]

STATIC = Path(__file__).parent / "static"


class Source(BaseModel):
    index: JsonInt
    document: str = Field(max_length=500)
    chunk: JsonInt
    text: str = Field(max_length=20_000)
    score: MaybeFloat = None
    relevance: MaybeFloat = None


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(max_length=200_000)
    id: str | None = None  # the response id of an assistant message (for feedback)
    model: str | None = None  # what answered it (compare columns differ)
    rating: str | None = Field(default=None, pattern="^(up|down)$")
    sources: list[Source] | None = Field(default=None, max_length=50)  # an assistant's passages


class Conversation(BaseModel):
    title: str = Field(max_length=200)
    model: str = Field(max_length=200)
    messages: list[Message]


class Upload(BaseModel):
    filename: str = Field(max_length=255, pattern=r"\.(?:jsonl|json|csv|tsv|txt|JSONL|JSON|CSV|TSV|TXT)$")
    content_b64: str = Field(min_length=4, pattern="^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")


class TrainRequest(Upload):
    settings: TrainSettings


def add_routes(app: FastAPI, gw: Gateway, engine: EngineClient, principal: Any, admin: Any) -> None:
    jobs = Jobs(gw.db, engine.base.id, engine.threads)

    def owner(key: Key | None) -> str:
        return key.name if key is not None else ""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    @app.get("/ui/api/me")
    async def me(key: Key | None = Depends(principal)) -> dict[str, Any]:
        return {"key": owner(key) or None, "admin": key is None or key.admin, "auth": gw.auth}

    @app.get("/ui/api/conversations")
    async def conversation_list(key: Key | None = Depends(principal)) -> dict[str, Any]:
        return {"data": await asyncio.to_thread(conversations.listing, gw.db, owner(key))}

    @app.get("/ui/api/conversations/{cid}")
    async def conversation_get(cid: ConversationId, key: Key | None = Depends(principal)) -> dict[str, Any]:
        conv = await asyncio.to_thread(conversations.get, gw.db, owner(key), cid)
        if conv is None:  # another key's conversation is as unknown as a missing one
            raise APIError(404, f"no conversation {cid!r}", param="id", code="conversation_not_found")
        return conv

    @app.put("/ui/api/conversations/{cid}")
    async def conversation_put(
        cid: ConversationId, body: Conversation, key: Key | None = Depends(principal)
    ) -> dict[str, Any]:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        if not await asyncio.to_thread(conversations.save, gw.db, owner(key), cid, body.title, body.model, messages):
            raise APIError(404, f"no conversation {cid!r}", param="id", code="conversation_not_found")
        return {"id": cid, "saved": len(messages)}

    @app.delete("/ui/api/conversations/{cid}")
    async def conversation_delete(cid: ConversationId, key: Key | None = Depends(principal)) -> dict[str, Any]:
        if not await asyncio.to_thread(conversations.delete, gw.db, owner(key), cid):
            raise APIError(404, f"no conversation {cid!r}", param="id", code="conversation_not_found")
        return {"id": cid, "deleted": True}

    # ------------------------------------------------------------------ admin dashboard

    @app.get("/ui/api/admin/adapters")
    async def admin_adapters(key: Key | None = Depends(admin)) -> dict[str, Any]:
        return {"data": await asyncio.to_thread(dashboard.adapters, gw.db)}

    @app.get("/ui/api/admin/usage")
    async def admin_usage(hours: float = 24.0, key: Key | None = Depends(admin)) -> dict[str, Any]:
        return await asyncio.to_thread(dashboard.timeline, gw.db, min(max(hours, 1.0), 24 * 30))

    @app.get("/ui/api/admin/live")
    async def admin_live(key: Key | None = Depends(admin)) -> dict[str, Any]:
        return await asyncio.to_thread(dashboard.live, gw.db, engine)

    @app.get("/ui/api/admin/bases")
    async def admin_bases(key: Key | None = Depends(admin)) -> dict[str, Any]:
        from loraplex.models.load import EMBEDDED

        others = [b for b in EMBEDDED if b != engine.base.id]
        return {"served": engine.base.id, "choices": [engine.base.id, *others]}

    @app.post("/ui/api/admin/train/check")
    async def train_check(body: Upload, key: Key | None = Depends(admin)) -> dict[str, Any]:
        return await asyncio.to_thread(jobs.check_upload, body.filename, body.content_b64)

    @app.post("/ui/api/admin/train/jobs")
    async def train_start(body: TrainRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        job = await asyncio.to_thread(jobs.start, owner(key), body.filename, body.content_b64, body.settings)
        await asyncio.to_thread(gw.log.audit, owner(key) or None, "train", job["name"], {"job": job["id"]}, 200)
        return job

    @app.get("/ui/api/admin/train/jobs")
    async def train_jobs(key: Key | None = Depends(admin)) -> dict[str, Any]:
        return {"data": await asyncio.to_thread(jobs.list, None)}

    @app.get("/ui/api/admin/train/jobs/{job_id}")
    async def train_job(job_id: JobId, key: Key | None = Depends(admin)) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(jobs.get, job_id)
        except KeyError:
            raise APIError(404, f"no training job {job_id!r}", param="id", code="job_not_found") from None

    @app.get("/ui/api/admin/train/jobs/{job_id}/report")
    async def train_report(job_id: JobId, key: Key | None = Depends(admin)) -> HTMLResponse:
        try:
            path = jobs.report(job_id)
        except KeyError:
            raise APIError(404, f"no eval report for job {job_id!r}", param="id", code="report_not_found") from None
        return HTMLResponse(path.read_text(encoding="utf-8"))
