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

from . import cpu_kernels
from .layers import _records_eager_backward, linear_gelu_linear

__all__ = ["ConvNeXtBlock", "ConvNeXtStage", "ConvNeXtStem", "HybridEmbed"]


def _layer_norm_unbiased(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last dim with the unbiased variance, through the fused kernel.

    (x - u) / sqrt(var * C/(C-1) + eps) == f * (x - u) / sqrt(var + eps * f^2) with f^2 = (C-1)/C, so the
    factor folds into the affine weight and the eps.
    """
    C = x.shape[-1]
    f2 = (C - 1) / C
    return F.layer_norm(x, norm.normalized_shape, norm.weight * math.sqrt(f2), norm.bias, norm.eps * f2)


# oneDNN's CPU depthwise weight gradient (channels-last) is fast up to this kernel width
# (kernels 5 or 7 columns wide cost 4-6x more per tap)
_FAST_WGRAD_WIDTH = 3


def _depthwise_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weight gradient of a stride-1, same-padded depthwise conv, as column slices of <= 3 taps.

    Tap columns ``j0 .. j0+k-1`` of a ``kh x kw`` kernel are the weight gradient of a ``kh x k`` conv whose
    input is ``x`` padded by ``kw // 2`` left and right and cut to ``W + k - 1`` columns from ``j0``. oneDNN
    computes those ~3x faster than the whole 7x7 one (14 vs 35-54 ms at [16, 128, 56, 56]). The same sums in
    another order: against float64, an fp32 error of ~7e-6 of the largest entry (oneDNN's own: ~3e-6).
    """
    C, _, kh, kw = weight.shape
    width = x.shape[-1]
    x_pad = F.pad(x, (kw // 2, kw // 2))
    parts = []
    for j0 in range(0, kw, _FAST_WGRAD_WIDTH):
        k = min(_FAST_WGRAD_WIDTH, kw - j0)
        parts.append(torch.ops.aten.convolution_backward(
            grad_out, x_pad[..., j0:j0 + width + k - 1], weight[..., j0:j0 + k], None,
            (1, 1), (kh // 2, 0), (1, 1), False, (0, 0), C, [False, True, False],
        )[1])
    return torch.cat(parts, dim=-1)


class _DepthwiseConvFunction(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` (stride 1): the same forward, a backward whose
    weight gradient comes from :func:`_depthwise_weight_grad` and whose bias gradient is a plain sum (asking
    oneDNN for the bias gradient alone runs its slow weight-gradient path), or both from the CPU kernels
    (``cpu_kernels``, as switched when the forward ran; ~2x faster again)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding = (weight.shape[-2] // 2, weight.shape[-1] // 2)
        ctx.kernels = x.dtype == torch.float32 and cpu_kernels.applies(x)
        return F.conv2d(x, weight, bias, 1, ctx.padding, 1, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        # grad_out in x's layout (channels-last in the models: the one oneDNN is fast in)
        cl = x.is_contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, (1, 1), ctx.padding, (1, 1), False, (0, 0), weight.shape[0],
                [True, False, False],
            )[0]
        if ctx.kernels and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            grad_w, grad_b = cpu_kernels.depthwise_weight_grad(grad_out, x, weight.shape[-2:])
            wanted = ctx.needs_input_grad
            return grad_x, grad_w if wanted[1] else None, grad_b if wanted[2] else None
        if ctx.needs_input_grad[1]:
            grad_w = _depthwise_weight_grad(grad_out, x, weight)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def _depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The blocks' 7x7 depthwise conv: in fp32 under CPU autocast (oneDNN's bf16 7x7 depthwise backward is ~2x
    slower), and with :class:`_DepthwiseConvFunction`'s backward for eager CPU training (inference, GPUs and
    ``torch.compile`` run the module)."""
    if x.device.type != "cpu":
        return conv(x)
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return _depthwise_conv(conv, x.float())
    if _records_eager_backward(x, conv.weight) and conv.weight.shape[-1] > _FAST_WGRAD_WIDTH:
        return _DepthwiseConvFunction.apply(x, conv.weight, conv.bias)
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
