"""Prediction on image files (stl.evaluate.infer) and TorchScript / ONNX export (stl.export), on tiny FANs.

The model files are written with ``export_model`` from randomly initialised tiny models (heads scaled up so
the predictions are peaked and the fused and class-token predictions differ), never trained.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from stl.data import create_transforms, load_image_rgb
from stl.evaluate.infer import find_images, format_predictions, predict_files
from stl.export import ExportError, default_export_path, export_trained_model
from stl.models import export_model, load_trained_model

from .train.tiny import TINY, TINY_TOKEN, register_tiny_models

CLASSES = ["cat", "dog", "fox"]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def write_model_file(path: Path, name: str = TINY_TOKEN, seed: int = 0, img_size: int = 32) -> Path:
    """A model file as training writes it, for a tiny registered FAN with peaked (scaled-up) heads."""
    register_tiny_models()
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=len(CLASSES), img_size=img_size)
    with torch.no_grad():
        for head in (model.head, getattr(model, "aux_head", None)):
            if head is not None:
                head.weight.mul_(50.0)
                head.bias.normal_(0.0, 0.5)
    export_model(path, model_name=name, num_classes=len(CLASSES), classes=CLASSES, img_size=img_size,
                 state_dict=model.state_dict(), source="model", epoch=0, val_top1=0.0, phase="student",
                 mean=MEAN, std=STD)
    return path


def write_images(folder: Path) -> dict[str, Path]:
    """Good images of several sizes and modes (one upper-case .PNG in a sub-folder), a text file, a text file
    named .png, a truncated PNG and a hidden file."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    files = {}
    for i, (h, w) in enumerate([(32, 32), (40, 48), (50, 30)]):
        files[f"good{i}"] = folder / f"good{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[f"good{i}"])
    files["gray"] = folder / "sub" / "GRAY.PNG"
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(files["gray"])
    files["notes"] = folder / "notes.txt"
    files["notes"].write_text("not an image")
    files["fake"] = folder / "fake.png"
    files["fake"].write_text("plain text with an image extension")
    data = (folder / "good0.png").read_bytes()
    files["truncated"] = folder / "truncated.png"
    files["truncated"].write_bytes(data[: len(data) // 2])
    (folder / ".hidden.png").write_bytes(data)
    return files


def direct_probs(model_path: Path, image: Path, fused: bool = True, weight: float = 0.5) -> torch.Tensor:
    """Softmax of a plain model call on the eval-transformed image: what predict must reproduce."""
    model, meta = load_trained_model(model_path)
    x = create_transforms(32, train=False, mean=meta["mean"], std=meta["std"])(load_image_rgb(image))
    with torch.no_grad():
        out = model(x.unsqueeze(0))
    if isinstance(out, tuple):
        out = out[0] + weight * out[1].amax(dim=1) if fused else out[0]
    return out.softmax(-1)[0]


@pytest.fixture(scope="module")
def token_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("token") / "model.pt", TINY_TOKEN)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("plain") / "model.pt", TINY, seed=1)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return write_images(tmp_path / "imgs")


# --- predict ------------------------------------------------------------------------------------------------
def test_find_images_recursive_case_insensitive_skips_hidden_and_other_extensions(images, tmp_path):
    files, skipped = find_images([tmp_path / "imgs", images["notes"], images["good0"]])
    names = [f.name for f in files]
    assert names == ["fake.png", "good0.png", "good1.png", "good2.png", "truncated.png", "GRAY.PNG",
                     "notes.txt"]  # folder order, then the explicit file; good0 given twice is kept once
    assert skipped == 2  # notes.txt and .hidden.png inside the folder
    with pytest.raises(FileNotFoundError, match="nope.png"):
        find_images([images["good0"], tmp_path / "nope.png"])


def test_predict_files_reports_bad_files_and_matches_a_direct_call(token_model, images, tmp_path, capsys):
    model, meta = load_trained_model(token_model)
    files, _ = find_images([tmp_path / "imgs"])
    rows = predict_files(model, meta, files, topk=2, batch_size=2)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert "cannot identify image file" in by_name["fake.png"]["error"]
    assert "truncated" in by_name["truncated.png"]["error"].lower()
    assert by_name["fake.png"]["predictions"] == []
    err = capsys.readouterr().err
    assert "fake.png" in err and "truncated.png" in err
    for name in ("good0.png", "good1.png", "GRAY.PNG"):
        row = by_name[name]
        assert row["error"] == "" and len(row["predictions"]) == 2
        probs = direct_probs(token_model, images["gray" if name == "GRAY.PNG" else name[:-4]])
        assert row["predictions"][0][0] == CLASSES[int(probs.argmax())]
        assert row["predictions"][0][1] == pytest.approx(float(probs.max()), abs=1e-5)
        assert row["predictions"][0][1] >= row["predictions"][1][1]


def test_fused_and_class_token_predictions_differ_as_computed(token_model, images):
    model, meta = load_trained_model(token_model)
    files = [images[f"good{i}"] for i in range(3)]
    fused = predict_files(model, meta, files, topk=3, progress=False)
    cls_only = predict_files(model, meta, files, topk=3, fused=False, progress=False)
    assert [r["predictions"] for r in fused] != [r["predictions"] for r in cls_only]
    for f, row_f, row_c in zip(files, fused, cls_only, strict=True):
        for row, is_fused in ((row_f, True), (row_c, False)):
            probs = direct_probs(token_model, f, fused=is_fused)
            got = dict(row["predictions"])
            assert got == pytest.approx({c: float(p) for c, p in zip(CLASSES, probs, strict=True)}, abs=1e-5)


def test_format_csv_and_json(token_model, images):
    model, meta = load_trained_model(token_model)
    files = [images["good0"], images["fake"]]
    rows = predict_files(model, meta, files, topk=5, progress=False)  # 5 > 3 classes: clamped
    lines = format_predictions(rows, "csv", 5).splitlines()
    assert lines[0] == "path,top1,top1_prob,top2,top2_prob,top3,top3_prob,error"
    assert lines[2].startswith(f"{images['fake']},,,,,,,") and "UnidentifiedImageError" in lines[2]
    items = json.loads(format_predictions(rows, "json", 5))
    assert items[0]["error"] is None and [p["class"] for p in items[0]["predictions"]] == [
        c for c, _ in rows[0]["predictions"]]
    assert items[1]["predictions"] == [] and "cannot identify" in items[1]["error"]
    with pytest.raises(ValueError, match="xml"):
        format_predictions(rows, "xml", 5)


# --- export -------------------------------------------------------------------------------------------------
def _reference(model_path: Path, batch: int) -> tuple[torch.Tensor, tuple]:
    model, _ = load_trained_model(model_path)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(x)
    return x, out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("fixture", ["token_model", "plain_model"])
@pytest.mark.parametrize("tokens", [False, True])
def test_torchscript_export_matches_pytorch_at_other_batch_sizes(fixture, tokens, request, tmp_path):
    model_path = request.getfixturevalue(fixture)
    if tokens and fixture == "plain_model":
        with pytest.raises(ValueError, match="--tokens needs a token model"):
            export_trained_model(model_path, "torchscript", tmp_path / "m.pt", tokens=True)
        return
    result = export_trained_model(model_path, "torchscript", tmp_path / "m.pt", tokens=tokens)
    print(f"torchscript {fixture} tokens={tokens}: max abs diff {result['max_abs_diff']:.3g}",
          file=sys.stderr)
    assert result["max_abs_diff"] < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation note
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x, ref = _reference(model_path, 5)  # traced at batch 2
    with torch.no_grad():
        got = loaded(x)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == (2 if tokens else 1)
    assert got[0].shape == (5, 3)
    for g, r in zip(got, ref, strict=False):
        assert (g - r).abs().max().item() < 1e-4
    if tokens:
        assert got[1].shape == (5, 4, 3)  # 32 px / patch 16 -> 4 tokens
    sidecar = json.loads((tmp_path / "m.pt.json").read_text())
    assert sidecar["classes"] == CLASSES and sidecar["img_size"] == 32
    assert sidecar["mean"] == pytest.approx(MEAN) and sidecar["std"] == pytest.approx(STD)
    assert [o["name"] for o in sidecar["outputs"]] == (["logits", "token_logits"] if tokens else ["logits"])


@pytest.mark.parametrize("fixture", ["token_model", "plain_model"])
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(fixture, request, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model_path = request.getfixturevalue(fixture)
    tokens = fixture == "token_model"
    result = export_trained_model(model_path, "onnx", tmp_path / "m.onnx", tokens=tokens, batch_size=2)
    print(f"onnx {fixture}: max abs diff {result['max_abs_diff']:.3g}", file=sys.stderr)
    assert result["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == result["outputs"]
    for batch in (1, 4):
        x, ref = _reference(model_path, batch)
        got = session.run(None, {"images": x.numpy()})
        assert len(got) == (2 if tokens else 1)
        for g, r in zip(got, ref, strict=False):
            assert g.shape == tuple(r.shape) and np.abs(g - r.numpy()).max() < 1e-4
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    assert sidecar["outputs"][0] == {"name": "logits", "shape": ["batch", 3]}
    assert sidecar["input"]["shape"] == ["batch", 3, 32, 32] and sidecar["opset"] == 17


def test_export_default_path_and_failures_leave_nothing(token_model, tmp_path, monkeypatch):
    assert default_export_path(Path("a/model.pt"), "onnx") == Path("exports/a-model.onnx")
    assert default_export_path(Path("labeler.pt"), "torchscript") == Path("exports/labeler.torchscript.pt")
    out = tmp_path / "out" / "m.pt"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_trained_model(token_model, "torchscript", out, tolerance=-1.0)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ExportError, match=r'pip install "stl\[export\]"'):
        export_trained_model(token_model, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc")
def test_keep_freed_memory_reuses_large_blocks() -> None:
    """In a fresh process: a freed 64 MiB tensor is faulted in again every time by default; after the call,
    once the heap has grown to hold it (one or two allocations), it is reused without faults."""
    import subprocess

    code = (
        "import json, resource, torch\n"
        "from stl.evaluate.infer import keep_freed_memory\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    torch.ones(16 * 2**20)\n"  # 64 MiB, filled (touched) and freed
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "default = [faults() for _ in range(3)]\n"
        "on = keep_freed_memory()\n"
        "kept = [faults() for _ in range(5)]\n"
        "print(json.dumps([on, default, kept]))\n"
    )
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # 4 KiB pages where the host allows
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    on, default, kept = json.loads(proc.stdout)
    assert on is True
    assert min(default[1:]) >= 16  # faulted in again (4 KiB or huge pages) on every allocation
    assert max(kept[2:]) < min(default[1:]) / 10, (default, kept)  # reused
