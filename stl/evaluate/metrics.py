"""Test-split metrics from logits, and the files the evaluate stage declares.

:func:`compute_metrics` turns ``labels [N]`` and ``logits [N, K]`` into one JSON-safe dict (accuracy,
P/R/F1, one-vs-rest ROC and AUC, confusion matrix). :func:`write_evaluation` writes DVC's metrics file and
the plot files in the formats DVC's templates read (``confusion.csv``: rows of ``actual,predicted``;
``roc/<class>.json``: ``{"roc": [{fpr, tpr, threshold}, ...]}``), plus CSV/JSON tables for people and for
the report stage. Every file is written atomically: a crashed stage never leaves a half-written file.
"""

from __future__ import annotations

import csv
import heapq
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from stl.io import write_bytes_atomic, write_json_atomic

# Scalars that go to reports/metrics.json (DVC metrics), in this order, when present in a result.
SCALAR_KEYS = (
    "top1", "top5",
    "macro_precision", "macro_recall", "macro_f1",
    "weighted_precision", "weighted_recall", "weighted_f1",
    "micro_auc", "macro_auc",
    "num_samples",
)
# roc_curve's first threshold is +inf ("predict nothing positive"); JSON has no inf, and every score here is a
# probability <= 1, so any finite number above 1 keeps the meaning.
INF_THRESHOLD = 1e9
MAX_ROC_POINTS = 200
_DIGITS = 6


def compute_metrics(labels: np.ndarray, logits: np.ndarray, class_names: Sequence[str], *,
                    max_roc_points: int = MAX_ROC_POINTS) -> dict[str, Any]:
    """All test metrics for one prediction, as plain python types (JSON-safe, NaN as None).

    Rates are fractions in 0..1. P/R/F1 follow scikit-learn (``zero_division=0``); the macro averages run over
    the classes present in ``labels`` (a class the split lacks would otherwise count as recall 0), so with an
    absent class they differ from ``report``'s "macro avg", which averages all K. ROC is one-vs-rest on
    softmax probabilities; a class with no positive (or no negative) sample has no ROC curve and AUC None, is
    left out of the macro AUC and is named in ``notes``.
    AUCs use the full curves; the stored curves are decimated to ``max_roc_points`` keeping the corners.
    """
    labels, logits = _check_inputs(labels, logits, class_names)
    n, k = logits.shape
    probs = softmax(logits)
    preds = logits.argmax(axis=1)
    ks = list(range(k))
    notes: list[str] = []

    out: dict[str, Any] = {"num_samples": n, "num_classes": k, "class_names": list(class_names)}
    out["top1"] = float(np.mean(preds == labels))
    if k > 5:
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        out["top5"] = float(np.mean((top5 == labels[:, None]).any(axis=1)))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=ks, average=None, zero_division=0)
    for avg, weights in (("macro", s > 0), ("weighted", s)):  # macro: the classes present, equally
        for name, values in (("precision", p), ("recall", r), ("f1", f)):
            out[f"{avg}_{name}"] = float(np.average(values, weights=weights))
    absent = [class_names[c] for c in ks if s[c] == 0]
    if absent:
        notes.append(f"classes absent from the labels (left out of the macro averages; predictions of them "
                     f"still count as errors; no ROC/AUC): {', '.join(absent)}")

    roc_classes: list[dict[str, Any] | None] = []
    aucs: list[float] = []
    onehot = labels[:, None] == np.arange(k)[None, :]
    for c in ks:
        pos = int(onehot[:, c].sum())
        if pos == 0 or pos == n:
            roc_classes.append(None)
            aucs.append(math.nan)
            if pos == n:
                notes.append(f"class {class_names[c]!r} is the only class in the labels: no ROC/AUC")
            continue
        fpr, tpr, thr = roc_curve(onehot[:, c], probs[:, c])
        aucs.append(float(roc_auc_score(onehot[:, c], probs[:, c])))
        roc_classes.append(_curve_dict(fpr, tpr, thr, max_roc_points) | {"auc": aucs[-1]})
    valid = [a for a in aucs if not math.isnan(a)]
    out["macro_auc"] = float(np.mean(valid)) if valid else math.nan
    if len(valid) < k:
        notes.append(f"macro AUC averages {len(valid)} of {k} classes (the others have no ROC)")
    fpr, tpr, thr = roc_curve(onehot.ravel(), probs.ravel())
    out["micro_auc"] = float(roc_auc_score(onehot.ravel(), probs.ravel()))
    out["roc"] = {
        "classes": roc_classes,
        "micro": _curve_dict(fpr, tpr, thr, max_roc_points) | {"auc": out["micro_auc"]},
        "macro": _macro_curve(roc_classes, max_roc_points) | {"auc": out["macro_auc"]},
    }

    out["per_class"] = [
        {"index": c, "class": class_names[c], "precision": float(p[c]), "recall": float(r[c]),
         "f1": float(f[c]), "support": int(s[c]), "auc": aucs[c]}
        for c in ks
    ]
    out["report"] = classification_report(labels, preds, labels=ks, target_names=list(class_names),
                                          output_dict=True, zero_division=0)
    counts = confusion_matrix(labels, preds, labels=ks)
    rows = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    out["confusion"] = {"counts": counts.tolist(), "normalized": normalized.tolist()}
    out["notes"] = notes
    return to_jsonable(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the max is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scalar_metrics(result: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The DVC-metrics subset of a :func:`compute_metrics` result, rounded to 6 digits."""
    out: dict[str, float | int | None] = {}
    for key in SCALAR_KEYS:
        if key not in result:
            continue
        v = result[key]
        if v is None or isinstance(v, int):
            out[key] = v
        else:
            out[key] = None if math.isnan(float(v)) else round(float(v), _DIGITS)
    return out


def write_evaluation(out_dir: Path, metrics_path: Path, results: Mapping[str, Mapping[str, Any]],
                     labels: np.ndarray, preds: np.ndarray, probs: np.ndarray,
                     paths: Sequence[str] | None, class_names: Sequence[str], *, top_k: int = 5,
                     extra_metrics: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write the evaluate stage's outputs.

    ``results`` maps a group name to a :func:`compute_metrics` result, e.g.
    ``{"test": ..., "test_fused": ...}`` (token models report both class-token and fused predictions); the
    first group is the primary one and feeds the sample-level files. ``labels``, ``preds``, ``probs [N, K]``
    and ``paths`` describe that primary prediction. Files: ``metrics_path`` (scalars per group),
    ``out_dir/evaluation.json`` (every result in full, for the report stage), ``per_class.csv`` /
    ``per_class.json``, ``predictions.csv``, and the DVC plot files ``confusion.csv``, ``roc/<class>.json``
    (stale ``roc/*.json`` from earlier runs are removed) and ``roc_by_class.json`` (the same points with a
    ``class`` field, for a template that colours by class). ``extra_metrics`` adds scalar groups to the
    metrics file (e.g. ``{"robustness": {...}}``), so the one file is written once.
    """
    if not results:
        raise ValueError("write_evaluation needs at least one result group, "
                         "e.g. {'test': compute_metrics(...)}")
    out_dir, metrics_path = Path(out_dir), Path(metrics_path)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    preds = np.asarray(preds).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    n, k = len(labels), len(class_names)
    if preds.shape != (n,) or probs.shape != (n, k):
        raise ValueError(f"write_evaluation: labels {labels.shape}, preds {preds.shape} and probs "
                         f"{probs.shape} do not describe the same {n} samples over {k} classes")
    if paths is not None and len(paths) != n:
        raise ValueError(f"write_evaluation: {len(paths)} paths for {n} samples")
    primary = next(iter(results))

    scalars: dict[str, Any] = {group: scalar_metrics(res) for group, res in results.items()}
    for group, values in (extra_metrics or {}).items():
        if group in scalars:
            raise ValueError(f"write_evaluation: extra metrics group {group!r} clashes with a result group")
        scalars[group] = {key: _round(v) for key, v in values.items()}
    write_json(metrics_path, scalars)
    write_json(out_dir / "evaluation.json", {group: to_jsonable(dict(res)) for group, res in results.items()})

    per_class = {group: res["per_class"] for group, res in results.items()}
    write_json(out_dir / "per_class.json", per_class)
    fields = ["group", "index", "class", "precision", "recall", "f1", "support", "auc"]
    rows = [{"group": g} | {key: _round(row[key]) for key in fields[1:]}
            for g, table in per_class.items() for row in table]
    write_bytes_atomic(out_dir / "per_class.csv", _csv_text(fields, rows))

    names = list(class_names)
    kk = min(top_k, k)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :kk]
    fields = ["index", "path", "label", "label_name", "pred", "pred_name", "prob", "correct"]
    for j in range(1, kk + 1):
        fields += [f"top{j}", f"top{j}_prob"]
    rows = []
    for i in range(n):
        row = {"index": i, "path": paths[i] if paths is not None else "", "label": int(labels[i]),
               "label_name": names[labels[i]], "pred": int(preds[i]), "pred_name": names[preds[i]],
               "prob": _round(probs[i, preds[i]]), "correct": int(labels[i] == preds[i])}
        for j in range(kk):
            row[f"top{j + 1}"] = names[order[i, j]]
            row[f"top{j + 1}_prob"] = _round(probs[i, order[i, j]])
        rows.append(row)
    write_bytes_atomic(out_dir / "predictions.csv", _csv_text(fields, rows))

    write_bytes_atomic(out_dir / "confusion.csv", _csv_text(
        ["actual", "predicted"],
        [{"actual": names[a], "predicted": names[p]} for a, p in zip(labels, preds, strict=True)]))

    roc_dir = out_dir / "roc"
    written: set[Path] = set()
    by_class: list[dict[str, Any]] = []
    curves = results[primary]["roc"]["classes"]
    for name, stem, curve in zip(names, roc_file_stems(names), curves, strict=True):
        if curve is None:
            continue
        path = roc_dir / f"{stem}.json"
        points = [{"fpr": _round(f), "tpr": _round(t), "threshold": _round(h)}
                  for f, t, h in zip(curve["fpr"], curve["tpr"], curve["thresholds"], strict=True)]
        write_json(path, {"roc": points})
        written.add(path)
        by_class += [{"class": str(name)} | p for p in points]
    # All classes in one long-format file: a template colouring by "class" overlays them without dvc.yaml
    # having to list one file per class (which depends on the dataset).
    write_json(out_dir / "roc_by_class.json", {"roc": by_class})
    if roc_dir.is_dir():
        for stale in roc_dir.glob("*.json"):
            if stale not in written:
                stale.unlink()


def roc_file_stems(class_names: Sequence[str]) -> list[str]:
    """File-safe, unique stems for ``roc/<class>.json`` (DVC uses the file name as the legend entry)."""
    stems: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(class_names):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or f"class_{i}"
        if stem.lower() in seen:
            stem = f"{stem}_{i}"
        seen.add(stem.lower())
        stems.append(stem)
    return stems


def to_jsonable(obj: Any) -> Any:
    """numpy -> python, NaN/inf -> None, tuples -> lists: what strict ``json.dumps`` accepts."""
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN), atomically."""
    write_json_atomic(path, to_jsonable(obj), allow_nan=False)


def _check_inputs(labels: Any, logits: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    logits = np.asarray(logits, dtype=np.float64)
    k = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != k:
        raise ValueError(f"compute_metrics: logits of shape {logits.shape}, expected [N, {k}] "
                         f"for {k} class names")
    if logits.shape[0] != labels.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"compute_metrics: {labels.shape[0]} labels for {logits.shape[0]} rows of logits")
    if k < 2:
        raise ValueError("compute_metrics: need at least 2 classes")
    if not np.all(np.isfinite(logits)):
        raise ValueError("compute_metrics: logits contain NaN or inf (a diverged model?)")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"compute_metrics: labels must be integers in 0..{k - 1}")
    return labels.astype(np.int64), logits


def _curve_dict(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray, max_points: int) -> dict[str, list[float]]:
    thr = np.where(np.isfinite(thr), thr, INF_THRESHOLD)
    keep = decimate_curve(fpr, tpr, max_points)
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "thresholds": thr[keep].tolist()}


def _macro_curve(classes: Sequence[Mapping[str, Any] | None], max_points: int) -> dict[str, list[float]]:
    """Mean TPR of the valid classes over the union of their FPRs (scikit-learn's macro ROC)."""
    valid = [c for c in classes if c is not None]
    if not valid:
        return {"fpr": [], "tpr": []}
    grid = np.unique(np.concatenate([np.asarray(c["fpr"]) for c in valid]))
    mean_tpr = np.mean([np.interp(grid, c["fpr"], c["tpr"]) for c in valid], axis=0)
    keep = decimate_curve(grid, mean_tpr, max_points)
    return {"fpr": grid[keep].tolist(), "tpr": mean_tpr[keep].tolist()}


def decimate_curve(x: np.ndarray, y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` points of a polyline, always the ends, most salient corners first.

    Greedy Douglas-Peucker by count: start from the two ends and repeatedly insert the point farthest from the
    chord of its span, so the corners that shape the curve survive and near-collinear points go first.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n <= max(max_points, 2):
        return np.arange(n)

    def farthest(a: int, b: int) -> tuple[float, int]:
        if b - a < 2:
            return 0.0, -1
        dx, dy = x[b] - x[a], y[b] - y[a]
        px, py = x[a + 1:b] - x[a], y[a + 1:b] - y[a]
        norm = math.hypot(dx, dy)
        d = np.abs(dx * py - dy * px) / norm if norm > 0 else np.hypot(px, py)
        i = int(np.argmax(d))
        return float(d[i]), a + 1 + i

    keep = {0, n - 1}
    dist, idx = farthest(0, n - 1)
    heap = [(-dist, 0, n - 1, idx)]
    while heap and len(keep) < max_points:
        neg, a, b, i = heapq.heappop(heap)
        if i < 0:
            continue
        keep.add(i)
        for lo, hi in ((a, i), (i, b)):
            d, j = farthest(lo, hi)
            if j >= 0:
                heapq.heappush(heap, (-d, lo, hi, j))
    return np.array(sorted(keep))


def _round(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return int(v)
    f = float(v)
    return round(f, _DIGITS) if math.isfinite(f) else None


def _csv_text(fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
