"""Predictions of a trained model on image files and folders: the library behind ``stl predict``.

    stl predict models/student/model.pt photo.jpg holiday/ --topk 3            # CSV on stdout
    stl predict models/student/model.pt data/raw --format json --output preds.json

    model, meta = load_trained_model("models/student/model.pt")
    rows = predict_files(model, meta, find_images(["holiday/"])[0], topk=3)

Images go through the model's eval transform (the one evaluation uses). A token model predicts from the fused
logits (``cls + fused_weight * max over tokens of aux``, the evaluate stage's ``test_fused``;
``--fused-weight`` sets w, 0.5 by default like ``evaluate.fused_weight``), so a prediction here equals that
one for the same file. A file that cannot be decoded becomes a row with an ``error`` and a line on stderr
instead of stopping a long run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stl.data import IMAGE_EXTENSIONS, create_transforms, load_image_rgb
from stl.models.outputs import FUSED_WEIGHT, prediction_logits

__all__ = ["find_images", "format_predictions", "keep_freed_memory", "predict_files", "resolve_device"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)


def keep_freed_memory(max_kept_bytes: int = 1 << 30) -> bool:
    """Make glibc keep freed memory for the next batch instead of handing it back to the OS.

    Inference allocates the same activations batch after batch. By default glibc serves each large one with
    fresh pages from mmap and unmaps it when freed, so every batch page-faults its activations in again; with
    every block on the heap, ``stl predict`` with FAN-ViT-T at 224 px spends ~1.5x less time on its batches,
    for ~15% more peak memory. Results do not change. The cost: memory freed below a live block stays with
    the process until it exits (only free memory at the top of the heap beyond ``max_kept_bytes`` goes back
    to the OS). Process-wide, so only short processes that just run inference (``stl predict``, the
    evaluate stage) call it. Returns whether it took effect (False off glibc).
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    kept = min(int(max_kept_bytes), 2**31 - 1)
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, kept))


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], int]:
    """The files to predict: each file given as is, each folder searched recursively for image extensions
    (case-insensitive, hidden entries skipped, sorted); duplicates dropped. Returns (files, skipped count).

    A file named explicitly is kept whatever its extension, so a wrong one is reported rather than ignored.
    A missing path raises FileNotFoundError naming it (before any model work).
    """
    files: list[Path] = []
    skipped = 0
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            for current, dirs, names in os.walk(path):
                skipped += sum(d.startswith(".") for d in dirs)
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        files.append(Path(current) / name)
                    else:
                        skipped += 1
        else:
            raise FileNotFoundError(f"{path}: no such file or folder; give image files or folders of images")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, skipped


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; a clear error for CUDA without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


class _ImageFiles(Dataset):
    """(tensor or None, index, error) per file: a decode failure is data, not an exception in a worker."""

    def __init__(self, files: Sequence[Path], transform: Callable) -> None:
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            return self.transform(load_image_rgb(self.files[index])), index, ""
        except Exception as e:  # noqa: BLE001 - any decoder failure is reported per file
            return None, index, f"{type(e).__name__}: {e}"


def _collate(batch: list[tuple[torch.Tensor | None, int, str]]) -> tuple[torch.Tensor | None, list, list]:
    good = [(x, i) for x, i, _ in batch if x is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], [(i, err) for x, i, err in batch if x is None]


def predict_files(
    model: nn.Module,
    meta: dict[str, Any],
    files: Sequence[Path],
    *,
    topk: int = 5,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    workers: int = 0,
    fused: bool = True,
    fused_weight: float = FUSED_WEIGHT,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per file, in order: ``path``, ``predictions`` ([(class, prob)], best first) and ``error``
    ('' when the image was read). Token models use ``cls + fused_weight * max over tokens of aux`` unless
    ``fused`` is False (class token only). With ``progress``, a bar and the per-file errors go to stderr.

    ``meta`` is :func:`stl.models.load_trained_model`'s (classes, img_size, mean, std).
    """
    from tqdm import tqdm

    if topk < 1:
        raise ValueError(f"--topk must be at least 1, got {topk}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    classes = list(meta["classes"])
    k = min(topk, len(classes))
    transform = create_transforms(int(meta["img_size"]), train=False, mean=meta["mean"], std=meta["std"])
    loader = DataLoader(_ImageFiles(files, transform), batch_size=batch_size, num_workers=workers,
                        shuffle=False, collate_fn=_collate)
    rows: list[dict[str, Any]] = [{"path": str(f), "predictions": [], "error": ""} for f in files]
    device = torch.device(device)
    model.eval()
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for images, indices, errors in loader:
            for i, err in errors:
                rows[i]["error"] = err
                if progress:
                    tqdm.write(f"warning: {files[i]}: not readable as an image ({err})", file=sys.stderr)
            if images is not None:
                logits = prediction_logits(model(images.to(device)), fused_weight if fused else None)
                probs, idx = logits.softmax(-1).topk(k, dim=-1)
                for i, p_row, c_row in zip(indices, probs.cpu().tolist(), idx.cpu().tolist(), strict=True):
                    rows[i]["predictions"] = [(classes[c], p) for c, p in zip(c_row, p_row, strict=True)]
            bar.update(len(indices) + len(errors))
    return rows


def format_predictions(rows: Sequence[dict[str, Any]], fmt: str, topk: int) -> str:
    """Rows of :func:`predict_files` as CSV (``path,top1,top1_prob,...,topK,topK_prob,error``) or JSON (a list
    of ``{path, predictions: [{class, prob}], error}``, error null when read). Probabilities: 6 decimals."""
    if fmt == "json":
        items = [{"path": r["path"],
                  "predictions": [{"class": c, "prob": round(p, 6)} for c, p in r["predictions"]],
                  "error": r["error"] or None} for r in rows]
        return json.dumps(items, indent=2) + "\n"
    if fmt != "csv":
        raise ValueError(f"unknown output format {fmt!r}; use csv or json")
    k = max([len(r["predictions"]) for r in rows] + [0]) or topk
    header = ["path"] + [col for j in range(1, k + 1) for col in (f"top{j}", f"top{j}_prob")] + ["error"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        cells = [cell for c, p in r["predictions"] for cell in (c, f"{p:.6f}")]
        writer.writerow([r["path"], *cells, *[""] * (2 * k - len(cells)), r["error"]])
    return out.getvalue()
