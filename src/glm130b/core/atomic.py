"""Atomic writes: a file or folder appears under its name complete or not at all.

Every writer of the project goes through here: write under a hidden temporary name beside the
target, flush it to disk (fsync), rename it into place, then fsync the folder so the rename
itself survives a power cut. A crash at any point leaves the previous version intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from glm130b.core.errors import InputError

TEMPORARY_MARK = ".tmp"  # hidden temporaries are named .<name>.tmp<pid>; cleaners glob for it


def check_output_folder(path: str | Path) -> Path:
    """Refuse, before any long work, an output folder that is an existing file or that cannot be
    created or written (a read-only parent)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, and the output is a folder; choose another path")
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    unwritable = InputError(f"{existing} cannot be written; choose an output folder you can write to")
    if not existing.is_dir():
        raise unwritable
    # A file made and removed, not os.access: root passes access() on a read-only folder, and no
    # one passes a read-only mount or /proc.
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".glm130b-write-check-")
    except OSError:
        raise unwritable from None
    os.close(handle)
    os.unlink(probe)
    return path


def temporary_path(path: Path) -> Path:
    """The hidden temporary name beside `path` that this process writes before the rename."""
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def fsync_directory(directory: Path) -> None:
    """Make the entries of `directory` (e.g. a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write a file at; on success it is synced and renamed to `path`,
    on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary file beside `path`, then the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_directory(tmp: Path, final: Path) -> None:
    """Rename a complete folder written at `tmp` to `final` (replacing an older `final`)."""
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_directory(final.parent)
