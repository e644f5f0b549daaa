"""The one atomic-write helper: every file RedKnot writes appears whole or not at all."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None], *,
                 durable: bool = False) -> None:
    """Write ``path`` through a ``<name>.tmp-<pid>-<rand>`` sibling renamed over it.

    Args:
        data: the bytes or text, or a function that writes the temporary path.
        durable: fsync the file and its folder (the rename survives a crash), for data
            that is expensive to recompute (KV segments); caches of cheap results skip it.

    The temporary file never survives, also when ``data`` raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)
