"""The models against the published reference: state_dict keys/shapes, parameter counts, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from stl.models.fan import FAN_MODEL_ARGS
from stl.models.registry import list_models

FAN_NAMES = list(FAN_MODEL_ARGS)


def _reference_shapes(reference_dir: Path, name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (reference_dir / "state_dict" / f"{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        dims = shape.strip("()").replace(" ", "").split(",")
        rows.append((key, tuple(int(d) for d in dims if d)))
    return rows


def test_all_fan_names_are_covered(reference_dir: Path) -> None:
    summary = json.loads((reference_dir / "state_dict" / "SUMMARY.json").read_text())
    assert sorted(FAN_NAMES) == sorted(n for n in summary if not n.startswith("fan_swin_"))
    assert len(FAN_NAMES) == 14


@pytest.mark.parametrize("name", FAN_NAMES)
def test_state_dict_and_params_match_reference(reference_dir: Path, name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == _reference_shapes(reference_dir, name)  # names, shapes and order
    summary = json.loads((reference_dir / "state_dict" / "SUMMARY.json").read_text())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == summary[name]["params"]
    assert len(ours) == summary[name]["keys"]


def test_registry_param_counts_match_reference(reference_dir: Path) -> None:
    summary = json.loads((reference_dir / "state_dict" / "SUMMARY.json").read_text())
    for row in list_models():
        assert row["params"] == summary[row["name"]]["params"], row["name"]


@pytest.mark.parametrize("name", ["fan_tiny_12_p16_224", "fan_tiny_8_p4_hybrid_token"])
def test_outputs_match_reference(reference_dir: Path, name: str) -> None:
    """fp32 eager reproduces the reference to float rounding; bf16 autocast stays close."""
    data = torch.load(reference_dir / "equivalence" / f"{name}.pt", weights_only=True)
    model = timm.create_model(name, num_classes=7)
    model.load_state_dict(data["state_dict"], strict=True)
    model.eval()
    for bf16, tolerance in ((False, 1e-4), (True, 0.05)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(data["x"])
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(data["y"])
        for ours, ref in zip(out, data["y"], strict=True):
            assert ours.shape == ref.shape
            rel = ((ours.float() - ref).abs().max() / ref.abs().max()).item()
            assert rel < tolerance, f"{name} (bf16={bf16}): relative max error {rel:.2e}"
