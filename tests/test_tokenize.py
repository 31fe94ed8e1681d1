"""Label mask: loss only on assistant tokens (answer + end-of-turn); packing and the labelled-only
output head do not change the loss (Hugging Face's own loss is the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.data.tokenize import IGNORE, encode, pack
from loraplex.models.load import BaseRef, load_model, load_tokenizer
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


def test_packed_and_unpacked_give_the_same_loss(tiny_base: Path) -> None:
    from peft import LoraConfig, get_peft_model

    ref = tiny(tiny_base)
    tok = load_tokenizer(ref)
    model = get_peft_model(
        load_model(ref, attn_implementation="eager"),
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
    results = {}
    for packed in (True, False):
        s, n = loss_sum(model, make_batch(examples, tok.pad_token_id, packed, 512))
        s.backward()
        grad = next(p.grad for p in model.parameters() if p.requires_grad).clone()
        model.zero_grad()
        results[packed] = (float(s) / n, n, grad)
    assert results[True][1] == results[False][1]
    assert abs(results[True][0] - results[False][0]) < 1e-4
    assert torch.allclose(results[True][2], results[False][2], atol=1e-4)
    # and both equal the unfused reference: Hugging Face's own loss on the padded batch (logits at
    # every position, its shift and mean), the loss TRL and Trainer train on
    batch = make_batch(examples, tok.pad_token_id, False, 512)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(reference) == pytest.approx(results[False][0], rel=1e-5)
    reference.backward()
    grad = next(p.grad for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(grad * results[False][1], results[False][2], rtol=1e-4, atol=1e-4)
