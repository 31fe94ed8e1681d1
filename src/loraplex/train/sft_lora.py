"""The LoRA SFT recipe on one process: data -> tokens -> PEFT LoRA model -> training loop -> registered adapter.

The file owns the whole loop and reads top to bottom: setup, data, model, run directory and resume,
train (micro-steps with gradient accumulation, clip, step, log, eval, checkpoint), then register
the result in the adapter store. The same run under torchrun / accelerate (several processes,
optionally sharded by FSDP or DeepSpeed) is sft_lora_distributed.py, a copy of this loop with the
collectives in it: torchtune's rule, a copied recipe beats one loop with a branch per launcher.

Why it is faster than a stock `transformers.Trainer` run of the same config (bench/train_throughput.py):
  * packing: rows are filled with whole examples instead of padded to the longest in the batch;
  * the output head runs only on labelled positions, and bf16 base weights where bf16 is faster
    (train/parts.py: loss_sum, build_model);
  * on a CPU the thread count is measured while training (threads.Tuner): all cores stall when
    another process takes one.

Checkpoints are safetensors + JSON only (never pickles) and hold everything needed to continue
bit-for-bit: LoRA weights, AdamW moments, scheduler position, RNG state, step and best eval loss.
Re-running the same command finds the run directory by its config hash and resumes.

This module does not parse files or render chat templates (see data/), does not know how the
store lays out versions (see adapters/registry.py), and does not start or join other processes.
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex import threads
from loraplex.adapters import registry
from loraplex.config import TrainConfig
from loraplex.errors import UserError
from loraplex.models.device import peak_memory, pick_device, pick_precision
from loraplex.models.load import eos_token_ids, load_tokenizer, resolve_base
from loraplex.train import distributed, zero
from loraplex.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from loraplex.train.data import make_batch, micro_batches, prepare, run_dir_of
from loraplex.train.gen_eval import generation_eval
from loraplex.train.parts import (
    EarlyStop,
    RunLog,
    autocast,
    bound_onednn_cache,
    build_model,
    compile_cache,
    eval_loss,
    labelled,
    loss_sum,
    lr_at,
    packed_attention,
    progress_bar,
    quantization_config,
    register,
    run_facts,
    schedule,
    summary,
    write_run_config,
)


@dataclass
class TrainResult:
    adapter: registry.AdapterRef | None  # None when interrupted
    run_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    interrupted: bool = False


def run(
    cfg: TrainConfig,
    resume: str = "auto",
    console: Any = None,
    on_step: Callable[[int, float, Any], None] | None = None,
) -> TrainResult:
    """Train and register `cfg.name@vN`. `resume`: auto (continue a matching run), always, never.

    `on_step(step, loss, model)` is called after every optimizer step (benchmarks snapshot weights
    there; raising KeyboardInterrupt from it behaves exactly like Ctrl-C).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    t_start = time.time()
    if not cfg.data.path:
        raise UserError("no training data: pass --data FILE or set data.path in the config")
    if distributed.launched():
        raise UserError(
            "this process was started by torchrun / accelerate launch: `loraplex train` runs the distributed "
            "recipe there (loraplex.train.sft_lora_distributed.run)"
        )

    # ---- setup: device, precision, base
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    tc = cfg.train
    device = pick_device(tc.device)
    if zero.requested(tc.deepspeed) is not None:
        console.print("[yellow]warning:[/] DeepSpeed partitions over several processes; one process trains without it")
    dtype = pick_precision(tc.precision, device.split(":")[0])
    bound_onednn_cache(device, dtype)  # before the first matmul (parts.py)
    quantization = quantization_config(cfg, device, dtype)  # before any work: QLoRA's errors come first
    base = resolve_base(cfg.base)
    tok = load_tokenizer(base)

    # ---- data: records -> split -> paraphrases -> retrieval -> tokens (train/data.py)
    data = prepare(cfg, tok, base, distributed.World(), console)
    train_ex, eval_ex, max_len, pad_id = data.train_ex, data.eval_ex, cfg.data.max_seq_length, tok.pad_token_id

    # ---- model and optimizer
    model = build_model(cfg, base, device, dtype, quantization, load_on=device)
    trainable, total_params = model.get_nb_trainable_parameters()
    if tc.compile:
        # In place (nn.Module.compile): parameter names, checkpoints and the saved adapter are unchanged.
        # dynamic=True: packed and padded batches change length from step to step.
        compile_cache()  # per CPU and instruction set (parts.py)
        model.get_base_model().get_decoder().compile(dynamic=True)
    # the prompt tokens a packed row's examples have in common, once (train/attention.py reads that layout)
    share_prefix = cfg.data.packing and packed_attention(model.get_base_model())
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates all LoRA tensors in one pass (hundreds of small tensors otherwise).
    opt = torch.optim.AdamW(
        params,
        lr=tc.learning_rate,
        weight_decay=tc.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=device.split(":")[0] in ("cpu", "cuda"),
    )
    steps_per_epoch, total_steps, warmup = schedule(cfg, len(train_ex))

    # ---- run directory and resume
    run_dir = run_dir_of(cfg, data.sha256, base)
    ckpt_root = run_dir / "checkpoints"
    start_step, stopper = 0, EarlyStop(tc.early_stopping_patience)
    ckpt = latest_checkpoint(ckpt_root) if resume != "never" else None
    if resume == "always" and ckpt is None:
        console.print(f"[yellow]--resume:[/] no checkpoint in {run_dir}; starting from step 0")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        start_step, stopper.best, stopper.bad = state["step"], state["best_eval"], state["bad_evals"]
        console.print(f"resuming {cfg.name} from {ckpt.name} ({start_step}/{total_steps} steps done)")
    elif run_dir.exists() and resume == "never":
        shutil.rmtree(run_dir)
    write_run_config(run_dir, cfg, data)
    log = RunLog(run_dir)
    cast = autocast(device, dtype)
    gen_convs = data.served_eval[: tc.gen_eval_examples] if tc.gen_eval_steps else []
    if tc.gen_eval_steps and not gen_convs:
        console.print("[yellow]warning:[/] train.gen_eval_steps is set but there is no eval data; skipped")
    eos_ids = eos_token_ids(tok, model.generation_config.eos_token_id)
    console.print(
        f"training [bold]{cfg.name}[/] on {base.id}: {len(train_ex)} examples ({data.stats.label_tokens} answer "
        f"tokens) {'packed' if cfg.data.packing else 'padded'}, {total_steps} steps, "
        f"{device} {str(dtype).removeprefix('torch.')}, "
        f"trainable {trainable:,} / {total_params:,} params ({100 * trainable / total_params:.2f}%)"
    )

    # ---- train
    model.train()
    step = start_step
    interrupted = stop_early = False
    train_loss: float | None = None
    last_eval: float | None = None
    recent: list[float] = []
    tokens_seen = 0
    t_loop = time.time()
    # CPU threads: a fixed count when one is asked for, else measured (threads.py: all cores stall
    # when another process takes one; bench/contention.py).
    # Not with train.compile: inductor's code depends on the thread count, so every count the
    # tuner tries would compile the decoder again (a recompile per probe, each tens of seconds).
    fixed = tc.threads or threads.budget() or (threads.cores() if tc.compile else None)
    tuner = threads.Tuner(threads.cores()) if device == "cpu" and not fixed else None
    if device == "cpu" and fixed:
        torch.set_num_threads(fixed)
    prev_sigint = signal.getsignal(signal.SIGINT)
    if prev_sigint is signal.SIG_IGN:  # background jobs ignore SIGINT; Ctrl-C must still checkpoint
        signal.signal(signal.SIGINT, signal.default_int_handler)
    progress = progress_bar(console)
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
                collated = [make_batch(b, pad_id, cfg.data.packing, max_len, share_prefix) for b in group]
                # Normalise by the answer tokens of the whole accumulated step, so every token
                # weighs the same however rows fall into micro-batches (packed == unpacked).
                n_total = sum(labelled(c) for c in collated)
                step_tokens = sum(len(ex.input_ids) for b in group for ex in b)  # real tokens, no padding
                tokens_seen += step_tokens
                step_loss = 0.0
                for c in collated:
                    with cast():
                        s, _ = loss_sum(model, {k: v.to(device) for k, v in c.items()})
                    (s * (1.0 / n_total)).backward()
                    step_loss += float(s.detach())
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if tuner is not None:
                    tuner.observe(step_tokens, time.perf_counter() - t_step)
                step += 1
                loss_value = step_loss / max(n_total, 1)
                recent = (recent + [loss_value])[-steps_per_epoch:]
                train_loss = sum(recent) / len(recent)
                tps = tokens_seen / max(time.time() - t_loop, 1e-9)
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

                # evaluation and early stopping: the watched figure is lower-is-better
                watched: float | None = None
                at_epoch_end = step % steps_per_epoch == 0
                if eval_ex and ((tc.eval_steps and step % tc.eval_steps == 0) or (not tc.eval_steps and at_epoch_end)):
                    last_eval = eval_loss(model, eval_ex, cfg, pad_id, device, cast)
                    log({"step": step, "eval_loss": last_eval})
                    if tc.early_stopping_metric == "eval_loss":
                        watched = last_eval
                if gen_convs and step % tc.gen_eval_steps == 0:
                    gen = generation_eval(model, tok, gen_convs, tc.gen_eval_max_tokens, eos_ids, cast)
                    log({"step": step, **gen})
                    progress.console.print(
                        f"step {step}: generation eval on {len(gen_convs)} questions: "
                        + ", ".join(f"{k.removeprefix('gen_')} {v:.3f}" for k, v in gen.items())
                    )
                    if tc.early_stopping_metric == "gen_score":
                        watched = -gen["gen_score"]
                if watched is not None and stopper.update(watched):
                    stop_early = True
                    what = "eval loss" if tc.early_stopping_metric == "eval_loss" else "generation score"
                    console.print(
                        f"early stopping at step {step}: {what} has not improved "
                        f"for {stopper.bad} evaluations (best {abs(stopper.best):.4f})"
                    )

                if step % tc.save_steps == 0 and step < total_steps:
                    save_checkpoint(ckpt_root, step, model, opt, stopper.state(), tc.save_total_limit)
                if on_step is not None:
                    on_step(step, loss_value, model)
    except KeyboardInterrupt:
        interrupted = True
        path = save_checkpoint(ckpt_root, step, model, opt, stopper.state(), tc.save_total_limit)
        console.print(
            f"\n[yellow]interrupted[/] at step {step}/{total_steps}; checkpoint saved to {path}.\n"
            "Run the same command again to resume."
        )
    finally:
        signal.signal(signal.SIGINT, prev_sigint)
        log.close()
    if interrupted:
        return TrainResult(None, run_dir, step, train_loss, last_eval, interrupted=True)

    # ---- register
    if eval_ex and last_eval is None:
        last_eval = eval_loss(model, eval_ex, cfg, pad_id, device, cast)
    loop_time = time.time() - t_loop
    threads_used = threads.summary(tuner, torch.get_num_threads()) if device == "cpu" else None
    peak = peak_memory(device)
    facts = {
        **run_facts(cfg, data, run_dir),
        "train_loss": train_loss,
        "eval_loss": last_eval,
        "steps": step,
        "trainable_params": trainable,
        "total_params": total_params,
        "wall_time_s": round(time.time() - t_start, 1),
        "tokens_per_s": round(tokens_seen / max(loop_time, 1e-9), 1),
        "device": device,
        "threads": threads_used,
        "precision": str(dtype).removeprefix("torch."),
        "peak_memory": {"bytes": peak[0], "kind": peak[1]},
    }
    ref = register(cfg, model, None, base, run_dir, facts, data.pairs)
    shutil.rmtree(ckpt_root, ignore_errors=True)  # the run is complete: its adapter is in the store
    console.print(summary(facts, ref))
    return TrainResult(ref, run_dir, step, train_loss, last_eval)
