"""The ConvNeXt stem of the FAN-Hybrid models (two ConvNeXt stages, stride 8) and its patch embedding.

Parameter names match the published ``patch_embed.backbone.*`` keys. The 1x1-conv MLP of each ConvNeXt block
is computed as Linear layers on a channels-last view (same weights, no LayerNorm2d permute round trips).

A quirk that the published weights depend on: the reference's LayerNorm2d normalises channels-last inputs
with the *unbiased* variance (``torch.var_mean``), and every ConvNeXt norm after the stem's sees a
channels-last tensor there. So the stem norm uses the usual biased variance and all later ones the unbiased
variance (``_layer_norm_unbiased``); without this the outputs drift by ~0.2%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn

from .layers import linear_gelu_linear

__all__ = ["ConvNeXtBlock", "ConvNeXtStage", "ConvNeXtStem", "HybridEmbed"]


def _layer_norm_unbiased(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last dim with the unbiased variance, through the fused kernel.

    (x - u) / sqrt(var * C/(C-1) + eps) == f * (x - u) / sqrt(var + eps * f^2) with f^2 = (C-1)/C, so the
    factor folds into the affine weight and the eps.
    """
    C = x.shape[-1]
    f2 = (C - 1) / C
    return F.layer_norm(x, norm.normalized_shape, norm.weight * math.sqrt(f2), norm.bias, norm.eps * f2)


def _depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Depthwise conv, run in fp32 under CPU autocast (oneDNN's bf16 7x7 depthwise backward is ~2x slower)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)


class _LayerNorm2dUnbiased(nn.LayerNorm):
    """LayerNorm2d (NCHW, over C) with the unbiased variance; see the module docstring."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm_unbiased(x.permute(0, 2, 3, 1), self).permute(0, 3, 1, 2)


class _ConvMlp(nn.Module):
    """1x1-conv MLP parameters (``fc1``, ``fc2``); applied as Linear layers on channels-last input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., C] channels-last; ``scale`` (the block's layer scale) is folded into fc2's weights."""
        weight, bias = self.fc2.weight.flatten(1), self.fc2.bias
        if scale is not None:
            weight, bias = weight * scale[:, None], bias * scale
        return linear_gelu_linear(x, self.fc1.weight.flatten(1), self.fc1.bias, weight, bias)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv -> LayerNorm (unbiased) -> MLP (4x, GELU) -> layer scale."""

    def __init__(self, dim: int, ls_init_value: float = 1e-6, mlp_ratio: int = 4):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = _LayerNorm2dUnbiased(dim, eps=1e-6)
        self.mlp = _ConvMlp(dim, mlp_ratio * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _depthwise_conv(self.conv_dw, x).permute(0, 2, 3, 1)
        y = _layer_norm_unbiased(y, self.norm)
        y = self.mlp(y, scale=self.gamma)
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    """Optional (LayerNorm2d + 2x2/s2 conv) downsample, then ``depth`` ConvNeXt blocks."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int, ls_init_value: float = 1e-6):
        super().__init__()
        if in_chs != out_chs or stride > 1:
            self.downsample: nn.Module = nn.Sequential(
                _LayerNorm2dUnbiased(in_chs, eps=1e-6),
                nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride),
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, ls_init_value) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtStem(nn.Module):
    """4x4/s4 conv + LayerNorm2d, then one stage per entry of ``depths`` (stride 1, then 2, ...).

    No drop path (the reference builds the stem with none).
    """

    def __init__(self, depths: Sequence[int] = (3, 3), dims: Sequence[int] = (128, 256), in_chans: int = 3):
        super().__init__()
        if len(dims) < len(depths):
            raise ValueError(f"ConvNeXt stem needs one dim per stage, got depths={depths} dims={dims}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        stages = []
        prev = dims[0]
        for i, depth in enumerate(depths):
            stages.append(ConvNeXtStage(prev, dims[i], depth, stride=2 if i > 0 else 1))
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.stride = 4 * 2 ** (len(depths) - 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridEmbed(nn.Module):
    """ConvNeXt stem then a ``patch_size`` conv to the embedding dim: [B,3,H,W] -> tokens [B, N, C]."""

    def __init__(
        self,
        depths: Sequence[int] = (3, 3),
        embed_dim: int = 384,
        in_chans: int = 3,
        patch_size: int = 2,
        dims: Sequence[int] = (128, 256),
    ):
        super().__init__()
        self.backbone = ConvNeXtStem(depths, dims, in_chans)
        self.proj = nn.Conv2d(self.backbone.num_features, embed_dim, patch_size, stride=patch_size)
        self.patch_size = self.backbone.stride * patch_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(self.backbone(x))
        H, W = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (H, W)
