"""The README is a front page and docs/ holds the depth: every link between them resolves (files
and #anchors), README stays under 20 KB, and docs/config.md's key table is what the config
classes say (scripts/config_reference.py writes it)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'."""
    out, fence = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        fence ^= line.startswith("```")
        if not fence and line.startswith("#"):
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


def test_every_link_in_readme_and_docs_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_readme_is_a_front_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) < 20_000
    assert ".venv/bin/python -m pytest -q -n 2 --dist worksteal tests" in text  # the command CI runs (.ci/run)
    linked = set(LINK.findall(text))
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked, "every page in docs/ is linked from README"


def test_the_config_reference_is_generated_from_the_config_classes() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from config_reference import DOC, render

    text = DOC.read_text(encoding="utf-8")
    assert render(text) == text, "docs/config.md is stale: run python scripts/config_reference.py"
    from loraplex.config import TrainConfig

    plain = [n for n, f in TrainConfig.model_fields.items() if not hasattr(f.annotation, "model_fields")]
    assert all(f"| `{n}` |" in text for n in plain)
    for section in ("data", "retrieval", "paraphrase", "lora", "train"):
        assert f"| `{section}." in text
