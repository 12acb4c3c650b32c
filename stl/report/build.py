"""The report stage's work: turn the evaluation outputs and training histories into one HTML file.

    python stages/report.py          # reads reports/eval/, models/*/history.json -> reports/report.html

Reads only files written by earlier stages (no model runs here), so the report is cheap to rebuild.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stl.io import write_bytes_atomic
from stl.report.figures import (
    figure_png,
    plot_confusion_matrix,
    plot_per_class,
    plot_roc,
    plot_training_curves,
    token_label_maps,
)
from stl.report.html import render_report


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _samples(eval_dir: Path, raw_dir: Path, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` test predictions with their images: every wrong one first, then correct ones."""
    path = eval_dir / "predictions.csv"
    if n <= 0 or not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    wrong = [r for r in rows if r["correct"] in ("False", "false", "0")]
    right = [r for r in rows if r not in wrong]
    picked = (wrong + right)[:n]
    return [
        {
            "image": raw_dir / r["path"],
            "path": r["path"],
            "label": r["label_name"],
            "pred": r["pred_name"],
            "prob": float(r["prob"]),
            "correct": r in right,
        }
        for r in picked
    ]


def _token_map_figures(eval_dir: Path, raw_dir: Path) -> list[dict[str, Any]]:
    """Labeler and student token-label maps beside each image (token models only), drawn over the image as
    the model saw it (resized and centre-cropped), so each cell sits on the pixels its token covers."""
    from stl.data import load_display_image, load_image_rgb

    data = _read_json(eval_dir / "token_maps.json")
    if not data:
        return []
    classes = data["classes"]
    items = []
    for entry in data["maps"]:
        maps = {
            name: (entry[name]["classes"], entry[name]["confidence"])
            for name in ("labeler", "student")
            if name in entry
        }
        path = raw_dir / entry["path"]
        image = load_display_image(path, data["img_size"]) if "img_size" in data else load_image_rgb(path)
        fig = token_label_maps(image, maps, classes)
        items.append(
            {"figure": figure_png(fig), "caption": f"{entry['path']} (true: {classes[entry['label']]})"}
        )
    return items


def _save_figures(figures: Mapping[str, Path | bytes], out_dir: Path) -> None:
    """Each figure as ``out_dir/<slug>.png``."""
    import re

    for name, fig in figures.items():
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        write_bytes_atomic(out_dir / f"{slug}.png", fig if isinstance(fig, bytes) else Path(fig).read_bytes())


def build_report(
    *,
    out_path: Path,
    eval_dir: Path,
    metrics_path: Path,
    histories: Mapping[str, Path],
    raw_dir: Path,
    params: Mapping[str, Any],
    summary: Mapping[str, Any],
    samples: int = 16,
    title: str = "STL training report",
    figures_dir: Path | None = None,
) -> Path:
    """Write the self-contained report to ``out_path`` from the outputs of the earlier stages (and, with
    ``figures_dir``, every figure as a PNG file for MLflow)."""
    evaluation = _read_json(eval_dir / "evaluation.json")
    if evaluation is None:
        raise FileNotFoundError(f"{eval_dir / 'evaluation.json'}: run the evaluate stage first (dvc repro)")
    metrics = _read_json(metrics_path) or {}
    history = {phase: _read_json(p) for phase, p in histories.items() if Path(p).is_file()}
    history = {phase: h for phase, h in history.items() if h}
    test = evaluation["test"]
    classes = test["class_names"]
    figures: dict[str, Path | bytes] = {}
    if history:
        figures["training_curves"] = figure_png(plot_training_curves(history))
    figures["roc"] = figure_png(plot_roc(test["roc"], classes))
    figures["confusion"] = figure_png(plot_confusion_matrix(test["confusion"]["counts"], classes))
    figures["confusion_normalized"] = figure_png(
        plot_confusion_matrix(test["confusion"]["normalized"], classes, normalized=True)
    )
    figures["per_class"] = figure_png(plot_per_class(test["per_class"]))
    if "test_fused" in evaluation:
        fused = evaluation["test_fused"]
        figures["roc (fused cls + token prediction)"] = figure_png(
            plot_roc(fused["roc"], classes, title="ROC, fused prediction")
        )
    if (eval_dir / "robustness_heatmap.png").is_file():
        figures["robustness (ImageNet-C style corruptions, top-1)"] = eval_dir / "robustness_heatmap.png"
    if figures_dir is not None:
        _save_figures(figures, figures_dir)
    return render_report(
        out_path,
        title=title,
        summary=summary,
        params=params,
        metrics=metrics,
        history=history,
        per_class=test["per_class"],
        figures=figures,
        samples=_samples(eval_dir, raw_dir, samples),
        token_maps=_token_map_figures(eval_dir, raw_dir),
        notes=test.get("notes", []),
    )
