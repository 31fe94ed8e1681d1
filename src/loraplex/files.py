"""Small file facts shared by the store, the base-model cache and training: a file's SHA-256.

One place so a digest computed by training (data files), the registry (adapter files) and the
base-model fingerprint are the same function. It reads; it never writes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
