"""Knowledge base at 10,000 chunks: ingestion throughput and search latency.

    python bench/knowledge_search.py [--chunks 10000] [--queries 300]

The corpus is generated here (nothing is downloaded): Chinese sentences drawn from jieba's own
dictionary by word frequency, so segmentation and BM25 see a realistic word distribution, with a
numbered fact in each sentence, written as Markdown files of ~50 chunks each. The shipped sample
knowledge base is added too. Rows:

  1. ingestion: files -> read -> chunk -> jieba -> SQLite FTS5, chunks per second;
  2. search: BM25 top-5 for questions made from indexed sentences (3-6 words each), p50 / p99,
     and for the sample base's questions alone (a 4-document base), side by side in the same run;
  3. hit rate: how often the sentence a question was made from is in the top 5.

The target (issue 8) is retrieval adding < 20 ms p50 to time to first token at 10,000 chunks;
bench/assistant_ttft.py measures that through a running server, this the search alone.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import tempfile
import time
from pathlib import Path


def corpus(n_chunks: int, out: Path, seed: int = 0) -> list[tuple[str, str]]:
    """Write files until they make n_chunks chunks (as the store cuts them); returns (question, sentence)."""
    import jieba

    from loraplex.knowledge.chunking import chunk

    rng = random.Random(seed)
    words, freqs = [], []
    with open(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), encoding="utf-8") as f:
        for line in f:
            w, c, *_ = line.split()
            if len(w) >= 2:
                words.append(w)
                freqs.append(int(c))
    cum = list(itertools.accumulate(freqs))  # once: choices(weights=...) would sum 300k weights per call
    probes: list[tuple[str, str]] = []
    per_file, chunk_chars, total, fi = 50, 480, 0, 0
    while total < n_chunks:
        paras = []
        for ci in range(per_file):
            para = ""
            while len(para) < chunk_chars - 60:
                drawn = rng.choices(words, cum_weights=cum, k=rng.randint(6, 12))
                sentence = "".join(drawn) + f"编号{fi}-{ci}-{len(para)}。"
                para += sentence
                if rng.random() < 0.02:
                    pick = rng.sample(range(len(sentence) // 2), 1)[0]
                    probes.append((sentence[pick : pick + 8], sentence))
            paras.append(para)
        text = "\n\n".join(paras)
        (out / f"doc{fi:04d}.md").write_text(text, encoding="utf-8")
        total += len(chunk(text))
        fi += 1
    return probes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    from importlib import resources

    tmp = Path(tempfile.mkdtemp(prefix="lp-kb-bench-"))
    os.environ["LORAPLEX_HOME"] = str(tmp / "home")
    from loraplex.knowledge.store import KnowledgeBase

    docs = tmp / "docs"
    docs.mkdir()
    probes = corpus(args.chunks, docs)
    kb = KnowledgeBase("bench", create=True)
    t = time.perf_counter()
    results = kb.add([docs])
    ingest = time.perf_counter() - t
    n_chunks = sum(r.chunks for r in results)
    mb = sum(p.stat().st_size for p in docs.iterdir()) / 1e6

    sample = KnowledgeBase("sample", create=True)
    sample.add([Path(str(resources.files("loraplex.samples") / "knowledge"))])
    sample_questions = [
        "春节放几天假？",
        "优惠码是什么？",
        "How much does the Pro plan cost per seat?",
        "hotel allowance",
    ]

    rng = random.Random(1)
    chosen = rng.sample(probes, min(args.queries, len(probes)))
    kb.search("预热")  # jieba's dictionary loads on first use
    big, small, hits = [], [], 0
    for q, sentence in chosen:
        t = time.perf_counter()
        top = kb.search(q, 5)
        big.append(time.perf_counter() - t)
        hits += any(sentence in h.text for h in top)
        sq = sample_questions[len(small) % len(sample_questions)]
        t = time.perf_counter()
        sample.search(sq, 5)
        small.append(time.perf_counter() - t)

    def pct(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] * 1e3

    print(f"\nknowledge base: {n_chunks} chunks from {len(results)} files ({mb:.1f} MB), BM25 over jieba words\n")
    print("| measure | result |")
    print("|---|---|")
    print(f"| ingestion | {ingest:.1f} s, **{n_chunks / ingest:.0f} chunks/s** ({mb / ingest:.2f} MB/s) |")
    print(
        f"| search top-5, {n_chunks} chunks, {len(big)} questions | p50 **{pct(big, 0.5):.2f} ms**, "
        f"p99 {pct(big, 0.99):.2f} ms |"
    )
    print(f"| search top-5, sample base (4 documents) | p50 {pct(small, 0.5):.2f} ms, p99 {pct(small, 0.99):.2f} ms |")
    print(f"| ratio of p50s (10k chunks / sample) | {statistics.median(big) / statistics.median(small):.1f}x |")
    print(f"| source sentence in top 5 | {hits / len(chosen):.0%} |")
    print(f"\ntarget: retrieval < 20 ms p50 at 10,000 chunks: {'met' if pct(big, 0.5) < 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
