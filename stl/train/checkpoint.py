"""Training checkpoints and the run fingerprint that decides whether to resume.

The exported model file (``model.pt`` / ``labeler.pt``) and its safe loader live in :mod:`stl.models.trained`.

Every file here is a plain dict of tensors and builtins (no pickled classes), written atomically (a temp file
in the same folder, fsync, then ``os.replace``) so an interruption leaves either the old file or the new one,
never half of one; they load with ``torch.load(weights_only=True)``.

Training checkpoint (``<out>/checkpoints/last.pt`` and ``best.pt``), keys: ``model``, ``ema`` (or None),
``optimizer``, ``scheduler``, ``scaler`` (or None), ``epoch`` (0-based index of the last finished epoch),
``num_updates``, ``best_top1``, ``best_epoch``, ``best_source`` ('ema' | 'model'), ``rng`` (one entry per
rank: python, numpy, torch, cuda), ``history`` (the per-epoch rows), ``fingerprint``, ``model_name``,
``num_classes``, ``classes``, ``img_size``, ``phase``, ``epochs``, ``mean``, ``std``, ``format_version``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stl.io import file_sha256, torch_save_atomic


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically: a failure (disk full, kill, an unpicklable value) leaves the old file."""
    torch_save_atomic(obj, path)


# --- fingerprint --------------------------------------------------------------------------------------------
def fingerprint(settings: dict[str, Any], files: list[str | Path] = ()) -> str:
    """sha256 over the settings (JSON, sorted keys) and the contents of ``files`` (e.g. the manifests).

    Two runs with the same fingerprint produce the same weights, so one may resume the other's checkpoint.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        p = Path(f)
        h.update(p.name.encode())
        h.update(file_sha256(p).encode() if p.is_file() else b"<missing>")
    return h.hexdigest()


# --- rng states ---------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states, as tensors and builtins."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
