"""Small file facts shared by the store, the base-model cache and training: a file's SHA-256,
where an installed package keeps a data file, and a cache directory written in one step.

One place so a digest computed by training (data files), the registry (adapter files) and the
base-model fingerprint are the same function. It writes only `write_dir`'s directories.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def package_file(package: str, name: str) -> Path:
    """A data file of an installed package, found without running the package's code."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed (pip install {package})")
    return Path(next(iter(spec.submodule_search_locations))) / name


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Make the directory `out` with what `write(tmp)` puts into a temporary one beside it, renamed
    in one step: a half-written cache is never read. Another process that wrote it first wins
    (its files are the same)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process wrote it first: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
