"""Label mask: loss only on assistant tokens (answer + end-of-turn); packing and the labelled-only
output head do not change the loss (Hugging Face's own loss is the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.data.tokenize import IGNORE, collate, encode, pack, pack_groups, shared_row
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
    example (the CPU recipe's; train/attention.py), there also with the examples' common prompt tokens
    in the row once (a prefix tree): the same loss and gradients as Hugging Face's."""
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
    batches = {
        "packed": make_batch(examples, tok.pad_token_id, True, 512),
        "two rows": two_rows,
        "padded": make_batch(examples, tok.pad_token_id, False, 512),
    }
    if attn == attention.NAME:
        # the system prompt is shared by all three, the first user turn by the first two: a tree of
        # three levels; then the same in two rows, one of them padded
        shared = make_batch(examples, tok.pad_token_id, True, 512, share=True)
        assert shared["input_ids"].shape[1] < batches["packed"]["input_ids"].shape[1]
        assert len([s for s in attention.segments(shared["position_ids"]) if s.keys is not None]) == 2
        batches["shared prefixes"] = shared
        groups = pack_groups(examples, max(lengths[0], lengths[1] + lengths[2]))
        batches["shared, two rows"] = collate([shared_row(g) for g in groups], tok.pad_token_id, True)
    for kind, batch in batches.items():
        s, n = loss_sum(model, batch)
        s.backward()
        grad = torch.cat([p.grad.flatten() for p in trained])
        model.zero_grad()
        results[kind] = (float(s) / n, n, grad)
    for kind in [k for k in results if k != "padded"]:
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
    assert [s[:3] for s in attention.segments(pos)] == [(0, 0, 3), (0, 3, 5), (0, 5, 7), (1, 0, 7)]
    assert all(s.keys is None for s in attention.segments(pos))


def test_a_prefix_tree_row_gives_each_example_the_shared_tokens_before_it() -> None:
    """Depth first: a shared run (positions 0-1), a branch that continues it (2-4), a sibling branch
    from position 2 and, inside it, a branch from position 3; then padding from 0."""
    pos = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 3, 0, 1]])
    spans = attention.segments(pos)
    assert [s[:3] for s in spans] == [(0, 0, 5), (0, 5, 7), (0, 7, 8), (0, 8, 10)]
    assert spans[1].keys.tolist() == [0, 1, 5, 6]
    assert spans[2].keys.tolist() == [0, 1, 5, 7]  # its parent's positions 0-2: the shared run, then 5
    assert spans[2].mask.tolist() == [[True, True, True, True]]
    assert spans[1].mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    with pytest.raises(ValueError, match="continuing no earlier run"):
        attention.segments(torch.tensor([[0, 1, 5, 6]]))


def test_shared_row_keeps_labels_and_shares_only_unlabelled_tokens() -> None:
    from loraplex.data.tokenize import Example

    a = Example([1, 2, 3, 4, 5], [IGNORE, IGNORE, IGNORE, 4, 5])
    # b shares 1 2 with a, not 3: the token before a first label is always an example's own
    b = Example([1, 2, 3, 4, 6], [IGNORE, IGNORE, IGNORE, IGNORE, 6])
    c = Example([1, 7, 8], [IGNORE, IGNORE, 8])
    row = shared_row([a, b, c])
    assert row.input_ids == [1, 2, 3, 4, 5, 3, 4, 6, 7, 8]
    assert row.position_ids == [0, 1, 2, 3, 4, 2, 3, 4, 1, 2]
    assert sorted(t for t in row.labels if t != IGNORE) == [4, 5, 6, 8]


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
