"""What a `model` field names, parsed once into a typed spec.

    NAME                the latest version of an adapter
    NAME@vN | NAME@ALIAS one version, or what an alias points to
    PART:WEIGHT          the adapter's delta scaled by WEIGHT (-10 to 10)
    PART+PART+...        a composition: the weighted sum of the parts' deltas

`base`, `default` and the base model's id are the base model (an empty spec).

Everything that reads a name (keys, output filters, feedback, the adapter cache, load/unload,
assistants, the registry) goes through `parse` or `parse_ref` here, so `hr@../../x` is refused the
same way everywhere. This module does not look names up (`registry.resolve` does) and never turns
a name into a path (`paths.check_name` guards that).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from loraplex.errors import NotFound, UserError
from loraplex.paths import NAME_RE

_PART = re.compile(r"(?P<name>[^@:]+)(?:@(?P<ver>[^:@]+))?(?::(?P<w>[-+0-9.eE]+))?")
VERSION_RE = re.compile(r"v([1-9][0-9]*)")
"""`vN`: an exact version (fullmatch)."""


class InvalidModelName(UserError):
    """The `model` field is not a well-formed name or composition (a 400)."""


class ModelNotFound(NotFound):
    """The `model` names nothing this server has (an OpenAI 404 `model_not_found`)."""


def not_found(model: str) -> str:
    """OpenAI's words for a model that is missing *or* hidden from this key: the two read the same,
    and never name the store's path or other models."""
    return f"the model {model!r} does not exist or you do not have access to it"


@dataclass(frozen=True)
class Part:
    """One adapter in a model name: `name`, a `version` (`vN`, an alias, or "" for the latest), a weight."""

    name: str
    version: str = ""
    weight: float = 1.0

    @property
    def ref(self) -> str:
        """`NAME` or `NAME@VERSION`, as the registry resolves it."""
        return f"{self.name}@{self.version}" if self.version else self.name

    def __str__(self) -> str:
        return self.ref if self.weight == 1.0 else f"{self.ref}:{self.weight:g}"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `model` field: no parts = the base model."""

    parts: tuple[Part, ...] = ()

    def __str__(self) -> str:
        """The canonical text (`hr@prod+formal:0.3`), "" for the base."""
        return "+".join(map(str, self.parts))


_SYNTAX = (
    "an adapter is NAME, NAME@vN or NAME@ALIAS, optionally :WEIGHT (names use a-z, 0-9, '.', '_', '-'), "
    "joined with '+' to compose, e.g. 'legal:0.7+formal:0.3'"
)


BASE_ALIASES = ("base", "default")
"""Other names of the base model, next to its own id."""


def base_names(base_id: str) -> tuple[str, ...]:
    """Every name of the base model, its id first (what a key's scope is matched against)."""
    return (base_id, *BASE_ALIASES)


def _valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and ".." not in name


def parse(model: str, base_names: tuple[str, ...] = ()) -> ModelSpec:
    """A `model` field -> ModelSpec; InvalidModelName says what is wrong."""
    model = model.strip()
    if model in base_names or model == "":
        return ModelSpec()
    parts = []
    for raw in model.split("+"):
        m = _PART.fullmatch(raw.strip())
        if not m or not _valid_name(m.group("name")) or not _valid_name(m.group("ver") or "v1"):
            raise InvalidModelName(f"invalid model {model!r}: {_SYNTAX}")
        weight = 1.0
        if m.group("w") is not None:
            try:
                weight = float(m.group("w"))
            except ValueError:
                raise InvalidModelName(f"invalid weight {m.group('w')!r} in model {model!r}") from None
            if not math.isfinite(weight) or abs(weight) > 10:
                raise InvalidModelName(f"weight {weight} in model {model!r} must be a number in [-10, 10]")
        parts.append(Part(m.group("name"), m.group("ver") or "", weight))
    return ModelSpec(tuple(parts))


def parse_ref(text: str, what: str = "adapter") -> Part:
    """`NAME`, `NAME@vN` or `NAME@ALIAS` (no weight, no composition) -> Part; a UserError otherwise."""
    m = _PART.fullmatch(text.strip())
    if not m or m.group("w") is not None or not _valid_name(m.group("name")) or not _valid_name(m.group("ver") or "v1"):
        raise UserError(f"invalid {what} {text!r}: use NAME, NAME@vN or NAME@ALIAS (a-z, 0-9, '.', '_', '-')")
    return Part(m.group("name"), m.group("ver") or "")


def split_ref(ref: str) -> tuple[str, str]:
    """`NAME@VERSION` -> (NAME, VERSION), `NAME` -> (NAME, ""), without validating: for resolved
    version ids, and for names that may belong to an upstream endpoint or the base model. Use
    `parse_ref` on an adapter reference a user typed."""
    name, _, version = ref.partition("@")
    return name, version


def name_of(ref: str) -> str:
    """The name in a version id or reference (`hr@v2` -> `hr`), unvalidated as with `split_ref`."""
    return split_ref(ref)[0]


def loose_names(model: str) -> tuple[str, ...]:
    """The names a `model` field mentions, without validating them: for matching glob patterns
    (key scopes, output filters) against names that may belong to an upstream endpoint rather
    than an adapter (`gpt-4o`, `llama3:8b`), where `parse` would refuse them."""
    return tuple(p.split(":")[0].split("@")[0].strip() for p in model.split("+"))
