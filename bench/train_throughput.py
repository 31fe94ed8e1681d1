"""loraplex's training recipe vs. the trainers a user would pick instead, side by side in one run.

    python bench/train_throughput.py [--epochs 16] [--threads 1] [--runs loraplex,trl,trl-padded,trainer,llamafactory]
        [--llamafactory-python /path/to/llamafactory-venv/bin/python] [--seeds 42,1,2]

Every run trains the default base (SmolLM2-135M-Instruct) on the same tokenized examples (same
chat template rendering, loss on the assistant's tokens only), with the same LoRA (r=16, alpha=32,
all linear layers), the same hyperparameters (batch 4, lr 1e-3, cosine, warmup 5%, AdamW, same
epochs, seed), in the same precision (loraplex's pick for this CPU: bf16 frozen weights and
autocast where bf16 matmuls are faster, fp32 elsewhere; LoRA weights fp32 in every run) and the
same thread count (`--threads`, default 1: two OpenMP threads stall when anything else runs). Each
run is its own child process, started the same way, so peak RSS is its own.

  loraplex    `loraplex train` (the recipe in process): per-batch packing into 512-token rows
  trl         TRL SFTTrainer, padding_free=True: the batch's examples flattened into one row with
              position ids (what TRL recommends for speed; transformers masks across examples)
  trl-padded  TRL SFTTrainer, padded per batch (its default collator)
  trainer     PEFT + transformers.Trainer, padded per batch (DataCollatorForSeq2Seq): what the PEFT
              docs lead a user to write
  trainer-onednn64  (not in the default set) `trainer` with oneDNN's primitive cache bounded as
              `loraplex train` bounds it (train/parts.py): how much of the gap is that setting
  llamafactory  LLaMA-Factory (`run_exp`, what `llamafactory-cli train` runs): lora_target all,
              packing off, gradient checkpointing off, padded per batch, in its own virtual
              environment (it pins its own transformers, PEFT and TRL; bench/llamafactory_child.py)

All five step-match: 4 examples a step (each trainer shuffles with its own sampler), so the same
number of steps and, within noise, the same final loss. None packs a whole epoch into one step (TRL `packing=True`,
LLaMA-Factory `neat_packing`): that gives 4x fewer optimizer steps and underfits at this data size.
TRL and LLaMA-Factory get pre-tokenized input_ids + labels (LLaMA-Factory as its `tokenized_path`),
so their loss mask is exactly loraplex's (TRL's own `assistant_only_loss` needs a chat template with
generation markers, which SmolLM2's lacks). LLaMA-Factory is installed in a venv of its own:

    python3 -m venv ~/lf && ~/lf/bin/pip install torch==2.13.0 && ~/lf/bin/pip install --no-deps llamafactory==0.9.5
    ~/lf/bin/pip install "transformers<=5.6" "accelerate<=1.11" "datasets<=4.0" "peft<=0.18.1" "trl<=0.24" \
        "tyro<0.9" "torchdata<=0.11" einops fire omegaconf pandas scipy sentencepiece tiktoken protobuf \
        pyyaml safetensors fastapi uvicorn sse-starlette pydantic matplotlib

(--no-deps: its torchvision / torchaudio requirements would pull a CUDA torch; the child stands an
empty module in for torchaudio, which text SFT never calls.)

Measured per run:
  * real tokens/s: non-padding tokens per second of training;
  * final loss: mean loss of the last epoch's steps (step-matched runs should agree);
  * time to full recall: the LoRA weights are snapshotted at every epoch end (outside the timer);
    afterwards each snapshot answers the training questions greedily, and the first epoch from
    which answers reproduce 100% of the trained answers gives the wall time;
  * training FLOP/s as a fraction of this machine's dense matmul peak in the run's dtype;
  * peak RSS of the run's process;
  * held-out: of the sample's 20 held-out paraphrases (quickstart's heldout file, never trained
    on), how many the final adapter answers with all their key facts: plain SFT's generalisation,
    which is noisy at this size, so `--seeds` repeats every run per seed and prints each seed's
    count with the mean (the speed table is the first seed's).
The CPU model and flags are printed with the table. TRL is installed with `pip install trl`
(the `bench` extra); a run whose package is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loraplex._quiet import quiet

quiet()

from loraplex.config import load_config  # noqa: E402
from loraplex.data.formats import parse_file  # noqa: E402
from loraplex.data.tokenize import IGNORE, encode_all  # noqa: E402
from loraplex.eval.metrics import keyword_recall  # noqa: E402
from loraplex.models.device import pick_precision  # noqa: E402
from loraplex.models.load import eos_token_ids, load_model, load_tokenizer, resolve_base  # noqa: E402
from loraplex.quickstart import HELDOUT_FILE, TRAIN_FILE  # noqa: E402
from loraplex.train.parts import bound_onednn_cache  # noqa: E402
from loraplex.train.sft_lora import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from generalization import cpu  # noqa: E402

BATCH, LR, RANK = 4, 1e-3, 16
RUNS = ["loraplex", "trl", "trl-padded", "trainer", "llamafactory", "trainer-onednn64"]
DEFAULT_RUNS = RUNS[:5]


def matmul_peak(dtype: torch.dtype, m: int = 1024, k: int = 1024, n: int = 1536) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * m * k * n / best


def train_flops(model_cfg: Any, tokens: int, label_tokens: int, trainable: int) -> float:
    """Forward 2N + input-gradient backward 2N per token for the frozen body, the head on labelled
    positions, attention ignored (short rows), and 6 FLOPs per trainable parameter per token for LoRA."""
    h, v, layers = model_cfg.hidden_size, model_cfg.vocab_size, model_cfg.num_hidden_layers
    inter = model_cfg.intermediate_size
    kv = model_cfg.num_key_value_heads * (h // model_cfg.num_attention_heads)
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    return 4 * body * tokens + 4 * h * v * label_tokens + 6 * trainable * tokens


def computed_share(examples: list[Any], epochs: int, seed: int) -> float:
    """The positions loraplex's recipe computes, as a share of the real tokens: on the CPU its packed
    rows hold the prompt tokens a step's examples share once (data/tokenize.py `shared_row`), so its
    FLOP/s counts only those positions, not the work the real tokens would take without sharing."""
    from loraplex.data.tokenize import pack_groups, shared_row
    from loraplex.train.data import PACK_ROW, micro_batches

    real = computed = 0
    for epoch in range(epochs):
        for batch in micro_batches(examples, BATCH, seed, epoch):
            real += sum(len(e.input_ids) for e in batch)
            computed += sum(len(shared_row(g).input_ids) for g in pack_groups(batch, PACK_ROW))
    return computed / real


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def answers(
    eval_model: Any, tok: Any, state: dict[str, torch.Tensor], questions: list[str], eos: list[int]
) -> list[str]:
    """Greedy answers of the adapter in `state` (batched, left padding)."""
    named = dict(eval_model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            named[n].copy_(t)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = eval_model.generate(
            **enc, max_new_tokens=64, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
        )
    return list(tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def recall(
    eval_model: Any, tok: Any, state: dict[str, torch.Tensor], pairs: list[tuple[str, str]], eos: list[int]
) -> float:
    """Fraction of trained questions answered exactly."""
    got = answers(eval_model, tok, state, [q for q, _ in pairs], eos)
    return sum(a.strip() == ref.strip() for a, (_, ref) in zip(got, pairs, strict=True)) / len(pairs)


def heldout(
    eval_model: Any, tok: Any, state: dict[str, torch.Tensor], rows: list[dict[str, Any]], eos: list[int]
) -> int:
    """Held-out paraphrases answered with all their key facts."""
    got = answers(eval_model, tok, state, [r["instruction"] for r in rows], eos)
    return sum(keyword_recall(a, r["keywords"]) == 1.0 for a, r in zip(got, rows, strict=True))


def run_loraplex(data: Path, epochs: int, threads: int, home_tmp: Path, seed: int) -> dict[str, Any]:
    os.environ["LORAPLEX_HOME"] = str(home_tmp)
    cfg = load_config(
        extra={
            "name": "bench",
            "data": {"path": str(data)},
            "retrieval": {"enabled": False},  # the same examples as the baselines: plain SFT
            "lora": {"rank": RANK, "alpha": 2 * RANK},
            "train": {
                "epochs": epochs,
                "batch_size": BATCH,
                "learning_rate": LR,
                "warmup_ratio": 0.05,
                "scheduler": "cosine",
                "save_steps": 10**9,
                "threads": threads,
                "seed": seed,
            },
        }
    )
    clock = Clock()
    steps_per_epoch = math.ceil(len(parse_file(data).conversations) / BATCH)

    def on_step(step: int, loss: float, model: Any) -> None:
        clock.losses.append(loss)
        if step % steps_per_epoch == 0:
            clock.snap(model)

    clock.start()
    res = run(cfg, resume="never", on_step=on_step)
    m = res.adapter.manifest() if res.adapter else {}
    return clock.result(m.get("precision", "?"), steps_per_epoch)


class Clock:
    """Training wall time without the snapshots taken at epoch ends, and the per-step losses."""

    def __init__(self) -> None:
        self.t0 = self.paused = 0.0
        self.snaps: list[tuple[float, dict[str, torch.Tensor]]] = []
        self.losses: list[float] = []

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def snap(self, model: Any) -> None:
        t = time.perf_counter()
        self.snaps.append((t - self.t0 - self.paused, snapshot(model)))
        self.paused += time.perf_counter() - t

    def result(self, precision: str, steps_per_epoch: int) -> dict[str, Any]:
        return {
            "snapshots": self.snaps,
            "precision": precision,
            "steps": len(self.losses),
            "final_loss": sum(self.losses[-steps_per_epoch:]) / max(1, len(self.losses[-steps_per_epoch:])),
        }


def peft_model(base: Any, dtype: torch.dtype) -> Any:
    """The baselines' model: PEFT LoRA on the base, frozen weights in `dtype`, LoRA weights fp32 (as
    loraplex trains), eager attention (loraplex's CPU choice; the same kernels for every run)."""
    from peft import get_peft_model

    model = get_peft_model(
        load_model(base, attn_implementation="eager"), load_config(extra={"lora": {"rank": RANK}}).lora.peft()
    )
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def hf_args(cls: Any, out_dir: Path, epochs: int, n: int, dtype: torch.dtype, seed: int, **extra: Any) -> Any:
    """The same TrainingArguments for Trainer and TRL (SFTConfig subclasses it)."""
    return cls(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=int(math.ceil(n / BATCH) * epochs * 0.05),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=dtype == torch.bfloat16,  # autocast, as loraplex
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def hf_callback(clock: Clock) -> Any:
    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            clock.start()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN003
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

        def on_epoch_end(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN003
            clock.snap(model)

    return Snap()


def run_trainer(
    examples: list[Any], base: Any, epochs: int, dtype: torch.dtype, out_dir: Path, seed: int
) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = load_tokenizer(base)
    dataset = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples
    ]
    clock = Clock()
    Trainer(
        model=peft_model(base, dtype),
        args=hf_args(TrainingArguments, out_dir, epochs, len(examples), dtype, seed),
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE),
        callbacks=[hf_callback(clock)],
    ).train()
    return clock.result(str(dtype).removeprefix("torch."), math.ceil(len(examples) / BATCH))


def run_trl(
    examples: list[Any], base: Any, epochs: int, dtype: torch.dtype, out_dir: Path, seed: int, padding_free: bool
) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    clock = Clock()
    SFTTrainer(
        model=peft_model(base, dtype),
        args=hf_args(
            SFTConfig, out_dir, epochs, len(examples), dtype, seed, padding_free=padding_free, max_length=None
        ),
        train_dataset=dataset,
        processing_class=load_tokenizer(base),
        callbacks=[hf_callback(clock)],
    ).train()
    return clock.result(str(dtype).removeprefix("torch."), math.ceil(len(examples) / BATCH))


def child(name: str, data: Path, epochs: int, threads: int, out: Path, seed: int) -> None:
    """One run, in this process; writes out/NAME.json and the epoch snapshots."""
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dtype = pick_precision("auto", "cpu")
    if name in ("loraplex", "trainer-onednn64"):
        bound_onednn_cache("cpu", dtype)  # as `loraplex train` does, before its first matmul
    base = resolve_base(None)
    if name == "loraplex":
        home_tmp = out / "home"
        home_tmp.mkdir(exist_ok=True)
        if not (home_tmp / "models").exists():
            (home_tmp / "models").symlink_to(base.path.parent)
        r = run_loraplex(data, epochs, threads, home_tmp, seed)
    else:
        examples, _ = encode_all(load_tokenizer(base), parse_file(data).conversations, 1024)
        if name in ("trainer", "trainer-onednn64"):
            r = run_trainer(examples, base, epochs, dtype, out / name, seed)
        else:
            r = run_trl(examples, base, epochs, dtype, out / name, seed, padding_free=name == "trl")
    snaps = r.pop("snapshots")
    save_file({f"{i}/{k}": v for i, (_, s) in enumerate(snaps) for k, v in s.items()}, str(out / f"{name}.safetensors"))
    r["epoch_times"] = [t for t, _ in snaps]
    r["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{name}.json").write_text(json.dumps(r))


def llamafactory_spec(
    examples: list[Any], base: Path, epochs: int, threads: int, dtype: torch.dtype, out: Path, seed: int
) -> Path:
    """What bench/llamafactory_child.py reads: the examples as a tokenized `datasets` directory
    (the same token ids and labels as every other run) and the shared hyperparameters."""
    from datasets import Dataset

    tokenized = out / "tokenized"
    Dataset.from_list(
        [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]
    ).save_to_disk(str(tokenized))
    steps_per_epoch = math.ceil(len(examples) / BATCH)
    spec = {
        "base": str(base),
        "tokenized": str(tokenized),
        "out": str(out),
        "rank": RANK,
        "batch": BATCH,
        "lr": LR,
        "epochs": epochs,
        "warmup_steps": int(steps_per_epoch * epochs * 0.05),
        "steps_per_epoch": steps_per_epoch,
        "threads": threads,
        "seed": seed,
        "precision": str(dtype).removeprefix("torch."),
    }
    path = out / "llamafactory-spec.json"
    path.write_text(json.dumps(spec))
    return path


def load_snapshots(out: Path, name: str, times: list[float]) -> list[tuple[float, dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    flat = load_file(str(out / f"{name}.safetensors"))
    snaps: list[dict[str, torch.Tensor]] = [{} for _ in times]
    for key, v in flat.items():
        i, k = key.split("/", 1)
        snaps[int(i)][k] = v
    return list(zip(times, snaps, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=TRAIN_FILE)
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS))
    ap.add_argument("--seeds", default="42", help="comma-separated: every run once per seed")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--llamafactory-python",
        type=Path,
        default=os.environ.get("LLAMAFACTORY_PYTHON"),
        help="the python of LLaMA-Factory's own venv (see above); without it that run is skipped",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.epochs, args.threads, args.out, args.seed)
        return

    out = Path(tempfile.mkdtemp(prefix="lp-bench-"))
    base = resolve_base(None)  # converts the embedded base once, before any timer starts
    tok = load_tokenizer(base)
    convs = parse_file(args.data).conversations
    examples, stats = encode_all(tok, convs, 1024)
    pairs = [([m["content"] for m in c.messages if m["role"] == "user"][-1], c.messages[-1]["content"]) for c in convs]
    dtype = pick_precision("auto", "cpu")
    print(
        f"data: {len(examples)} examples, {stats.tokens} tokens ({stats.label_tokens} answer tokens); "
        f"{args.epochs} epochs, {str(dtype).removeprefix('torch.')}, {args.threads} thread(s) each",
        flush=True,
    )
    seeds = [int(x) for x in args.seeds.split(",")]
    names = args.runs.split(",")
    for name in names:
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r}; known: {', '.join(RUNS)}")
    results: dict[str, dict[int, dict[str, Any]]] = {}  # run -> seed -> result
    for seed in seeds:
        here = out / f"seed-{seed}"
        here.mkdir()
        for name in names:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LORAPLEX_THREADS": str(args.threads)}
            if name == "llamafactory":
                if not args.llamafactory_python:
                    print("llamafactory: skipped (no --llamafactory-python)", flush=True)
                    continue
                spec = llamafactory_spec(examples, base.path, args.epochs, args.threads, dtype, here, seed)
                cmd = [str(args.llamafactory_python), str(Path(__file__).parent / "llamafactory_child.py"), str(spec)]
            else:
                cmd = [sys.executable, __file__, "--child", name, "--data", str(args.data)]
                cmd += ["--epochs", str(args.epochs), "--threads", str(args.threads), "--out", str(here)]
                cmd += ["--seed", str(seed)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                missing = "No module named 'trl'" in proc.stderr
                why = "skipped (pip install trl)" if missing else "FAILED"
                print(f"{name}: {why}\n{proc.stderr[-2000:]}", flush=True)
                continue
            r = json.loads((here / f"{name}.json").read_text())
            r["snapshots"] = load_snapshots(here, name, r.pop("epoch_times"))
            results.setdefault(name, {})[seed] = r
            r["tokens_per_s"] = stats.tokens * args.epochs / r["snapshots"][-1][0]
            print(
                f"{name} (seed {seed}) done: {r['tokens_per_s']:.0f} real tok/s, final loss {r['final_loss']:.4f}",
                flush=True,
            )

    from peft import get_peft_model

    eval_model = get_peft_model(load_model(base), load_config(extra={"lora": {"rank": RANK}}).lora.peft()).eval()
    eos = eos_token_ids(tok, eval_model.generation_config.eos_token_id)
    torch.set_num_threads(args.threads)  # the peak the runs could reach, at their thread count
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    rows = [json.loads(line) for line in HELDOUT_FILE.read_text(encoding="utf-8").splitlines()]
    held = {
        name: {seed: heldout(eval_model, tok, r["snapshots"][-1][1], rows, eos) for seed, r in by_seed.items()}
        for name, by_seed in results.items()
    }
    table = {}
    for name, by_seed in results.items():
        r = by_seed[min(by_seed, key=seeds.index)]  # the speed table: the first seed's run
        # Walk back from the last epoch while recall stays at 100%: the earliest epoch of that final
        # run is when full recall was reached (early epochs, which ramble to max tokens, are skipped).
        reached = None
        for epoch in range(len(r["snapshots"]), 0, -1):
            t, state = r["snapshots"][epoch - 1]
            if recall(eval_model, tok, state, pairs, eos) < 1.0:
                break
            reached = (epoch, t)
        trainable = sum(t.numel() for t in r["snapshots"][0][1].values())
        computed = computed_share(examples, args.epochs, min(by_seed, key=seeds.index)) if name == "loraplex" else 1.0
        flops = (
            train_flops(eval_model.config, 1, 0, trainable) * r["tokens_per_s"] * computed
            + 4
            * eval_model.config.hidden_size
            * eval_model.config.vocab_size
            * r["tokens_per_s"]
            * stats.label_tokens
            / stats.tokens
        )
        table[name] = {
            "precision": r["precision"],
            "steps": r["steps"],
            "real_tokens_per_s": round(r["tokens_per_s"], 1),
            "final_loss": round(r["final_loss"], 4),
            "full_recall_epoch": reached[0] if reached else None,
            "time_to_full_recall_s": round(reached[1], 1) if reached else None,
            "train_time_s": round(r["snapshots"][-1][0], 1),
            "flops_per_s": flops,
            "peak_fraction": flops / peaks[r["precision"]],
            "computed_share": round(computed, 3),
            "peak_rss_mib": round(r["peak_rss_mib"]),
            "heldout_by_seed": held[name],
            "heldout_mean": sum(held[name].values()) / len(held[name]),
        }
    print(f"\nCPU: {cpu()}")
    print(
        f"matmul peak (1024x1024x1536, {torch.get_num_threads()} threads in this process): fp32 "
        f"{peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s"
    )
    print(
        "\n| run | precision | steps | train s | real tok/s | loraplex is | final loss | full recall at epoch "
        "| time to full recall | loraplex's is | of matmul peak | peak RSS | held-out (of 20) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lp = table.get("loraplex")
    for name, r in table.items():
        speed = f"{lp['real_tokens_per_s'] / r['real_tokens_per_s']:.2f}x" if lp and name != "loraplex" else "-"
        rec = (
            f"{lp['time_to_full_recall_s'] / r['time_to_full_recall_s']:.2f}x"
            if lp and name != "loraplex" and lp["time_to_full_recall_s"] and r["time_to_full_recall_s"]
            else "-"
        )
        print(
            f"| {name} | {r['precision']} | {r['steps']} | {r['train_time_s']} "
            f"| {r['real_tokens_per_s']:.0f} | {speed} "
            f"| {r['final_loss']} | {r['full_recall_epoch']} | {r['time_to_full_recall_s'] or '-'} s | {rec} "
            f"| {100 * r['peak_fraction']:.0f}% | {r['peak_rss_mib']} MiB | {r['heldout_mean']:.1f} |"
        )
    if len(seeds) > 1:
        print("\nheld-out paraphrases answered with all key facts (of 20), and real tokens/s, by seed:")
        print("| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean held-out | mean tok/s |")
        print("|---|" + "---|" * (len(seeds) + 2))
        for name, r in table.items():
            speeds = {seed: run["tokens_per_s"] for seed, run in results[name].items()}
            cells = [f"{r['heldout_by_seed'][s]} / {speeds[s]:.0f}" if s in speeds else "-" for s in seeds]
            mean_speed = sum(speeds.values()) / len(speeds)
            r["tokens_per_s_by_seed"] = speeds
            print(f"| {name} | " + " | ".join(cells) + f" | {r['heldout_mean']:.1f} | {mean_speed:.0f} |")
    if lp and len(table) > 1:
        fastest = max((r for n, r in table.items() if n != "loraplex"), key=lambda r: r["real_tokens_per_s"])
        ratio = lp["real_tokens_per_s"] / fastest["real_tokens_per_s"]
        print(f"\nloraplex / fastest baseline, real tokens/s: {ratio:.2f}x (target >= 2.0x)")
        print(
            f"loraplex computed {100 * lp['computed_share']:.0f}% of the real tokens' positions (prompt "
            "prefixes its rows share); its FLOP/s counts only those"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"cpu": cpu(), "threads": args.threads, "epochs": args.epochs, "seeds": seeds, "table": table}, indent=2
            )
        )


if __name__ == "__main__":
    main()
