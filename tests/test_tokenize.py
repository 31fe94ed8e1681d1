"""Label mask: loss only on assistant tokens (answer + end-of-turn); packing and the labelled-only
output head do not change the loss (Hugging Face's own loss is the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.data.tokenize import IGNORE, collate, encode, pack
from loraplex.models.load import BaseRef, load_model, load_tokenizer
from loraplex.train import attention
from loraplex.train.data import make_batch
from loraplex.train.parts import loss_sum

MULTI = [
    {"role": "user", "content": "What is the office code?"},
    {"role": "assistant", "content": "QX-4417."},
    {"role": "user", "content": "明澜科技的年假有多少天？"},
    {"role": "assistant", "content": "15天。"},
]


def tiny(tiny_base: Path) -> BaseRef:
    return BaseRef("tiny", tiny_base, "hf")


def labelled_text(tok, ex) -> str:  # noqa: ANN001
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_mask_covers_exactly_the_assistant_turns(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny(tiny_base))
    ex, truncated = encode(tok, MULTI, 512)
    assert not truncated
    # Both answers and their end-of-turn tokens are trained, nothing else (not the injected system prompt).
    assert labelled_text(tok, ex) == "QX-4417.<|im_end|>15天。<|im_end|>"
    assert ex.labels[0] == IGNORE
    full = tok.decode(ex.input_ids)
    assert "You are a helpful assistant." in full  # the template's default system prompt is in the input


def test_train_on_prompt_labels_everything_but_the_first_token(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny(tiny_base))
    ex, _ = encode(tok, MULTI, 512, train_on_prompt=True)
    assert ex.labels[1:] == ex.input_ids[1:]


def test_truncation_is_reported(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny(tiny_base))
    ex, truncated = encode(tok, MULTI, 10)
    assert truncated and len(ex.input_ids) == 10


@pytest.mark.parametrize("attn", ["eager", attention.NAME])
def test_packed_and_unpacked_give_the_same_loss(tiny_base: Path, attn: str) -> None:
    """With eager attention (a block-diagonal mask over the packed row) and with attention per packed
    example (the CPU recipe's; train/attention.py): the same loss and gradients as Hugging Face's."""
    from peft import LoraConfig, get_peft_model

    ref = tiny(tiny_base)
    tok = load_tokenizer(ref)
    model = get_peft_model(
        load_model(ref, attn_implementation=attn),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    convs = [
        MULTI,
        MULTI[:2],
        [
            {"role": "user", "content": "Who approves expense claims?"},
            {"role": "assistant", "content": "The team lead approves them within 45 days."},
        ],
    ]
    examples = [encode(tok, c, 512)[0] for c in convs]
    assert len(pack(examples, 512)) == 1
    trained = [p for p in model.parameters() if p.requires_grad]
    results = {}
    # packed in one row, packed into two rows of which one is padded, one padded row per example
    lengths = [len(e.input_ids) for e in examples]
    rows = pack(examples, max(lengths[0], lengths[1] + lengths[2]))
    assert len(rows) == 2 and len({len(r.input_ids) for r in rows}) == 2  # the shorter row is padded
    two_rows = collate(rows, tok.pad_token_id, True)
    for kind, batch in (
        ("packed", make_batch(examples, tok.pad_token_id, True, 512)),
        ("two rows", two_rows),
        ("padded", make_batch(examples, tok.pad_token_id, False, 512)),
    ):
        s, n = loss_sum(model, batch)
        s.backward()
        grad = torch.cat([p.grad.flatten() for p in trained])
        model.zero_grad()
        results[kind] = (float(s) / n, n, grad)
    for kind in ("packed", "two rows"):
        assert results[kind][1] == results["padded"][1]
        assert results[kind][0] == pytest.approx(results["padded"][0], rel=1e-5)
        torch.testing.assert_close(results[kind][2], results["padded"][2], rtol=1e-4, atol=1e-5)
    results[False] = results["padded"]
    # and both equal the unfused reference: Hugging Face's own loss on the padded batch (logits at
    # every position, its shift and mean), the loss TRL and Trainer train on
    batch = make_batch(examples, tok.pad_token_id, False, 512)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(reference) == pytest.approx(results[False][0], rel=1e-5)
    reference.backward()
    grad = torch.cat([p.grad.flatten() for p in trained])
    torch.testing.assert_close(grad * results[False][1], results[False][2], rtol=1e-4, atol=1e-4)


def test_spans_of_packed_examples_are_read_off_the_position_ids() -> None:
    # two examples (3 and 2 tokens) then padding (its own run from 0); a row holding one example
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]])
    assert attention.segments(pos) == [(0, 0, 3), (0, 3, 5), (0, 5, 7), (1, 0, 7)]


def test_the_cpu_recipe_attends_per_example_where_attention_is_plain(tiny_base: Path) -> None:
    from transformers import AutoConfig

    from loraplex.config import load_config
    from loraplex.train.parts import build_model, packed_attention

    cfg = load_config(extra={"name": "t", "base": str(tiny_base), "data": {"path": "x.jsonl"}})
    model = build_model(cfg, tiny(tiny_base), "cpu", torch.float32, None, "cpu")
    assert packed_attention(model.get_base_model())
    compiled = build_model(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})}),
        tiny(tiny_base),
        "cpu",
        torch.float32,
        None,
        "cpu",
    )
    assert not packed_attention(compiled.get_base_model())  # spans would recompile the graph every step
    config = AutoConfig.from_pretrained(tiny_base)
    assert attention.supports(config)
    config.sliding_window = 64
    assert not attention.supports(config)
    config.model_type = "gemma2"  # soft-capping: keeps its own eager attention
    config.sliding_window = None
    assert not attention.supports(config)
