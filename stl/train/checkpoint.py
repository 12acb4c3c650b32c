"""Training checkpoints, the exported model file, and the run fingerprint that decides whether to resume.

    from stl.train.checkpoint import load_trained_model
    model, meta = load_trained_model("models/model.pt", device="cpu")   # eval mode, no training code needed
    meta["classes"], meta["img_size"], meta["mean"], meta["std"]

Every file here is a plain dict of tensors and builtins (no pickled classes), written atomically (a temp file
in the same folder, fsync, then ``os.replace``) so an interruption leaves either the old file or the new one,
never half of one; they load with ``torch.load(weights_only=True)``.

Training checkpoint (``<out>/checkpoints/last.pt`` and ``best.pt``), keys: ``model``, ``ema`` (or None),
``optimizer``, ``scheduler``, ``scaler`` (or None), ``epoch`` (0-based index of the last finished epoch),
``num_updates``, ``best_top1``, ``best_epoch``, ``best_source`` ('ema' | 'model'), ``rng`` (one entry per
rank: python, numpy, torch, cuda), ``history`` (the per-epoch rows), ``fingerprint``, ``model_name``,
``num_classes``, ``classes``, ``img_size``, ``phase``, ``epochs``, ``mean``, ``std``, ``format_version``.

Exported model (``model.pt`` / ``labeler.pt``), keys: ``model_name``, ``num_classes``, ``classes``,
``img_size``, ``state_dict``, ``source`` ('ema' | 'model'), ``epoch``, ``val_top1``, ``phase``, ``mean``,
``std``, ``format_version``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stl.io import torch_save_atomic

FORMAT_VERSION = 1
EXPORT_KEYS = ("model_name", "num_classes", "classes", "img_size", "state_dict", "source", "epoch",
               "val_top1", "phase", "mean", "std")


class CheckpointError(RuntimeError):
    """A checkpoint or model file is missing, unreadable or of the wrong kind; the message names the file."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically: a failure (disk full, kill, an unpicklable value) leaves the old file."""
    torch_save_atomic(obj, path)


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one of this module's files safely (``weights_only=True``); a clear error if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is one message
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e}); "
                              "delete it to start over") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


# --- fingerprint --------------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(settings: dict[str, Any], files: list[str | Path] = ()) -> str:
    """sha256 over the settings (JSON, sorted keys) and the contents of ``files`` (e.g. the manifests).

    Two runs with the same fingerprint produce the same weights, so one may resume the other's checkpoint.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        p = Path(f)
        h.update(p.name.encode())
        h.update(_file_digest(p).encode() if p.is_file() else b"<missing>")
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


# --- exported model -----------------------------------------------------------------------------------------
def export_model(path: str | Path, *, model_name: str, num_classes: int, classes: list[str], img_size: int,
                 state_dict: dict[str, torch.Tensor], source: str, epoch: int, val_top1: float, phase: str,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Write the deployable model file (weights + what evaluation and prediction need to use them)."""
    atomic_save({
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "num_classes": int(num_classes),
        "classes": list(classes),
        "img_size": int(img_size),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "source": source,
        "epoch": int(epoch),
        "val_top1": float(val_top1),
        "phase": phase,
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
    }, path)


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by training (``model.pt`` / ``labeler.pt``): (model in eval mode, meta).

    ``meta`` is the file's dict without ``state_dict``. Only needs the model registry (``stl.models``).
    """
    import timm

    import stl.models  # noqa: F401 - registers the FAN models with timm

    obj = load_file(path)
    missing = [k for k in EXPORT_KEYS if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path}: not a model file written by training (missing keys {missing}); expected the model.pt "
            "or labeler.pt of a training stage, or checkpoints/best.pt (use load_file for that)"
        )
    try:
        model = timm.create_model(obj["model_name"], num_classes=obj["num_classes"], img_size=obj["img_size"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot build its model {obj['model_name']!r}: {e}") from None
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {obj['model_name']!r}: {e}") from None
    model.to(device).eval()
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model, meta
