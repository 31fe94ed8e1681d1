"""`loraplex eval --report DIR`: one self-contained HTML file (no scripts, fonts or images from
elsewhere): the summary table, metric bars against the baseline and the training run's loss curves
as inline SVG (matplotlib), then every example side by side with its diff against the reference,
and the judge's prompt when a judge graded.

The page is rendered by jinja2 with autoescaping, so answers are shown as text, never as markup.
This module only renders a result that eval/run.py produced.
"""

from __future__ import annotations

import difflib
import io
import json
from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

from loraplex.adapters import registry

METRICS = [
    ("score", "score", "{:.3f}"),
    ("exact", "exact match", "{:.1%}"),
    ("normalised", "normalised match", "{:.1%}"),
    ("keywords", "keyword recall", "{:.1%}"),
    ("rouge_l", "ROUGE-L F1 (chars)", "{:.3f}"),
    ("bleu", "BLEU (zh tokens)", "{:.1f}"),
    ("loss", "loss on references", "{:.3f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("length", "answer length (chars)", "{:.0f}"),
    ("stopped", "stopped at end of turn", "{:.1%}"),
    ("judge", "judge score (1-5)", "{:.2f}"),
    ("refused", 'answered "I don\'t know" (retrieval.refuse_below)', "{:.1%}"),
]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>loraplex eval: {{ r.adapter }} vs {{ r.baseline }}</title>
<style>
body { font: 15px/1.5 system-ui, "Noto Sans CJK SC", "PingFang SC", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1a1a1a; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: .35rem .6rem; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #0a7a2f; font-weight: 600; } .worse { color: #b3261e; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; } .plots figure { margin: 0; max-width: 100%; }
.plots svg { max-width: 100%; height: auto; }
.example { border: 1px solid #ddd; border-radius: 6px; margin: 1rem 0; padding: .75rem 1rem; }
.example h3 { margin: 0 0 .5rem; font-size: 1rem; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: .75rem; }
.cols div { background: #fafafa; padding: .5rem; border-radius: 4px; white-space: pre-wrap; }
ins { background: #d7f5dd; text-decoration: none; } del { background: #fbd9d6; }
.tag { font-size: .8rem; padding: .1rem .4rem; border-radius: 3px; background: #eee; }
.tag.improved { background: #d7f5dd; } .tag.regressed { background: #fbd9d6; }
small.judge { color: #555; }
pre { background: #f6f6f6; padding: .75rem; white-space: pre-wrap; }
</style></head><body>
<h1>{{ r.adapter }} vs {{ r.baseline }}</h1>
<p>Base model {{ r.base_model }}; {{ r.data.examples }} examples from <code>{{ r.data.path }}</code>
(sha256 {{ r.data.sha256[:12] }}); greedy, at most {{ r.max_tokens }} new tokens; {{ r.created_at }}.
Generation took {{ r.timing.generation_s }} s.</p>
<h2>Summary</h2>
<table id="summary"><tr><th>metric</th><th>{{ r.baseline }}</th><th>{{ r.adapter }}</th><th>change</th></tr>
{% for row in summary %}<tr><td>{{ row.label }}</td><td class="num">{{ row.baseline }}</td>
<td class="num">{{ row.adapter }}</td><td class="num {{ row.cls }}">{{ row.delta }}</td></tr>
{% endfor %}</table>
<p>Per example, on the score (keyword recall where the data names keywords, else ROUGE-L):
<b>{{ r.comparison.improved }}</b> improved, <b>{{ r.comparison.regressed }}</b> regressed,
<b>{{ r.comparison.unchanged }}</b> unchanged (a change under {{ margin }} counts as unchanged).</p>
<h2>Plots</h2>
<div class="plots">
<figure id="bars">{{ bars }}<figcaption>Metrics, baseline vs adapter (0-1 scales).</figcaption></figure>
{% if curves %}<figure id="curves">{{ curves }}<figcaption>Training run: loss per step.</figcaption></figure>
{% else %}<p id="curves-missing">No training metrics for {{ r.adapter }} on this machine
({{ curves_note }}).</p>{% endif %}
</div>
<h2>Examples</h2>
{% for ex in examples %}<section class="example" id="ex-{{ loop.index }}">
<h3>{{ loop.index }}. {{ ex.question }} <span class="tag {{ ex.change }}">{{ ex.change }}</span></h3>
<div class="cols">
<div><b>reference</b>{% if ex.keywords %} (keywords: {{ ex.keywords|join(", ") }}){% endif -%}
<br>{{ ex.reference }}</div>
<div class="baseline"><b>{{ r.baseline }}</b> · score {{ "%.2f"|format(ex.baseline.scores.score) }}
{{- ex.baseline_judge }}<br>{{ ex.baseline_diff }}
{%- if ex.baseline.judge %}<br><small class="judge">judge: {{ ex.baseline.judge.reason }}</small>{% endif %}</div>
<div class="adapter"><b>{{ r.adapter }}</b> · score {{ "%.2f"|format(ex.adapter.scores.score) }}
{{- ex.adapter_judge }}<br>{{ ex.adapter_diff }}
{%- if ex.adapter.judge %}<br><small class="judge">judge: {{ ex.adapter.judge.reason }}</small>{% endif %}</div>
</div><small>{{ ex.source }}</small></section>
{% endfor %}
{% if r.judge %}<h2>Judge</h2><p>{{ r.judge.model }} at <code>{{ r.judge.url }}</code>, asked for every answer:</p>
<pre id="judge-prompt">{{ r.judge.prompt }}</pre>{% endif %}
<p><small>Diffs: <ins>text the answer adds</ins>, <del>reference text it lacks</del>.
Written by loraplex eval.</small></p>
</body></html>
"""


def diff_html(answer: str, reference: str) -> Markup:
    """Character-level diff of the answer against the reference (characters, so Chinese diffs well)."""
    out = []
    sm = difflib.SequenceMatcher(None, reference, answer, autojunk=False)
    for op, a0, a1, b0, b1 in sm.get_opcodes():
        if op == "equal":
            out.append(escape(answer[b0:b1]))
            continue
        if a1 > a0:
            out.append(Markup("<del>%s</del>") % reference[a0:a1])
        if b1 > b0:
            out.append(Markup("<ins>%s</ins>") % answer[b0:b1])
    return Markup("").join(out)


def _svg(fig: Any) -> Markup:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return Markup(text[text.index("<svg") :])  # drop the XML prolog and doctype: inline SVG


def bars_svg(result: dict[str, Any]) -> Markup:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("score", "exact", "normalised", "keywords", "rouge_l", "bleu", "stopped", "judge")
    scale = {"bleu": 100.0, "judge": 5.0}
    a, b, labels = [], [], []
    for k in keys:
        va, vb = result["summary"]["adapter"].get(k), result["summary"]["baseline"].get(k)
        if va is None or vb is None:
            continue
        labels.append(k if k not in scale else f"{k}/{scale[k]:.0f}")
        a.append(va / scale.get(k, 1.0))
        b.append(vb / scale.get(k, 1.0))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], b, 0.4, label=result["baseline"], color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], a, 0.4, label=result["adapter"], color="#2f6fdf")
    ax.set_xticks(list(x), labels, rotation=20)
    ax.set_ylim(0, 1.25)
    ax.legend(loc="upper left", ncols=2, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def curves_svg(adapter: str) -> tuple[Markup | None, str]:
    """The training run's loss and eval loss per step, or (None, why not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = registry.resolve(adapter).manifest().get("run_dir")
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return None, "the adapter was not trained here, or its run directory is gone"
    train, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        if "eval_loss" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    if not train:
        return None, f"{path} has no loss records"
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(*zip(*train, strict=True), label="train loss", color="#2f6fdf")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#d9822b")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    svg = _svg(fig)
    plt.close(fig)
    return svg, ""


def _fmt(fmt: str, v: Any) -> str:
    return "-" if v is None else fmt.format(v)


def render(result: dict[str, Any]) -> str:
    from jinja2 import Environment

    from loraplex.eval.run import CHANGE_MARGIN

    summary = []
    for key, label, fmt in METRICS:
        va, vb = result["summary"]["adapter"].get(key), result["summary"]["baseline"].get(key)
        if va is None and vb is None:
            continue
        delta, cls = "", ""
        if va is not None and vb is not None:
            d = va - vb
            lower_is_better = key in ("loss", "perplexity")
            delta = fmt.replace("{:", "{:+").format(d)
            if key != "length" and abs(d) > 1e-9:
                cls = "better" if (d < 0) == lower_is_better else "worse"
        summary.append(
            {"label": label, "adapter": _fmt(fmt, va), "baseline": _fmt(fmt, vb), "delta": delta, "cls": cls}
        )

    def judged(side: dict[str, Any]) -> str:
        j = side.get("judge")
        return f" · judge {j['score']}/5" if j and j.get("score") is not None else (" · judge: -" if j else "")

    examples = [
        {
            **ex,
            "adapter_diff": diff_html(ex["adapter"]["text"], ex["reference"]),
            "baseline_diff": diff_html(ex["baseline"]["text"], ex["reference"]),
            "adapter_judge": judged(ex["adapter"]),
            "baseline_judge": judged(ex["baseline"]),
        }
        for ex in result["examples"]
    ]
    curves, note = curves_svg(result["adapter"])
    env = Environment(autoescape=True)
    return env.from_string(PAGE).render(
        r=result,
        summary=summary,
        examples=examples,
        bars=bars_svg(result),
        curves=curves,
        curves_note=note,
        margin=CHANGE_MARGIN,
    )


def write(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(render(result), encoding="utf-8")
    (out_dir / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    return path
