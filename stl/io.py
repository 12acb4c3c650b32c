"""Atomic file output, the one way the project writes files (and the one file digest it reads them by).

A temp file (or folder) beside the target, then ``os.replace``: readers (DVC, the next stage, a browser) see
the old file or the new one, never half of one, and a failure leaves the old file and no temp file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(binary_file)`` on a temp file beside ``path``, fsync, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes atomically."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return atomic_write(path, lambda f: f.write(raw))


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """JSON (indented, UTF-8) atomically; ``dumps`` go to :func:`json.dumps` (e.g. ``allow_nan=False``)."""
    return write_bytes_atomic(path, json.dumps(obj, indent=2, **dumps) + "\n")


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically: an interrupted save never corrupts the previous checkpoint."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


@contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder that replaces ``out_dir`` only if the block completes.

    The staging folder sits beside ``out_dir`` (same filesystem, so the swap is a rename); on any exception
    it is deleted and an existing ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        staging = work / "new"
        staging.mkdir()  # created with the umask's permissions, unlike mkdtemp's 0700
        yield staging
        old = work / "old"
        if out_dir.exists() or out_dir.is_symlink():
            os.replace(out_dir, old)
        try:
            os.replace(staging, out_dir)
        except BaseException:
            if old.exists() or old.is_symlink():
                os.replace(old, out_dir)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
