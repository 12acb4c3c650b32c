"""Figures build from plain data, draw what they should, and save as PNG atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from stl.evaluate.metrics import compute_metrics
from stl.report.figures import (
    figure_png,
    plot_confusion_matrix,
    plot_per_class,
    plot_roc,
    plot_sample_grid,
    plot_training_curves,
    save_figure,
    to_display_image,
    token_label_map,
    token_label_maps,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def metrics() -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 80)
    labels[:4] = [0, 1, 2, 3]
    logits = rng.normal(size=(80, 4)) + 2 * np.eye(4)[labels]
    return compute_metrics(labels, logits, ["a", "b", "c", "d"])


def test_roc_figure_has_classes_and_averages(metrics: dict, tmp_path: Path) -> None:
    fig = plot_roc(metrics["roc"], metrics["class_names"])
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert sum(lbl.startswith(("micro", "macro")) for lbl in labels) == 2
    assert sum(lbl[:2] in ("a ", "b ", "c ", "d ") for lbl in labels) == 4
    path = save_figure(fig, tmp_path / "figs" / "roc.png")
    assert path.read_bytes().startswith(PNG)
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]  # no temp file left


def test_roc_skips_a_class_without_curve(metrics: dict) -> None:
    roc = dict(metrics["roc"], classes=[None, *metrics["roc"]["classes"][1:]])
    fig = plot_roc(roc, metrics["class_names"])
    assert len([ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("a ")]) == 0


@pytest.mark.parametrize("k", [3, 25])
def test_confusion_matrix_scales(k: int) -> None:
    m = np.arange(k * k).reshape(k, k)
    fig = plot_confusion_matrix(m, [f"class_{i}" for i in range(k)])
    ax = fig.axes[0]
    assert len(ax.texts) == (k * k if k <= 20 else 0)  # numbers in the cells only while readable
    assert fig.get_size_inches()[1] >= 5.0
    norm = plot_confusion_matrix(m / m.sum(1, keepdims=True), [str(i) for i in range(k)], normalized=True)
    assert "normalised" in norm.axes[0].get_title()
    assert figure_png(fig, dpi=40).startswith(PNG)


def test_confusion_matrix_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion_matrix(np.zeros((2, 2)), ["a", "b", "c"])


def test_training_curves_two_phases() -> None:
    history = {
        "labeler": [{"epoch": e, "train_loss": 2 - 0.1 * e, "val_top1": 0.1 * e, "lr": 1e-3}
                    for e in range(5)],
        "student": [{"epoch": e, "train_loss": 1.5 - 0.1 * e, "val_loss": 1.6 - 0.1 * e, "val_top1": 0.2 * e,
                     "lr": 1e-3 / (e + 1)} for e in range(4)],
    }
    fig = plot_training_curves(history)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "top-1", "learning rate"]
    loss_labels = {ln.get_label() for ln in fig.axes[0].get_lines()}
    assert loss_labels == {"labeler: train_loss", "student: train_loss", "student: val_loss"}
    assert figure_png(fig, dpi=40).startswith(PNG)


def test_training_curves_without_history() -> None:
    fig = plot_training_curves({"student": []})
    assert isinstance(fig, Figure) and fig.axes[0].texts[0].get_text() == "no training history"


def test_per_class_bars(metrics: dict) -> None:
    fig = plot_per_class(metrics["per_class"])
    assert len(fig.axes[0].patches) == 3 * 4


def test_sample_grid_marks_wrong_predictions() -> None:
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    samples = [{"image": img, "label": "a", "pred": "a", "prob": 0.9},
               {"image": np.zeros((16, 16)), "label": "a", "pred": "b", "prob": 0.6},
               {"image": np.zeros((3, 16, 16), dtype=np.float32), "label": "b", "pred": "b"}]
    fig = plot_sample_grid(samples, cols=2)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 3
    assert titled[1].title.get_color() != titled[0].title.get_color()
    assert "(0.60)" in titled[1].get_title()


def test_token_label_map_and_side_by_side(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((32, 32, 3))
    classes = np.array([[0, 1], [2, 1]])
    conf = np.array([[0.9, 0.5], [0.3, 1.0]])
    names = ["zero", "one", "two"]
    fig = token_label_map(image, classes, conf, names, title="labeler")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["90", "50", "30", "100"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names
    overlay = ax.get_images()[1].get_array()
    assert overlay.shape == (2, 2, 4) and overlay[0, 0, 3] > overlay[1, 0, 3]  # confident tokens more opaque
    pair = token_label_maps(image, {"labeler": (classes, conf), "student": (classes[::-1], conf)}, names)
    assert [a.get_title() for a in pair.axes] == ["image", "labeler", "student"]
    assert save_figure(pair, tmp_path / "tl.png").read_bytes().startswith(PNG)


def test_token_label_map_checks_shapes() -> None:
    with pytest.raises(ValueError, match="same \\[h, w\\] grid"):
        token_label_map(np.zeros((8, 8)), np.zeros((2, 2), int), np.zeros((2, 3)), ["a"])
    with pytest.raises(ValueError, match="0..1"):
        token_label_map(np.zeros((8, 8)), np.full((2, 2), 5), np.zeros((2, 2)), ["a", "b"])


def test_display_image_normalises() -> None:
    chw = np.stack([np.linspace(-2, 2, 16).reshape(4, 4)] * 3)
    out = to_display_image(chw)
    assert out.shape == (4, 4, 3) and out.min() == 0.0 and out.max() == 1.0
