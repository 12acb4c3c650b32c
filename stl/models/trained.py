"""The trained-model file: what training exports and evaluation, prediction and export read back.

    from stl.models import load_trained_model
    model, meta = load_trained_model("models/student/model.pt", device="cpu")   # eval mode
    meta["classes"], meta["img_size"], meta["mean"], meta["std"]

A plain dict (no pickled classes, so it loads with ``torch.load(weights_only=True)``), written atomically.
Keys: ``model_name``, ``num_classes``, ``classes``, ``img_size``, ``state_dict``, ``source`` ('ema' |
'model'), ``epoch``, ``val_top1``, ``phase``, ``mean``, ``std``, ``format_version``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from stl.io import torch_save_atomic

FORMAT_VERSION = 1
EXPORT_KEYS = ("model_name", "num_classes", "classes", "img_size", "state_dict", "source", "epoch",
               "val_top1", "phase", "mean", "std")


class CheckpointError(RuntimeError):
    """A checkpoint or model file is missing, unreadable or of the wrong kind; the message names the file."""


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one of this module's files safely (``weights_only=True``); a clear error if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is one message
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:  # a pickled class: a published checkpoint, say, not one of our files
            raise CheckpointError(
                f"{path}: cannot be read as a file written by this project (it pickles the Python class "
                f"{found[1]}). Published FAN / STL checkpoints are read by stl.models.load_checkpoint "
                "(train.pretrained, stl.labeler)") from None
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        first_line = (text.strip().splitlines() or [""])[0]
        detail = found[1].strip() if found else f"{type(e).__name__}: {first_line}"[:300]
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({detail}); if training wrote it and "
                              "was interrupted, delete it to start over") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def export_model(path: str | Path, *, model_name: str, num_classes: int, classes: list[str], img_size: int,
                 state_dict: dict[str, torch.Tensor], source: str, epoch: int, val_top1: float, phase: str,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Write the deployable model file (weights + what evaluation and prediction need to use them)."""
    torch_save_atomic({
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
