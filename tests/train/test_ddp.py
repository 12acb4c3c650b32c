"""A real 2-process torchrun (gloo, CPU): every rank ends with the same parameters, rank 0 writes the files.

    pytest tests/train/test_ddp.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stl.models.trained import load_file

from .tiny import make_split

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _hash_state(state: dict, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_torchrun_two_processes_keep_identical_parameters(tmp_path: Path) -> None:
    split, raw = make_split(tmp_path / "data", n_per_class=(20, 25))  # 9 val images: shards of 5 and 4
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(split), str(raw), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert all(r["ddp"] == "DistributedDataParallel" for r in reports)
    assert reports[0]["hash"] == reports[1]["hash"], "ranks diverged"
    assert reports[0]["summary"] == reports[1]["summary"]  # rank 0's summary is broadcast

    last = load_file(out / "checkpoints" / "last.pt")
    import timm

    from .tiny import TINY, register_tiny_models

    register_tiny_models()
    names = [n for n, _ in timm.create_model(TINY, num_classes=2, img_size=32).named_parameters()]
    assert _hash_state(last["model"], names) == reports[0]["hash"]
    assert last["num_updates"] == 2 * 3  # 27 train images -> 14 per rank (padded) -> 3 batches of 4
    # validation counted each of the 9 images once (no padding duplicates): top-1 is a multiple of 100/9
    for row in last["history"]:
        correct = row["val_top1"] * 9 / 100
        assert abs(correct - round(correct)) < 1e-6, row["val_top1"]
    # only rank 0 printed the epoch lines
    assert proc.stdout.count("[supervised] epoch 2/2") == 1
    assert (out / "model.pt").is_file() and (out / "history.json").is_file()
