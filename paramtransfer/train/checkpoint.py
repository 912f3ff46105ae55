"""Atomic files, inter-process locks and training checkpoints (loaded with ``weights_only=True``).

Every temporary file is unique to its writer (``.NAME.<random>.tmp`` beside its target), so two processes
writing the same file never clobber each other's half-written copy: a reader sees a whole old or a whole
new file. A writer killed part-way leaves its temporary file behind; :func:`remove_stale_temps` deletes
them where the caller holds the folder's lock (then no other writer can be mid-write there).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete temporary files (``.*.tmp``) that killed writers left in ``directory``; call it only while
    holding the lock that every writer of that folder takes."""
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


@contextmanager
def hold_lock(path: str | os.PathLike, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock between processes (``filelock``) for the ``with`` block; wait for it if
    another process holds it. ``waiting`` is printed on stderr once if this process has to wait.

    The lock file is created if missing and left in place (deleting it would race with a waiter). The
    operating system releases the lock of a killed process. Locks on a network filesystem are only as
    good as its ``flock`` support.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            print(f"paramtransfer: {waiting}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: start over rather than crash
        return None
