"""Matplotlib figures for the report and MLflow, from plain numpy arrays and dicts.

Figures are built as ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, never through pyplot:
no GUI backend, no global figure registry to leak from in a long evaluation, safe in a worker process.
:func:`save_figure` writes a PNG atomically; :func:`figure_png` gives the bytes for embedding.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from stl.io import write_bytes_atomic

_DPI = 110
_ANNOTATE_MAX = 20  # confusion cells carry numbers up to this many classes
_LEGEND_MAX = 20  # ROC legend lists classes up to this many


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure on the Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = _DPI) -> bytes:
    """PNG bytes of ``fig`` (for HTML embedding or MLflow's ``log_image``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: Path, dpi: int = _DPI) -> Path:
    """Write ``fig`` as a PNG atomically and release it (also from pyplot, if it was made there)."""
    path = Path(path)
    write_bytes_atomic(path, figure_png(fig, dpi))
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    fig.clear()
    return path


def class_colors(k: int) -> list[tuple[float, float, float, float]]:
    """K distinguishable colours (tab10 / tab20, then an evenly sampled turbo map)."""
    if k <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(k)]
    if k <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(k)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(v) for v in np.linspace(0.05, 0.95, k)]


def plot_roc(roc: Mapping[str, Any], class_names: Sequence[str], title: str = "ROC, one-vs-rest") -> Figure:
    """Per-class ROC curves with micro and macro averages.

    ``roc`` is the ``"roc"`` entry of :func:`stl.evaluate.metrics.compute_metrics`: ``classes`` (one
    ``{fpr, tpr, auc}`` or None per class), ``micro`` and ``macro``. Beyond 20 classes the class curves are
    drawn thin and unlabelled so that the averages stay readable.
    """
    fig = new_figure(7.5, 6.0)
    ax = fig.add_subplot()
    classes = roc.get("classes", [])
    many = len(classes) > _LEGEND_MAX
    for color, name, curve in zip(class_colors(len(classes)), class_names, classes, strict=False):
        if not curve:
            continue
        label = None if many else f"{_short(name)} ({_fmt_auc(curve.get('auc'))})"
        ax.plot(curve["fpr"], curve["tpr"], color=color, lw=0.8 if many else 1.4, alpha=0.5 if many else 0.9,
                label=label)
    for key, style in (("micro", ":"), ("macro", "--")):
        curve = roc.get(key)
        if curve and len(curve.get("fpr", [])):
            ax.plot(curve["fpr"], curve["tpr"], color="black", ls=style, lw=2.2,
                    label=f"{key} average ({_fmt_auc(curve.get('auc'))})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="-", alpha=0.5)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=title + (f" ({len(classes)} classes)" if many else ""))
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small" if len(classes) <= 10 else "x-small", title="class (AUC)")
    return fig


def plot_confusion_matrix(matrix: Any, class_names: Sequence[str], normalized: bool = False,
                          title: str | None = None) -> Figure:
    """A confusion matrix (rows: actual, columns: predicted), counts or row-normalised.

    Cells carry their value up to 20 classes; the figure grows with K and, beyond ~40 classes, only every
    n-th tick is labelled so names never overlap.
    """
    m = np.asarray(matrix, dtype=np.float64)
    k = len(class_names)
    if m.shape != (k, k):
        raise ValueError(f"plot_confusion_matrix: matrix of shape {m.shape} for {k} class names")
    side = float(np.clip(2.5 + 0.42 * k, 5.0, 18.0))
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    vmax = 1.0 if normalized else max(float(m.max()), 1.0)
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    step = max(1, math.ceil(k / 40))
    ticks = list(range(0, k, step))
    labels = [_short(class_names[i]) for i in ticks]
    fs = 9 if k <= 10 else 7 if k <= 30 else 5
    ax.set_xticks(ticks, labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=fs)
    ax.set_yticks(ticks, labels, fontsize=fs)
    default = "confusion matrix (row-normalised)" if normalized else "confusion matrix (counts)"
    ax.set(xlabel="predicted", ylabel="actual", title=title or default)
    if k <= _ANNOTATE_MAX:
        size = 9 if k <= 10 else 7
        for i in range(k):
            for j in range(k):
                v = m[i, j]
                text = f"{v:.2f}" if normalized else f"{int(round(v))}"
                if not normalized and v == 0:
                    text = "0"
                ax.text(j, i, text, ha="center", va="center", fontsize=size,
                        color="white" if v > 0.55 * vmax else "black")
    return fig


def plot_training_curves(history: Mapping[str, Sequence[Mapping[str, Any]]],
                         title: str = "training curves") -> Figure:
    """Loss, top-1 and learning rate per epoch, one colour per phase (e.g. ``labeler`` and ``student``).

    ``history`` maps a phase name to its per-epoch dicts. Keys are found by name: any key containing ``loss``,
    any containing ``top1`` or ``acc``, and ``lr``; ``epoch`` is the x axis (the row number without it).
    """
    panels = (("loss", lambda key: "loss" in key), ("top-1", lambda key: "top1" in key or "acc" in key),
              ("learning rate", lambda key: key == "lr" or key.startswith("lr_")))
    phases = [(name, list(rows)) for name, rows in history.items() if rows]
    colors = class_colors(max(len(phases), 1))
    used = [title_ for title_, pick in panels
            if any(pick(key) for _, rows in phases for row in rows for key in row)]
    fig = new_figure(5.0 * max(len(used), 1), 4.2)
    if not used:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no training history", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(1, len(used), squeeze=False)[0]
    styles = ["-", "--", ":", "-."]
    for ax, panel in zip(axes, used, strict=True):
        pick = dict(panels)[panel]
        for color, (phase, rows) in zip(colors, phases, strict=False):
            keys = sorted({key for row in rows for key in row if pick(key)})
            for n, key in enumerate(keys):
                xs, ys = [], []
                for i, row in enumerate(rows):
                    v = row.get(key)
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        xs.append(row.get("epoch", i))
                        ys.append(v)
                if ys:
                    ax.plot(xs, ys, color=color, ls=styles[n % len(styles)],
                            marker="o" if len(ys) < 15 else None, ms=3, label=f"{phase}: {key}")
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set(xlabel="epoch", title=panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    return fig


def plot_per_class(per_class: Sequence[Mapping[str, Any]],
                   metrics: Sequence[str] = ("precision", "recall", "f1")) -> Figure:
    """Grouped horizontal bars of per-class metrics (rows of ``compute_metrics(...)["per_class"]``)."""
    names = [_short(str(row.get("class", i))) for i, row in enumerate(per_class)]
    k = len(names)
    fig = new_figure(8.0, float(np.clip(1.2 + 0.35 * k, 3.0, 40.0)))
    ax = fig.add_subplot()
    height = 0.8 / max(len(metrics), 1)
    y = np.arange(k)
    cmap = matplotlib.colormaps["tab10"]
    for n, metric in enumerate(metrics):
        vals = [row.get(metric) for row in per_class]
        vals = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in vals]
        ax.barh(y + (n - (len(metrics) - 1) / 2) * height, vals, height=height, color=cmap(n), label=metric)
    ax.set_yticks(y, names, fontsize=9 if k <= 20 else 6)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.0), xlabel="score", title="per-class metrics")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return fig


def plot_sample_grid(samples: Sequence[Mapping[str, Any]], cols: int = 4) -> Figure:
    """Images with ``true / pred (prob)`` titles, wrong predictions titled in red.

    Each sample: ``image`` (HxW, HxWx3 or 3xHxW array; uint8 or float), ``label`` and ``pred`` (names),
    optional ``prob``.
    """
    n = max(len(samples), 1)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = new_figure(2.6 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, s in zip(axes, samples, strict=False):
        ax.imshow(to_display_image(s["image"]), cmap="gray" if np.asarray(s["image"]).ndim == 2 else None)
        ok = s.get("correct", s.get("label") == s.get("pred"))
        prob = s.get("prob")
        tail = f" ({prob:.2f})" if isinstance(prob, (int, float)) else ""
        ax.set_title(f"true: {_short(s.get('label'))}\npred: {_short(s.get('pred'))}{tail}", fontsize=8,
                     color="black" if ok else "#c0392b")
    return fig


def token_label_map(image: Any, token_classes: Any, token_conf: Any, class_names: Sequence[str], *,
                    title: str | None = None, ax: Any = None) -> Figure:
    """STL's token-label map: each token's class (colour) and confidence (opacity, and the value in the cell
    up to 14x14 tokens) over the image, on the token grid.

    ``token_classes`` and ``token_conf`` are [h, w] (argmax class and its probability per token); the cell
    text is the confidence in percent. Draws into
    ``ax`` when given (for side-by-side figures) and returns its figure.
    """
    cls = np.asarray(token_classes, dtype=np.int64)
    conf = np.clip(np.asarray(token_conf, dtype=np.float64), 0.0, 1.0)
    if cls.ndim != 2 or conf.shape != cls.shape:
        raise ValueError(f"token_label_map: token_classes {cls.shape} and token_conf {conf.shape} must be "
                         "the same [h, w] grid")
    k = len(class_names)
    if cls.size and (cls.min() < 0 or cls.max() >= k):
        raise ValueError(f"token_label_map: token classes must be in 0..{k - 1}")
    if ax is None:
        fig = new_figure(5.2, 4.6)
        ax = fig.add_subplot()
    fig = ax.figure
    img = to_display_image(image)
    height, width = img.shape[:2]
    h, w = cls.shape
    colors = np.array([to_rgba(c) for c in class_colors(k)])
    overlay = colors[cls].copy()
    overlay[..., 3] = 0.15 + 0.55 * conf
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, width, height, 0))
    ax.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
    for i in range(1, w):
        ax.axvline(i * width / w, color="white", lw=0.4, alpha=0.6)
    for i in range(1, h):
        ax.axhline(i * height / h, color="white", lw=0.4, alpha=0.6)
    if h * w <= 196:
        fs = 7 if max(h, w) <= 8 else 5
        outline = [patheffects.withStroke(linewidth=1.5, foreground="black")]
        for r in range(h):
            for c in range(w):
                ax.text((c + 0.5) * width / w, (r + 0.5) * height / h, f"{round(100 * conf[r, c]):d}",
                        ha="center", va="center", fontsize=fs, color="white", path_effects=outline)
    present = sorted(set(cls.ravel().tolist()))
    ax.legend(handles=[Patch(color=colors[c], label=_short(class_names[c])) for c in present],
              fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set(xlim=(0, width), ylim=(height, 0), xticks=[], yticks=[])
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def token_label_maps(image: Any, maps: Mapping[str, tuple[Any, Any]], class_names: Sequence[str],
                     title: str | None = None) -> Figure:
    """The image and one token-label map per model side by side (e.g. ``{"labeler": (cls, conf),
    "student": (cls, conf)}``): shows which parts of the image each model attributes to which class."""
    fig = new_figure(3.2 + 4.4 * len(maps), 3.8)
    axes = fig.subplots(1, 1 + len(maps), squeeze=False)[0]
    img = to_display_image(image)
    axes[0].imshow(img, cmap="gray" if img.ndim == 2 else None)
    axes[0].set(xticks=[], yticks=[], title="image")
    for ax, (name, (cls, conf)) in zip(axes[1:], maps.items(), strict=True):
        token_label_map(image, cls, conf, class_names, title=name, ax=ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def to_display_image(image: Any) -> np.ndarray:
    """HxW or HxWx3 in a range imshow accepts: CHW is transposed, normalised floats rescaled to 0..1."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


def _short(name: Any, n: int = 18) -> str:
    """Middle ellipsis: class names often share a prefix and differ at the end (``n01440764_tench``)."""
    s = str(name)
    if len(s) <= n:
        return s
    head = (n - 1) // 2
    return s[:head] + "\u2026" + s[len(s) - (n - 1 - head):]


def _fmt_auc(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


__all__ = [
    "class_colors", "figure_png", "new_figure", "plot_confusion_matrix", "plot_per_class", "plot_roc",
    "plot_sample_grid", "plot_training_curves", "save_figure", "to_display_image", "token_label_map",
    "token_label_maps",
]
