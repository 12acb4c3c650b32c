"""Shared building blocks of the FAN models (FAN-ViT, FAN-Hybrid and FAN-Swin).

Parameter names mirror the published checkpoints (see STL_METHOD.md section 2), so that a model assembled
from these blocks loads them with ``strict=True``. The computations are written for speed: attention goes
through ``scaled_dot_product_attention`` (two bf16 matmuls under CPU autocast, where that is faster), the
channel attention is a [d x 1] gate per head, token grids are viewed as channels-last images instead of being
copied, layer scales are folded into the weights of the last linear op of their branch (no extra pass over
the activations), and the Fourier positional features are cached.

Token tensors are ``[B, N, C]`` with ``N = H * W`` in row-major order; modules that need the grid take
``H, W`` explicitly.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, trunc_normal_
from torch import nn

from . import cpu_kernels

__all__ = [
    "ChannelProcessing",
    "ClassAttention",
    "ClassAttentionBlock",
    "ConvPatchEmbed",
    "DWConv",
    "FANBlock",
    "FANBlockSE",
    "FanMlp",
    "GeluMlp",
    "OverlapPatchEmbed",
    "PositionalEncodingFourier",
    "SEMlp",
    "SqueezeExcite",
    "TokenMixing",
    "checkpoint_block",
    "clear_buffer_pool",
    "fused_backward",
    "head_dim_of",
    "init_fan_weights",
    "linear_gelu_linear",
]

_FOURIER_CACHE_SIZE = 8


def init_fan_weights(module: nn.Module) -> None:
    """Reference init for Linear (trunc-normal .02, zero bias) and LayerNorm (1, 0); use with ``apply``."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _init_conv_fan_out(module: nn.Module) -> None:
    """He-style normal(0, sqrt(2 / fan_out)) init the reference uses for convs inside the FAN blocks."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def head_dim_of(dim: int, num_heads: int) -> int:
    """Per-head width; a ``dim`` the heads do not divide is a configuration error naming both."""
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    return dim // num_heads


def _fold_out_scale(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of ``scale * layer(x)`` for a Linear/Conv (output channels first): a layer-scale multiply on
    the small weight instead of a full pass (and its backward) over the activations."""
    weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    return weight, (bias * scale if bias is not None else None)


def _project(linear: nn.Module, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x)``, times a per-output-channel ``scale`` (a layer scale) folded into its weight and bias
    when given; an ``nn.Linear`` through the CPU kernels' bf16 linear where they serve ``x`` (the bias added
    in the matmul's epilogue)."""
    kernels = (type(linear) is nn.Linear and _records_eager_backward(x, linear.weight)
               and cpu_kernels.applies_to_linear(x, linear.weight))
    if scale is None and not kernels:
        return linear(x)
    weight, bias = linear.weight, linear.bias
    if scale is not None:
        weight, bias = _fold_out_scale(weight, bias, scale)
    return cpu_kernels.linear(x, weight, bias) if kernels else F.linear(x, weight, bias)


def _tokens_to_image(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, N, C] tokens -> [B, C, H, W] as a channels-last *view* (no copy when x is contiguous)."""
    B, N, C = x.shape
    if N != H * W:
        raise ValueError(f"token count {N} does not match the grid {H}x{W}")
    return x.reshape(B, H, W, C).permute(0, 3, 1, 2)


def _image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]; a view when x is channels-last, one copy otherwise."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


_FUSED_BACKWARD = threading.local()  # per thread, like torch's grad mode


def _fused_backward_enabled() -> bool:
    return getattr(_FUSED_BACKWARD, "enabled", True)


@contextlib.contextmanager
def fused_backward(enabled: bool) -> Iterator[None]:
    """Switch the buffer-reusing autograd functions (the MLPs' fused backward, the 7x7 depthwise weight
    gradient, and with ``cpu_kernels`` on, the kernels' functions: BatchNorm, channel gate) on or off inside
    the block, in this thread; on by default.

    They make CPU training faster and leaner but run backward once per forward and only to first order. Turn
    them off for double backward, ``retain_graph=True`` with several backward calls, or ``torch.func``
    transforms: the models then record the plain ops (same results, the plain graph's speed and memory).
    The setting applies to forwards run in this thread (``nn.DataParallel`` replicas run in their own).
    """
    previous = _fused_backward_enabled()
    _FUSED_BACKWARD.enabled = enabled
    try:
        yield
    finally:
        _FUSED_BACKWARD.enabled = previous


def checkpoint_block(block: nn.Module, *args: object) -> object:
    """``block(*args)`` under non-reentrant gradient checkpointing, recomputed in backward with the
    :func:`fused_backward` and CPU-kernel settings of the forward (backward may run in another thread or
    outside the block; a recomputation with other ops would save other tensors)."""
    enabled, kernels = _fused_backward_enabled(), cpu_kernels.cpu_kernels_enabled()

    def run(*inputs: object) -> object:
        with fused_backward(enabled), cpu_kernels.recorded_setting(kernels):
            return block(*inputs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def _records_eager_backward(*tensors: torch.Tensor) -> bool:
    """Whether a buffer-reusing autograd function applies: an eager forward that autograd records (inference
    gets the plain ops; ``torch.compile`` and tracing too, as they record ops themselves), unless switched off
    with :func:`fused_backward`."""
    return (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _fused_backward_enabled()
        and any(t.requires_grad for t in tensors)
    )


def _as_autocast_inputs(device: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as autocast would hand them to a matmul or conv (cast to its dtype when it is on), for
    functions that then run with autocast off and must give autocast's numbers."""
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return [t.to(dtype) for t in tensors]


def _consume_saved(ctx, what: str) -> None:
    """Mark a buffer-reusing function's saved tensors used: a second backward would read overwritten ones."""
    if ctx.consumed:
        raise RuntimeError(
            f"the fused {what}'s graph was run backward twice (retain_graph=True); its backward reuses its "
            "saved activations. Run one backward per forward, or build the graph under "
            "`with stl.models.fused_backward(False):`"
        )
    ctx.consumed = True


def _default_pool_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such names
        return 2**31


class _BufferPool:
    """CPU buffers of finished backward passes, handed to the next forward that needs as many elements.

    Why: glibc serves tensors of 32 MB and more with fresh pages from the OS, and each page is faulted in and
    zeroed on first touch, which on the CPU costs more than the op that writes it. Reusing the hidden-size
    buffers of the MLPs across steps took an FAN-Hybrid-T fp32 training step after validation passes from 2.5
    to 1.8 s (median). A buffer enters the pool only once the backward that owned it is done with it, so no
    graph can read it again, and each function gives back as many buffers as its forward took, so the pool
    holds one step's worth. Only CPU tensors of ``min_bytes`` (32 MiB) and more are pooled: smaller ones come
    from glibc's heap, which reuses them itself, and CUDA's caching allocator reuses memory anyway. At most
    ``max_bytes`` are kept (1/8 of physical memory), the least recently returned dropped first.
    """

    def __init__(self, max_bytes: int, min_bytes: int = 32 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._free: list[torch.Tensor] = []  # flat buffers, oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of this shape (uninitialised): a pooled buffer of exactly its size, or new."""
        numel = math.prod(shape)
        if torch.device(device).type == "cpu" and numel * dtype.itemsize >= self.min_bytes:
            with self._lock:
                for i in range(len(self._free) - 1, -1, -1):
                    buf = self._free[i]
                    if buf.numel() == numel and buf.dtype == dtype:
                        del self._free[i]
                        self._bytes -= buf.nbytes
                        return buf.view(shape)
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, *buffers: torch.Tensor) -> None:
        """Return buffers nothing will read again (contiguous CPU tensors; others are left to be freed)."""
        with self._lock:
            for buf in buffers:
                if (buf.device.type != "cpu" or not buf.is_contiguous()
                        or not self.min_bytes <= buf.nbytes <= self.max_bytes):
                    continue
                self._free.append(buf.view(-1))
                self._bytes += buf.nbytes
            while self._bytes > self.max_bytes:
                self._bytes -= self._free.pop(0).nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes


_POOL = _BufferPool(_default_pool_bytes())


def clear_buffer_pool() -> None:
    """Free the MLP buffers kept for the next training step (when training is over and memory is wanted)."""
    _POOL.clear()


class _LinearGeluLinear(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` on 2-D ``x``; its backward writes into the buffers of its saved activations.

    Autograd's version allocates two new hidden-size tensors in backward (the grad of the GELU output and of
    its input). On the CPU every large allocation is fresh memory from the OS, and its page faults cost more
    than the arithmetic (2-3x on a 100 MB tensor). Here the hidden grad is written over the saved GELU output
    (not needed once fc2's weight grad is taken) and the GELU backward over the saved pre-activation: the same
    math and results, no new hidden-size memory; the two buffers then go to the next step's forward
    (:class:`_BufferPool`). With the CPU kernels on (``cpu_kernels``), the GELU backward also sums fc1's bias
    gradient in the same pass. Not differentiable twice, and its graph can be run backward once only (it
    consumes its saved tensors).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # type: ignore[override]
        hidden = (x.shape[0], w1.shape[0])
        pre = torch.addmm(b1, x, w1.t(), out=_POOL.take(hidden, x.dtype, x.device))
        act = torch.ops.aten.gelu.out(pre, out=_POOL.take(hidden, x.dtype, x.device))
        out = torch.addmm(b2, act, w2.t())
        ctx.save_for_backward(x, w1, w2, pre, act)
        ctx.consumed = False
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        _consume_saved(ctx, "fc1-GELU-fc2 MLP")
        x, w1, w2, pre, act = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_w2 = grad_out.t().mm(act)
        grad_b2 = grad_out.sum(0)
        grad_act = torch.mm(grad_out, w2, out=act)  # act is no longer needed
        if cpu_kernels.applies_to_rows(pre):  # GELU backward and fc1's bias grad in one pass
            grad_b1 = cpu_kernels.gelu_backward_sum_(grad_act, pre).to(pre.dtype)
            grad_pre = pre
        else:
            grad_pre = torch.ops.aten.gelu_backward.grad_input(grad_act, pre, grad_input=pre)
            grad_b1 = grad_pre.sum(0)
        grad_w1 = grad_pre.t().mm(x)
        grad_x = grad_pre.mm(w1) if ctx.needs_input_grad[0] else None
        _POOL.give(pre, act)  # the grads above are new tensors; nothing reads these two again
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def linear_gelu_linear(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)`` over the last dim of ``x``, the same numbers (also
    under autocast), with a backward that allocates no hidden-size memory (see ``_LinearGeluLinear``).

    Without autograd (inference, ``no_grad``) and under ``torch.compile`` (which plans memory itself) the
    plain ops run."""
    if not _records_eager_backward(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    lead = x.shape[:-1]
    device = x.device.type
    x, w1, b1, w2, b2 = _as_autocast_inputs(device, [x, w1, b1, w2, b2])
    with torch.autocast(device, enabled=False):
        out = _LinearGeluLinear.apply(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)
    return out.view(*lead, out.shape[-1])


class GeluMlp(nn.Module):
    """fc1 -> GELU -> fc2 with dropout after each (timm's ``Mlp`` parameters and behaviour), computed by
    :func:`linear_gelu_linear` whenever dropout is inactive."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop.p > 0.0:
            return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))
        return linear_gelu_linear(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class PositionalEncodingFourier(nn.Module):
    """Fourier positional encoding (XCiT style) projected to the embedding dim by a 1x1 conv.

    The 64 sin/cos features depend only on (H, W), so they are computed once per (H, W, device, dtype) and
    cached on the module (not in the state_dict); only the projection runs per call. Returns ``[1, H*W, C]``
    to be broadcast-added to the tokens.
    """

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale = 2 * math.pi
        self.temperature = temperature
        self.hidden_dim = hidden_dim
        self.dim = dim
        self.eps = 1e-6
        self._cache: dict[tuple, torch.Tensor] = {}

    def _features(self, H: int, W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()  # a traced graph computes them itself: no cached tensor
        key = (H, W, device, dtype)
        feats = None if compiling else self._cache.get(key)
        if feats is not None:
            return feats
        # built outside inference mode / autograd so a cached tensor is usable in any later mode
        with torch.inference_mode(False), torch.no_grad():
            f32 = torch.float32
            y = torch.arange(1, H + 1, dtype=f32, device=device)
            x = torch.arange(1, W + 1, dtype=f32, device=device)
            y = y / (y[-1:] + self.eps) * self.scale
            x = x / (x[-1:] + self.eps) * self.scale
            dim_t = torch.arange(self.hidden_dim, dtype=f32, device=device)
            dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
            pos_y = y[:, None] / dim_t  # [H, hidden]
            pos_x = x[:, None] / dim_t  # [W, hidden]
            # sin on even, cos on odd channels, interleaved: [sin(a0), cos(a0), sin(a1), cos(a1), ...]
            pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], dim=2).flatten(1)
            pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], dim=2).flatten(1)
            feats = torch.cat(
                [pos_y[:, None, :].expand(H, W, -1), pos_x[None, :, :].expand(H, W, -1)], dim=2
            ).reshape(H * W, 2 * self.hidden_dim)
            feats = feats.to(dtype)
        if compiling:
            return feats
        if len(self._cache) >= _FOURIER_CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = feats
        return feats

    def forward(self, H: int, W: int) -> torch.Tensor:
        weight = self.token_projection.weight
        feats = self._features(H, W, weight.device, weight.dtype)
        pos = F.linear(feats, weight.flatten(1), self.token_projection.bias)
        return pos.unsqueeze(0)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}  # copies (EMA, pickling) start with an empty cache
        return state


def _conv3x3_bn(in_chs: int, out_chs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_chs),
    )


class ConvPatchEmbed(nn.Module):
    """Stride-16 conv stem of FAN-ViT: four 3x3/s2 conv+BN layers (C/8, C/4, C/2, C), GELU between."""

    def __init__(self, embed_dim: int = 768, in_chans: int = 3, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.patch_size = 16
        self.proj = nn.Sequential(
            _conv3x3_bn(in_chans, embed_dim // 8, 2),
            act_layer(),
            _conv3x3_bn(embed_dim // 8, embed_dim // 4, 2),
            act_layer(),
            _conv3x3_bn(embed_dim // 4, embed_dim // 2, 2),
            act_layer(),
            _conv3x3_bn(embed_dim // 2, embed_dim, 2),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        # channels-last convs are faster on CPU (oneDNN) and make the final [B, N, C] a free view
        x = x.contiguous(memory_format=torch.channels_last)
        if not (cpu_kernels.cpu_kernels_enabled() and self.training):
            x = self.proj(x)
            H, W = x.shape[-2:]
            return x.flatten(2).transpose(1, 2), (H, W)
        layers = list(self.proj)  # layer by layer: BatchNorm (+ GELU) through the kernels where they apply
        for i in range(0, len(layers), 2):
            conv, bn = layers[i]
            act = layers[i + 1] if i + 1 < len(layers) else None
            x = conv(x)
            gelu = type(act) is nn.GELU and act.approximate == "none"
            if (act is None or gelu) and cpu_kernels.applies(x, bn) and _records_eager_backward(x, bn.weight):
                x = cpu_kernels.batch_norm_act(x, bn, gelu=gelu)
            else:
                x = bn(x)
                x = act(x) if act is not None else x
        H, W = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (H, W)


class DWConv(nn.Module):
    """Depthwise 3x3 conv -> GELU -> BatchNorm -> depthwise 3x3 conv over the token grid."""

    def __init__(self, dim: int, kernel_size: int = 3, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale`` (per channel) is folded into conv2's weights: ``scale * DWConv(x)`` in one pass."""
        x = self.bn(self.act(self.conv1(_tokens_to_image(x, H, W))))
        conv = self.conv2
        if scale is None:
            x = conv(x)
        else:
            weight, bias = _fold_out_scale(conv.weight, conv.bias, scale)
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return _image_to_tokens(x)


def _linear_grads(
    grad: torch.Tensor, x: torch.Tensor, in_float: bool, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear's weight and bias gradients from its output's gradient and its input, [R, O] and [R, I] rows:
    in float32 by the kernels' op for bf16 ones (``in_float``), else torch's in their dtype."""
    if in_float:
        return cpu_kernels.linear_weight_grad(grad, x, bias)
    return grad.t().mm(x), grad.sum(0) if bias else None


class _FanMlpFunction(torch.autograd.Function):
    """FanMlp's fc1 -> depthwise conv -> GELU -> BatchNorm -> depthwise conv (scaled) [+ residual] -> fc2.

    The ops and results of the module's plain path; the backward reuses buffers the plain autograd graph would
    allocate afresh: fc2's input grad goes into the saved fc2 input, the GELU backward into the saved conv
    output, and the residual's two grads are summed in place (three hidden-size allocations instead of six; on
    the CPU each fresh one is page-faulted in). With the CPU kernels on (``cpu_kernels``), the depthwise block
    between fc1 and fc2 runs as two fused passes each way (cpu_kernels.fan_dw_forward) and saves its first
    conv's output and the GELU's; under bf16 autocast fc1 and fc2 take their weights uncast, add the bias in
    the matmul and get float weight gradients (cpu_kernels.linear_weight_grad). Its graph can be run backward
    once (see _LinearGeluLinear).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, c1w, c1b, bn_w, bn_b, bn_mean, bn_var, c2w, c2b, w2, b2, meta):  # type: ignore[override]
        H, W, residual, bn_training, bn_kernels, momentum, eps, linear_kernels = meta
        B, N, _ = x.shape
        hidden = w1.shape[0]
        x2 = x.reshape(B * N, -1)
        ctx.dtypes = [t.dtype for t in (w1, b1, c1w, c1b, c2w, c2b, w2, b2)]  # of their gradients
        if linear_kernels:  # fc1's and fc2's weights come uncast: their gradients are computed in float
            w1, b1, w2, b2 = (t.to(torch.bfloat16) for t in (w1, b1, w2, b2))
            affine = cpu_kernels.linear_with_bias
        else:
            affine = lambda a, w, b: torch.addmm(b, a, w.t())  # noqa: E731
        h = affine(x2, w1, b1)
        h_img = h.view(B, H, W, hidden).permute(0, 3, 1, 2)  # channels-last view
        conv = (1, 1), (c1w.shape[-1] // 2,) * 2, (1, 1), False, (0, 0), hidden
        kernels = bn_kernels and cpu_kernels.applies(h_img) and c1w.shape[-2:] == (3, 3)
        if kernels:
            s, saved = cpu_kernels.fan_dw_forward(
                h.view(B, H, W, hidden), (c1w, c1b), (bn_w, bn_b, bn_mean, bn_var), momentum, eps, (c2w, c2b),
                residual,
            )
            s, c1 = s.view(B * N, hidden), None  # (c1 is in saved)
        else:
            c1 = torch.ops.aten.convolution(h_img, c1w, c1b, *conv)
            act = F.gelu(c1)
            bn_out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                act, bn_w, bn_b, bn_mean, bn_var, bn_training, momentum, eps
            )
            c2 = torch.ops.aten.convolution(bn_out, c2w, c2b, *conv)
            s = c2.permute(0, 2, 3, 1).reshape(B * N, hidden)  # a view when the conv keeps channels-last
            if residual:
                s.add_(h)  # c2 is not saved: summing into it is safe
            saved = (act, bn_w, bn_mean, bn_var, save_mean, save_invstd, bn_out)
        out = affine(s, w2, b2)
        ctx.save_for_backward(x2, w1, h, c1w, c1, c2w, s, w2, *saved)
        ctx.meta = (B, N, H, W, hidden, residual, bn_training, eps, conv, kernels, linear_kernels)
        ctx.consumed = False
        return out.view(B, N, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        _consume_saved(ctx, "FAN MLP")
        x2, w1, h, c1w, c1, c2w, s, w2, *saved = ctx.saved_tensors
        B, N, H, W, hidden, residual, bn_training, eps, conv, kernels, linear_kernels = ctx.meta
        g = grad_out.reshape(B * N, -1)
        grad_w2, grad_b2 = _linear_grads(g, s, linear_kernels, bias=True)
        grad_s = torch.mm(g, w2, out=s)  # fc2's input is no longer needed
        if kernels:  # dL/dh is written over grad_s
            grads = cpu_kernels.fan_dw_backward_(
                grad_s.view(B, H, W, hidden), h.view(B, H, W, hidden), tuple(saved), (c1w, c2w), residual
            )
            grad_c1w, grad_c1b, grad_bn_w, grad_bn_b, grad_c2w, grad_c2b, grad_b1 = grads  # float32
            grad_h = grad_s
        else:
            act, bn_w, bn_mean, bn_var, save_mean, save_invstd, bn_out = saved
            mask = [True, True, True]
            grad_s_img = grad_s.view(B, H, W, hidden).permute(0, 3, 1, 2)
            grad_bn_out, grad_c2w, grad_c2b = torch.ops.aten.convolution_backward(
                grad_s_img, bn_out, c2w, [hidden], *conv, mask
            )
            bn_mask = [True, *ctx.needs_input_grad[5:7]]  # no weight or bias grads for an affine=False BN
            grad_act, grad_bn_w, grad_bn_b = torch.ops.aten.native_batch_norm_backward(
                grad_bn_out, act, bn_w, bn_mean, bn_var, save_mean, save_invstd, bn_training, eps, bn_mask
            )
            del grad_bn_out
            grad_c1 = torch.ops.aten.gelu_backward.grad_input(grad_act, c1, grad_input=c1)
            del grad_act
            h_img = h.view(B, H, W, hidden).permute(0, 3, 1, 2)
            grad_h_img, grad_c1w, grad_c1b = torch.ops.aten.convolution_backward(
                grad_c1, h_img, c1w, [hidden], *conv, mask
            )
            grad_h = grad_h_img.permute(0, 2, 3, 1).reshape(B * N, hidden)
            if residual:
                grad_h = grad_s.add_(grad_h)
        grad_w1, grad_h_sums = _linear_grads(grad_h, x2, linear_kernels, bias=not kernels)
        grad_b1 = grad_b1 if kernels else grad_h_sums
        grad_x = grad_h.mm(w1).view(B, N, -1) if ctx.needs_input_grad[0] else None
        grads = grad_w1, grad_b1, grad_c1w, grad_c1b, grad_c2w, grad_c2b, grad_w2, grad_b2
        grad_w1, grad_b1, grad_c1w, grad_c1b, grad_c2w, grad_c2b, grad_w2, grad_b2 = (
            grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes, strict=True)
        )
        return (grad_x, grad_w1, grad_b1, grad_c1w, grad_c1b, grad_bn_w, grad_bn_b, None, None, grad_c2w,
                grad_c2b, grad_w2, grad_b2, None)


class FanMlp(nn.Module):
    """The FAN MLP: fc1 -> (x + gamma * DWConv(x)) -> fc2. No activation outside the DWConv (as published).

    ``dwconv_residual=False`` drops the ``+ x`` (the FAN-Swin variant of the reference does this).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
        dwconv_residual: bool = True,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.gamma = nn.Parameter(torch.ones(hidden_features))
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.dwconv_residual = dwconv_residual
        self.apply(init_fan_weights)
        self.apply(_init_conv_fan_out)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if self._use_fused(x):
            return self._fused(x, H, W)
        x = self.fc1(x)
        y = self.drop(self.dwconv(x, H, W, scale=self.gamma))  # gamma * DWConv(x), folded into the conv
        x = y + x if self.dwconv_residual else y
        return self.drop(self.fc2(x))

    def _use_fused(self, x: torch.Tensor) -> bool:
        """The fused function serves eager training steps: autograd on, no active dropout, the GELU/BN
        layout (``torch.compile`` gets the plain ops and plans memory itself)."""
        act, bn = self.dwconv.act, self.dwconv.bn
        return (
            _records_eager_backward(x, self.fc1.weight)
            and not (self.training and self.drop.p > 0.0)
            and type(act) is nn.GELU
            and act.approximate == "none"
            and type(bn) is nn.BatchNorm2d  # SyncBatchNorm (convert_sync_batchnorm) needs its own forward
            and bn.track_running_stats
            and not torch.jit.is_scripting()
        )

    def _fused(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        dw, bn = self.dwconv, self.dwconv.bn
        if x.shape[1] != H * W:
            raise ValueError(f"token count {x.shape[1]} does not match the grid {H}x{W}")
        if bn.training and x.shape[0] * H * W == 1:  # as F.batch_norm: one value gives no variance
            size = [1, x.shape[2], H, W]
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        momentum = cpu_kernels.count_batch(bn) if bn.training else 0.0
        c2w, c2b = _fold_out_scale(dw.conv2.weight, dw.conv2.bias, self.gamma)
        device = x.device.type  # linear and conv inputs as autocast casts them; BN keeps its fp32 params
        linear_kernels = cpu_kernels.applies_to_linear(x, self.fc1.weight)  # fc1, fc2: the bias in the matmul
        fc1, fc2 = [self.fc1.weight, self.fc1.bias], [self.fc2.weight, self.fc2.bias]
        if not linear_kernels:  # (the function casts them itself)
            fc1, fc2 = _as_autocast_inputs(device, fc1), _as_autocast_inputs(device, fc2)
        x, c1w, c1b, c2w, c2b = _as_autocast_inputs(device, [x, dw.conv1.weight, dw.conv1.bias, c2w, c2b])
        meta = (H, W, self.dwconv_residual, bn.training, cpu_kernels.serves_batch_norm(bn), momentum, bn.eps,
                linear_kernels)
        with torch.autocast(device, enabled=False):
            return _FanMlpFunction.apply(
                x, *fc1, c1w, c1b, bn.weight, bn.bias, bn.running_mean, bn.running_var, c2w, c2b, *fc2, meta
            )


class SqueezeExcite(nn.Module):
    """Squeeze-excite over the token grid (global mean -> reduce -> ReLU -> expand -> sigmoid gate).

    The 1x1 convs keep the published parameter names; on a pooled [B, C] vector they are plain matmuls.
    """

    def __init__(self, dim: int, se_ratio: float = 0.25):
        super().__init__()
        reduced = max(1, int(dim * se_ratio + 0.5))
        self.conv_reduce = nn.Conv2d(dim, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=1)
        s = F.relu(F.linear(s, self.conv_reduce.weight.flatten(1), self.conv_reduce.bias))
        s = F.linear(s, self.conv_expand.weight.flatten(1), self.conv_expand.bias)
        return x * s.sigmoid().unsqueeze(1)


class SEMlp(FanMlp):
    """FanMlp followed by squeeze-excite (the MLP of ``fan_small_12_p16_224_se_attn``)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, drop: float = 0.0):
        super().__init__(in_features, hidden_features, in_features, drop=drop)
        self.se = SqueezeExcite(in_features)
        _init_conv_fan_out(self.se.conv_reduce)
        _init_conv_fan_out(self.se.conv_expand)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.se(super().forward(x, H, W))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, heads, Nq, d] over k, v [B, heads, N, d].

    ``scaled_dot_product_attention`` everywhere except reduced precision on CPU, where its flash kernel is
    ~3x slower than two batched matmuls (measured with torch 2.14 on AMX-capable CPUs; also for class
    attention's single query: forward + backward 3.2 vs 1.4 ms at [16, 4, 1, 48] over 197 tokens, bf16).
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, dropout_p)
        return attn @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class TokenMixing(nn.Module):
    """Multi-head self-attention with separate ``q`` and ``kv`` projections (FAN's token mixer)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim_of(dim, num_heads)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.apply(init_fan_weights)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, kv_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``scale`` (a layer scale) is folded into the output projection. ``kv_input``: the values of ``x``
        for the ``kv`` projection, when they come separately (a bf16 copy, see :func:`_norm_for_matmuls`)."""
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q, kv = _project(self.q, x), _project(self.kv, x if kv_input is None else kv_input)
        dropout_p = self.attn_drop if self.training else 0.0
        # (eager first: applies_to_attention asks an op, which torch.compile would break its graph on)
        if dropout_p == 0.0 and _records_eager_backward(q, kv) and cpu_kernels.applies_to_attention(q, kv):
            x = cpu_kernels.attention(q, kv, h)
        else:
            q = q.view(B, N, h, d).transpose(1, 2)
            k, v = kv.view(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            x = _attention(q, k, v, dropout_p).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(_project(self.proj, x, scale))


class ChannelProcessing(nn.Module):
    """FAN's fully-attentional channel processing (the "MLP" of a FAN block).

    v = norm_v(FanMlp(x)); per head h a channel gate
    ``g_h = sigmoid(softmax_N(q_h)^T @ mean_d(softmax_N(x_h))) * temperature_h`` of size [d x 1] multiplies v
    channel-wise. Computed as a weighted sum over tokens, never materialising a [d x d] matrix. No output
    projection. ``norm_v`` uses the default LayerNorm eps (1e-5) like the reference.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        mlp_hidden_dim: int | None = None,
        attn_drop: float = 0.0,
        drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        dwconv_residual: bool = True,
    ):
        super().__init__()
        head_dim_of(dim, num_heads)  # checks the split
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.mlp_v = FanMlp(dim, mlp_hidden_dim, drop=drop, dwconv_residual=dwconv_residual)
        self.norm_v = norm_layer(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        init_fan_weights(self.q)
        init_fan_weights(self.norm_v)

    def channel_gate(self, x: torch.Tensor, q_input: torch.Tensor | None = None) -> torch.Tensor:
        """The per-channel gate [B, 1, C] (exposed for visualisation of the channel attention). ``q_input``:
        the values of ``x`` for the ``q`` projection, when they come separately (a bf16 copy, see
        :func:`_norm_for_matmuls`)."""
        B, N, C = x.shape
        h = self.num_heads
        q = _project(self.q, x if q_input is None else q_input)
        if cpu_kernels.applies_to_tokens(q, x) and _records_eager_backward(q, x):
            gate = cpu_kernels.channel_gate(q, x, h).view(B, h, C // h).sigmoid()
        else:
            q = q.softmax(dim=1).view(B, N, h, C // h)
            k = x.softmax(dim=1).view(B, N, h, C // h).mean(dim=-1, keepdim=True)  # [B, N, h, 1]
            gate = (q * k).sum(dim=1).sigmoid()  # [B, h, d]
        gate = gate * self.temperature.view(1, h, 1)
        return self.attn_drop(gate).reshape(B, 1, C)

    def gated_value(
        self,
        x: torch.Tensor,
        H: int,
        W: int,
        scale: torch.Tensor | None = None,
        matmul_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
        normalize: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v [B, N, C], gate [B, 1, C]); the output is ``v * gate``, ``scale`` is folded into the gate.
        ``matmul_inputs``: the values of ``x`` for the gate's ``q`` projection and for the MLP, when they come
        separately (bf16 copies, see :func:`_norm_for_matmuls`). ``normalize=False``: v before ``norm_v``,
        for a caller that applies it itself."""
        q_input, mlp_input = (x, x) if matmul_inputs is None else matmul_inputs
        gate = self.channel_gate(x, q_input)
        if scale is not None:
            gate = gate * scale
        v = self.mlp_v(mlp_input, H, W)
        return (self.norm_v(v) if normalize else v), gate

    def forward(self, x: torch.Tensor, H: int, W: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        v, gate = self.gated_value(x, H, W, scale)
        return v * gate


class ClassAttention(nn.Module):
    """CaiT class attention: the cls token (token 0) queries all tokens; returns the new cls token [B,1,C]."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim_of(dim, num_heads)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, kv_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The new class token of tokens ``x`` [B, N, C]; with ``kv_inputs``, k and v read those ([B, N, C]
        each: a norm's bf16 copies from the CPU kernels) and ``x`` may be the class tokens alone."""
        k_input, v_input = kv_inputs if kv_inputs is not None else (x, x)
        (B, N, C), h, d = k_input.shape, self.num_heads, self.head_dim
        q = _project(self.q, x[:, :1]).view(B, 1, h, d).transpose(1, 2)
        k = _project(self.k, k_input).view(B, N, h, d).transpose(1, 2)
        v = _project(self.v, v_input).view(B, N, h, d).transpose(1, 2)
        dropout_p = self.attn_drop if self.training else 0.0
        if cpu_kernels.cpu_kernels_enabled():  # bf16: two matmuls (SDPA's flash backward for 1 query: ~3 ms)
            x = _attention(q, k, v, dropout_p)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(_project(self.proj, x))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the cls token over all tokens, [B, heads, N] (for visualisation)."""
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x[:, :1]).view(B, h, 1, d)
        k = self.k(x).view(B, N, h, d).transpose(1, 2)
        return ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1).squeeze(2)


class ClassAttentionBlock(nn.Module):
    """Class-attention block as published (CaiT with ``tokens_norm``).

    Faithful to the reference, including its treatment of the patch tokens: they receive
    ``x + gamma1 * norm1(x)`` in the attention step and are doubled in the MLP step; the token models'
    per-token logits depend on this.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        eta: float = 1.0,
        tokens_norm: bool = True,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """The block on tokens ``x`` [B, N, C]; ``cls_only``: its class token alone, ``forward(x)[:, :1]``
        (see :meth:`_forward_cls`)."""
        if cls_only:
            return self._forward_cls(x)
        normed = _norm_for_matmuls(self.norm1, x, copies=2, keep_float=True)  # k and v; the rest
        if normed is None:
            x_norm = self.norm1(x)
            x_attn = self.attn(x_norm)
        else:
            x_norm, *kv_inputs = normed
            x_attn = self.attn(x_norm[:, :1], kv_inputs)
        x_attn = torch.cat([x_attn, x_norm[:, 1:]], dim=1)
        x = x + self.drop_path(self.gamma1 * x_attn)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        cls_token = self.gamma2 * self.mlp(x[:, :1])
        return x + self.drop_path(torch.cat([cls_token, x[:, 1:]], dim=1))

    def _forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)[:, :1]`` without the patch tokens' work, for the last block when only the class token
        is read (a ViT-T training step spent ~5 ms of its 2 blocks' ~18 on the patch tokens' norm2,
        concatenations, adds and backward). Bit for bit with torch's ops (every op is per row; drop path draws
        as many numbers); with the CPU kernels, to float rounding."""
        normed = _norm_for_matmuls(self.norm1, x, copies=2, keep_float=False)  # k and v
        if normed is None:
            x_attn = self.attn(self.norm1(x))
        else:  # (q's input: the class tokens' norm, as the kernels' to float rounding)
            x_attn = self.attn(self.norm1(x[:, :1]), normed)
        x_cls = x[:, :1] + self.drop_path(self.gamma1 * x_attn)
        x_cls = self.norm2(x_cls)
        return x_cls + self.drop_path(self.gamma2 * self.mlp(x_cls))


class OverlapPatchEmbed(nn.Module):
    """3x3/s2 conv + LayerNorm (eps 1e-5) between two token dims (FAN-Xlarge's in-trunk downsample)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 3, stride: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)
        _init_conv_fan_out(self.proj)
        init_fan_weights(self.norm)

    def forward(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, int, int]:
        x = self.proj(_tokens_to_image(x, H, W))
        H, W = x.shape[-2:]
        return self.norm(_image_to_tokens(x)), H, W


def _kernels_add(x: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None) -> bool:
    """Whether the kernels add a FAN block's branch ``v`` (times its [B, 1, C] ``gate``) to ``x``."""
    return (
        cpu_kernels.applies_to_tokens(x, v)
        and (gate is None or (gate.dtype == torch.float32 and gate.shape == (x.shape[0], 1, x.shape[2])
                              and gate.is_contiguous()))
        and _records_eager_backward(x, v)
    )


def _norm_for_matmuls(
    norm: nn.Module, x: torch.Tensor, copies: int, keep_float: bool
) -> tuple[torch.Tensor, ...] | None:
    """``norm(x)`` through the CPU kernels as the bf16 matmuls after it read it under autocast: ``copies``
    bf16 tensors, one per matmul, preceded by the fp32 output when ``keep_float``; None where the kernels do
    not serve it (then ``norm(x)`` is for the caller to run)."""
    # (eager first, as for the attention kernel: torch.compile gets the plain ops)
    if _records_eager_backward(x, norm.weight) and cpu_kernels.applies_to_layer_norm(x, norm):
        return cpu_kernels.layer_norm_cast(x, norm, copies, keep_float)
    return None


class FANBlock(nn.Module):
    """Pre-norm FAN block: token mixing then channel processing, each with layer scale and drop path.

    ``forward(x, H, W) -> (x, H, W)``; an optional ``downsample`` (OverlapPatchEmbed) changes the grid.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        eta: float = 1.0,
        downsample: nn.Module | None = None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = TokenMixing(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = self._make_mlp(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.downsample = downsample

    def _make_mlp(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float
    ) -> nn.Module:
        return ChannelProcessing(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            mlp_hidden_dim=int(dim * mlp_ratio),
            attn_drop=attn_drop,
            drop=drop,
        )

    def _drops_paths(self) -> bool:
        return self.training and isinstance(self.drop_path, DropPath)

    def _channel_branch(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x + drop_path(gamma2 * mlp(norm2(x))), with gamma2 folded into the channel gate."""
        normed = _norm_for_matmuls(self.norm2, x, copies=2, keep_float=True)  # q and the MLP; the gate
        if normed is None:
            y, matmul_inputs = self.norm2(x), None
        else:
            y, matmul_inputs = normed[0], (normed[1], normed[2])
        m, gate = self.mlp.gated_value(y, H, W, self.gamma2, matmul_inputs, normalize=False)
        norm = self.mlp.norm_v  # applied to m here, in the kernel that adds the branch where it serves
        if (not self._drops_paths() and _records_eager_backward(x, m)
                and cpu_kernels.applies_to_layer_norm_residual(x, m, norm, gate)):
            return cpu_kernels.layer_norm_residual(x, m, norm, gate)
        v = norm(m)
        if self._drops_paths():
            return x + self.drop_path(v * gate)
        if _kernels_add(x, v, gate):
            return cpu_kernels.residual(x, v, gate)
        return torch.addcmul(x, v, gate)

    def forward(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, int, int]:
        # layer scales are folded into the last linear op of each branch (saves full passes over x)
        normed = _norm_for_matmuls(self.norm1, x, copies=2, keep_float=False)  # q and kv
        if normed is None:
            y = self.attn(self.norm1(x), scale=self.gamma1)
        else:
            y = self.attn(normed[0], scale=self.gamma1, kv_input=normed[1])
        if not self._drops_paths() and _kernels_add(x, y):
            x = cpu_kernels.residual(x, y)
        else:
            x = x + self.drop_path(y)
        x = self._channel_branch(x, H, W)
        if self.downsample is not None:
            x, H, W = self.downsample(x, H, W)
        return x, H, W


class FANBlockSE(FANBlock):
    """FAN block whose channel processing is a squeeze-excite MLP (``*_se_attn``); works for any H, W."""

    def _make_mlp(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float
    ) -> nn.Module:
        return SEMlp(dim, int(dim * mlp_ratio), drop=drop)

    def _channel_branch(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), H, W))
