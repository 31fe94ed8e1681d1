"""The LoRA SFT recipe on several processes (torchrun / accelerate launch): sft_lora.py's loop with
the collectives in it, data-parallel, optionally with the frozen base sharded by FSDP or DeepSpeed ZeRO.

A copy of the one-process recipe, not a branch inside it (torchtune's rule): the loop below reads
top to bottom for this case, and the one-process loop stays free of ranks and shards. What both
need lives in train/parts.py; a change to the loop itself is made in both files.

Each optimizer step's micro-batches are dealt out round-robin over the processes (distributed.py
says why the summed gradients equal the one-process gradient). Sharded runs (FSDP, ZeRO) gather
weights in lockstep, so every process runs the same number of forwards per step (a zero-weighted
one when it is short of micro-batches), and their reduction averages, hence the loss scaled by N.
Only rank 0 writes (run directory, checkpoints, metrics, the store); the state saved is global, so
a run resumes on any number of processes, sharded or not, and on the one-process recipe.

This module does not start the processes (torchrun / accelerate do) and does not tune threads:
processes in lockstep each run a fixed count (train.threads, $LORAPLEX_THREADS or torch's).
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file

from loraplex import threads
from loraplex.config import TrainConfig
from loraplex.errors import UserError
from loraplex.models.device import peak_memory, pick_device, pick_precision
from loraplex.models.load import eos_token_ids, load_tokenizer, resolve_base
from loraplex.train import distributed, zero
from loraplex.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_state
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
from loraplex.train.sft_lora import TrainResult


def run(
    cfg: TrainConfig,
    resume: str = "auto",
    console: Any = None,
    on_step: Callable[[int, float, Any], None] | None = None,
) -> TrainResult:
    """sft_lora.run on every process of a torchrun / accelerate launch; rank 0 registers `cfg.name@vN`
    (the others return a result without an adapter)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    t_start = time.time()
    if not cfg.data.path:
        raise UserError("no training data: pass --data FILE or set data.path in the config")

    # ---- setup: processes, sharding, device, precision, base
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    tc = cfg.train
    device = pick_device(tc.device)
    world = distributed.init(device)
    if not world.main:
        console = Console(stderr=True, quiet=True)  # one process reports
    fsdp = distributed.wants_fsdp(tc.fsdp)
    deepspeed = zero.requested(tc.deepspeed)
    ds_config = None
    if deepspeed is not None:
        if fsdp:
            raise UserError("train.fsdp and DeepSpeed both shard the run: choose one")
        zero.check_installed()
        ds_config = zero.prepare(
            *deepspeed,
            micro_batch=tc.batch_size,
            micro_per_process=-(-tc.gradient_accumulation // world.size),
            world_size=world.size,
            max_grad_norm=tc.max_grad_norm,
        )
    sharded = fsdp or ds_config is not None
    if device == "cuda":
        device = f"cuda:{world.local_rank}"
    dtype = pick_precision(tc.precision, device.split(":")[0])
    bound_onednn_cache(device, dtype)  # before the first matmul (parts.py)
    quantization = quantization_config(cfg, device, dtype)  # before any work: QLoRA's errors come first
    if not world.main:
        world.barrier()  # rank 0 converts a GGUF base once, the others then read the cache
    base = resolve_base(cfg.base)
    if world.main:
        world.barrier()
    tok = load_tokenizer(base)

    # ---- data (rank 0 paraphrases, the others read its cache: train/data.py)
    data = prepare(cfg, tok, base, world, console)
    train_ex, eval_ex, max_len, pad_id = data.train_ex, data.eval_ex, cfg.data.max_seq_length, tok.pad_token_id

    # ---- model and optimizer
    # Sharded runs load on the CPU: FSDP and ZeRO-3 move each process's share to the GPU, so a base
    # too big for one GPU never has to fit on one.
    model = build_model(cfg, base, device, dtype, quantization, "cpu" if sharded and quantization is None else device)
    trainable, total_params = model.get_nb_trainable_parameters()
    held = 1.0
    if fsdp:
        distributed.shard(model, device, world.size)  # replaces the parameters: `params` comes after
        held = distributed.local_share(model)
    if tc.compile:
        compile_cache()  # per CPU and instruction set (parts.py)
        model.get_base_model().get_decoder().compile(dynamic=True)
    # the prompt tokens a packed row's examples have in common, once (train/attention.py reads that layout)
    share_prefix = cfg.data.packing and packed_attention(model.get_base_model())
    params = [p for p in model.parameters() if p.requires_grad]
    opt: Any = torch.optim.AdamW(
        params,
        lr=tc.learning_rate,
        weight_decay=tc.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=device.split(":")[0] in ("cpu", "cuda") and not sharded,  # the fused kernel takes no shards
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
        state = load_checkpoint(ckpt, model, None if ds_config else opt)
        start_step, stopper.best, stopper.bad = state["step"], state["best_eval"], state["bad_evals"]
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
        write_run_config(run_dir, cfg, data)
    log = RunLog(run_dir if world.main else None)
    cast = autocast(device, dtype)
    gen_convs = data.served_eval[: tc.gen_eval_examples] if tc.gen_eval_steps else []
    if tc.gen_eval_steps and not gen_convs:
        console.print("[yellow]warning:[/] train.gen_eval_steps is set but there is no eval data; skipped")
    eos_ids = eos_token_ids(tok, model.generation_config.eos_token_id)
    console.print(
        f"training [bold]{cfg.name}[/] on {base.id}: {len(train_ex)} examples ({data.stats.label_tokens} answer "
        f"tokens) {'packed' if cfg.data.packing else 'padded'}, {total_steps} steps, "
        f"{device} {str(dtype).removeprefix('torch.')} x {world.size} processes"
        + (f" (FSDP: each holds {held:.0%} of the weights)" if fsdp else "")
        + (f" (DeepSpeed ZeRO-{zero.stage(ds_config)}: each holds {held:.0%} of the weights)" if ds_config else "")
        + f", trainable {trainable:,} / {total_params:,} params ({100 * trainable / total_params:.2f}%)"
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
    fixed = tc.threads or threads.budget()
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
                collated = [make_batch(b, pad_id, cfg.data.packing, max_len, share_prefix) for b in group]
                # Normalise by the answer tokens of the whole accumulated step (on every process).
                n_total = sum(labelled(c) for c in collated)
                tokens_seen += sum(len(ex.input_ids) for b in group for ex in b)  # real tokens, no padding
                step_loss = 0.0
                share = [(c, 1.0) for c in collated[world.rank :: world.size]]  # this process's (all, alone)
                if sharded:  # FSDP and ZeRO gather weights in lockstep: the same number of forwards everywhere
                    share += [(collated[0], 0.0)] * (-(-len(collated) // world.size) - len(share))
                # FSDP and DeepSpeed average the gradients they reduce; scaled by N, that average is the sum
                scale = world.size if sharded else 1
                for i, (c, weight) in enumerate(share):
                    c = {k: v.to(device) for k, v in c.items()}
                    with cast():
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

                # evaluation (every process: sharded forwards need all of them) and early stopping
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

                # sharded state is gathered by every process; rank 0 writes it
                if step % tc.save_steps == 0 and step < total_steps and (world.main or sharded):
                    state = stopper.state()
                    save_checkpoint(ckpt_root, step, model, opt, state, tc.save_total_limit, write=world.main)
                if on_step is not None:
                    on_step(step, loss_value, model)
    except KeyboardInterrupt:
        interrupted = True
        # every process holds the same state after an optimizer step; rank 0's copy is the one kept
        if world.main and sharded:
            # gathering the shards needs every process, and the others may already be gone
            last = latest_checkpoint(ckpt_root)
            console.print(
                f"\n[yellow]interrupted[/] at step {step}/{total_steps}; sharded runs resume from the last "
                f"periodic checkpoint ({last.name if last else 'none yet: train.save_steps'}).\n"
                "Run the same command again to resume."
            )
        elif world.main:
            path = save_checkpoint(ckpt_root, step, model, opt, stopper.state(), tc.save_total_limit)
            console.print(
                f"\n[yellow]interrupted[/] at step {step}/{total_steps}; checkpoint saved to {path}.\n"
                "Run the same command again to resume."
            )
    finally:
        signal.signal(signal.SIGINT, prev_sigint)
        log.close()
    if interrupted:
        world.close(together=False)
        return TrainResult(None, run_dir, step, train_loss, last_eval, interrupted=True)

    # ---- register (rank 0, from the whole tensors every process helped gather)
    if eval_ex and last_eval is None:
        last_eval = eval_loss(model, eval_ex, cfg, pad_id, device, cast)
    loop_time = time.time() - t_loop
    threads_used = threads.summary(None, torch.get_num_threads()) if device == "cpu" else None
    peak = peak_memory(device)
    ref = None
    gathered = trainable_state(model) if sharded else None  # a collective: before rank 0 goes on alone
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
    if world.main:
        ref = register(cfg, model, gathered, base, run_dir, facts, data.pairs)
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the run is complete: its adapter is in the store
    console.print(summary(facts, ref))
    world.close()
    return TrainResult(ref, run_dir, step, train_loss, last_eval)
