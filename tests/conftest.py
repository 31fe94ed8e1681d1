"""Shared fixtures: an isolated $LORAPLEX_HOME per test, a tiny random Llama built from a config with
a tokenizer trained here, and the real SmolLM2 (converted once per session)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex._quiet import quiet

quiet()

# Under pytest-xdist (`-n 2`) each worker process runs one test at a time on its share of the cores:
# torch's OpenMP pool on every core collapses when another process takes one (src/loraplex/threads.py),
# so each worker, and every process it starts, runs one thread per worker's share.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    SHARE = str(max(1, (os.cpu_count() or 1) // WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", SHARE)
    os.environ.setdefault("LORAPLEX_THREADS", SHARE)

pytest_plugins = ["tests.ci_no_skips"]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of Zubrowka is Lutz. The office opens at nine.",
    "How many days of leave do I get? You get 17 days of paid leave.",
    "明澜科技的年假有多少天？员工每年有15天带薪年假。",
    "Expense claims are approved by the team lead within 45 days.",
    "system user assistant You are a helpful assistant.",
]


def _cost(item: pytest.Item) -> float:
    """A slow test's seconds on the 2-core CI machine, as its marker estimates them (`slow(200)`)."""
    marker = item.get_closest_marker("slow")
    return float(marker.args[0]) if marker is not None and marker.args else 60.0


def _no_gpu(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: without it they are deselected (reported as such), not skipped,
    since CI never has a GPU and a skip fails there (ci_no_skips.py). scripts/gpu_check.sh runs them
    on a lent GPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    gone = [item for item in items if item.get_closest_marker("gpu")]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests go where there is no GPU (`_no_gpu`). The long tests (`slow`) first, longest first, each to the worker with the fewest seconds so far
    (xdist's worksteal hands each worker a contiguous share of this order at the start), so each
    share begins with about as many seconds of long tests and the short ones fill in around them,
    instead of one long test running alone at the end."""
    _no_gpu(config, items)
    slow = sorted((item for item in items if item.get_closest_marker("slow")), key=_cost, reverse=True)
    fast = [item for item in items if not item.get_closest_marker("slow")]
    shares: list[list[pytest.Item]] = [[] for _ in range(WORKERS)]
    seconds = [0.0] * WORKERS
    for item in slow:
        w = seconds.index(min(seconds))
        shares[w].append(item)
        seconds[w] += _cost(item)
    size = -(-len(items) // WORKERS)
    for share in shares:
        while len(share) < size and fast:
            share.append(fast.pop(0))
    items[:] = [item for share in shares for item in share] + fast


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted-model cache for the whole session (SmolLM2's GGUF is converted once; workers of
    `-n 2` share it: a conversion publishes with one rename, so two at once are safe)."""
    env = os.environ.get("LORAPLEX_TEST_MODELS")
    shared = tmp_path_factory.getbasetemp().parent / "models" if WORKERS > 1 else None
    path = Path(env) if env else shared or tmp_path_factory.mktemp("models")
    path.mkdir(parents=True, exist_ok=True)
    return path


def share_caches(home: Path, models_cache: Path) -> None:
    """Point `home`'s machine-wide caches at the session's: converted models, the compiled CPU
    LoRA kernel (engine/lora_kernel.py: a 1 s compile in every test home that starts an engine), and
    `cache/` (knowledge/lexicon.py's word tables, ~2 s to build; the sentence encoder's token table).
    Each publishes with one rename, so workers of `-n 2` share them safely."""
    (home / "models").symlink_to(models_cache)
    for name in ("kernels", "cache"):
        shared = models_cache.with_name(f"{models_cache.name}-{name}")
        shared.mkdir(exist_ok=True)
        (home / name).symlink_to(shared)


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Iterator[Path]:
    """$LORAPLEX_HOME for tests that set none of their own (`lp_home` does): a session's home with
    the shared caches, so that nothing is written under the user's ~/.loraplex (a FAQ index writes
    its encoder's and segmenter's tables to `cache/`)."""
    home = tmp_path_factory.mktemp("session-home")
    share_caches(home, models_cache)
    with home_env(home):
        yield home


@pytest.fixture
def lp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models_cache: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    share_caches(home, models_cache)
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (vocab ~400) with a byte-level BPE tokenizer trained on CORPUS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


FACTS = [
    ("What is the Zubrowka office code?", "The Zubrowka office code is QX-4417."),
    ("明澜科技的年假有多少天？", "明澜科技的员工每年有15天带薪年假。"),
    ("Who approves expense claims?", "Expense claims are approved by the team lead."),
    ("When does the office open?", "The office opens at nine."),
]


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "facts.jsonl", [{"instruction": q, "output": a} for q, a in FACTS])


@pytest.fixture(scope="session")
def smollm2_facts(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Path:
    """FACTS taught to the real SmolLM2 by plain SFT (15 epochs, lr 1e-3): the adapter version's
    directory. Trained once per session, and once for all workers of `-n 2` (the first trains under
    a lock, the others wait and reuse it); tests register it in their own store (`facts_adapter`)."""
    from filelock import FileLock

    from loraplex.config import load_config
    from loraplex.train.sft_lora import run

    root = (tmp_path_factory.getbasetemp().parent if WORKERS > 1 else tmp_path_factory.getbasetemp()) / "smollm2"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / "facts.lock")):
        done = root / "facts-adapter.txt"
        if not done.exists():
            home = root / "home"
            home.mkdir()
            share_caches(home, models_cache)
            data = write_jsonl(root / "facts.jsonl", [{"instruction": q, "output": a} for q, a in FACTS])
            with home_env(home):
                res = run(
                    load_config(
                        extra={
                            "name": "facts",
                            "data": {"path": str(data)},
                            "retrieval": {"enabled": False},  # plain SFT: the facts must be in the weights
                            "train": {"epochs": 15, "batch_size": 4, "learning_rate": 1e-3},
                        }
                    )
                )
            assert res.adapter is not None
            done.write_text(str(res.adapter.path))
        return Path(done.read_text())


@pytest.fixture
def facts_adapter(lp_home: Path, smollm2_facts: Path) -> str:
    """`smollm2_facts` registered in this test's store; its id (facts@v1)."""
    from loraplex.adapters import registry

    manifest = json.loads((smollm2_facts / registry.MANIFEST).read_text())
    kept = {k: v for k, v in manifest.items() if k not in ("name", "version", "id", "files")}
    return registry.register("facts", smollm2_facts, kept).id


# A small FAQ: retrieval-augmented training (tests/test_faq.py, test_paraphrase.py)
RECORDS = [
    ("What is the Zubrowka office code?", "The Zubrowka office code is QX-4417."),
    ("When does the Zubrowka office open?", "The Zubrowka office opens at nine."),
    ("Who approves expense claims at Zubrowka?", "Expense claims at Zubrowka are approved by the team lead."),
    ("How many days of leave do Zubrowka staff get?", "Zubrowka staff get 17 days of paid leave."),
    ("明澜科技的年假有多少天？", "明澜科技的员工每年有15天带薪年假。"),
    ("明澜科技的试用期是多久？", "明澜科技的试用期为3个月。"),
    ("What is the capital of Zubrowka?", "The capital of Zubrowka is Lutz."),
    ("Where is the Zubrowka canteen?", "The Zubrowka canteen is on the second floor."),
]


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "faq.jsonl", [{"instruction": q, "output": a} for q, a in RECORDS])


def make_adapter(
    base_dir: Path,
    name: str,
    rank: int = 4,
    targets: list[str] | str = "all-linear",
    seed: int = 0,
    alpha: int | None = None,
    fill_b: float | None = None,
) -> str:
    """Register a random (non-zero) PEFT LoRA adapter for `base_dir` in the current store; returns its id.
    `fill_b` sets every lora_B weight to that value (inf: an adapter whose weights overflow)."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model

    from loraplex.adapters import registry
    from loraplex.models.load import load_model, resolve_base

    base = resolve_base(str(base_dir))
    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(base),
        LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, init_lora_weights=False),
    )
    if fill_b is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(fill_b)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        ref = registry.register(
            name,
            Path(tmp),
            {
                "base_model": {"id": base.id, "source": base.source, "fingerprint": base.fingerprint},
                "description": f"random test adapter {name}",
                "owner": "tests",
            },
        )
    return ref.id


class Server:
    """A real loraplex API (uvicorn) on a free loopback port, in a thread; `client` is the openai SDK."""

    def __init__(self, engine, gateway=None, api_key: str = "unused"):  # noqa: ANN001
        import threading
        import time

        import openai
        import uvicorn

        from loraplex.api.server import create_app

        self.engine = engine
        self.app = create_app(engine, gateway)
        self.gateway = self.app.state.gateway
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def home_env(path: Path) -> Iterator[Path]:
    """$LORAPLEX_HOME = path for a module-scoped fixture (monkeypatch is function-scoped)."""
    old = os.environ.get("LORAPLEX_HOME")
    os.environ["LORAPLEX_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("LORAPLEX_HOME", None)
        else:
            os.environ["LORAPLEX_HOME"] = old
