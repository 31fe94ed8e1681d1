"""Assistants: what users pick. An assistant bundles adapters (with weights), a system prompt,
sampling defaults and optionally a knowledge base, and is served as a model of its own.

One YAML file per assistant, `$LORAPLEX_HOME/assistants/NAME.yaml`, written whole to a temporary
file and renamed (never half-written), readable and editable by hand; a hand edit with a mistake
is reported with its file:line and field when the assistant is next used, like a training config.
`find` keeps parsed files by modification time, so the server reads a file only when it changes.

This module does not search knowledge bases or build prompts (retrieval.py), nor serve anything.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraplex.adapters.names import VERSION_RE, ModelSpec, Part, parse, parse_ref, split_ref
from loraplex.errors import UserError
from loraplex.paths import NAME_RE, check_name, home


class AdapterPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str = Field(description="NAME, NAME@vN or NAME@ALIAS of a stored adapter")
    weight: float = Field(1.0, description="its weight in the composition, -10 to 10")

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v) or abs(v) > 10:
            raise ValueError("must be a number in [-10, 10]")
        return v

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        try:
            return parse_ref(v).ref
        except UserError:
            raise ValueError("an adapter is NAME, NAME@vN or NAME@ALIAS (a-z, 0-9, '.', '_', '-')") from None

    @property
    def part(self) -> Part:
        name, version = split_ref(self.ref)  # checked above
        return Part(name, version, self.weight)


class Sampling(BaseModel):
    """Defaults for requests that leave these unset; a request's own values win."""

    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=32768)


class Knowledge(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = Field(
        description="the knowledge base searched on every question, or NAME@vN: the Q&A an adapter version "
        "was trained on (train with retrieval on)"
    )
    top_k: int = Field(4, ge=1, le=20, description="passages put into the prompt, at most")
    min_relevance: float = Field(
        0.3, ge=0, le=1, description="passages covering less of the question than this are not used"
    )
    min_similarity: float = Field(
        0.5, ge=-1, le=1, description="with vectors: a passage this similar (cosine) is used whatever its words"
    )
    when_nothing_found: Literal["answer", "refuse", "base"] = Field(
        "answer",
        description="answer: without passages, from the model alone; refuse: say 'I don't know' "
        "(and the prompt tells the model to say so when the passages lack the answer); base: the base "
        "model answers without the assistant's adapters (and the prompt says as with refuse)",
    )
    min_topic: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="NAME@vN only: refuse (say 'I don't know') when the best passage, with the names the Q&A "
        "repeats (its organisations) taken out of it and of the question, is less similar than this: the "
        "question is about the same organisation, not about anything the Q&A says; none: never",
    )
    refusal: str = Field("", description="what to answer when refusing; default: a sentence in the question's language")
    language: Literal["question", "passages"] = Field(
        "question",
        description="the language of the prompt's instructions (Chinese or English): the question's, or the "
        "first passage's (then every wording of a question that finds the same passage shares one prompt "
        "prefix, which the server's prefix cache keeps)",
    )

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        name, version = split_ref(v)
        if "@" in v and not VERSION_RE.fullmatch(version):
            raise ValueError("a knowledge base is NAME, or NAME@vN for an adapter version's own Q&A")
        check_name(name, "knowledge base name")
        return v


class Assistant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    display_name: str = ""
    description: str = ""
    adapters: list[AdapterPart] = Field(default_factory=list, description="none: the base model alone")
    system_prompt: str = ""
    sampling: Sampling = Field(default_factory=Sampling)
    knowledge: Knowledge | None = None
    created_at: str = ""
    updated_at: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_name(v, "assistant name")
        return v

    @property
    def spec(self) -> ModelSpec:
        """The composition the engine serves (no parts: the base model)."""
        return ModelSpec(tuple(p.part for p in self.adapters))

    @property
    def model(self) -> str:
        """The composition as text, `hr@prod+formal:0.3`, or "" for the base model."""
        return str(self.spec)

    def to_yaml(self) -> str:
        head = f"# loraplex assistant, served as model {self.name!r}; edit with `loraplex assistants edit`\n"
        return head + yaml.safe_dump(self.model_dump(exclude_none=True), allow_unicode=True, sort_keys=False)


def root() -> Path:
    return home() / "assistants"


def path_of(name: str) -> Path:
    return root() / f"{check_name(name, 'assistant name')}.yaml"


def names() -> list[str]:
    if not root().is_dir():
        return []
    return sorted(p.stem for p in root().glob("*.yaml") if NAME_RE.match(p.stem))


def read(path: Path) -> Assistant:
    from loraplex.config import explain, load_yaml

    raw, node = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}:1: an assistant must be a mapping of keys to values")
    try:
        a = Assistant.model_validate(raw)
    except ValidationError as e:
        message = explain(e, str(path), node, Assistant)
        raise UserError(message.replace("invalid config", "invalid assistant", 1)) from None
    if a.name != path.stem:
        raise UserError(f"{path}: name {a.name!r} does not match the file name {path.stem!r}")
    return a


_cache: dict[str, tuple[float, Assistant]] = {}
_lock = threading.Lock()


def find(name: str) -> Assistant | None:
    """The assistant called `name`, or None if there is none (or `name` cannot be one)."""
    if not NAME_RE.match(name) or ".." in name:
        return None
    path = root() / f"{name}.yaml"
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    with _lock:
        hit = _cache.get(name)
    if hit and hit[0] == mtime:
        return hit[1]
    a = read(path)
    with _lock:
        _cache[name] = (mtime, a)
    return a


def get(name: str) -> Assistant:
    a = find(check_name(name, "assistant name"))
    if a is None:
        have = ", ".join(names()) or "none yet"
        raise UserError(f"no assistant {name!r} (have: {have}); create one with `loraplex assistants create`")
    return a


def save(a: Assistant, new: bool) -> Path:
    """Write `a` atomically; `new` refuses to overwrite an existing assistant."""
    path = path_of(a.name)
    if new and path.exists():
        raise UserError(f"assistant {a.name!r} exists; change it with `loraplex assistants edit {a.name}`")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    a = a.model_copy(update={"created_at": a.created_at or now, "updated_at": now})
    root().mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root(), prefix=f".{a.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(a.to_yaml())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove(name: str) -> None:
    path = path_of(name)
    if not path.exists():
        raise UserError(f"no assistant {name!r}")
    path.unlink()
    with _lock:
        _cache.pop(name, None)


def build(fields: dict[str, object]) -> Assistant:
    """An Assistant from command-line fields, with every problem named by its field."""
    try:
        return Assistant.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise UserError(f"assistant {fields.get('name')!r}: {problems}") from None


def parse_adapter(text: str) -> AdapterPart:
    """`hr@prod` or `formal:0.3` (a weight after the last colon)."""
    try:
        parts = parse(text).parts
        if len(parts) != 1:
            raise ValueError("one adapter per --adapter")
        return AdapterPart(ref=parts[0].ref, weight=parts[0].weight)
    except (UserError, ValueError, ValidationError):
        raise UserError(f"--adapter {text!r}: use NAME, NAME@vN or NAME@ALIAS, then :WEIGHT (-10 to 10)") from None


def check(a: Assistant) -> None:
    """Everything an assistant names exists: its adapters in the store, its knowledge base."""
    from loraplex.adapters import registry
    from loraplex.knowledge.store import KnowledgeBase

    for part in a.adapters:
        try:
            registry.resolve(part.ref)
        except UserError as e:
            raise UserError(f"assistant {a.name!r}: adapter {part.ref!r}: {e}") from None
    if a.knowledge is not None and "@" in a.knowledge.base:  # an adapter version's own Q&A
        ref = registry.resolve(a.knowledge.base)
        if not (ref.path / registry.KNOWLEDGE).is_file():
            raise UserError(f"assistant {a.name!r}: knowledge {ref.id!r}: that version was trained without retrieval")
    elif a.knowledge is not None:
        KnowledgeBase(a.knowledge.base).close()


def create(a: Assistant) -> Path:
    from loraplex.adapters import registry

    if any(name == a.name for name, _ in registry.list_names()):
        raise UserError(f"{a.name!r} is already an adapter's name; an assistant needs a name of its own")
    check(a)
    return save(a, new=True)


def update(name: str, changes: dict[str, object]) -> Assistant:
    """Apply `changes` (top-level fields; `sampling` and `knowledge` merge key by key) and save."""
    current = get(name).model_dump()
    for key, value in changes.items():
        if key in ("sampling", "knowledge") and isinstance(value, dict) and isinstance(current.get(key), dict):
            current[key] = {**current[key], **value}
        else:
            current[key] = value
    a = build(current)
    check(a)
    save(a, new=False)
    return a


def knowledge_bases() -> list[str]:
    """The knowledge bases some assistant searches (an assistant with a mistake is left out)."""
    bases = set()
    for name in names():
        try:
            found = find(name)
        except UserError:
            continue  # reported when it is used
        if found is not None and found.knowledge is not None:
            bases.add(found.knowledge.base)
    return sorted(bases)
