"""loraplex's training recipe vs. a plain PEFT + transformers.Trainer script, side by side in one run.

    python bench/train_throughput.py [--epochs 20] [--data FILE] [--json out.json]

Both train the default base (SmolLM2-135M-Instruct) on the same tokenized examples (same chat
template rendering and assistant-only labels), with the same LoRA config (r=16, alpha=32,
all-linear) and hyperparameters (batch 4, lr 1e-3, cosine, warmup 5%, AdamW, same epochs).
The baseline is what the PEFT docs lead a user to write: `Trainer` with defaults (fp32 on CPU),
padding per batch (DataCollatorForSeq2Seq), no packing.

Measured:
  * real tokens/s: non-padding tokens processed per second of training;
  * time to full recall: the LoRA weights are snapshotted at every epoch end (outside the timer);
    afterwards each snapshot answers the training questions greedily, and the first epoch whose
    answers reproduce 100% of the trained answers gives the wall time;
  * training FLOP/s as a fraction of this machine's dense matmul peak in the dtype each run uses.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from loraplex._quiet import quiet

quiet()

from loraplex.config import load_config  # noqa: E402
from loraplex.data.formats import parse_file  # noqa: E402
from loraplex.data.tokenize import IGNORE, encode_all  # noqa: E402
from loraplex.models.load import eos_token_ids, load_model, load_tokenizer, resolve_base  # noqa: E402
from loraplex.quickstart import TRAIN_FILE  # noqa: E402
from loraplex.train.sft_lora import run  # noqa: E402

BATCH, LR, RANK = 4, 1e-3, 16


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


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def recall(
    eval_model: Any, tok: Any, state: dict[str, torch.Tensor], pairs: list[tuple[str, str]], eos: list[int]
) -> float:
    """Fraction of trained questions answered exactly (batched greedy, left padding)."""
    named = dict(eval_model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            named[n].copy_(t)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q, _ in pairs
    ]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = eval_model.generate(
            **enc, max_new_tokens=64, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
        )
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(a.strip() == ref.strip() for a, ref in zip(answers, [a for _, a in pairs], strict=True)) / len(pairs)


def run_loraplex(data: Path, epochs: int, home_tmp: Path) -> dict[str, Any]:
    import os

    os.environ["LORAPLEX_HOME"] = str(home_tmp)
    cfg = load_config(
        extra={
            "name": "bench",
            "data": {"path": str(data)},
            "retrieval": {"enabled": False},  # the same examples as the baseline: plain SFT
            "lora": {"rank": RANK, "alpha": 2 * RANK},
            "train": {
                "epochs": epochs,
                "batch_size": BATCH,
                "learning_rate": LR,
                "warmup_ratio": 0.05,
                "scheduler": "cosine",
                "save_steps": 10**9,
            },
        }
    )
    snaps: list[tuple[float, dict[str, torch.Tensor]]] = []
    paused = [0.0]
    t0 = [time.perf_counter()]
    steps_per_epoch = math.ceil(len(parse_file(data).conversations) / BATCH)

    def on_step(step: int, loss: float, model: Any) -> None:
        if step % steps_per_epoch == 0:
            t = time.perf_counter()
            snaps.append((t - t0[0] - paused[0], snapshot(model)))
            paused[0] += time.perf_counter() - t

    res = run(cfg, resume="never", on_step=on_step)
    m = res.adapter.manifest() if res.adapter else {}
    return {
        "snapshots": snaps,
        "tokens_per_s": m.get("tokens_per_s"),
        "precision": m.get("precision"),
        "trainable": m.get("trainable_params"),
    }


def run_trainer_baseline(examples: list[Any], base: Any, epochs: int, out_dir: Path) -> dict[str, Any]:
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tok = load_tokenizer(base)
    model = get_peft_model(load_model(base), load_config(extra={"lora": {"rank": RANK}}).lora.peft())
    dataset = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples
    ]
    snaps: list[tuple[float, dict[str, torch.Tensor]]] = []
    clock = {"t0": 0.0, "paused": 0.0, "real_tokens": 0}

    class Snap(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            clock["t0"] = time.perf_counter()

        def on_epoch_end(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN003
            t = time.perf_counter()
            snaps.append((t - clock["t0"] - clock["paused"], snapshot(model)))
            clock["paused"] += time.perf_counter() - t

    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=int(math.ceil(len(examples) / BATCH) * epochs * 0.05),
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=42,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE),
        callbacks=[Snap()],
    )
    trainer.train()
    train_time = snaps[-1][0]
    real_tokens = sum(len(e.input_ids) for e in examples) * epochs
    return {"snapshots": snaps, "tokens_per_s": real_tokens / train_time, "precision": "float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--data", type=Path, default=TRAIN_FILE)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)

    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="lp-bench-"))
    # Convert the base once (into the user's cache) before any timer starts.
    base = resolve_base(None)
    tok = load_tokenizer(base)
    convs = parse_file(args.data).conversations
    examples, stats = encode_all(tok, convs, 1024)
    pairs = [([m["content"] for m in c.messages if m["role"] == "user"][-1], c.messages[-1]["content"]) for c in convs]

    home_tmp = tmp / "home"
    home_tmp.mkdir()
    (home_tmp / "models").symlink_to(resolve_base(None).path.parent)
    print(
        f"data: {len(examples)} examples, {stats.tokens} tokens ({stats.label_tokens} answer tokens); "
        f"{args.epochs} epochs each",
        flush=True,
    )
    results = {"baseline": run_trainer_baseline(examples, base, args.epochs, tmp / "trainer")}
    print(f"baseline done: {results['baseline']['tokens_per_s']:.0f} real tok/s", flush=True)
    results["loraplex"] = run_loraplex(args.data, args.epochs, home_tmp)
    print(f"loraplex done: {results['loraplex']['tokens_per_s']:.0f} real tok/s", flush=True)

    from peft import get_peft_model

    eval_model = get_peft_model(load_model(base), load_config(extra={"lora": {"rank": RANK}}).lora.peft()).eval()
    eos = eos_token_ids(tok, eval_model)
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    table = {}
    for name, r in results.items():
        # Walk back from the last epoch while recall stays at 100%: the earliest epoch of that final
        # run is when full recall was reached (early epochs, which ramble to max tokens, are skipped).
        reached = None
        for epoch in range(len(r["snapshots"]), 0, -1):
            t, state = r["snapshots"][epoch - 1]
            if recall(eval_model, tok, state, pairs, eos) < 1.0:
                break
            reached = (epoch, t)
        trainable = sum(t.numel() for t in r["snapshots"][0][1].values())
        flops = (
            train_flops(eval_model.config, 1, 0, trainable) * r["tokens_per_s"]
            + 4
            * eval_model.config.hidden_size
            * eval_model.config.vocab_size
            * r["tokens_per_s"]
            * stats.label_tokens
            / stats.tokens
        )
        table[name] = {
            "real_tokens_per_s": round(r["tokens_per_s"], 1),
            "precision": r["precision"],
            "full_recall_epoch": reached[0] if reached else None,
            "time_to_full_recall_s": round(reached[1], 1) if reached else None,
            "train_time_s": round(r["snapshots"][-1][0], 1),
            "flops_per_s": flops,
            "peak_fraction": flops / peaks[r["precision"]],
        }
    b, lp = table["baseline"], table["loraplex"]
    tps_ratio = lp["real_tokens_per_s"] / b["real_tokens_per_s"]
    recall_ratio = (
        lp["time_to_full_recall_s"] / b["time_to_full_recall_s"]
        if lp["time_to_full_recall_s"] and b["time_to_full_recall_s"]
        else None
    )
    print("\n| run | precision | real tok/s | full recall at epoch | time to full recall | FLOP/s | of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    for name, r in table.items():
        print(
            f"| {name} | {r['precision']} | {r['real_tokens_per_s']:.0f} | {r['full_recall_epoch']} | "
            f"{r['time_to_full_recall_s']} s | {r['flops_per_s'] / 1e9:.0f} G | {100 * r['peak_fraction']:.0f}% |"
        )
    print(f"\nmatmul peak here: fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
    print(f"real tokens/s ratio loraplex/baseline: {tps_ratio:.2f}x (target >= 2.0x)")
    print(
        f"time-to-full-recall ratio loraplex/baseline: "
        f"{'n/a (not reached)' if recall_ratio is None else f'{recall_ratio:.2f}x'} (target <= 0.5x)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"table": table, "tokens_per_s_ratio": tps_ratio, "recall_time_ratio": recall_ratio}, indent=2)
        )


if __name__ == "__main__":
    main()
