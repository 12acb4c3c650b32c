"""The ``stl`` command: predict and export in-process (``stl.cli.main``), exit codes in a real subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stl.cli import main

from .test_inference import CLASSES, direct_probs, write_images, write_model_file
from .train.tiny import TINY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return write_images(tmp_path / "imgs")


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_csv_to_stdout(model_file, images, tmp_path, capsys):
    assert main(["predict", str(model_file), str(tmp_path / "imgs"), "--topk", "2", "--batch-size", "3"]) == 0
    out, err = capsys.readouterr()
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert list(_rows(out)[0]) == ["path", "top1", "top1_prob", "top2", "top2_prob", "error"]
    assert len(rows) == 6  # 4 good + fake + truncated; notes.txt and the hidden file are skipped
    assert "fake.png" in err and "truncated.png" in err and "skipped 2" in err
    assert rows["fake.png"]["error"] and rows["fake.png"]["top1"] == ""
    for name in ("good0.png", "good1.png", "good2.png", "GRAY.PNG"):
        r = rows[name]
        assert r["error"] == ""
        p1, p2 = float(r["top1_prob"]), float(r["top2_prob"])
        assert p1 >= p2 and p1 + p2 <= 1 + 1e-5
    probs = direct_probs(model_file, images["good1"])
    assert rows["good1.png"]["top1"] == CLASSES[int(probs.argmax())]
    assert float(rows["good1.png"]["top1_prob"]) == pytest.approx(float(probs.max()), abs=2e-6)


def test_predict_json_output_file_fused_and_no_fused(model_file, images, tmp_path, capsys):
    files = [str(images[f"good{i}"]) for i in range(3)]
    out = {}
    for flag in ("--fused", "--no-fused"):
        out[flag] = tmp_path / f"{flag}.json"
        assert main(["predict", str(model_file), *files, "--output", str(out[flag]), "--topk", "3"]
                    + [flag]) == 0  # json chosen from the extension
        assert "wrote 3 prediction(s)" in capsys.readouterr().err
    fused = json.loads(out["--fused"].read_text())
    cls_only = json.loads(out["--no-fused"].read_text())
    assert [i["path"] for i in fused] == files
    assert fused != cls_only
    for path, f, c in zip(files, fused, cls_only, strict=True):
        for item, is_fused in ((f, True), (c, False)):
            probs = [p["prob"] for p in item["predictions"]]
            assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5 and item["error"] is None
            direct = direct_probs(model_file, Path(path), fused=is_fused)
            assert item["predictions"][0]["class"] == CLASSES[int(direct.argmax())]
    assert main(["predict", str(model_file), files[0], "--format", "json"]) == 0  # stdout, forced json
    assert json.loads(capsys.readouterr().out)[0]["path"] == files[0]


def test_only_the_predict_command_keeps_freed_memory(model_file, images, monkeypatch, capsys):
    """Run as the command (argv from sys.argv) predict keeps freed memory for the next batch; called from
    Python with argv, or for export, the caller's process is left as it is."""
    import stl.evaluate.infer

    calls: list[bool] = []
    monkeypatch.setattr(stl.evaluate.infer, "keep_freed_memory", lambda: calls.append(True) or True)
    predict = ["predict", str(model_file), str(images["good0"])]
    assert main(predict) == 0 and calls == []
    monkeypatch.setattr(sys, "argv", ["stl", *predict])
    assert main() == 0 and calls == [True]
    out = images["good0"].parent / "m.ts"
    export = ["export", str(model_file), "--format", "torchscript", "--output", str(out)]
    monkeypatch.setattr(sys, "argv", ["stl", *export])
    assert main() == 0 and calls == [True]
    capsys.readouterr()


def test_predict_fused_weight(model_file, images, capsys):
    # the weight the evaluate stage scored with (evaluate.fused_weight) reproduces its predictions
    image = images["good2"]
    probs = {}
    for weight in (0.0, 3.0):
        args = ["predict", str(model_file), str(image), "--format", "json", "--fused-weight", str(weight)]
        assert main(args) == 0
        top = json.loads(capsys.readouterr().out)[0]["predictions"][0]
        direct = direct_probs(model_file, image, weight=weight)
        assert top["class"] == CLASSES[int(direct.argmax())]
        assert top["prob"] == pytest.approx(float(direct.max()), abs=2e-6)
        probs[weight] = top["prob"]
    assert probs[0.0] != probs[3.0]
    cls_only = direct_probs(model_file, image, fused=False)
    assert probs[0.0] == pytest.approx(float(cls_only.max()), abs=2e-6)  # weight 0: the class token alone


def test_predict_errors(model_file, images, tmp_path, capsys):
    assert main(["predict", str(model_file), str(images["good0"]), str(tmp_path / "missing")]) == 1
    assert "missing: no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["predict", str(bad), str(images["good0"])]) == 1
    assert f"{bad}: cannot be read" in capsys.readouterr().err
    torch.save({"state_dict": {}}, bad)
    assert main(["predict", str(bad), str(images["good0"])]) == 1
    assert f"{bad}: not a model file" in capsys.readouterr().err
    out = tmp_path / "none.csv"
    args = [str(images["fake"]), str(images["notes"]), "--output", str(out)]
    assert main(["predict", str(model_file), *args]) == 1
    err = capsys.readouterr().err
    assert "none of the 2 file(s) could be read" in err and "notes.txt" in err and not out.exists()
    with pytest.raises(SystemExit):  # argparse: bad choice
        main(["predict", str(model_file), str(images["good0"]), "--format", "xml"])


def test_export_torchscript_and_onnx(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output goes to ./exports/
    assert main(["export", str(model_file), "--format", "torchscript", "--output",
                 str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert "max abs difference vs PyTorch" in out and (tmp_path / "m.pt.json").is_file()
    diff = float(out.split("vs PyTorch: ")[1].split()[0])
    assert diff < 1e-4
    pytest.importorskip("onnxruntime")
    assert main(["export", str(model_file), "--format", "onnx", "--tokens", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    default = tmp_path / "exports" / f"{model_file.parent.name}-model.onnx"
    assert "(logits, token_logits)" in out and default.is_file()
    assert float(out.split("vs PyTorch: ")[1].split()[0]) < 1e-4


def test_export_errors(model_file, tmp_path, capsys):
    plain = write_model_file(tmp_path / "plain.pt", TINY)
    assert main(["export", str(plain), "--format", "torchscript", "--tokens"]) == 1
    assert "--tokens needs a token model" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "onnx"]) == 1
    assert "nope.pt" in capsys.readouterr().err


def test_exit_codes_through_a_real_subprocess(model_file, images, tmp_path):
    """``python -m stl.cli``: 0 with unreadable files among good ones, 1 (one error line) for a bad model.

    The tiny test model is not a registered FAN: a ``sitecustomize`` on PYTHONPATH registers it in the child.
    """
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "from tests.train.tiny import register_tiny_models\n\nregister_tiny_models()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "OMP_NUM_THREADS": "1"}
    env.pop("STL_DEBUG", None)

    def stl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stl.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    proc = stl("predict", str(model_file), str(tmp_path / "imgs"), "--topk", "1")
    assert proc.returncode == 0, proc.stderr
    rows = _rows(proc.stdout)
    assert len(rows) == 6 and sum(bool(r["error"]) for r in rows) == 2
    out = tmp_path / "in_process.csv"  # the command (allocator tuned) predicts what the library does
    args = ["predict", str(model_file), str(tmp_path / "imgs"), "--topk", "1", "--output", str(out)]
    assert main(args) == 0
    assert rows == _rows(out.read_text())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    proc = stl("predict", str(bad), str(images["good0"]))
    assert proc.returncode == 1, proc.stderr
    assert f"error: {bad}: cannot be read" in proc.stderr and "Traceback" not in proc.stderr
