"""build_report (the report stage's work) from evaluation files written by the evaluate stage's writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stl.evaluate.metrics import compute_metrics, write_evaluation
from stl.report import build

CLASSES = ["ant", "bee", "cow"]


@pytest.fixture
def stage_outputs(tmp_path: Path) -> dict[str, Path]:
    """What the earlier stages leave: raw images, reports/eval/*, metrics.json and training histories."""
    raw, eval_dir = tmp_path / "raw", tmp_path / "eval"
    rng = np.random.default_rng(0)
    paths = []
    for i, name in enumerate(["ant", "ant", "bee", "bee", "bee", "ant"]):
        rel = f"{name}/{i}.png"
        (raw / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 96, 3), dtype=np.uint8)).save(raw / rel)  # 96 wide, 48 high
        paths.append(rel)
    labels = np.array([0, 0, 1, 1, 1, 0])  # 'cow' is absent from the test labels
    logits = np.log(np.array([[.7, .2, .1], [.2, .5, .3], [.1, .8, .1], [.1, .6, .3], [.2, .7, .1],
                              [.6, .3, .1]]))
    results = {"test": compute_metrics(labels, logits, CLASSES),
               "test_fused": compute_metrics(labels, logits + 0.1, CLASSES)}
    probs = np.exp(logits)
    write_evaluation(eval_dir, tmp_path / "metrics.json", results, labels, probs.argmax(1), probs, paths,
                     CLASSES)
    grid = {"classes": [[0, 1], [1, 1]], "confidence": [[0.9, 0.6], [0.7, 0.8]]}
    (eval_dir / "token_maps.json").write_text(json.dumps(
        {"classes": CLASSES, "img_size": 32,
         "maps": [{"path": paths[0], "label": 0, "student": grid, "labeler": grid}]}))
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"epoch": 0, "train_loss": 1.0, "val_top1": 50.0},
                                   {"epoch": 1, "train_loss": 0.5, "val_top1": 80.0}]))
    return {"raw": raw, "eval": eval_dir, "metrics": tmp_path / "metrics.json", "history": history}


def test_report_from_stage_outputs(stage_outputs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    drawn = []
    real = build.token_label_maps

    def recording(image, *args, **kwargs):
        drawn.append(image)
        return real(image, *args, **kwargs)

    monkeypatch.setattr(build, "token_label_maps", recording)
    out = build.build_report(
        out_path=tmp_path / "report" / "report.html", eval_dir=stage_outputs["eval"],
        metrics_path=stage_outputs["metrics"], histories={"student": stage_outputs["history"],
                                                          "labeler": tmp_path / "absent.json"},
        raw_dir=stage_outputs["raw"], params={"train": {"lr": 0.001}}, summary={"model": "m"}, samples=4,
        figures_dir=tmp_path / "figures",
    )
    html = out.read_text()
    for section in ("Metrics", "Per-class table", "Sample predictions", "Token-label maps", "Parameters"):
        assert f">{section}<" in html, section
    assert "classes absent from the labels" in html and "cow" in html  # the evaluation's notes are shown
    assert "4 test images, 1 wrong" in html  # wrong predictions first
    # the token map is drawn over the image as the model saw it: resized, centre-cropped to 32x32
    assert [image.size for image in drawn] == [(32, 32)]
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert {"training_curves.png", "roc.png", "confusion.png", "confusion_normalized.png",
            "per_class.png"} <= set(figures)
    assert any(name.startswith("roc_fused") for name in figures)


def test_report_needs_the_evaluation(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the evaluate stage first"):
        build.build_report(out_path=tmp_path / "r.html", eval_dir=tmp_path, metrics_path=tmp_path / "m.json",
                           histories={}, raw_dir=tmp_path, params={}, summary={})
    assert not (tmp_path / "r.html").exists()
