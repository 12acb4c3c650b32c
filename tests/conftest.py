"""Shared fixtures: the repo root, the reference data in ../shared (tests skip cleanly without it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

# Tests are small; two threads match the CI machine and keep timings stable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """../shared/reference, or a clean skip where the reference data is not beside the checkout."""
    ref = SHARED / "reference"
    if not ref.is_dir():
        pytest.skip(f"{ref} is absent (reference data lives beside the checkout)")
    return ref
