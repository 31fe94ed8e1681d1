"""Does an adapter fit a base model? Compared on the fingerprint the manifest keeps of the base
it was trained on (architecture and shapes must match; other weights of the same shape warn).

It does not read adapter weights (peft_io.py) or load models.
"""

from __future__ import annotations

import warnings

from loraplex.adapters.registry import AdapterRef
from loraplex.errors import UserError
from loraplex.models.load import BaseRef

SHAPE_KEYS = ("architecture", "hidden_size", "num_hidden_layers", "vocab_size")


def check_compatible(adapter: AdapterRef, base: BaseRef) -> None:
    """Refuse an adapter trained on a base of another shape; warn when only the weights differ."""
    trained_on = adapter.manifest().get("base_model", {})
    fp = trained_on.get("fingerprint", {})
    diffs = [k for k in SHAPE_KEYS if fp.get(k) is not None and fp.get(k) != base.fingerprint.get(k)]
    if diffs:
        detail = ", ".join(f"{k} {fp.get(k)} vs {base.fingerprint.get(k)}" for k in diffs)
        raise UserError(
            f"adapter {adapter.id} was trained on {trained_on.get('id')!r} and does not fit base {base.id!r} ({detail})"
        )
    if fp.get("weights_sha256") and fp["weights_sha256"] != base.fingerprint.get("weights_sha256"):
        warnings.warn(
            f"adapter {adapter.id} was trained on {trained_on.get('id')!r}, whose weights differ from "
            f"{base.id!r}; answers may differ from training",
            stacklevel=2,
        )
