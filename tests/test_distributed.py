"""Data-parallel training with `torchrun` (2 CPU processes, gloo) on the tiny model: the same
losses and weights as one process with the same global batch, one writer, and a run interrupted
on one process resumes on two."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loraplex.adapters import registry
from loraplex.config import TrainConfig, load_config
from loraplex.train.sft_lora import run

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun (installed with torch) not found")

SETTINGS = {
    "batch_size": 1,
    "gradient_accumulation": 4,  # 4 micro-batches per step: 2 on each process
    "max_steps": 4,
    "learning_rate": 1e-2,
    "warmup_ratio": 0.0,
    "precision": "fp32",
    "logging_steps": 1,
    "save_steps": 2,
}


def config(name: str, base: Path, data: Path) -> TrainConfig:
    return load_config(
        extra={"name": name, "base": str(base), "data": {"path": str(data), "eval_ratio": 0}, "train": SETTINGS}
    )


def overrides(name: str, base: Path, data: Path) -> list[str]:
    sets = [f"train.{k}={v}" for k, v in SETTINGS.items()] + ["data.eval_ratio=0"]
    return ["--name", name, "--base", str(base), "--data", str(data), *[a for s in sets for a in ("--set", s)]]


def torchrun(args: list[str], home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert TORCHRUN is not None
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "loraplex.cli", "train", *args]
    env = {**os.environ, "LORAPLEX_HOME": str(home), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(ref: str) -> dict:
    return load_file(str(registry.resolve(ref).path / "adapter_model.safetensors"))


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-5 for k in a)


def test_two_processes_match_one_and_only_rank_0_writes(lp_home: Path, tiny_base: Path, facts_file: Path) -> None:
    one = run(config("one", tiny_base, facts_file))
    assert one.adapter is not None
    r = torchrun(overrides("two", tiny_base, facts_file), lp_home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stderr and r.stderr.count("training two") == 1  # one process reports
    two = registry.resolve("two")
    assert registry.list_names() == [("one", [1]), ("two", [1])]  # registered once
    run_dir = Path(two.manifest()["run_dir"])
    assert losses(run_dir) == pytest.approx(losses(one.run_dir), rel=1e-5)  # one metrics line per step
    assert close(weights("one@v1"), weights("two@v1"))


def test_a_run_interrupted_on_one_process_resumes_on_two(lp_home: Path, tiny_base: Path, facts_file: Path) -> None:
    cfg = config("mixed", tiny_base, facts_file)

    def stop(step: int, loss: float, model: object) -> None:
        if step == 2:
            raise KeyboardInterrupt

    first = run(cfg, on_step=stop)
    assert first.interrupted and first.steps == 2
    r = torchrun(overrides("mixed", tiny_base, facts_file), lp_home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming mixed from step-2" in r.stderr or "(2/4 steps done)" in r.stderr, r.stderr[-2000:]
    straight = run(config("straight", tiny_base, facts_file))
    assert straight.adapter is not None
    assert close(weights("mixed@v1"), weights("straight@v1"))


def test_fsdp_shards_the_base_and_matches_one_process(lp_home: Path, tiny_base: Path, facts_file: Path) -> None:
    """`train.fsdp`: the frozen base sharded over 2 processes (FSDP2, gloo) gives the same losses and
    weights as one process; with 2 micro-batches per step the dealt-out share is even, with 3 one
    process runs a zero-weighted forward to keep FSDP in lockstep, and the result is still equal."""
    one = run(config("one", tiny_base, facts_file))
    r = torchrun([*overrides("sharded", tiny_base, facts_file), "--set", "train.fsdp=true"], lp_home)
    assert r.returncode == 0, r.stderr[-3000:]
    said = " ".join(r.stderr.split())  # Rich wraps lines
    held = re.search(r"x 2 processes \(FSDP: each holds (\d+)% of the weights\)", said)
    assert held and 50 < int(held.group(1)) < 75, r.stderr[-2000:]  # layers halved, embeddings whole
    sharded = registry.resolve("sharded")
    assert losses(Path(sharded.manifest()["run_dir"])) == pytest.approx(losses(one.run_dir), rel=1e-5)
    assert close(weights("one@v1"), weights("sharded@v1"))

    odd = {**SETTINGS, "gradient_accumulation": 3}
    three = run(
        load_config(
            extra={
                "name": "three",
                "base": str(tiny_base),
                "data": {"path": str(facts_file), "eval_ratio": 0},
                "train": odd,
            }
        )
    )
    args = overrides("uneven", tiny_base, facts_file) + ["--set", "train.gradient_accumulation=3"]
    r = torchrun([*args, "--set", "train.fsdp=true"], lp_home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP: each holds" in " ".join(r.stderr.split())
    uneven = registry.resolve("uneven")
    assert losses(Path(uneven.manifest()["run_dir"])) == pytest.approx(losses(three.run_dir), rel=1e-5)
    assert close(weights("three@v1"), weights("uneven@v1"))


def test_a_one_process_run_resumes_sharded(lp_home: Path, tiny_base: Path, facts_file: Path) -> None:
    """A checkpoint holds whole tensors, so FSDP processes each take their shard of it."""

    def stop(step: int, loss: float, model: object) -> None:
        if step == 2:
            raise KeyboardInterrupt

    first = run(config("mixed", tiny_base, facts_file), on_step=stop)
    assert first.interrupted
    r = torchrun([*overrides("mixed", tiny_base, facts_file), "--set", "train.fsdp=true"], lp_home)
    assert r.returncode == 0, r.stderr[-3000:]
    said = " ".join(r.stderr.split())
    assert "(2/4 steps done)" in said and "FSDP: each holds" in said, r.stderr[-2000:]
    straight = run(config("straight", tiny_base, facts_file))
    assert straight.adapter is not None
    assert close(weights("mixed@v1"), weights("straight@v1"))


def test_deepspeed_is_refused_with_the_fsdp_alternative(lp_home: Path, tiny_base: Path, facts_file: Path) -> None:
    r = torchrun(overrides("ds", tiny_base, facts_file), lp_home, {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert r.returncode != 0
    assert "DeepSpeed is not supported" in r.stderr and "examples/accelerate/fsdp.yaml" in r.stderr
    assert registry.list_names() == []


def test_the_shipped_accelerate_fsdp_config(lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path) -> None:
    """examples/accelerate/fsdp.yaml under `accelerate launch` (2 CPU processes here instead of its 4
    GPUs): accelerate says FSDP, the base is sharded, and the result equals one process."""
    import yaml

    shipped = yaml.safe_load((Path(__file__).parent.parent / "examples/accelerate/fsdp.yaml").read_text())
    assert shipped["distributed_type"] == "FSDP"
    cpu = tmp_path / "fsdp-cpu.yaml"
    cpu.write_text(yaml.safe_dump({**shipped, "num_processes": 2, "use_cpu": True}))
    accelerate = Path(TORCHRUN or "").parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(cpu), "-m", "loraplex.cli", "train"]
    env = {**os.environ, "LORAPLEX_HOME": str(lp_home), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*cmd, *overrides("acc", tiny_base, facts_file)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes (FSDP: each holds" in " ".join(r.stderr.split())
    one = run(config("one", tiny_base, facts_file))
    assert one.adapter is not None and close(weights("one@v1"), weights("acc@v1"))
