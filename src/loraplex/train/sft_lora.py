"""The LoRA SFT recipe: data -> tokens -> PEFT LoRA model -> training loop -> registered adapter.

One file owns the whole loop and reads top to bottom: setup, train (micro-steps with gradient
accumulation, clip, step, log, eval, checkpoint), then register the result in the adapter store.

Why it is faster than a stock `transformers.Trainer` run of the same config (bench/train_throughput.py):
  * packing: rows are filled with whole examples instead of padded to the longest in the batch;
  * the output head runs only on positions that carry a label (assistant tokens): on a small
    model with a 49k vocabulary the head is a fifth of the FLOPs and most of the activation memory;
  * bf16 autocast with the frozen base weights stored in bf16 where the CPU/GPU runs bf16 faster,
    so weights are not re-cast on every forward (LoRA weights and optimizer state stay fp32).

Checkpoints are safetensors + JSON only (never pickles) and hold everything needed to continue
bit-for-bit: LoRA weights, AdamW moments, scheduler position, RNG state, step and best eval loss.
Re-running the same command finds the run directory by its config hash and resumes.

This module does not parse files or render chat templates (see data/), and does not know how the
store lays out versions (see adapters/registry.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from loraplex import threads
from loraplex.adapters import registry
from loraplex.assistants import faq
from loraplex.config import TrainConfig
from loraplex.data.tokenize import IGNORE
from loraplex.errors import UserError
from loraplex.models.device import peak_memory, pick_device, pick_precision
from loraplex.models.load import BaseRef, eos_token_ids, load_model, load_tokenizer, resolve_base
from loraplex.train import distributed, zero
from loraplex.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_state
from loraplex.train.data import make_batch, micro_batches, prepare, run_dir_of, write_eval_split
from loraplex.train.gen_eval import generation_eval


@dataclass
class TrainResult:
    adapter: registry.AdapterRef | None  # None when interrupted
    run_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    interrupted: bool = False


# ----------------------------------------------------------------------------- helpers


def quantization_config(cfg: TrainConfig, device: str, dtype: torch.dtype) -> Any:
    """bitsandbytes' config for a QLoRA run (None without `train.quantization_bit`)."""
    tc = cfg.train
    if tc.quantization_bit is None:
        return None
    if device.split(":")[0] != "cuda":
        raise UserError(
            f"train.quantization_bit: {tc.quantization_bit}: QLoRA's quantised base needs a CUDA GPU (bitsandbytes); "
            f"this run is on {device}. Remove quantization_bit to train LoRA on the full-precision base "
            "(`loraplex plan` shows the memory each needs)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("train.quantization_bit needs bitsandbytes: pip install 'loraplex[qlora]'")
    from transformers import BitsAndBytesConfig

    if tc.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=tc.quantization_type,
        bnb_4bit_use_double_quant=tc.double_quantization,
        bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
    )


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    Equivalent to `model(**batch).loss * n`, but the output head runs only on labelled positions.
    """
    inner = model.get_base_model()
    hidden = inner.get_decoder()(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


def lr_at(step: int, total: int, warmup: int, peak: float, kind: str) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run(
    cfg: TrainConfig,
    resume: str = "auto",
    console: Any = None,
    on_step: Callable[[int, float, Any], None] | None = None,
    register: bool = True,
) -> TrainResult:
    """Train and register `cfg.name@vN`. `resume`: auto (continue a matching run), always, never.

    `on_step(step, loss, model)` is called after every optimizer step (benchmarks snapshot weights
    there; raising KeyboardInterrupt from it behaves exactly like Ctrl-C).
    """
    from peft import get_peft_model
    from rich.console import Console

    console = console or Console(stderr=True)
    t_start = time.time()
    if not cfg.data.path:
        raise UserError("no training data: pass --data FILE or set data.path in the config")

    # ---- setup: device, base, data
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    world = distributed.init(device)
    if not world.main:
        console = Console(stderr=True, quiet=True)  # one process reports
    fsdp = distributed.wants_fsdp(cfg.train.fsdp) and world.size > 1
    deepspeed = zero.requested(cfg.train.deepspeed)
    if deepspeed is not None and world.size == 1:
        console.print("[yellow]warning:[/] DeepSpeed partitions over several processes; one process trains without it")
        deepspeed = None
    ds_config = None
    if deepspeed is not None:
        if fsdp:
            raise UserError("train.fsdp and DeepSpeed both shard the run: choose one")
        zero.check_installed()
        ds_config = zero.prepare(
            *deepspeed,
            micro_batch=cfg.train.batch_size,
            micro_per_process=-(-cfg.train.gradient_accumulation // world.size),
            world_size=world.size,
            max_grad_norm=cfg.train.max_grad_norm,
        )
    sharded = fsdp or ds_config is not None
    if world.size > 1 and device == "cuda":
        device = f"cuda:{world.local_rank}"
    dtype = pick_precision(cfg.train.precision, device.split(":")[0])
    quantization = quantization_config(cfg, device, dtype)  # before any work: QLoRA's errors come first
    if not world.main:
        world.barrier()  # rank 0 converts a GGUF base once, the others then read the cache
    base = resolve_base(cfg.base)
    if world.main:
        world.barrier()
    tok = load_tokenizer(base)

    # ---- data: records -> split -> paraphrases -> retrieval -> tokens (train/data.py)
    data = prepare(cfg, tok, base, world, console)
    train_ex, eval_ex, eval_convs, served_eval = data.train_ex, data.eval_ex, data.eval_convs, data.served_eval
    pairs, augmented, stats, max_len = data.pairs, data.augmented, data.stats, cfg.data.max_seq_length
    pad_id = tok.pad_token_id

    # ---- model
    # Eager attention beats SDPA's CPU kernels at these lengths (bench/train_throughput.py profile).
    # Sharded runs load on the CPU: FSDP and ZeRO-3 move each process's share to the GPU, so a base
    # too big for one GPU never has to fit on one. On a GPU the base loads straight in the compute
    # dtype: an fp32 copy first would need twice its memory (32 GB for an 8B base, more than a 24 GB
    # card that trains it in bf16). On the CPU it loads in fp32, so LoRA's initial weights are exact
    # (PEFT rounds a new adapter to its base's dtype before lifting it back to fp32).
    model = load_model(
        base,
        dtype=dtype if quantization is not None or device != "cpu" else torch.float32,
        device="cpu" if sharded and quantization is None else device,
        attn_implementation="eager" if device == "cpu" else "sdpa",
        quantization=quantization,
    )
    # No `prepare_model_for_kbit_training` for QLoRA: it casts every unquantised weight to fp32, and the
    # embeddings and head of a 128k-vocabulary model are then 4 GB instead of 2; autocast computes in
    # the compute dtype and the RMSNorms already compute in fp32. Checkpointing is our own switch below.
    model = get_peft_model(model, cfg.lora.peft())
    if dtype != torch.float32 and quantization is None:
        # Frozen base weights live in the compute dtype, LoRA weights stay fp32 (autocast casts them).
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
        # PEFT casts each LoRA input up to the fp32 adapter dtype and autocast casts it straight
        # back down: two copies of every activation per module and step, for nothing.
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach the LoRA weights without the input
        # embeddings having to require grad (the reentrant kind needs that hack under PEFT).
        inner = model.get_base_model()
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5's name for it
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total_params = model.get_nb_trainable_parameters()
    held = 1.0
    if fsdp:
        distributed.shard(model, device, world.size)  # replaces the parameters: `params` comes after
        held = distributed.local_share(model)
    if cfg.train.compile:
        # In place (nn.Module.compile): parameter names, checkpoints and the saved adapter are unchanged.
        # dynamic=True: packed and padded batches change length from step to step.
        model.get_base_model().get_decoder().compile(dynamic=True)
    params = [p for p in model.parameters() if p.requires_grad]
    tc = cfg.train
    # The fused kernel updates all LoRA tensors in one pass (hundreds of small tensors otherwise).
    opt: Any = torch.optim.AdamW(
        params,
        lr=tc.learning_rate,
        weight_decay=tc.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=device.split(":")[0] in ("cpu", "cuda") and not sharded,  # the fused kernel takes no shards
    )
    per_step = tc.batch_size * tc.gradient_accumulation
    steps_per_epoch = max(1, math.ceil(len(train_ex) / per_step))
    total_steps = tc.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = int(total_steps * tc.warmup_ratio)

    # ---- run directory and resume
    run_dir = run_dir_of(cfg, data.sha256, base)
    ckpt_root = run_dir / "checkpoints"
    start_step, best_eval, bad_evals = 0, float("inf"), 0
    ckpt = latest_checkpoint(ckpt_root) if resume != "never" else None
    if resume == "always" and ckpt is None:
        console.print(f"[yellow]--resume:[/] no checkpoint in {run_dir}; starting from step 0")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, None if ds_config else opt)
        start_step, best_eval, bad_evals = state["step"], state["best_eval"], state["bad_evals"]
        console.print(f"resuming {cfg.name} from {ckpt.name} ({start_step}/{total_steps} steps done)")
    elif run_dir.exists() and resume == "never" and world.main:
        shutil.rmtree(run_dir)
    engine = None  # DeepSpeed's, which then reduces, clips and steps
    if ds_config is not None:
        # after the weights: it partitions what they are
        engine = zero.engine(zero.Forward(model, loss_sum), opt, ds_config, device)
        opt = engine.optimizer
        if ckpt is not None:
            zero.restore_moments(opt, dict(model.named_parameters()), load_file(str(ckpt / "optimizer.safetensors")))
        held = zero.local_share(model)
    world.barrier()  # every process has read the checkpoint before rank 0 writes anything
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, ensure_ascii=False))
        if eval_convs:
            write_eval_split(run_dir / "eval_split.jsonl", eval_convs)

    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(run_dir / "tensorboard")) if world.main else None
    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if world.main else None  # noqa: SIM115

    def log(record: dict[str, Any]) -> None:
        if metrics_file is None or tb is None:
            return
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, int | float):
                tb.add_scalar(k, v, record["step"])

    def autocast() -> Any:
        return torch.autocast(
            device_type=device.split(":")[0] if device != "mps" else "cpu",
            dtype=dtype,
            enabled=dtype != torch.float32,
        )

    def evaluate() -> float | None:
        if not eval_ex:
            return None
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad(), autocast():
            for k in range(0, len(eval_ex), tc.batch_size):
                batch = make_batch(eval_ex[k : k + tc.batch_size], pad_id, cfg.data.packing, max_len)
                s, c = loss_sum(model, {key: v.to(device) for key, v in batch.items()})
                tot, n = tot + float(s), n + c
        model.train()
        return tot / max(n, 1)

    gen_convs = served_eval[: tc.gen_eval_examples] if tc.gen_eval_steps else []
    if tc.gen_eval_steps and not gen_convs:
        console.print("[yellow]warning:[/] train.gen_eval_steps is set but there is no eval data; skipped")
    eos_ids = eos_token_ids(tok, model)

    console.print(
        f"training [bold]{cfg.name}[/] on {base.id}: {len(train_ex)} examples ({stats.label_tokens} answer tokens) "
        f"{'packed' if cfg.data.packing else 'padded'}, {total_steps} steps, "
        f"{device} {str(dtype).removeprefix('torch.')}"
        + (f" x {world.size} processes" if world.size > 1 else "")
        + (f" (FSDP: each holds {held:.0%} of the weights)" if fsdp else "")
        + (f" (DeepSpeed ZeRO-{zero.stage(ds_config)}: each holds {held:.0%} of the weights)" if ds_config else "")
        + ", "
        f"trainable {trainable:,} / {total_params:,} params ({100 * trainable / total_params:.2f}%)"
    )

    # ---- train
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    model.train()
    step = start_step
    interrupted = False
    train_loss: float | None = None
    eval_loss: float | None = None
    recent: list[float] = []
    tokens_seen = 0
    t_loop = time.time()
    stop_early = False
    # CPU threads: a fixed count when one is asked for, else measured (threads.py: all cores stall
    # when another process takes one; bench/contention.py). Not with several processes in lockstep.
    fixed = tc.threads or threads.budget()
    tuner = threads.Tuner(threads.cores()) if device == "cpu" and not fixed and world.size == 1 else None
    if device == "cpu" and fixed:
        torch.set_num_threads(fixed)
    prev_sigint = signal.getsignal(signal.SIGINT)
    if prev_sigint is signal.SIG_IGN:  # background jobs ignore SIGINT; Ctrl-C must still checkpoint
        signal.signal(signal.SIGINT, signal.default_int_handler)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and os.environ.get("LORAPLEX_PROGRESS") != "1",
    )
    try:
        with progress:
            task = progress.add_task(cfg.name, total=total_steps, completed=start_step, loss="-", lr="-", tps="-")
            while step < total_steps and not stop_early:
                epoch, index = divmod(step, steps_per_epoch)
                batches = micro_batches(train_ex, tc.batch_size, tc.seed, epoch)
                group = batches[index * tc.gradient_accumulation : (index + 1) * tc.gradient_accumulation]
                lr = lr_at(step, total_steps, warmup, tc.learning_rate, tc.scheduler)
                for g in opt.param_groups:
                    g["lr"] = lr
                if tuner is not None and tuner.threads != torch.get_num_threads():
                    torch.set_num_threads(tuner.threads)
                t_step = time.perf_counter()
                collated = [make_batch(b, pad_id, cfg.data.packing, max_len) for b in group]
                # Normalise by the answer tokens of the whole accumulated step, so every token
                # weighs the same however rows fall into micro-batches (packed == unpacked).
                n_total = sum(int((c["labels"][:, 1:] != IGNORE).sum()) for c in collated)
                step_tokens = sum(len(ex.input_ids) for b in group for ex in b)  # real tokens, no padding
                tokens_seen += step_tokens
                step_loss = 0.0
                share = [(c, 1.0) for c in collated[world.rank :: world.size]]  # this process's (all, alone)
                if sharded:  # FSDP and ZeRO gather weights in lockstep: the same number of forwards everywhere
                    share += [(collated[0], 0.0)] * (-(-len(collated) // world.size) - len(share))
                # FSDP and DeepSpeed average the gradients they reduce; scaled by N, that average is the sum
                scale = world.size if sharded else 1
                for i, (c, weight) in enumerate(share):
                    c = {k: v.to(device) for k, v in c.items()}
                    with autocast():
                        s, _ = loss_sum(model, c) if engine is None else engine(c)
                    loss = s * (weight * scale / n_total)
                    if engine is None:
                        loss.backward()
                    else:  # the step's last micro-batch is DeepSpeed's boundary: reduce, clip, step, zero
                        engine.set_gradient_accumulation_boundary(i == len(share) - 1)
                        engine.backward(loss, scale_wrt_gas=False)
                        engine.step()
                    step_loss += weight * float(s.detach())
                if engine is None:
                    if not sharded:
                        world.sum_grads(params)
                    torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step_loss = world.sum(step_loss)
                if tuner is not None:
                    tuner.observe(step_tokens, time.perf_counter() - t_step)
                step += 1
                loss_value = step_loss / max(n_total, 1)
                recent = (recent + [loss_value])[-steps_per_epoch:]
                train_loss = sum(recent) / len(recent)
                elapsed = time.time() - t_loop
                tps = tokens_seen / max(elapsed, 1e-9)
                if step % tc.logging_steps == 0 or step == total_steps:
                    log(
                        {
                            "step": step,
                            "epoch": step / steps_per_epoch,
                            "loss": loss_value,
                            "lr": lr,
                            "tokens_per_s": tps,
                            "elapsed_s": time.time() - t_start,
                        }
                    )
                progress.update(task, completed=step, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
                at_epoch_end = step % steps_per_epoch == 0
                watched: float | None = None  # lower is better (the gen score enters negated)
                if eval_ex and ((tc.eval_steps and step % tc.eval_steps == 0) or (not tc.eval_steps and at_epoch_end)):
                    eval_loss = evaluate()
                    assert eval_loss is not None
                    log({"step": step, "eval_loss": eval_loss})
                    if tc.early_stopping_metric == "eval_loss":
                        watched = eval_loss
                if gen_convs and step % tc.gen_eval_steps == 0:
                    gen = generation_eval(model, tok, gen_convs, tc.gen_eval_max_tokens, eos_ids, autocast)
                    log({"step": step, **gen})
                    progress.console.print(
                        f"step {step}: generation eval on {len(gen_convs)} questions: "
                        + ", ".join(f"{k.removeprefix('gen_')} {v:.3f}" for k, v in gen.items())
                    )
                    if tc.early_stopping_metric == "gen_score":
                        watched = -gen["gen_score"]
                if watched is not None:
                    if watched < best_eval - 1e-4:
                        best_eval, bad_evals = watched, 0
                    else:
                        bad_evals += 1
                        stop_early = bool(tc.early_stopping_patience) and bad_evals >= tc.early_stopping_patience
                        if stop_early:
                            what = "eval loss" if tc.early_stopping_metric == "eval_loss" else "generation score"
                            console.print(
                                f"early stopping at step {step}: {what} has not improved "
                                f"for {bad_evals} evaluations (best {abs(best_eval):.4f})"
                            )
                if step % tc.save_steps == 0 and step < total_steps and (world.main or sharded):
                    save_checkpoint(
                        ckpt_root,
                        step,
                        model,
                        opt,
                        {"best_eval": best_eval, "bad_evals": bad_evals},
                        tc.save_total_limit,
                        write=world.main,
                    )
                if on_step is not None:
                    on_step(step, loss_value, model)
    except KeyboardInterrupt:
        interrupted = True
        # every process holds the same state after an optimizer step; rank 0's copy is the one kept
        if not world.main:
            world.close(together=False)
            return TrainResult(None, run_dir, step, train_loss, eval_loss, interrupted=True)
        if sharded:
            # gathering the shards needs every process, and the others may already be gone
            last = latest_checkpoint(ckpt_root)
            console.print(
                f"\n[yellow]interrupted[/] at step {step}/{total_steps}; sharded runs resume from the last "
                f"periodic checkpoint ({last.name if last else 'none yet: train.save_steps'}).\n"
                "Run the same command again to resume."
            )
        else:
            path = save_checkpoint(
                ckpt_root, step, model, opt, {"best_eval": best_eval, "bad_evals": bad_evals}, tc.save_total_limit
            )
            console.print(
                f"\n[yellow]interrupted[/] at step {step}/{total_steps}; checkpoint saved to {path}.\n"
                "Run the same command again to resume."
            )
    finally:
        signal.signal(signal.SIGINT, prev_sigint)
        if metrics_file is not None and tb is not None:
            metrics_file.close()
            tb.close()
    if interrupted:
        world.close(together=False)
        return TrainResult(None, run_dir, step, train_loss, eval_loss, interrupted=True)

    if eval_ex and eval_loss is None:
        eval_loss = evaluate()
    wall = time.time() - t_start
    loop_time = time.time() - t_loop
    threads_used = threads.summary(tuner, torch.get_num_threads()) if device == "cpu" else None
    peak, peak_kind = peak_memory(device)
    ref = None
    gathered = trainable_state(model) if sharded else None  # a collective: before rank 0 goes on alone
    if register and world.main:
        ref = _register(
            cfg,
            model,
            gathered,
            base,
            run_dir,
            {
                "data": {
                    "path": str(Path(cfg.data.path).resolve()),
                    "format": data.format,
                    "sha256": data.sha256,
                    "records": data.records,
                    "eval_records": len(eval_convs),
                    "eval_file": str(run_dir / "eval_split.jsonl") if eval_convs else None,
                    "examples": len(train_ex),
                    "tokens": stats.tokens,
                    "answer_tokens": stats.label_tokens,
                    "truncated": stats.truncated,
                    "redactions": data.redactions,
                },
                "retrieval": {
                    "enabled": bool(pairs),
                    "top_k": cfg.retrieval.top_k,
                    "min_similarity": cfg.retrieval.min_similarity,
                    "passages": len(pairs),
                    **augmented,
                },
                "train_loss": train_loss,
                "eval_loss": eval_loss,
                "steps": step,
                "trainable_params": trainable,
                "total_params": total_params,
                "wall_time_s": round(wall, 1),
                "tokens_per_s": round(tokens_seen / max(loop_time, 1e-9), 1),
                "device": device,
                "threads": threads_used,
                "precision": str(dtype).removeprefix("torch."),
                "peak_memory": {"bytes": peak, "kind": peak_kind},
            },
            pairs,
        )
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the run is complete: its adapter is in the store
    console.print(
        f"[green]done[/] in {wall:.0f}s: {step} steps, train loss {train_loss:.4f}"
        + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "")
        + f", {tokens_seen / max(loop_time, 1e-9):,.0f} tok/s"
        + (f" on {threads_used['text']}" if threads_used else "")
        + f", peak {peak_kind} {peak / 2**30:.2f} GiB"
        + f", trainable {trainable:,} "
        f"({100 * trainable / total_params:.2f}%)" + (f" -> [bold]{ref.id}[/]" if ref else "")
    )
    world.close()
    return TrainResult(ref, run_dir, step, train_loss, eval_loss)


def _register(
    cfg: TrainConfig,
    model: Any,
    gathered: dict[str, torch.Tensor] | None,
    base: BaseRef,
    run_dir: Path,
    facts: dict[str, Any],
    pairs: list[faq.Pair],
) -> registry.AdapterRef:
    out = run_dir / "adapter"
    if out.exists():
        shutil.rmtree(out)
    if pairs:  # registered with the weights: the version answers from the Q&A it was trained on
        out.mkdir(parents=True)
        faq.write(out / faq.FILE, pairs)
    # The saved adapter is fp32 whatever the training precision (it is what the LoRA weights are);
    # under FSDP it is written from the whole tensors gathered from the shards.
    model.save_pretrained(str(out), safe_serialization=True, **({"state_dict": gathered} if gathered else {}))
    adapter_cfg = json.loads((out / registry.CONFIG).read_text())
    adapter_cfg["base_model_name_or_path"] = base.id  # not the cache path, which differs per machine
    (out / registry.CONFIG).write_text(json.dumps(adapter_cfg, indent=2))
    manifest = {
        "base_model": {"id": base.id, "source": base.source, "fingerprint": base.fingerprint},
        "config": cfg.model_dump(mode="json"),
        "description": cfg.description,
        "owner": cfg.owner,
        "tags": cfg.tags,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        **facts,
    }
    return registry.register(cfg.name, out, manifest)
