"""Under torchrun with 2 ranks the evaluate stage's metrics and predictions equal one process's exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from stl.models import export_model
from tests.conftest import REPO_ROOT
from tests.train.tiny import TINY_TOKEN, make_split, register_tiny_models

HERE = Path(__file__).resolve().parent


def _run(nproc: int, model: Path, split: Path, raw: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "eval_worker.py"), str(model), str(split), str(raw), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out.parent)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def test_two_rank_evaluation_equals_one_process(tmp_path: Path) -> None:
    register_tiny_models()
    split, raw = make_split(tmp_path / "data", n_per_class=(17, 19))  # 7 test images: shards of 4 and 3
    torch.manual_seed(0)
    model = timm.create_model(TINY_TOKEN, num_classes=2, img_size=32)
    path = tmp_path / "model.pt"
    export_model(path, model_name=TINY_TOKEN, num_classes=2, classes=["bright", "dark"], img_size=32,
                 state_dict=model.state_dict(), source="model", epoch=0, val_top1=0.0, phase="student",
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        out.mkdir()
    _run(1, path, split, raw, one)
    _run(2, path, split, raw, two)
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (one, two))
    assert m1 == m2
    assert (one / "eval" / "predictions.csv").read_text() == (two / "eval" / "predictions.csv").read_text()
    rows = (two / "eval" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 7  # every test image once, no padded duplicates
    assert "test_fused" in m2
    assert "robustness" not in m2  # off by default: the DVC plots file is there, with its header only
    assert (two / "eval" / "robustness.csv").read_text() == "corruption,severity,top1\n"
    assert not (two / "eval" / "robustness.json").exists()
