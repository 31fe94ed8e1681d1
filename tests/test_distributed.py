"""Data-parallel training with `torchrun` (2 CPU processes, gloo) on the tiny model: the same
losses and weights as one process with the same global batch, one writer, and a run interrupted
on one process resumes on two; the same with the base sharded by FSDP and by DeepSpeed ZeRO-2/3."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from loraplex.adapters import registry
from loraplex.config import TrainConfig, load_config
from loraplex.train import sft_lora as sf
from loraplex.train.plan import make_plan
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


# Plain SFT: these tests are about processes and sharding, which see examples, not how they were
# made. With retrieval's longer examples a micro-batch packs into rows of other shapes on one
# process than on two, and the fp32 sums differ in the last bits (weights ~1e-5 apart after Adam).
def config(name: str, base: Path, data: Path, **train: Any) -> TrainConfig:
    """SETTINGS with `train` changed."""
    return load_config(
        extra={
            "name": name,
            "base": str(base),
            "data": {"path": str(data), "eval_ratio": 0},
            "retrieval": {"enabled": False},
            "train": SETTINGS | train,
        }
    )


def overrides(name: str, base: Path, data: Path) -> list[str]:
    sets = [f"train.{k}={v}" for k, v in SETTINGS.items()] + ["data.eval_ratio=0", "retrieval.enabled=false"]
    return ["--name", name, "--base", str(base), "--data", str(data), *[a for s in sets for a in ("--set", s)]]


def torchrun(args: list[str], home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert TORCHRUN is not None
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "loraplex.cli", "train", *args]
    env = {**os.environ, "LORAPLEX_HOME": str(home), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def accelerate_launch(config: dict, args: list[str], home: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --config_file <config> -m loraplex.cli train <args>`."""
    import yaml

    (tmp / "accelerate.yaml").write_text(yaml.safe_dump(config))
    accelerate = Path(TORCHRUN or "").parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(tmp / "accelerate.yaml"), "-m", "loraplex.cli", "train"]
    env = {**os.environ, "LORAPLEX_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(ref: str) -> dict:
    return load_file(str(registry.resolve(ref).path / "adapter_model.safetensors"))


def close(a: dict, b: dict, tol: float = 1e-4) -> bool:
    """Same weights, up to rounding. Adam moves every weight by about lr (1e-2 here) a step however
    small its gradient, so a weight whose gradient is near zero carries the gradient's relative
    rounding error (rows summed in another order on another process) times lr: measured up to 2.3e-5
    after 4 steps with attention per packed example, 5e-6 with eager attention."""
    return a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < tol for k in a)


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
    held = re.search(r"x 2 processes \(FSDP: each holds (\d+%) of the weights\)", said)
    assert held, r.stderr[-2000:]
    # layers halved, embeddings whole: what `loraplex plan --gpus 2 --shard fsdp` says of this model
    planned = make_plan(str(tiny_base), rank=load_config().lora.rank, gpus=2, shard="fsdp")
    assert held.group(1) == f"{planned['held_fraction']:.0%}" and 50 < int(held.group(1)[:-1]) < 75
    sharded = registry.resolve("sharded")
    assert losses(Path(sharded.manifest()["run_dir"])) == pytest.approx(losses(one.run_dir), rel=1e-5)
    assert close(weights("one@v1"), weights("sharded@v1"))

    three = run(config("three", tiny_base, facts_file, gradient_accumulation=3))
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


def test_the_shipped_accelerate_fsdp_config(lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path) -> None:
    """examples/accelerate/fsdp.yaml under `accelerate launch` (2 CPU processes here instead of its 4
    GPUs): accelerate says FSDP, the base is sharded, and the result equals one process."""
    import yaml

    shipped = yaml.safe_load((Path(__file__).parent.parent / "examples/accelerate/fsdp.yaml").read_text())
    assert shipped["distributed_type"] == "FSDP"
    cpu = {**shipped, "num_processes": 2, "use_cpu": True}
    r = accelerate_launch(cpu, overrides("acc", tiny_base, facts_file), lp_home, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes (FSDP: each holds" in " ".join(r.stderr.split())
    one = run(config("one", tiny_base, facts_file))
    assert one.adapter is not None and close(weights("one@v1"), weights("acc@v1"))


EXAMPLES = Path(__file__).parent.parent / "examples"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed (pip install 'loraplex[deepspeed]')"
)


@needs_deepspeed
@pytest.mark.parametrize("config_file", ["ds_z2_config.json", "ds_z3_config.json", "ds_z3_offload_config.json"])
def test_deepspeed_zero_matches_one_process(lp_home: Path, tiny_base: Path, facts_file: Path, config_file: str) -> None:
    """The shipped ZeRO-2, ZeRO-3 and ZeRO-3-offload configs (LLaMA-Factory's, "auto" fields and all) over 2 gloo
    processes: the same losses and weights as one process, with 3 micro-batches per step (one
    process runs a zero-weighted forward to keep ZeRO in lockstep). ZeRO-3 partitions the base."""
    one = run(config("one", tiny_base, facts_file, gradient_accumulation=3))
    ds = str(EXAMPLES / "deepspeed" / config_file)
    args = [*overrides("zero", tiny_base, facts_file), "--set", "train.gradient_accumulation=3"]
    r = torchrun([*args, "--set", f"train.deepspeed={ds}"], lp_home)
    assert r.returncode == 0, r.stderr[-3000:]
    said = " ".join(r.stderr.split())
    stage = 3 if "z3" in config_file else 2
    held = re.search(rf"x 2 processes \(DeepSpeed ZeRO-{stage}: each holds (\d+%) of the weights\)", said)
    assert held, r.stderr[-2000:]
    planned = make_plan(str(tiny_base), rank=load_config().lora.rank, gpus=2, shard=f"zero{stage}")
    assert held.group(1) == f"{planned['held_fraction']:.0%}" == ("50%" if stage == 3 else "100%")
    assert registry.list_names() == [("one", [1]), ("zero", [1])]  # registered once
    ran = registry.resolve("zero")
    assert losses(Path(ran.manifest()["run_dir"])) == pytest.approx(losses(one.run_dir), rel=1e-5)
    # ZeRO reduce-scatters the gradients (another summation order), and Adam turns rounding in
    # near-zero gradients into full-size steps: equal to a few 1e-5 here, where FSDP is within 1e-5
    assert close(weights("one@v1"), weights("zero@v1"), tol=1e-4)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoints_resume_on_any_process_count(
    lp_home: Path, tiny_base: Path, facts_file: Path, stage: int
) -> None:
    """Interrupted on one plain process at step 2; resumed under ZeRO-2/3 on two processes, which
    checkpoint every 4 steps until Ctrl-C (SIGINT to the process group, as a terminal sends it);
    a plain single process finishes from the last checkpoint. The result equals a run that was
    never interrupted: weights and AdamW moments go in and out of DeepSpeed's partitions whole."""
    settings = {**SETTINGS, "max_steps": 80, "save_steps": 4}
    cfg = config("hop", tiny_base, facts_file, **settings)

    def stop(step: int, loss: float, model: object) -> None:
        if step == 2:
            raise KeyboardInterrupt

    assert run(cfg, on_step=stop).interrupted
    run_dir = next((lp_home / "runs").glob("hop-*"))
    ds = str(EXAMPLES / "deepspeed" / f"ds_z{stage}_config.json")
    sets = [f"train.{k}={v}" for k, v in settings.items()] + ["data.eval_ratio=0", f"train.deepspeed={ds}"]
    sets.append("retrieval.enabled=false")  # the same run id as `cfg`
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "loraplex.cli", "train"]
    cmd += ["--name", "hop", "--base", str(tiny_base), "--data", str(facts_file)]
    env = {**os.environ, "LORAPLEX_HOME": str(lp_home), "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        [*cmd, *[a for s in sets for a in ("--set", s)]],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as leg:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step-0000008" / "state.json").exists():
            if leg.poll() is not None or time.time() > deadline:
                leg.kill()
                pytest.fail(f"the ZeRO leg ended before its step-8 checkpoint:\n{leg.communicate()[1][-3000:]}")
            time.sleep(0.02)
        os.killpg(leg.pid, signal.SIGINT)
        _, err = leg.communicate(timeout=120)
    said = " ".join(err.split())
    assert "(2/80 steps done)" in said and f"DeepSpeed ZeRO-{stage}: each holds" in said, err[-2000:]
    assert registry.list_names() == []  # interrupted: nothing registered
    last = sf.latest_checkpoint(run_dir / "checkpoints")
    assert last is not None and 8 <= int(last.name.removeprefix("step-")) < 80
    finished = run(cfg)
    assert finished.adapter is not None and finished.steps == 80
    run(config("straight", tiny_base, facts_file, **settings))
    assert close(weights("hop@v1"), weights("straight@v1"), tol=1e-4)


@needs_deepspeed
def test_the_shipped_accelerate_deepspeed_config(
    lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path
) -> None:
    """examples/accelerate/deepspeed_zero3.yaml under `accelerate launch` (2 CPU processes instead of
    its 4 GPUs; accelerate's DeepSpeed launcher needs no GPU): loraplex reads the stage from the
    environment accelerate sets, partitions the base, and the result equals one process."""
    import yaml

    shipped = yaml.safe_load((EXAMPLES / "accelerate" / "deepspeed_zero3.yaml").read_text())
    assert shipped["distributed_type"] == "DEEPSPEED" and shipped["deepspeed_config"]["zero_stage"] == 3
    r = accelerate_launch({**shipped, "num_processes": 2}, overrides("acc", tiny_base, facts_file), lp_home, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes (DeepSpeed ZeRO-3: each holds 50% of the weights)" in " ".join(r.stderr.split())
    one = run(config("one", tiny_base, facts_file))
    assert one.adapter is not None and close(weights("one@v1"), weights("acc@v1"), tol=1e-4)


@needs_deepspeed
def test_deepspeed_config_errors_name_the_field(
    lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DeepSpeed config is user input: what loraplex decides itself is refused, naming the file and
    the field. Through torchrun once (every process stops before training, nothing registered, no
    traceback), then each rule directly."""
    from loraplex.errors import UserError
    from loraplex.train import zero

    f = tmp_path / "optimizer.json"
    f.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    r = torchrun([*overrides("bad", tiny_base, facts_file), "--set", f"train.deepspeed={f}"], lp_home)
    said = " ".join(r.stderr.split())
    assert r.returncode != 0 and not re.search(r"\[rank\d\]: Traceback", r.stderr), r.stderr[-2000:]
    assert "field 'optimizer': loraplex trains with its own AdamW" in said and "training bad" not in said
    assert registry.list_names() == []

    sizes = {"micro_batch": 1, "micro_per_process": 2, "world_size": 2, "max_grad_norm": 1.0}
    cases = {
        "bf16.json": ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}, "field 'bf16.enabled'"),
        "batch.json": (
            {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}},
            "field 'train_micro_batch_size_per_gpu' is 8, but the train config makes it 1",
        ),
        "stage.json": ({"zero_optimization": {"stage": 0}}, "'zero_optimization.stage' must be 1, 2 or 3, not 0"),
        "broken.json": ('{\n  "zero_optimization": {"stage": 2,}\n}', "broken.json:2: invalid JSON"),
    }
    for name, (content, message) in cases.items():
        f = tmp_path / name
        f.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(UserError) as e:
            zero.prepare(*(zero.requested(str(f)) or ({}, "")), **sizes)
        assert message in str(e.value) and name in str(e.value), (name, str(e.value))
    with pytest.raises(UserError, match="config file not found"):
        zero.requested(str(tmp_path / "missing.json"))

    # accelerate's DeepSpeed fields (no config file) and LLaMA-Factory's "auto" values
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    asked = zero.requested(None)
    assert asked == (
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
        "accelerate's DeepSpeed config",
    )
    shipped = zero.requested(str(EXAMPLES / "deepspeed" / "ds_z3_config.json"))
    assert shipped is not None
    ready = zero.prepare(*shipped, **sizes)
    assert ready["train_batch_size"] == 4 and ready["gradient_clipping"] == 1.0 and "bf16" not in ready
    assert ready["zero_optimization"]["reduce_bucket_size"] == "auto"  # filled from the model in zero.engine
