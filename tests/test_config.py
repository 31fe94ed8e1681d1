"""Config: unknown keys suggest the closest valid one with file:line; overrides; types."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.config import load_config
from loraplex.errors import UserError


def test_typo_names_line_and_suggests(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: hr\ntrain:\n  epochs: 3\n  learning_rat: 0.001\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    assert f"{p}:4" in str(e.value) and "did you mean 'train.learning_rate'" in str(e.value)


def test_wrong_type_and_bad_name(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: ../etc\nlora:\n  rank: many\n")
    msg = str(pytest.raises(UserError, load_config, p).value)
    assert f"{p}:1" in msg and "invalid adapter name" in msg
    assert f"{p}:3" in msg and "lora.rank" in msg


def test_set_overrides_and_relative_data_path(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("")
    p = tmp_path / "c.yaml"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "z3.json").write_text("{}")
    p.write_text("# loraplex train c.yaml\nname: hr\ndata:\n  path: d.jsonl\ntrain:\n  deepspeed: ds/z3.json\n")
    cfg = load_config(p, ["train.learning_rate=5e-4", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.train.learning_rate == 5e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.train.deepspeed == str(tmp_path / "ds" / "z3.json")  # like data paths: next to the config
    with pytest.raises(UserError, match="did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])


def test_example_configs_are_valid_and_start_with_their_command() -> None:
    examples = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))
    assert examples
    for ex in examples:
        assert ex.read_text().startswith(f"# loraplex train examples/{ex.name}")
        load_config(ex)
