"""Generation eval during training: greedy answers to held-out questions, scored as `loraplex eval`
scores them, so early stopping can watch what users see rather than the loss.

It does not choose when to run (the recipe does) or write reports (eval/).
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.data.formats import Conversation
from loraplex.models.load import GREEDY


@torch.no_grad()
def generation_eval(
    model: Any, tok: Any, convs: list[Conversation], max_new_tokens: int, eos: list[int], autocast: Any
) -> dict[str, float]:
    """Greedy answers to eval questions, scored like `loraplex eval`: exact match, keyword recall
    (where records name keywords) and the per-answer score (keyword recall, else ROUGE-L)."""
    from loraplex.data.tokenize import render
    from loraplex.eval import metrics

    texts = [render(tok, c.messages[:-1], add_generation_prompt=True) for c in convs]
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right end of every row
    try:
        inputs = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    device = next(model.parameters()).device
    model.eval()
    with autocast():
        out = model.generate(
            **{k: v.to(device) for k, v in inputs.items()},
            max_new_tokens=max_new_tokens,
            **GREEDY,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
    model.train()
    new = out[:, inputs["input_ids"].shape[1] :].cpu()
    scores = []
    for c, ids in zip(convs, new, strict=True):
        stopped = any(int(t) in eos for t in ids)
        answer = str(tok.decode(ids, skip_special_tokens=True)).strip()
        scores.append(metrics.score(answer, c.messages[-1]["content"], list(c.keywords), stopped))
    kw = [x.keywords for x in scores if x.keywords is not None]
    result = {
        "gen_exact": sum(x.exact for x in scores) / len(scores),
        "gen_score": sum(x.score for x in scores) / len(scores),
    }
    if kw:
        result["gen_keywords"] = sum(kw) / len(kw)
    return result
