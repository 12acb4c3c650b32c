"""compute_metrics against hand-computed values; write_evaluation's files and DVC plot formats."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from stl.evaluate.metrics import (
    INF_THRESHOLD,
    compute_metrics,
    decimate_curve,
    roc_file_stems,
    softmax,
    write_evaluation,
)

NAMES3 = ["cat", "dog", "owl"]


def _pair_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC by its definition: P(score_pos > score_neg) + 0.5 P(tie)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _known() -> tuple[np.ndarray, np.ndarray]:
    """6 samples, 3 classes; argmax predictions [0, 0, 1, 1, 2, 2] for labels [0, 0, 0, 1, 1, 2]."""
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([
        [0.7, 0.2, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.5, 0.2],
        [0.2, 0.6, 0.2],
        [0.1, 0.4, 0.5],
        [0.1, 0.1, 0.8],
    ])
    return labels, np.log(probs)  # softmax(log p) == p for rows summing to 1


def test_perfect_classifier() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2])
    logits = 5.0 * np.eye(3)[labels]
    m = compute_metrics(labels, logits, NAMES3)
    keys = ("top1", "macro_precision", "macro_recall", "macro_f1", "weighted_f1", "micro_auc", "macro_auc")
    for key in keys:
        assert m[key] == pytest.approx(1.0), key
    assert "top5" not in m
    assert m["confusion"]["counts"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert all(row["auc"] == pytest.approx(1.0) for row in m["per_class"])
    assert m["notes"] == []


def test_known_confusion_and_scores() -> None:
    labels, logits = _known()
    m = compute_metrics(labels, logits, NAMES3)
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["confusion"]["counts"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    np.testing.assert_allclose(m["confusion"]["normalized"], [[2 / 3, 1 / 3, 0], [0, 0.5, 0.5], [0, 0, 1]])
    prec, rec, f1 = [1.0, 0.5, 0.5], [2 / 3, 0.5, 1.0], [0.8, 0.5, 2 / 3]
    for row, p, r, f in zip(m["per_class"], prec, rec, f1, strict=True):
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f))
    assert [row["support"] for row in m["per_class"]] == [3, 2, 1]
    assert m["macro_precision"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["report"]["dog"]["precision"] == pytest.approx(0.5)

    probs = np.exp(logits)
    aucs = [_pair_auc(probs[labels == c, c], probs[labels != c, c]) for c in range(3)]
    assert aucs[2] == 1.0  # its one positive (0.8) beats every negative
    assert aucs[0] == pytest.approx(1.0)  # positives 0.7, 0.6, 0.3 vs negatives 0.2, 0.1, 0.1
    assert aucs[1] == pytest.approx(7 / 8)  # positives 0.6, 0.4 vs 0.2, 0.3, 0.5, 0.1: 0.4 loses to 0.5
    for row, auc in zip(m["per_class"], aucs, strict=True):
        assert row["auc"] == pytest.approx(auc)
    assert m["macro_auc"] == pytest.approx(np.mean(aucs))
    onehot = np.eye(3)[labels].ravel().astype(bool)
    assert m["micro_auc"] == pytest.approx(_pair_auc(probs.ravel()[onehot], probs.ravel()[~onehot]))
    curve = m["roc"]["classes"][1]
    assert curve["fpr"][0] == 0.0 and curve["tpr"][0] == 0.0 and curve["fpr"][-1] == 1.0
    assert curve["thresholds"][0] == INF_THRESHOLD
    json.dumps(m, allow_nan=False)


def test_top5_only_beyond_five_classes() -> None:
    labels = np.array([0, 1, 2, 3, 4])
    assert "top5" not in compute_metrics(labels, np.eye(5)[labels], list("abcde"))
    # six classes: sample 0 has its label ranked 6th (not in top 5), sample 1 ranked 2nd, sample 2 first
    logits = np.array([
        [0.0, 1, 2, 3, 4, 5],
        [0.0, 1, 2, 3, 5, 4],
        [9.0, 1, 2, 3, 4, 5],
    ])
    m = compute_metrics(np.array([0, 5, 0]), logits, list("abcdef"))
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx(2 / 3)


def test_class_absent_from_labels() -> None:
    labels = np.array([0, 0, 1, 1])
    logits = np.array([[2.0, 0, 0], [1, 0, 1.5], [0, 2, 0], [0, 1, 0]])
    m = compute_metrics(labels, logits, NAMES3)
    assert m["per_class"][2]["auc"] is None
    assert m["roc"]["classes"][2] is None
    assert m["per_class"][0]["auc"] == pytest.approx(1.0) and m["per_class"][1]["auc"] == pytest.approx(1.0)
    assert m["macro_auc"] == pytest.approx(1.0)  # NaN of 'owl' skipped, not averaged in as 0
    assert any("owl" in note for note in m["notes"])
    assert m["confusion"]["normalized"][2] == [0.0, 0.0, 0.0]
    # macro P/R/F1 over the two present classes; the wrong 'owl' prediction still costs cat's recall
    assert m["macro_recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["macro_precision"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    json.dumps(m, allow_nan=False)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="expected \\[N, 3\\]"):
        compute_metrics(np.array([0, 1]), np.zeros((2, 4)), NAMES3)
    with pytest.raises(ValueError, match="labels must be integers"):
        compute_metrics(np.array([0, 3]), np.zeros((2, 3)), NAMES3)
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(np.array([0, 1]), np.full((2, 3), np.nan), NAMES3)


def test_softmax_is_stable() -> None:
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])


def test_decimate_keeps_ends_and_corners() -> None:
    rng = np.random.default_rng(0)
    x = np.sort(rng.random(5000))
    x[0], x[-1] = 0.0, 1.0
    y = np.minimum(1.0, 5 * x)  # a sharp corner at x = 0.2
    y[0] = 0.0
    keep = decimate_curve(x, y, 200)
    assert len(keep) <= 200 and keep[0] == 0 and keep[-1] == len(x) - 1
    assert np.all(np.diff(keep) > 0)
    corner = int(np.searchsorted(x, 0.2))
    assert np.min(np.abs(x[keep] - x[corner])) < 1e-3
    assert np.trapezoid(y[keep], x[keep]) == pytest.approx(np.trapezoid(y, x), abs=1e-4)
    np.testing.assert_array_equal(decimate_curve(x[:10], y[:10], 200), np.arange(10))


def test_long_roc_curves_are_decimated() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 3000)
    logits = rng.normal(size=(3000, 3)) + 1.5 * np.eye(3)[labels]
    m = compute_metrics(labels, logits, NAMES3)
    for curve in [*m["roc"]["classes"], m["roc"]["micro"], m["roc"]["macro"]]:
        assert 2 < len(curve["fpr"]) <= 200
        assert curve["fpr"][0] == 0.0 and curve["fpr"][-1] == 1.0 and curve["tpr"][-1] == 1.0


def _write(tmp_path: Path, names: list[str]) -> tuple[Path, Path, dict]:
    labels, logits = _known()
    fused = logits.copy()
    fused[2] = [0.0, -1.0, -1.0]  # the fused prediction gets sample 2 right
    results = {"test": compute_metrics(labels, logits, names),
               "test_fused": compute_metrics(labels, fused, names)}
    out_dir, metrics_path = tmp_path / "reports" / "eval", tmp_path / "reports" / "metrics.json"
    paths = [f"data/img_{i}.png" for i in range(6)]
    write_evaluation(out_dir, metrics_path, results, labels, logits.argmax(1), softmax(logits), paths, names,
                     extra_metrics={"robustness": {"mean_corruption_top1": 0.5123456789, "fog": None}})
    return out_dir, metrics_path, results


def test_write_evaluation_files(tmp_path: Path) -> None:
    names = ["cat", "dog/wolf", "<script>owl"]
    out_dir, metrics_path, results = _write(tmp_path, names)
    for path in [metrics_path, *out_dir.rglob("*.json")]:
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text, path
        json.loads(text)
    assert not list(tmp_path.rglob("*.tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert metrics_path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    metrics = json.loads(metrics_path.read_text())
    assert set(metrics) == {"test", "test_fused", "robustness"}
    assert metrics["robustness"] == {"mean_corruption_top1": 0.512346, "fog": None}
    assert metrics["test"]["top1"] == round(4 / 6, 6)
    assert metrics["test_fused"]["top1"] == round(5 / 6, 6)
    assert metrics["test"]["num_samples"] == 6
    for key in ("macro_precision", "macro_recall", "macro_f1", "weighted_f1", "micro_auc", "macro_auc"):
        v = metrics["test"][key]
        assert 0.0 <= v <= 1.0 and v == round(v, 6)
    assert "top5" not in metrics["test"] and "per_class" not in metrics["test"]

    full = json.loads((out_dir / "evaluation.json").read_text())
    assert full["test"]["confusion"]["counts"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]

    with open(out_dir / "confusion.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["actual", "predicted"]
    assert [(r["actual"], r["predicted"]) for r in rows] == [
        ("cat", "cat"), ("cat", "cat"), ("cat", "dog/wolf"), ("dog/wolf", "dog/wolf"),
        ("dog/wolf", "<script>owl"), ("<script>owl", "<script>owl")]

    roc_files = sorted(p.name for p in (out_dir / "roc").iterdir())
    assert roc_files == sorted(f"{s}.json" for s in roc_file_stems(names))
    assert roc_files == ["cat.json", "dog_wolf.json", "script_owl.json"]
    for path in (out_dir / "roc").iterdir():
        data = json.loads(path.read_text())
        assert list(data) == ["roc"]
        assert all(set(p) == {"fpr", "tpr", "threshold"} for p in data["roc"])
        assert all(math.isfinite(p[k]) for p in data["roc"] for k in p)
        assert data["roc"][0] == {"fpr": 0.0, "tpr": 0.0, "threshold": INF_THRESHOLD}
        assert data["roc"][-1]["fpr"] == 1.0 and data["roc"][-1]["tpr"] == 1.0

    by_class = json.loads((out_dir / "roc_by_class.json").read_text())["roc"]
    assert {p["class"] for p in by_class} == set(names)
    assert all(set(p) == {"class", "fpr", "tpr", "threshold"} for p in by_class)
    cat_points = [{k: v for k, v in p.items() if k != "class"} for p in by_class if p["class"] == "cat"]
    assert cat_points == json.loads((out_dir / "roc" / "cat.json").read_text())["roc"]

    with open(out_dir / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 6
    assert preds[2]["path"] == "data/img_2.png" and preds[2]["label_name"] == "cat"
    assert preds[2]["pred_name"] == "dog/wolf" and preds[2]["correct"] == "0"
    assert float(preds[2]["prob"]) == pytest.approx(0.5)
    assert preds[2]["top1"] == "dog/wolf" and preds[2]["top3"] == "<script>owl"
    assert "top4" not in preds[2]

    per_class = json.loads((out_dir / "per_class.json").read_text())
    assert [r["class"] for r in per_class["test"]] == names
    with open(out_dir / "per_class.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 6 and {r["group"] for r in table} == {"test", "test_fused"}
    assert float(table[0]["precision"]) == pytest.approx(results["test"]["per_class"][0]["precision"])


def test_write_evaluation_skips_absent_class_and_removes_stale_roc(tmp_path: Path) -> None:
    out_dir = tmp_path / "eval"
    (out_dir / "roc").mkdir(parents=True)
    (out_dir / "roc" / "old_class.json").write_text("{}")
    labels = np.array([0, 0, 1, 1])
    logits = np.array([[2.0, 0, 0], [1, 0, 1.5], [0, 2, 0], [0, 1, 0]])
    res = {"test": compute_metrics(labels, logits, NAMES3)}
    write_evaluation(out_dir, tmp_path / "m.json", res, labels, logits.argmax(1), softmax(logits), None,
                     NAMES3)
    assert sorted(p.name for p in (out_dir / "roc").iterdir()) == ["cat.json", "dog.json"]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["test"]["macro_auc"] == 1.0


def test_write_evaluation_rejects_mismatched_arrays(tmp_path: Path) -> None:
    labels, logits = _known()
    res = {"test": compute_metrics(labels, logits, NAMES3)}
    with pytest.raises(ValueError, match="same 6 samples"):
        write_evaluation(tmp_path, tmp_path / "m.json", res, labels, logits.argmax(1)[:5], softmax(logits),
                         None, NAMES3)
    assert not (tmp_path / "m.json").exists()


def test_roc_file_stems_are_safe_and_unique() -> None:
    assert roc_file_stems(["a b", "a_b", "..", "Ünï"]) == ["a_b", "a_b_1", "class_2", "n"]
