"""The adapter registry: versions, aliases, rollback, integrity, archives and export formats."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraplex.adapters import registry
from loraplex.adapters.archive import export_tar, import_tar
from loraplex.cli import app
from loraplex.errors import UserError
from loraplex.export.formats import export, modelfile
from loraplex.models.load import load_tokenizer, resolve_base
from tests.conftest import make_adapter


def test_concurrent_registration_in_two_processes_never_reuses_a_version(
    lp_home: Path, tiny_base: Path, tmp_path: Path
) -> None:
    make_adapter(tiny_base, "shared", seed=1)
    src = registry.resolve("shared@v1").path
    script = (
        "import sys\nfrom pathlib import Path\nfrom loraplex.adapters import registry\n"
        "for i in range(6):\n    registry.register('shared', Path(sys.argv[1]), {'writer': sys.argv[2]})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(src), w]) for w in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert registry.versions("shared") == list(range(1, 14))
    writers = [registry.resolve(f"shared@v{v}").manifest().get("writer") for v in range(2, 14)]
    assert sorted(writers) == ["a"] * 6 + ["b"] * 6
    (row,) = registry.catalog()
    assert row["versions"] == [f"v{v}" for v in range(1, 14)]  # the index agrees with the files


def test_alias_tag_move_rollback_and_rm(lp_home: Path, tiny_base: Path) -> None:
    for seed in (1, 2, 3):
        make_adapter(tiny_base, "legal", seed=seed)
    with pytest.raises(UserError, match="no alias 'prod'"):
        registry.resolve("legal@prod")
    registry.tag("legal@v1", "prod")
    assert registry.resolve("legal@prod").version == 1
    registry.tag("legal@v3", "prod")
    registry.tag("legal@v2", "staging")
    assert registry.resolve("legal@prod").id == "legal@v3"
    assert registry.resolve("legal").version == 3  # a bare name is the latest version
    assert registry.rollback("legal") == (3, 1)
    assert registry.resolve("legal@prod").id == "legal@v1"
    with pytest.raises(UserError, match="no earlier version"):
        registry.rollback("legal")
    # rm refuses what an alias points to, unless forced (which drops the alias too)
    with pytest.raises(UserError, match="legal@prod points to"):
        registry.remove("legal@v1")
    with pytest.raises(UserError, match="exact version"):
        registry.remove("legal@prod")
    registry.remove("legal@v3")
    assert registry.versions("legal") == [1, 2]
    registry.remove("legal@v1", force=True)
    assert registry.aliases_of("legal") == {"staging": 2}
    with pytest.raises(UserError, match="invalid alias"):
        registry.tag("legal@v2", "v7")
    with pytest.raises(UserError, match="invalid alias"):
        registry.tag("legal@v2", "../x")
    # the CLI shows aliases in list and moves them
    r = CliRunner().invoke(app, ["adapters", "tag", "legal@v2", "prod"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["adapters", "list", "--json"])
    (row,) = json.loads(r.stdout)
    assert row["aliases"] == {"prod": "v2", "staging": "v2"} and row["versions"] == ["v2"]
    r = CliRunner().invoke(app, ["adapters", "describe", "legal@v2", "--description", "法律助手", "--owner", "legal"])
    assert r.exit_code == 0, r.output
    shown = json.loads(CliRunner().invoke(app, ["adapters", "show", "legal@prod"]).stdout)
    assert shown["description"] == "法律助手" and shown["owner"] == "legal" and shown["integrity"] == "ok"
    assert shown["aliases"] == ["prod", "staging"]


def test_names_with_path_characters_never_reach_the_disk(lp_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    make_adapter(tiny_base, "ok", seed=1)
    src = registry.resolve("ok").path
    for bad in ("../evil", "a/b", "/abs", "UPPER", "", "x" * 65, "..", "a\x00b"):
        with pytest.raises(UserError, match="name"):
            registry.register(bad, src, {})
        with pytest.raises(UserError):
            registry.resolve(bad)
    assert [p.name for p in registry.store_root().iterdir() if p.is_dir() and not p.name.startswith(".")] == ["ok"]
    assert not (lp_home / "evil").exists() and not (registry.store_root() / "a").exists()


def test_tampered_or_truncated_weights_are_refused(lp_home: Path, tiny_base: Path) -> None:
    make_adapter(tiny_base, "t", seed=1)
    ref = registry.resolve("t")
    weights = ref.path / registry.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="tampered or truncated"):
        registry.verify(ref)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match="tampered or truncated"):
        registry.verify(ref)
    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        registry.verify(ref)


def test_an_adapter_for_another_base_is_refused_naming_both(lp_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplex.adapters.compat import check_compatible

    make_adapter(tiny_base, "t", seed=1)
    other = tmp_path / "other"
    cfg = LlamaConfig.from_pretrained(tiny_base)
    cfg.hidden_size, cfg.intermediate_size = 32, 64
    LlamaForCausalLM(cfg).save_pretrained(other)
    load_tokenizer(resolve_base(str(tiny_base))).save_pretrained(other)
    with pytest.raises(UserError, match=r"t@v1 was trained on .* does not fit base .*hidden_size 64 vs 32"):
        check_compatible(registry.resolve("t"), resolve_base(str(other)))


def test_archive_round_trip_is_bit_identical_and_idempotent(
    lp_home: Path, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_adapter(tiny_base, "hr", seed=1)
    make_adapter(tiny_base, "hr", seed=2)
    tar = tmp_path / "hr.tar"
    export_tar("hr@v2", tar)
    export_tar("hr@v2", tmp_path / "again.tar")
    assert tar.read_bytes() == (tmp_path / "again.tar").read_bytes()  # deterministic archives
    original = registry.resolve("hr@v2").path

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "other-home"))
    ref, new = import_tar(tar)
    assert new and ref.id == "hr@v2" and registry.versions("hr") == [2]
    for f in (registry.WEIGHTS, registry.CONFIG, registry.MANIFEST):
        assert (ref.path / f).read_bytes() == (original / f).read_bytes()
    assert import_tar(tar) == (ref, False)  # the same version again: nothing to do
    registry.verify(ref)
    # hr@v1's weights dressed up as hr@v2 (checksums consistent): refused, versions are immutable
    v1 = lp_home / "adapters" / "hr" / "v1"
    manifest = json.loads((v1 / registry.MANIFEST).read_text())
    files = {f: (v1 / f).read_bytes() for f in (registry.WEIGHTS, registry.CONFIG)}
    forged = _tar(
        tmp_path / "forged.tar",
        "hr",
        2,
        {**files, registry.MANIFEST: json.dumps({**manifest, "version": 2, "id": "hr@v2"}).encode()},
    )
    with pytest.raises(UserError, match="already exists with different weights"):
        import_tar(forged)
    assert (ref.path / registry.WEIGHTS).read_bytes() == (original / registry.WEIGHTS).read_bytes()


def _tar(path: Path, name: str, version: int, files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w") as t:
        for fname, data in {**{f"{name}/v{version}/{k}": v for k, v in files.items()}, **(extra or {})}.items():
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_bad_archives_are_refused_and_write_nothing(lp_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    make_adapter(tiny_base, "src", seed=1)
    good = export_tar("src@v1", tmp_path / "good.tar")
    with tarfile.open(tmp_path / "good.tar") as t:
        files = {m.name.split("/")[-1]: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]
    registry.remove(good.id)
    manifest = json.loads(files["manifest.json"])
    cases = {
        "not a readable adapter archive": (tmp_path / "junk.tar", None),
        "damaged or truncated": (tmp_path / "trunc.tar", None),
        "unexpected member '../../etc/x'": _tar(tmp_path / "evil.tar", "src", 1, files, {"../../etc/x": b"x"}),
        "adapter_model.safetensors missing": _tar(
            tmp_path / "missing.tar", "src", 1, {k: v for k, v in files.items() if k != registry.WEIGHTS}
        ),
        "manifest.json field files.adapter_model.safetensors.sha256": _tar(
            tmp_path / "schema.tar",
            "src",
            1,
            {
                **files,
                "manifest.json": json.dumps(
                    {**manifest, "files": {**manifest["files"], registry.WEIGHTS: {"sha256": "nope", "bytes": 1}}}
                ).encode(),
            },
        ),
        "tampered or truncated": _tar(
            tmp_path / "tamper.tar", "src", 1, {**files, registry.WEIGHTS: files[registry.WEIGHTS][:-1] + b"\x00"}
        ),
        "invalid adapter name": _tar(tmp_path / "name.tar", "Bad Name", 1, files),
    }
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 100)
    (tmp_path / "trunc.tar").write_bytes((tmp_path / "good.tar").read_bytes()[:1500])
    for message, case in cases.items():
        path = case[0] if isinstance(case, tuple) else case
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
            import_tar(path)
    assert registry.versions("src") == []
    assert not [p for p in (registry.store_root() / "src").iterdir()]  # no temporary directories left


def test_export_formats(lp_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.engine.local import LocalModel

    make_adapter(tiny_base, "sup", rank=8, seed=3)
    make_adapter(tiny_base, "hr", rank=4, seed=4)
    registry.tag("sup@v1", "prod")
    registry.tag("hr@v1", "prod")
    # peft: the two PEFT files, loadable by anyone
    export(["sup"], "peft", tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} >= {registry.WEIGHTS, registry.CONFIG}
    # merged: plain transformers answers exactly like base + adapter
    export(["sup@prod"], "merged", tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    lm = LocalModel(base=str(tiny_base), adapter="sup@v1")
    for q in ("How many days of leave do I get?", "明澜科技的年假有多少天？"):
        msgs = [{"role": "user", "content": q}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = merged.generate(**ids, max_new_tokens=24, do_sample=False)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text.strip() == lm.answer(msgs, 24)  # LocalModel strips surrounding whitespace
    assert merged.generation_config.eos_token_id  # stops at end of turn on its own
    # vllm: PEFT directories and the command line for every prod adapter
    r = CliRunner().invoke(app, ["export", "--format", "vllm", "--alias", "prod", "--out", str(tmp_path / "vllm")])
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "vllm" / "vllm.json").read_text())
    assert spec["max_lora_rank"] == 8 and [m["id"] for m in spec["lora_modules"]] == ["hr@v1", "sup@v1"]
    sh = (tmp_path / "vllm" / "serve.sh").read_text()
    assert "--enable-lora" in sh and f"sup={tmp_path / 'vllm' / 'adapters' / 'sup'}" in sh
    assert (tmp_path / "vllm" / "adapters" / "hr" / registry.WEIGHTS).is_file()
    # an existing non-empty directory is never overwritten; a failed export leaves nothing behind
    with pytest.raises(UserError, match="not empty"):
        export(["sup"], "peft", tmp_path / "peft")
    with pytest.raises(UserError, match="not a GGUF file"):
        export(["sup"], "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".tmp-*"))


def test_modelfile_takes_template_stop_and_system_from_the_chat_template(tiny_base: Path) -> None:
    tok = load_tokenizer(resolve_base(str(tiny_base)))
    text = modelfile("./base.gguf", "./adapter.gguf", tok, None)
    lines = text.splitlines()
    assert lines[0] == "FROM ./base.gguf" and lines[1] == "ADAPTER ./adapter.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "{{ .System }}" in text and "<|im_start|>assistant\n" in text
    assert 'SYSTEM """You are a helpful assistant."""' in lines  # the template's default system prompt
    assert 'SYSTEM """只回答人事问题。"""' in modelfile("b", "a", tok, "只回答人事问题。")


def test_a_damaged_index_says_delete_it_and_is_rebuilt_after(tiny_base: Path, lp_home: Path) -> None:
    make_adapter(tiny_base, "legal", seed=1)
    registry.tag("legal@v1", "prod")
    index = lp_home / "adapters" / "index.db"
    registry._open.clear()  # as a new process would: no pool holds the old file open
    for f in index.parent.glob("index.db*"):
        f.unlink()
    index.write_bytes(b"not a database, " * 64)
    with pytest.raises(UserError, match="index.db is damaged .*delete it and it is rebuilt"):
        registry.catalog()
    registry._open.clear()
    index.unlink()
    assert [(e["name"], e["versions"]) for e in registry.catalog()] == [("legal", ["v1"])]  # rebuilt from the files


# A child that does one store operation. With "before"/"after" it SIGKILLs itself right before or
# right after the rename that publishes its result (the moments between the steps of a commit);
# with "random" the test kills it at a random moment; with "never" it finishes.
_KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
at, op, arg = sys.argv[1:4]
rename = os.rename
def killing_rename(src, dst):
    if at == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
    if at == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = killing_rename
if op == "register":
    from loraplex.adapters import registry
    registry.register("hr", Path(arg), {"base_model": {"id": "tiny"}})
elif op == "import":
    from loraplex.adapters.archive import import_tar
    import_tar(Path(arg))
else:
    from loraplex.export.formats import export
    export(["hr@v1"], "merged", Path(arg))
"""


@pytest.mark.slow(30)
@pytest.mark.parametrize("op", ["register", "import", "export"])
def test_a_kill_during_registration_import_or_export_leaves_no_partial_result_and_is_reported(
    op: str, lp_home: Path, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kill -9` right before the publishing rename, right after it, and at random moments: the
    store (or the export directory) holds only complete results, the index is repaired, the next
    command says what it cleaned up, and the operation run again succeeds."""
    import os
    import random
    import signal
    import time

    make_adapter(tiny_base, "hr", seed=1)
    export_tar("hr@v1", tmp_path / "hr.tar")
    out = tmp_path / "merged"
    arg = {"register": str(registry.resolve("hr@v1").path), "import": str(tmp_path / "hr.tar"), "export": str(out)}
    env = {**os.environ}

    def fresh_store_for_import(i: int) -> None:
        """Import writes only into a store without the version: a new one for every run."""
        if op == "import":
            monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / f"other-home-{i}"))
            env["LORAPLEX_HOME"] = str(tmp_path / f"other-home-{i}")

    def complete_export_removed() -> None:
        """An export directory that exists is whole (then removed, so the next export can write it)."""
        if out.exists():
            assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
            shutil.rmtree(out)

    def next_command() -> str:
        """What a user runs next: a listing, or the same export again; its warnings, on one line."""
        complete_export_removed()
        cmd = ["export", "hr@v1", "--format", "merged", "--out", str(out)] if op == "export" else ["adapters", "list"]
        done = subprocess.run(
            [sys.executable, "-m", "loraplex.cli", *cmd], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Setting accelerator" not in done.stderr  # no DeepSpeed chatter when it is not used
        complete_export_removed()
        return " ".join(done.stderr.split())

    def consistent() -> None:
        """Nothing half-written anywhere; complete, checked versions; the index agrees with the files."""
        assert [p.name for p in [*registry.store_root().rglob(".t*"), *tmp_path.glob(".t*")]] == []
        on_disk = registry.versions("hr")
        for v in on_disk:
            registry.verify(registry.resolve(f"hr@v{v}"))
        assert [r["versions"] for r in registry.catalog()] == ([[f"v{v}" for v in on_disk]] if on_disk else [])

    def child(i: int, at: str, rng: random.Random | None = None) -> int:
        """Run the child; with `rng`, SIGKILL it a random moment after its staging entry appears."""
        fresh_store_for_import(i)
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, at, op, arg[op]], env=env)
        if rng is not None:
            where = registry.store_root() if op != "export" else tmp_path
            while proc.poll() is None and not any(where.rglob(".tmp-*")):
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.003 if op != "export" else 0.3))
            proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=300)

    label = {"register": "registration", "import": "import", "export": "export"}[op]
    assert child(0, "never") == 0
    next_command()
    rng = random.Random(3)
    for i, at in enumerate(("before", "after", "random", "random", "random"), 1):
        code = child(i, at, rng if at == "random" else None)
        assert code == -signal.SIGKILL or (at == "random" and code == 0), code
        said = next_command()
        if at == "before":
            assert f"an unfinished {label} left by process" in said and "killed or crashed" in said, said
        if at == "after" and op != "export":
            assert f"indexed hr@v{3 if op == 'register' else 1}:" in said, said
            assert "missing from the index" in said, said
        consistent()
    assert child(9, "never") == 0  # and the operation, run again, succeeds
    next_command()
    consistent()
