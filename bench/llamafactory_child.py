"""One LLaMA-Factory run for bench/train_throughput.py, in LLaMA-Factory's own Python environment.

    PYTHON_OF_LLAMAFACTORY bench/llamafactory_child.py SPEC.json

LLaMA-Factory pins its own transformers, PEFT and TRL, so it lives in a virtual environment of its
own and this file imports nothing of loraplex. SPEC.json (written by train_throughput.py) names the
base model directory, the tokenized examples (a `datasets` directory: input_ids, attention_mask,
labels, the very token ids every other run trains on, which LLaMA-Factory takes as
`tokenized_path`), the hyperparameters, the precision and the output directory. It trains with
`llamafactory.train.tuner.run_exp` (what `llamafactory-cli train` runs) and a callback that times
the run and snapshots the LoRA weights at each epoch end, and writes llamafactory.json and
llamafactory.safetensors in the format train_throughput.py reads for every run.

LLaMA-Factory 0.9.5 imports torchaudio at start-up for its audio plugin; on a CPU-only torch from
local disk there is none that matches, so an empty module stands in for it (text SFT never calls it).
"""

from __future__ import annotations

import importlib.machinery
import json
import resource
import sys
import time
import types
from pathlib import Path
from typing import Any


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub

    import torch
    from llamafactory.train.tuner import run_exp
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    snaps: list[tuple[float, dict[str, torch.Tensor]]] = []
    losses: list[float] = []
    clock = {"t0": 0.0, "paused": 0.0}

    class Snap(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock["t0"] = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            t = time.perf_counter()
            state_now = {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
            snaps.append((t - clock["t0"] - clock["paused"], state_now))
            clock["paused"] += time.perf_counter() - t

    bf16 = spec["precision"] == "bfloat16"
    run_exp(
        {
            "stage": "sft",
            "do_train": True,
            "model_name_or_path": spec["base"],
            "finetuning_type": "lora",
            "lora_target": "all",
            "lora_rank": spec["rank"],
            "lora_alpha": 2 * spec["rank"],
            "lora_dropout": 0.0,
            "tokenized_path": spec["tokenized"],
            "dataset": "bench",  # required by its argument check; the tokenized data is what loads
            "template": "empty",  # the examples arrive tokenized with SmolLM2's own template
            "cutoff_len": 1024,
            "packing": False,
            "neat_packing": False,
            "disable_gradient_checkpointing": True,
            "output_dir": str(out / "llamafactory"),
            "overwrite_output_dir": True,
            "per_device_train_batch_size": spec["batch"],
            "gradient_accumulation_steps": 1,
            "learning_rate": spec["lr"],
            "num_train_epochs": spec["epochs"],
            "lr_scheduler_type": "cosine",
            "warmup_steps": spec["warmup_steps"],
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "bf16": bf16,  # frozen weights in bf16 and autocast, LoRA weights fp32: as loraplex
            "seed": spec["seed"],
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "plot_loss": False,
        },
        callbacks=[Snap()],
    )
    steps_per_epoch = spec["steps_per_epoch"]
    last = losses[-steps_per_epoch:]
    save_file(
        {f"{i}/{k}": v for i, (_, s) in enumerate(snaps) for k, v in s.items()}, str(out / "llamafactory.safetensors")
    )
    result = {
        "precision": spec["precision"],
        "steps": len(losses),
        "final_loss": sum(last) / max(1, len(last)),
        "epoch_times": [t for t, _ in snaps],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out / "llamafactory.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
