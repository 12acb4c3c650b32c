"""The HTML report is one self-contained, escaped file with every section."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stl.evaluate.metrics import compute_metrics
from stl.report.figures import figure_png, plot_confusion_matrix, plot_roc, save_figure, token_label_maps
from stl.report.html import data_uri, flatten, render_report

EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("report")
    names = ["cat", EVIL, "owl"]
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = [[.7, .2, .1], [.3, .5, .2], [.2, .6, .2], [.1, .8, .1], [.1, .1, .8], [.2, .2, .6]]
    logits = np.log(np.array(probs))
    m = compute_metrics(labels, logits, names)
    roc_png = save_figure(plot_roc(m["roc"], names), tmp / "roc.png")  # a Path figure
    conf_png = figure_png(plot_confusion_matrix(m["confusion"]["counts"], names), dpi=40)  # bytes
    photo = tmp / "photo.jpg"
    Image.fromarray(np.full((300, 200, 3), 120, np.uint8)).save(photo)
    samples = [
        {"image": photo, "label": "cat", "pred": "cat", "prob": 0.7, "path": str(photo)},
        {"image": np.zeros((32, 32), np.uint8), "label": "cat", "pred": EVIL, "prob": 0.5},
        {"image": np.random.default_rng(0).random((3, 32, 32)), "label": "owl", "pred": "owl", "prob": 0.8},
    ]
    tl = token_label_maps(np.zeros((32, 32, 3)), {"labeler": (np.zeros((2, 2), int), np.ones((2, 2))),
                                                  "student": (np.ones((2, 2), int), np.ones((2, 2)))}, names)
    out = render_report(
        tmp / "out" / "report.html",
        title=f"Run {EVIL}",
        summary={"model": "fan_tiny_8_p4_hybrid_token", "source": "https://example.org/flowers.tgz"},
        params={"train": {"lr": 0.002, "epochs": 3}, "model": "fan_tiny"},
        metrics={"test": {"top1": 0.6667, "macro_auc": 0.9, "num_samples": 6},
                 "test_fused": {"top1": 0.8333, "macro_auc": None, "num_samples": 6}},
        history={"student": [{"epoch": 0, "train_loss": 1.2, "val_top1": 0.5}]},
        per_class=m["per_class"],
        figures={"roc": roc_png, "confusion": conf_png, "extra<b>": conf_png},
        samples=samples,
        token_maps=[{"figure": figure_png(tl, dpi=40), "caption": f"image 0 {EVIL}"}],
    )
    return out, out.read_text(encoding="utf-8")


def test_report_is_self_contained(report: tuple[Path, str]) -> None:
    path, text = report
    assert path.name == "report.html" and [p.name for p in path.parent.iterdir()] == ["report.html"]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text and "<script" not in text.lower() and "@import" not in text
    assert "data:image/png;base64," in text
    assert "data:image/jpeg;base64," in text  # the photo sample, thumbnailed
    for uri in re.findall(r'src="([^"]+)"', text):
        assert uri.startswith("data:image/")


def test_report_escapes_text(report: tuple[Path, str]) -> None:
    _, text = report
    assert EVIL not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "extra&lt;b&gt;" in text
    assert "https://example.org/flowers.tgz" in text  # shown as text, never fetched


def test_report_sections_and_tables(report: tuple[Path, str]) -> None:
    _, text = report
    for heading in ("Run summary", "Metrics", "Training curves", "ROC curves", "Confusion matrix",
                    "Per-class table", "Sample predictions", "Token-label maps", "Other figures",
                    "Parameters"):
        assert f"<h2>{heading}</h2>" in text, heading
    assert "<th>test</th><th>test_fused</th>" in text
    assert "<th>train.lr</th>" in text and "<th>train.epochs</th>" in text
    assert text.count('class="sample wrong"') == 1
    assert text.count('class="sample"') == 2
    assert '<th>top1</th><td class="num">0.6667</td><td class="num">0.8333</td>' in text
    assert "1 wrong" in text
    assert "student: 1 epochs" in text


def test_report_without_optional_parts(tmp_path: Path) -> None:
    out = render_report(tmp_path / "r.html", title="t", summary={}, params={}, metrics={}, history={},
                        per_class=[], figures={}, samples=[])
    text = out.read_text()
    assert "Token-label maps" not in text and "no samples" in text


def test_flatten_and_data_uri() -> None:
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}
    assert data_uri(b"\x89PNG\r\n\x1a\nxx").startswith("data:image/png;base64,")
    with pytest.raises(ValueError, match="not a PNG"):
        data_uri(b"<svg onload=alert(1)>")


def test_sample_thumbnails_are_read_as_the_model_reads_them(tmp_path: Path) -> None:
    ramp = tmp_path / "ramp16.png"
    Image.fromarray((np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)).save(ramp)
    out = render_report(tmp_path / "r.html", title="t", summary={}, params={}, metrics={}, history={},
                        per_class=[], figures={},
                        samples=[{"image": ramp, "label": "a", "pred": "a", "prob": 0.9, "path": "r.png"}],
                        token_maps=[], notes=["classes absent from the labels: <owl>"])
    uri = re.search(r'src="data:image/(?:jpeg|png);base64,([^"]+)"', out.read_text()).group(1)
    import base64
    import io

    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("L"), dtype=np.float64)
    assert 100 < thumb.mean() < 155  # a 16-bit ramp scaled to 8 bits (mean ~127), not clipped to white
    assert "classes absent from the labels: &lt;owl&gt;" in out.read_text()
