"""Atomic checkpoint writes, the exported model file, fingerprints and RNG state round trips.

    pytest tests/train/test_checkpoint.py -q
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import stl.io
from stl.io import write_bytes_atomic
from stl.models.trained import CheckpointError, export_model, load_file, load_trained_model
from stl.train.checkpoint import atomic_save, capture_rng_state, fingerprint, restore_rng_state

from .tiny import TINY, register_tiny_models


def test_atomic_save_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled: torch.save fails mid-write
        atomic_save({"epoch": 2, "w": torch.zeros(1000), "bad": lambda: None}, path)
    assert load_file(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_atomic_save_interrupted_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.pt"
    atomic_save({"epoch": 1}, path)

    def boom(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stl.io.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_file(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_atomic_write_text(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "history.json"
    write_bytes_atomic(path, "[]\n")
    assert path.read_text() == "[]\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() would give


def test_load_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_file(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)) as err:
        load_file(bad)
    assert "delete it to start over" in str(err.value) and "weights_only" not in str(err.value)
    published = tmp_path / "fan_tiny.pth.tar"  # a published checkpoint, not a file of ours: say where it goes
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-3)}, published)
    with pytest.raises(CheckpointError, match="pickles the Python class argparse.Namespace") as err:
        load_file(published)
    assert "stl.models.load_checkpoint" in str(err.value) and "delete" not in str(err.value)


def test_fingerprint_tracks_settings_and_file_contents(tmp_path: Path) -> None:
    f = tmp_path / "train.csv"
    f.write_text("path,label\na.png,0\n")
    a = fingerprint({"lr": 1e-3, "model": "x"}, [f])
    assert a == fingerprint({"model": "x", "lr": 1e-3}, [f])  # key order does not matter
    assert a != fingerprint({"lr": 2e-3, "model": "x"}, [f])
    f.write_text("path,label\na.png,1\n")
    assert a != fingerprint({"lr": 1e-3, "model": "x"}, [f])


def test_rng_state_round_trip_through_a_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    atomic_save({"rng": [capture_rng_state()]}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(load_file(tmp_path / "s.pt")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_export_and_load_trained_model(tmp_path: Path) -> None:
    register_tiny_models()
    torch.manual_seed(0)
    model = timm.create_model(TINY, num_classes=2, img_size=32).eval()
    path = tmp_path / "model.pt"
    export_model(path, model_name=TINY, num_classes=2, classes=["a", "b"], img_size=32,
                 state_dict=model.state_dict(), source="ema", epoch=3, val_top1=87.5, phase="supervised",
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    loaded, meta = load_trained_model(path)
    assert not loaded.training
    assert meta["classes"] == ["a", "b"] and meta["source"] == "ema" and meta["epoch"] == 3
    assert meta["mean"] == [0.5, 0.5, 0.5] and "state_dict" not in meta
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    atomic_save({"model": model.state_dict()}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="not a model file"):
        load_trained_model(tmp_path / "last.pt")
