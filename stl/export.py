"""Export a trained model to TorchScript or ONNX, checked against PyTorch: the library behind ``stl export``.

    stl export models/student/model.pt --format torchscript        # -> exports/student-model.torchscript.pt
    stl export models/student/model.pt --format onnx --tokens      # -> exports/student-model.onnx, + tokens
    pip install "stl[export]"                                      # ONNX needs onnx and onnxruntime

The exported graph takes normalised images ``images [B, 3, S, S]`` (S = the model's img_size) with a dynamic
batch axis and returns ``logits [B, K]`` (token models: the class-token output; with ``tokens`` also
``token_logits [B, N, K]``, the aux head per patch token). A sidecar ``<export>.json`` holds what a user
needs to run it: classes, img_size, mean, std, the preprocessing and the outputs. ONNX uses torch's
TorchScript-based exporter (``dynamo=False``: needs only ``onnx``, not ``onnxscript``). Every export is
reloaded (torch.jit.load / onnxruntime) and compared with PyTorch on random inputs at batch sizes other than
the traced one; an export whose outputs differ by more than ``tolerance`` is deleted and reported, so a bad
file is never left behind.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stl.io import write_json_atomic
from stl.models import is_token_model

__all__ = ["FORMATS", "ExportError", "TracedOutputs", "default_export_path", "export_trained_model"]

FORMATS = ("torchscript", "onnx")
_SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
INSTALL_HINT = 'pip install "stl[export]"'


class ExportError(RuntimeError):
    """The export failed or its outputs differ from PyTorch's; the message names the model and the value."""


class TracedOutputs(nn.Module):
    """The exported forward: normalised images -> ``logits`` (and ``token_logits`` with ``tokens``).

    Exists so every format exports the same, fixed output signature whatever the model returns.
    """

    def __init__(self, model: nn.Module, tokens: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokens = tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        if isinstance(out, tuple):
            return out if self.tokens else out[0]
        return out


def default_export_path(model_path: str | Path, fmt: str) -> Path:
    """``models/student/model.pt`` -> ``exports/student-model.onnx`` (or ``.torchscript.pt``): outside the
    DVC outputs, which a later ``dvc repro`` or checkout would replace."""
    model_path = Path(model_path)
    prefix = f"{model_path.parent.name}-" if model_path.parent.name else ""
    return Path("exports") / f"{prefix}{model_path.stem}{_SUFFIX[fmt]}"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx and onnxruntime packages ({e}); install them with: "
                          f"{INSTALL_HINT}") from None


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracer's and exporter's notes (shape checks frozen to constants, deprecations): the
    numerical comparison after export is the real test of the traced graph."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, FutureWarning, DeprecationWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        yield


def _write_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _write_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, names: Sequence[str], opset: int
) -> None:
    axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=list(names), dynamic_axes=axes)


def _run_export(path: Path, fmt: str, images: torch.Tensor) -> list[np.ndarray]:
    if fmt == "torchscript":
        with _quiet():
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            out = loaded(images)
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"images": images.numpy()}))


def _verify(
    module: nn.Module, path: Path, fmt: str, img_size: int, trace_batch: int, label: str
) -> tuple[float, list]:
    """Max |exported - PyTorch| over batches 1 and trace_batch + 1 (never the traced size: that exercises
    the dynamic batch axis); also returns the output shapes seen at the largest batch."""
    generator = torch.Generator().manual_seed(0)
    batches = sorted({1, trace_batch + 1} - {trace_batch}) or [trace_batch + 1]
    worst, shapes = 0.0, []
    for b in batches:
        images = torch.randn(b, 3, img_size, img_size, generator=generator)
        with torch.no_grad():
            ref = module(images)
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        got = _run_export(path, fmt, images)
        if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref, strict=False)):
            raise ExportError(f"{label}: the {fmt} export returns shapes {[g.shape for g in got]} at batch "
                              f"{b}, PyTorch returns {[r.shape for r in ref]}; not written")
        worst = max(worst, *(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True)))
        shapes = [list(r.shape) for r in ref]
    return worst, shapes


def export_trained_model(
    model_path: str | Path,
    fmt: str,
    output: str | Path | None = None,
    *,
    tokens: bool = False,
    batch_size: int = 2,
    opset: int = 17,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Export the trained model file ``model_path`` (``model.pt`` / ``labeler.pt``) and verify it.

    Returns ``path``, ``sidecar``, ``max_abs_diff``, ``outputs`` (names) and ``shapes``. Raises ExportError
    (nothing written) when the export fails or differs from PyTorch by more than ``tolerance``.
    """
    from stl.models import load_trained_model

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if fmt == "onnx":
        _require_onnx()
    model, meta = load_trained_model(model_path, "cpu")
    token_model = is_token_model(model)
    if tokens and not token_model:
        raise ValueError(f"{model_path}: --tokens needs a token model (*_token), but this is "
                         f"{meta['model_name']!r}, which has no token outputs; drop --tokens")
    path = Path(output) if output is not None else default_export_path(model_path, fmt)
    names = ["logits", "token_logits"] if tokens else ["logits"]
    module = TracedOutputs(model, tokens=tokens).eval()
    img_size = int(meta["img_size"])
    example = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            if fmt == "torchscript":
                _write_torchscript(module, example, tmp)
            else:
                _write_onnx(module, example, tmp, names, opset)
        except Exception as e:  # noqa: BLE001 - the tracer/exporter raise many types
            raise ExportError(f"{model_path}: {fmt} export of {meta['model_name']!r} failed "
                              f"({type(e).__name__}: {e})") from e
        max_diff, shapes = _verify(module, tmp, fmt, img_size, batch_size, str(model_path))
        if not max_diff <= tolerance:
            raise ExportError(f"{model_path}: the {fmt} export differs from PyTorch by {max_diff:.3g} (max "
                              f"abs, tolerance {tolerance:g}); not written. Try another --opset or --format")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

    sidecar = path.with_name(path.name + ".json")
    outputs = [{"name": n, "shape": ["batch", *s[1:]]} for n, s in zip(names, shapes, strict=True)]
    write_json_atomic(sidecar, {
        "format": fmt,
        "file": path.name,
        "model_name": meta["model_name"],
        "classes": list(meta["classes"]),
        "img_size": img_size,
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "input": {"name": "images", "shape": ["batch", 3, img_size, img_size], "dtype": "float32"},
        "outputs": outputs,
        "token_model": token_model,
        "preprocess": "RGB; resize the short side to img_size (bicubic); centre crop img_size x img_size; "
                      "scale to 0..1; subtract mean and divide by std per channel",
        "postprocess": "softmax(logits) over classes" + (
            "; token models predict best with softmax(logits + 0.5 * max over tokens of token_logits) "
            "(export with --tokens)" if token_model else ""),
        **({"opset": opset} if fmt == "onnx" else {}),
        "max_abs_diff_vs_pytorch": max_diff,
    })
    return {"path": path, "sidecar": sidecar, "max_abs_diff": max_diff, "outputs": names, "shapes": shapes}
