"""Small file facts shared by the store, the base-model cache and training: a file's SHA-256, and
where an installed package keeps a data file.

One place so a digest computed by training (data files), the registry (adapter files) and the
base-model fingerprint are the same function. It reads; it never writes.
"""

from __future__ import annotations

import hashlib
import importlib.util
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
