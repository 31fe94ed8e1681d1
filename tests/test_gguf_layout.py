"""models/gguf_layout.py reads a llama GGUF as transformers' own GGUF loader does (its reference),
on a small GGUF written here from the tiny random Llama the way llama.cpp's converter writes one:
renamed tensors, q/k rows permuted for rotary, linear weights in Q8_0, the tokenizer's vocabulary
and merges in the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loraplex.models import load
from loraplex.models.gguf_layout import GGUF_NAMES, permute, read_llama, unpermute


def _write_gguf(hf_dir: Path, out: Path, untied: bool) -> dict[str, np.ndarray]:
    """`hf_dir` (a Llama with a byte-level BPE tokenizer) as a GGUF file; the HF weights it holds."""
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    weights = load_file(str(hf_dir / "model.safetensors"))
    if untied:
        weights["lm_head.weight"] = np.random.default_rng(0).normal(size=weights["model.embed_tokens.weight"].shape)
        weights["lm_head.weight"] = weights["lm_head.weight"].astype(np.float32)
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_chat_template((hf_dir / "chat_template.jinja").read_text())
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    block = {f"{p}.{hf}": g for hf, g in GGUF_NAMES.items() for p in ("self_attn", "mlp")}
    block |= {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in weights.items():
        stem = name.removesuffix(".weight")
        if stem in top:
            gname = top[stem]
        else:
            _, _, layer, rest = stem.split(".", 3)
            gname = f"blk.{layer}.{block[rest]}"
        if gname.endswith("attn_q"):
            t = permute(t, cfg.num_attention_heads)
        elif gname.endswith("attn_k"):
            t = permute(t, cfg.num_key_value_heads)
        if t.ndim == 2 and stem != "model.embed_tokens":  # quantised as a Q4/Q8 GGUF's linear weights are
            w.add_tensor(
                gname + ".weight",
                gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(gname + ".weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def test_permute_and_unpermute_are_inverse() -> None:
    w = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8 * 3, 2)
    assert not np.array_equal(permute(w, 3), w)
    assert np.array_equal(unpermute(permute(w, 3), 3), w)


@pytest.mark.parametrize("untied", [False, True])
def test_a_llama_gguf_converts_as_transformers_loads_it(tiny_base: Path, tmp_path: Path, untied: bool) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    original = _write_gguf(tiny_base, path, untied)
    out = tmp_path / "converted"
    load._convert_gguf(path, out)

    reference = load._transformers_gguf(path)  # transformers' own GGUF loader
    ref_state = {k: v.numpy() for k, v in reference.state_dict().items()}
    ours = load_file(str(out / "model.safetensors"))
    if not untied:
        assert "lm_head.weight" not in ours  # tied: the embedding is the head
        ref_state.pop("lm_head.weight")
    assert sorted(ours) == sorted(ref_state)
    for name, t in ours.items():
        assert np.array_equal(t, ref_state[name]), name
        assert np.allclose(t, original[name], atol=0.02), name  # and q/k back in Hugging Face order

    config = json.loads((out / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "head_dim",
        "rope_parameters",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    ):
        assert config[key] == reference.config.to_dict()[key], key
    assert config["tie_word_embeddings"] is not untied

    # the converted directory loads and computes as transformers' model of the same file
    base = load.BaseRef("tiny", out, "gguf")
    model, tok = load.load_model(base), load.load_tokenizer(base)
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(out))("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tok.chat_template and tok.pad_token_id == config["pad_token_id"]


def test_a_gguf_of_another_architecture_is_left_to_transformers(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert read_llama(path) is None
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(load.UserError, match="cannot read GGUF file"):
        read_llama(tmp_path / "junk.gguf")
