"""Content digests of files (data files recorded with results, downloads checked against pins)."""

from __future__ import annotations

import hashlib
from pathlib import Path

READ_BYTES = 1 << 20  # 1 MiB reads: constant memory for files of any size


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
