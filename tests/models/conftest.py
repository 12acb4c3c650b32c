"""Fixtures for the model tests: tiny FAN configs and the shared reference data (skipped where absent)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import stl.models  # noqa: F401  (registers the models with timm)
from stl.models.fan import FAN

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference next to the repository; tests that need it skip cleanly when it is absent."""
    if not (REFERENCE_DIR / "state_dict" / "SUMMARY.json").is_file():
        pytest.skip(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


TINY_KINDS: dict[str, dict[str, Any]] = {
    "vit": dict(embed_dim=32, depth=2, num_heads=2),
    "se": dict(embed_dim=32, depth=2, num_heads=2, se_mlp=True),
    "hybrid": dict(embed_dim=32, depth=2, num_heads=2, hybrid_depths=(1, 1), hybrid_dims=(16, 32)),
    "token": dict(
        embed_dim=32, depth=2, num_heads=2, hybrid_depths=(1, 1), hybrid_dims=(16, 32), return_dense=True
    ),
    # FAN-Xlarge layout: an in-trunk downsample from 32 to 48 channels, heads change with it
    "xlarge": dict(
        embed_dim=32,
        depth=3,
        channel_dims=[32, 32, 48],
        num_heads=[2, 2, 3],
        hybrid_depths=(1, 1),
        hybrid_dims=(16, 32),
    ),
}


@pytest.fixture
def make_tiny() -> Callable[..., FAN]:
    """Build a tiny FAN of a given kind (vit, se, hybrid, token, xlarge) with overrides."""

    def _make(kind: str = "vit", num_classes: int = 5, **overrides: Any) -> FAN:
        torch.manual_seed(0)
        return FAN(num_classes=num_classes, **{**TINY_KINDS[kind], **overrides})

    return _make
