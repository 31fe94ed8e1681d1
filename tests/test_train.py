"""The recipe on a tiny random model: loss falls, resume is exact, the store only holds whole adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraplex.adapters import registry
from loraplex.cli import app
from loraplex.config import load_config
from loraplex.errors import UserError
from loraplex.files import sha256_file
from loraplex.train import cross_entropy
from loraplex.train.parts import INDUCTOR_CACHE_ENV, ONEDNN_CACHE, ONEDNN_CACHE_ENV, compile_cache
from loraplex.train.sft_lora import run

from .conftest import write_jsonl


def tiny_cfg(tiny_base: Path, data: Path, **train: object):
    return load_config(
        extra={
            "name": "tiny",
            "base": str(tiny_base),
            "data": {"path": str(data)},
            "train": {"batch_size": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32", **train},
        }
    )


def test_loss_falls_and_adapter_is_registered(lp_home: Path, tiny_base: Path, facts_file: Path) -> None:
    res = run(tiny_cfg(tiny_base, facts_file, max_steps=30, save_steps=10))
    losses = [
        json.loads(line)["loss"]
        for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert res.adapter is not None and res.adapter.id == "tiny@v1"
    m = res.adapter.manifest()
    for key in (
        "name",
        "version",
        "base_model",
        "config",
        "data",
        "train_loss",
        "trainable_params",
        "wall_time_s",
        "created_at",
        "description",
        "owner",
        "tags",
        "files",
    ):
        assert key in m
    assert m["data"]["sha256"] == sha256_file(facts_file)
    assert m["data"]["records"] == 4 and m["base_model"]["fingerprint"]["vocab_size"] > 0
    assert (res.adapter.path / "adapter_model.safetensors").is_file()
    assert list((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    registry.verify(res.adapter)
    # The next training of the same name is v2.
    assert run(tiny_cfg(tiny_base, facts_file, max_steps=2)).adapter.id == "tiny@v2"  # type: ignore[union-attr]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    # 7 rows a chunk over 23 positions: three full chunks and a short one
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 7 * 4 * 997)
    torch.manual_seed(0)
    head = torch.nn.Linear(48, 997, bias=False).requires_grad_(False).to(dtype)
    hidden = torch.randn(23, 48, dtype=dtype)
    targets = torch.randint(0, 997, (23,))
    assert cross_entropy.fused_ok(head)
    results = {}
    for name, fn in (("chunked", cross_entropy.head_cross_entropy), ("reference", cross_entropy.reference)):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = fn(head, h, targets)
        (loss * 0.37).backward()  # the recipe scales by 1 / answer tokens before backward
        assert h.grad is not None
        results[name] = (loss.detach(), h.grad)
    (loss, grad), (ref_loss, ref_grad) = results["chunked"], results["reference"]
    assert loss.dtype == ref_loss.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    else:  # the same bf16 products; the scale applied after the bf16 rounding instead of before it
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-4)
    # a micro-batch without labelled positions (its answers truncated away): zero loss, zero gradient
    empty = hidden[:0].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        nothing = cross_entropy.head_cross_entropy(head, empty, targets[:0])
    nothing.backward()
    assert float(nothing.detach()) == 0.0 and empty.grad is not None and empty.grad.shape == (0, 48)
    # without gradients (eval loss): the same loss, and no gradient kept
    with torch.no_grad():
        assert float(cross_entropy.head_cross_entropy(head, hidden, targets)) == pytest.approx(float(loss), rel=1e-6)
    # a head that is trained (a LoRA or modules_to_save on it) goes the plain way, and gets its gradient
    trained = torch.nn.Linear(48, 997, bias=False)
    assert not cross_entropy.fused_ok(trained)
    cross_entropy.head_cross_entropy(trained, hidden.float(), targets).backward()
    assert trained.weight.grad is not None and trained.weight.grad.abs().sum() > 0


def test_training_bounds_onednn_cache_unless_the_user_set_it(
    lp_home: Path, tiny_base: Path, facts_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 CPU run bounds oneDNN's primitive cache (packed rows make new matmul shapes every
    step: parts.bound_onednn_cache); an fp32 run and a value the user set are left as they are."""
    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    run(tiny_cfg(tiny_base, facts_file, max_steps=1))  # fp32
    assert ONEDNN_CACHE_ENV not in os.environ
    run(tiny_cfg(tiny_base, facts_file, max_steps=1, precision="bf16"))
    assert os.environ[ONEDNN_CACHE_ENV] == str(ONEDNN_CACHE)
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "512")
    run(tiny_cfg(tiny_base, facts_file, max_steps=1, precision="bf16"))
    assert os.environ[ONEDNN_CACHE_ENV] == "512"


def test_interrupt_and_resume_match_an_uninterrupted_run(lp_home: Path, tiny_base: Path, facts_file: Path) -> None:
    full = run(tiny_cfg(tiny_base, facts_file, max_steps=12, save_steps=100, seed=3))
    assert full.adapter is not None
    expected = load_file(str(full.adapter.path / "adapter_model.safetensors"))

    def ctrl_c_at_5(step: int, loss: float, model: object) -> None:
        if step == 5:
            raise KeyboardInterrupt  # exactly what Ctrl-C raises

    cfg = tiny_cfg(tiny_base, facts_file, max_steps=12, save_steps=100, seed=3)
    cfg.name = "resumed"
    first = run(cfg, on_step=ctrl_c_at_5)
    assert first.interrupted and first.adapter is None and first.steps == 5
    assert registry.versions("resumed") == []  # nothing half-written in the store
    second = run(cfg)  # re-running the same command resumes
    assert second.adapter is not None and second.steps == 12
    got = load_file(str(second.adapter.path / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k


def test_the_seed_alone_decides_the_adapter_whatever_the_process_did_before(
    lp_home: Path, tiny_base: Path, facts_file: Path
) -> None:
    """Two identical runs in one process, with draws from torch's global generator between them (as
    a process's first FAQ index makes when it builds its sentence encoder): the same adapter, bit
    for bit. Before, the LoRA weights started from wherever the generator was, so a second run in a
    test worker or a script trained another adapter than the first and than `loraplex train`."""
    first = run(tiny_cfg(tiny_base, facts_file, max_steps=6, threads=1))
    assert first.adapter is not None
    torch.randn(4096)
    cfg = tiny_cfg(tiny_base, facts_file, max_steps=6, threads=1)
    cfg.name = "again"
    second = run(cfg)
    assert second.adapter is not None
    a = load_file(str(first.adapter.path / "adapter_model.safetensors"))
    b = load_file(str(second.adapter.path / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_records_refuse_training_and_write_nothing(lp_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": " "}]
    )
    with pytest.raises(UserError, match=r"bad.jsonl:2 \[output\]: field 'output' is empty"):
        run(tiny_cfg(tiny_base, data, max_steps=2))
    assert registry.list_names() == []
    ok = run(
        tiny_cfg(tiny_base, data, max_steps=2).model_copy(
            update={"data": load_config(extra={"data": {"path": str(data), "skip_invalid": True}}).data}
        )
    )
    assert ok.adapter is not None and ok.adapter.manifest()["data"]["records"] == 1


def test_missing_base_is_a_clear_error(lp_home: Path, facts_file: Path, tmp_path: Path) -> None:
    cfg = load_config(extra={"name": "x", "base": str(tmp_path / "nope"), "data": {"path": str(facts_file)}})
    with pytest.raises(UserError, match="never downloads"):
        run(cfg)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    cfg = load_config(extra={"name": "x", "base": str(pickled), "data": {"path": str(facts_file)}})
    with pytest.raises(UserError, match="only safetensors"):
        run(cfg)


def test_each_launcher_has_its_recipe(
    lp_home: Path, tiny_base: Path, facts_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process: sft_lora. Under torchrun (WORLD_SIZE > 1) the one-process recipe refuses and
    names the distributed one, which `loraplex train` picks there (tests/test_distributed.py)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="sft_lora_distributed"):
        run(tiny_cfg(tiny_base, facts_file, max_steps=1))
    assert not (lp_home / "adapters").exists() or registry.versions("tiny") == []
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: one process, the plain recipe
    assert run(tiny_cfg(tiny_base, facts_file, max_steps=1)).adapter is not None


def test_cli_train_shortcut_list_show_and_check(
    lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(facts_file),
            "--name",
            "faq",
            "--base",
            str(tiny_base),
            "--set",
            "train.max_steps=3",
            "--set",
            "train.precision=fp32",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["adapters", "list", "--json"])
    rows = json.loads(r.stdout)
    assert rows[0]["name"] == "faq" and rows[0]["versions"] == ["v1"]
    r = runner.invoke(app, ["adapters", "show", "faq@v1"])
    assert json.loads(r.stdout)["config"]["train"]["max_steps"] == 3
    bad = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"instruction": "call 13812345678", "output": "ok"},
            {"instruction": "call 13812345678", "output": "ok"},
            {"output": "x"},
        ],
    )
    r = runner.invoke(app, ["data", "check", str(bad), "--base", str(tiny_base), "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["records"] == 2 and report["personal_data"] == {"phone": 2}
    assert report["errors"] == [f"{bad}:3 [instruction]: missing field 'instruction'"]
    assert len(report["duplicates"]) == 1


def test_chat_streams_multi_turn_with_the_adapter(lp_home: Path, tiny_base: Path, facts_file: Path) -> None:
    """`loraplex chat` in a real subprocess: two turns, /reset, /exit; the first answer is the one the
    serving engine gives the same prompt (test_engine checks the engine against PEFT)."""
    import os
    import subprocess
    import sys

    from loraplex.engine.local import EngineChat

    run(tiny_cfg(tiny_base, facts_file, max_steps=3))
    env = {**os.environ, "LORAPLEX_HOME": str(lp_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "chat", "--adapter", "tiny", "--max-new-tokens", "8"],
        input="When does the office open?\nAnd on Sunday?\n/reset\n/exit\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "chatting with tiny@v1" in proc.stderr
    answers = [line.split("tiny@v1> ", 1)[1] for line in proc.stdout.splitlines() if "tiny@v1> " in line]
    assert len(answers) == 2
    # trained with retrieval (the default): the chat answers from the passages its own Q&A gives
    from loraplex.assistants import faq, retrieval

    asked = [{"role": "user", "content": "When does the office open?"}]
    prepared = retrieval.prepare(faq.assistant("tiny"), asked, retrieval.Searcher())  # type: ignore[arg-type]
    assert prepared.sources and "[1] faq #" in proc.stderr  # the passages are cited under the answer
    lm = EngineChat(None, "tiny", quantize="auto")  # chat's default, as serve's: int4 on a CPU
    try:
        assert lm.engine.quantize == "int4"
        first = "".join(lm.stream(prepared.messages, max_new_tokens=8, use_adapter=not prepared.base_only))
    finally:
        lm.close()
    assert answers[0] == first


def test_full_disk_during_registration_leaves_no_partial_version(
    lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path
) -> None:
    """A write that fails half-way (here: a file-size limit, as a full disk fails a write) gives a
    clear error and leaves the store without a half-written version."""
    import subprocess
    import sys

    res = run(tiny_cfg(tiny_base, facts_file, max_steps=2))
    assert res.adapter is not None
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from loraplex.adapters import registry\n"
        "from loraplex.errors import UserError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    registry.register('tiny', Path(sys.argv[1]), {'note': 'x'})\n"
        "except UserError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(res.adapter.path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert "cannot write adapter tiny" in proc.stdout
    assert registry.versions("tiny") == [1]
    leftovers = [p.name for p in (registry.store_root() / "tiny").iterdir()]
    assert leftovers == ["v1"]


def test_gradient_checkpointing_trains_the_same(
    lp_home: Path, tiny_base: Path, facts_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recomputing activations in backward changes memory, not the maths: same losses, same weights."""
    import transformers.modeling_utils
    from safetensors.torch import load_file

    plain = run(tiny_cfg(tiny_base, facts_file, max_steps=3, logging_steps=1))
    calls = []
    real = transformers.modeling_utils.checkpoint  # what transformers wraps each layer's forward in

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    cfg = tiny_cfg(tiny_base, facts_file, max_steps=3, logging_steps=1, gradient_checkpointing=True)
    ckpt = run(cfg.model_copy(update={"name": "tiny-gc"}))
    assert calls and set(calls) == {False}  # the layers really were checkpointed, non-reentrant

    def losses(run_dir: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(ckpt.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-5)
    assert plain.adapter is not None and ckpt.adapter is not None
    a = load_file(str(plain.adapter.path / "adapter_model.safetensors"))
    b = load_file(str(ckpt.adapter.path / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-5 for k in a)


_COMPILED_LOSSES = """
import json, sys
from loraplex.config import load_config
from loraplex.train.sft_lora import run
train = {"batch_size": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32", "max_steps": 3,
         "logging_steps": 1, "compile": True}
cfg = load_config(extra={"name": sys.argv[3], "base": sys.argv[1], "data": {"path": sys.argv[2]}, "train": train})
res = run(cfg)
lines = (res.run_dir / "metrics.jsonl").read_text().splitlines()
print(json.dumps([json.loads(x)["loss"] for x in lines if '"loss"' in x]))
"""


@pytest.mark.slow(140)
def test_compile_switch_trains_the_same_and_keeps_a_cache_per_instruction_set(
    lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train.compile` runs the decoder through torch.compile (inductor) and changes nothing else:
    the same losses and weights; the run id ignores it, so a run can resume with it switched on.
    It keeps one thread count: inductor's code depends on it, so each count the thread tuner tried
    would compile the decoder again.

    Then the same run in a fresh process held to AVX2 (LORAPLEX_CPU_ISA), with inductor's default
    cache directory the same as this process's: it gets a cache of its own (parts.compile_cache) and
    trains as the uncompiled run does. Before, the AVX2 run loaded the first run's AVX-512 kernels and
    its losses were NaN. A directory the user sets is kept. (One test, not two: each compile takes
    over a minute on a 2-core AVX2 CPU, and a second run on the CPU's own instructions showed nothing
    the first does not.)"""
    import platform
    import subprocess
    import sys

    import torch

    from loraplex import cpu_isa, threads
    from loraplex.engine import lora_kernel
    from loraplex.models.load import resolve_base
    from loraplex.train.data import run_id

    if platform.machine() not in ("x86_64", "AMD64") or lora_kernel._compiler() is None:
        pytest.skip("the AVX2 hold is x86-64's, and inductor needs a C compiler")
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, "")  # so that teardown removes what the run sets
    monkeypatch.delenv(INDUCTOR_CACHE_ENV)
    plain = run(tiny_cfg(tiny_base, facts_file, max_steps=3, logging_steps=1))
    cfg = tiny_cfg(tiny_base, facts_file, max_steps=3, logging_steps=1, compile=True)
    base = resolve_base(str(tiny_base))
    assert run_id(cfg, "x", base) == run_id(tiny_cfg(tiny_base, facts_file, max_steps=3, logging_steps=1), "x", base)
    env = {k: v for k, v in os.environ.items() if k not in (*cpu_isa.TORCH["avx2"], INDUCTOR_CACHE_ENV)}
    monkeypatch.delenv(threads.ENV, raising=False)  # no thread budget: a plain run would tune the count
    monkeypatch.delenv(threads.OMP_ENV, raising=False)  # torch's variable is a budget too
    # a machine of one core, this worker's share: two threads stall next to the other test process
    # (threads.py); the compiled run's count is still the machine's, not a tuned one
    monkeypatch.setattr(threads, "cores", lambda: 1)
    before = torch.get_num_threads()
    try:
        compiled = run(cfg.model_copy(update={"name": "tiny-compiled"}))
    finally:
        torch.set_num_threads(before)  # this worker's budget, for the tests after this one
    assert compiled.adapter is not None
    assert compiled.adapter.manifest()["threads"]["mode"] == "fixed"
    assert compiled.adapter.manifest()["threads"]["threads"] == threads.cores()

    def losses(run_dir: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    expected = losses(plain.run_dir)
    assert losses(compiled.run_dir) == pytest.approx(expected, rel=1e-4)
    a = load_file(str(plain.adapter.path / "adapter_model.safetensors"))  # type: ignore[union-attr]
    b = load_file(str(compiled.adapter.path / "adapter_model.safetensors"))  # type: ignore[union-attr]
    # Adam's normalised step turns the compiled kernels' rounding (~1e-7) in near-zero gradients into
    # visible weight differences: bound them by a tenth of what 3 steps at lr 1e-2 can move a weight.
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 0.1 * 3 * 1e-2 for k in a)

    # held to AVX2, in a fresh process whose default cache directory is this one's (the same TMPDIR)
    out = subprocess.run(
        [sys.executable, "-c", _COMPILED_LOSSES, str(tiny_base), str(facts_file), "tiny-avx2"],
        env={**env, "LORAPLEX_CPU_ISA": "avx2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == pytest.approx(expected, rel=1e-3), (got, expected)
    assert sorted(d.name.split("-")[0] for d in (lp_home / "inductor").iterdir()) == ["avx2", "native"]
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    assert compile_cache() == tmp_path / "mine"


def test_qlora_needs_cuda_and_merges_into_the_full_precision_base(
    lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path
) -> None:
    """QLoRA on a machine without CUDA stops at once with a message that says what to do; an
    adapter trained with QLoRA merges into the de-quantised full-precision base, never onto 4-bit
    weights: merged W == fp32 W + scale * B @ A, exactly as for any LoRA."""
    from transformers import AutoModelForCausalLM

    from loraplex.export.formats import export
    from loraplex.models.load import load_model, resolve_base

    cfg = tiny_cfg(tiny_base, facts_file, max_steps=2, quantization_bit=4, device="cpu")
    with pytest.raises(UserError, match="QLoRA's quantised base needs a CUDA GPU") as e:
        run(cfg)
    assert "Remove quantization_bit" in str(e.value)
    assert not (lp_home / "runs").exists() or not any((lp_home / "runs").iterdir())  # nothing half-made

    res = run(tiny_cfg(tiny_base, facts_file, max_steps=2))
    assert res.adapter is not None
    # what a QLoRA run records in the manifest: the same adapter files, quantization_bit in the config
    manifest_path = res.adapter.path / registry.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["train"]["quantization_bit"] = 4
    manifest_path.write_text(json.dumps(manifest))
    export([res.adapter.id], "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = load_model(resolve_base(str(tiny_base)))
    lora = load_file(str(res.adapter.path / "adapter_model.safetensors"))
    adapter_cfg = json.loads((res.adapter.path / "adapter_config.json").read_text())
    scale = adapter_cfg["lora_alpha"] / adapter_cfg["r"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = scale * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    want = base.model.layers[0].self_attn.q_proj.weight + delta
    got = merged.model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.float32 and float((got - want).abs().max()) < 1e-6
    assert float(delta.abs().max()) > 1e-4  # the adapter really changed the weight
    # every weight equals PEFT's own merge (the reference export used before it merged by itself)
    from peft import PeftModel

    reference = PeftModel.from_pretrained(base, str(res.adapter.path)).merge_and_unload().state_dict()
    mine = merged.state_dict()
    assert mine.keys() == reference.keys()
    assert max(float((mine[k] - reference[k]).abs().max()) for k in mine) < 1e-6


@pytest.mark.slow(70)
def test_sigkill_at_random_points_then_rerunning_ends_with_the_uninterrupted_adapter(
    lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path
) -> None:
    """`kill -9` (not Ctrl-C: nothing runs on the way out) five times at random points of a run
    that checkpoints every step, so most kills land while a checkpoint is being written; the same
    command, run again, resumes each time and ends with the adapter an uninterrupted run makes."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import yaml

    train = {"batch_size": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32", "threads": 1}
    cfg = {"name": "killed", "base": str(tiny_base), "data": {"path": str(facts_file)}}
    cfg["train"] = {**train, "max_steps": 80, "save_steps": 1}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref = run(load_config(extra={**cfg, "name": "ref", "train": {**cfg["train"], "save_steps": 100}}))
    assert ref.adapter is not None
    expected = load_file(str(ref.adapter.path / "adapter_model.safetensors"))

    cmd = [sys.executable, "-m", "loraplex.cli", "train", str(config)]
    env = {**os.environ, "LORAPLEX_HOME": str(lp_home)}
    ckpts = lp_home / "runs"
    rng = random.Random(0)
    reached = []
    for _ in range(5):
        before = max((p.name for p in ckpts.glob("killed-*/checkpoints/step-*")), default="")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        # wait for this run's first new checkpoint, then kill at a random moment a few steps on
        while time.time() < deadline and proc.poll() is None:
            if max((p.name for p in ckpts.glob("killed-*/checkpoints/step-*")), default="") > before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None, "the run finished before it could be killed: make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = sorted(p.name for p in ckpts.glob("killed-*/checkpoints/step-*") if (p / "state.json").is_file())
        reached.append(done[-1] if done else "none")
    assert len(set(reached)) >= 3, reached  # the kills landed at different points
    assert registry.versions("killed") == []  # nothing half-registered

    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resuming killed from step-" in " ".join((final.stdout + final.stderr).split())
    got = load_file(str(registry.resolve("killed").path / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resumes(
    lp_home: Path, tiny_base: Path, facts_file: Path
) -> None:
    """A checkpoint write that fails half-way (a file-size limit fails a write as a full disk does):
    a clear error naming the checkpoint and the one kept, nothing half-written left, and the next
    run resumes from the kept one and ends with the uninterrupted run's adapter."""
    import subprocess
    import sys

    full = run(tiny_cfg(tiny_base, facts_file, max_steps=12, save_steps=4, seed=5, threads=1))
    assert full.adapter is not None
    expected = load_file(str(full.adapter.path / "adapter_model.safetensors"))

    def ctrl_c_at_5(step: int, loss: float, model: object) -> None:
        if step == 5:
            raise KeyboardInterrupt

    cfg = tiny_cfg(tiny_base, facts_file, max_steps=12, save_steps=4, seed=5, threads=1)
    cfg.name = "diskfull"
    first = run(cfg, on_step=ctrl_c_at_5)
    assert first.interrupted
    ckpts = first.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000004", "step-0000005"]
    limit = (ckpts / "step-0000005" / "trainable.safetensors").stat().st_size // 2
    script = (
        "import resource, signal, sys\n"
        "from loraplex.errors import UserError\n"
        "from loraplex.train.sft_lora import run\n"
        "from tests.test_train import tiny_cfg\n"
        "from pathlib import Path\n"
        f"cfg = tiny_cfg(Path({str(tiny_base)!r}), Path({str(facts_file)!r}), max_steps=12, save_steps=4, seed=5, threads=1)\n"
        "cfg.name = 'diskfull'\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "try:\n"
        "    run(cfg)\n"
        "except UserError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent
    )
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"cannot write checkpoint {ckpts / 'step-0000008'}: " in out and "File too large" in out, out
    assert f"The last whole checkpoint, {ckpts / 'step-0000005'}, is kept" in out, out
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000004", "step-0000005"]  # no .tmp- left
    assert registry.versions("diskfull") == []

    last = run(cfg)  # space again: resumes from step 5
    assert last.adapter is not None and last.steps == 12
    got = load_file(str(last.adapter.path / "adapter_model.safetensors"))
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k
