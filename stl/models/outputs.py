"""What a FAN model returns, read in one place by training, token labelling, evaluation and serving.

Plain models return ``logits [B, K]``; ``*_token`` models return ``(cls_logits [B, K], aux_logits [B, N, K])``
with N the patch tokens in row-major order of the token grid. The STL reference's prediction for a token
model fuses both: ``cls + w * max over tokens of aux`` (:func:`fused_logits`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["FUSED_WEIGHT", "fused_logits", "prediction_logits", "split_outputs", "token_grid"]

FUSED_WEIGHT = 0.5  # the STL reference's weight of the token max in the fused prediction


def split_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cls [B, K], aux [B, N, K])`` of a token model, or ``(logits [B, K], None)``; anything else is an
    error naming the shapes it got."""
    if isinstance(out, torch.Tensor):
        if out.ndim == 2:
            return out, None
    elif isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out):
        cls, aux = out
        if cls.ndim == 2 and aux.ndim == 3 and aux.shape[0] == cls.shape[0] and aux.shape[2] == cls.shape[1]:
            return cls, aux
    if isinstance(out, (tuple, list)):
        got = str([tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out])
    else:
        got = str(tuple(out.shape)) if isinstance(out, torch.Tensor) else type(out).__name__
    raise ValueError(f"unexpected model output {got}: expected logits [B, K] or a token model's "
                     "(cls [B, K], aux [B, N, K])")


def fused_logits(cls: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
    """``cls + weight * max over tokens of aux`` in float32: the token model's fused prediction."""
    return cls.float() + weight * aux.float().amax(dim=1)


def prediction_logits(out: Any, fused_weight: float | None) -> torch.Tensor:
    """The logits a prediction is made from, float32: fused for a token model unless ``fused_weight`` is
    None (class token only), the logits themselves for a plain model."""
    cls, aux = split_outputs(out)
    if aux is None or fused_weight is None:
        return cls.float()
    return fused_logits(cls, aux, fused_weight)


def token_grid(image_hw: tuple[int, int], num_tokens: int) -> tuple[int, int]:
    """The (h, w) token grid of a model that turned an ``image_hw`` input into ``num_tokens`` tokens.

    FAN models have one square stride s, so ``num_tokens = (H / s) * (W / s)``; anything else (an input size
    the stride does not divide, a model that is not a FAN token model) is refused.
    """
    height, width = int(image_hw[0]), int(image_hw[1])
    stride = math.sqrt(height * width / num_tokens) if num_tokens > 0 else 0.0
    s = round(stride)
    if s < 1 or abs(stride - s) > 1e-6 or height % s or width % s:
        raise ValueError(
            f"cannot infer the token grid: {num_tokens} tokens for a {height}x{width} input is not a "
            f"whole-pixel stride (sqrt(H*W/n) = {stride:.4g}); use a *_token FAN model and an input size "
            "its stride divides"
        )
    return height // s, width // s
