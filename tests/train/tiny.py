"""Tiny FAN models and a tiny image dataset for the training tests (also imported by the torchrun script).

    from .tiny import register_tiny_models, make_split     # or `import tiny` with this folder on sys.path
    register_tiny_models()            # 'stl_test_fan' and 'stl_test_fan_token' in timm's registry
    split_dir, raw_dir = make_split(tmp_path, n_per_class=20)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import timm
from PIL import Image
from timm.models import register_model

from stl.config import TrainConfig
from stl.models import FAN

TINY = "stl_test_fan"
TINY_TOKEN = "stl_test_fan_token"
_ARCH = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2, cls_attn_layers=1)


def _tiny(return_dense: bool, **kwargs: Any) -> FAN:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return FAN(**{**_ARCH, **kwargs}, return_dense=return_dense)


def register_tiny_models() -> None:
    """Register the two tiny FANs once per process (a ViT stem, 1 block, dim 32: 4 tokens at 32 px)."""
    if not timm.is_model(TINY):
        def stl_test_fan(pretrained: bool = False, **kwargs: Any) -> FAN:
            return _tiny(False, **kwargs)

        register_model(stl_test_fan)
    if not timm.is_model(TINY_TOKEN):
        def stl_test_fan_token(pretrained: bool = False, **kwargs: Any) -> FAN:
            return _tiny(True, **kwargs)

        register_model(stl_test_fan_token)


def make_split(root: Path, n_per_class: int | tuple[int, int] = 20, size: int = 32) -> tuple[Path, Path]:
    """Two learnable classes (dark vs bright noise images, PNG) and their 60/20/20 % manifests."""
    from stl.data import split_dataset

    counts = (n_per_class, n_per_class) if isinstance(n_per_class, int) else n_per_class
    raw, split = root / "raw", root / "split"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "bright")):
        (raw / name).mkdir(parents=True, exist_ok=True)
        for i in range(counts[c]):
            base = 60 + 130 * c
            pixels = np.clip(rng.normal(base, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(raw / name / f"{i:03d}.png")
    split_dataset(raw, split, 0.6, 0.2, 0.2, seed=0)
    return split, raw


def tiny_opts(**overrides: Any) -> TrainConfig:
    """Fast, deterministic settings: 32 px, batch 8, no workers, few warmup steps."""
    base = dict(img_size=32, batch_size=8, workers=0, threads=0, lr=1e-3, min_lr=1e-5, warmup_epochs=1,
                warmup_lr=1e-5, drop_path=0.1, ema=True, ema_decay=0.9)
    return dataclasses.replace(TrainConfig(), **{**base, **overrides})
