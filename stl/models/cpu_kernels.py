"""Optional CPU kernels for FAN models' training steps (channels-last), built on first use with
``torch.utils.cpp_extension`` from ``csrc/*.cpp`` (ops ``torch.ops.stl_cpu.*``).

    import stl.models
    stl.models.use_cpu_kernels(True)     # what `train.cpu_kernels: true` in params.yaml does

They serve eager training on the CPU, in fp32 or, under bf16 autocast, on bf16 activations (read and
written in bf16, computed in fp32, as torch's ops do): the FAN MLP's depthwise block (3x3 depthwise conv,
GELU, BatchNorm in training mode, 3x3 depthwise conv, residual) in two fused passes each way; BatchNorm in
training mode over channels-last activations with the GELU after it (the FAN-ViT conv stem); the weight and
bias gradients of the ConvNeXt stem's 7x7 depthwise convs; the GELU backward of fc1 -> GELU -> fc2 MLPs with
fc1's bias gradient; FAN's channel gate (two softmaxes over the tokens, a per-head mean and a weighted sum,
forward and backward); FAN's self-attention (TokenMixing: per image and head in cache, its matmuls
through ATen's batch-reduce GEMM, in bf16 only where the CPU has AMX tiles for them); a FAN block's two
residual adds (one pass each way, the channel branch's gate gradient summed in it, and its LayerNorm too);
and, under bf16 autocast, a FAN block's two LayerNorms with a bf16 copy of the output per matmul after them
(one pass each way instead of the LayerNorm, autocast's casts and their gradients' conversions and sums) and
its linears with the bias added in oneDNN's matmul (torch's addmm copies it into the output first) and
their weight and bias gradients computed in float (MKL's bf16 GEMM with a float output; autocast rounds
them to bf16 and converts them).
Elsewhere (inference, CUDA, ``torch.compile``, ``fused_backward(False)``) the models keep torch's ops.
Results match torch's to float rounding (bf16: torch's rounding or finer; built for AVX512-BF16, bf16 stores
flush values below 1.2e-38 to zero), so the switch is off by default, like ``fused=True`` AdamW.

The first build takes ~30 s and needs a C++ compiler and ninja; it is cached (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``). When the build fails, a warning says why and the models keep
torch's ops.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

__all__ = ["attention", "batch_norm_act", "channel_gate", "cpu_kernels_enabled", "depthwise_weight_grad",
           "keeps_cpu_kernels_setting", "layer_norm_cast", "layer_norm_residual", "linear",
           "linear_weight_grad", "residual", "use_cpu_kernels"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = tuple(_CSRC / f for f in ("attention.cpp", "bn_gelu.cpp", "channel_gate.cpp", "depthwise.cpp",
                                      "fan_dwconv.cpp", "layer_norm.cpp", "linear_grad.cpp",
                                      "residual.cpp"))
_HEADERS = (_CSRC / "vec_rows.h", _CSRC / "gelu.h")
# ATen's vector types pick their instruction set from these defines (as torch's own kernels are built)
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}
# GCC otherwise calls ATen's vectorized exp out of line in the GELU loops, spilling every vector register
_INLINE_FLAGS = ["--param=max-inline-insns-single=1000", "--param=large-function-growth=1000",
                 "--param=inline-unit-growth=1000"]
_enabled = False


@functools.cache
def _build() -> str | None:
    """Build and load the kernels once per process; returns why they are unavailable, or None."""
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the pip package's binary, when its bin dir is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        capability = torch.backends.cpu.get_cpu_capability()
        vector_flags = _CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])
        if capability == "AVX512" and torch.cpu._is_avx512_bf16_supported():
            vector_flags = [*vector_flags, "-mavx512bf16"]  # bf16 rounding in one instruction (vec_rows.h)
        flags = ["-O3", "-fopenmp", *_INLINE_FLAGS, *vector_flags]
        # one build per source, flags, torch and environment: the cache directory is shared by every
        # environment on the machine, and a build against other torch headers must not replace this one
        texts = [path.read_text() for path in (*_SOURCES, *_HEADERS)]
        key = "\n".join([*texts, *flags, torch.__version__, sys.prefix])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        cpp_extension.load(
            name=f"stl_cpu_kernels_{re.sub(r'[^0-9a-z]+', '_', capability.lower())}_{digest}",
            sources=[str(path) for path in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],  # torch's own libgomp (same soname, already loaded): one thread pool
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a build error: the message says which
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # a compiler's first "error:" line says why; ninja's last line only that the build stopped
        reason = next((line for line in lines if "error:" in line), lines[-1] if lines else "")
        return f"{type(error).__name__}: {reason}".strip()
    return None


def use_cpu_kernels(enabled: bool = True) -> bool:
    """Switch the fused CPU kernels on or off for this process; returns whether they are now in use.

    Switching on builds them (once per process, cached across processes). If that fails, a warning names
    the reason and the models go on with torch's ops.
    """
    if enabled:
        reason = _build()
        if reason is not None:
            warnings.warn(
                f"stl: the fused CPU kernels could not be built ({reason}); using torch's ops. They need a "
                "C++ compiler (g++) and ninja (pip install ninja).",
                RuntimeWarning,
                stacklevel=2,
            )
            enabled = False
    _set(enabled)
    return enabled


def cpu_kernels_enabled() -> bool:
    """Whether :func:`use_cpu_kernels` switched the kernels on (and they built)."""
    return _enabled


def keeps_cpu_kernels_setting(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a function that may switch the kernels for its own work: the caller's setting is restored
    when it returns or raises (a training run in a test or notebook does not leave them on)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with recorded_setting(_enabled):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def recorded_setting(enabled: bool) -> Iterator[None]:
    """The switch as a forward pass found it (``cpu_kernels_enabled()`` then), for recomputing that forward
    later (gradient checkpointing) with the same ops and saved tensors; the current setting is restored
    after."""
    previous = _enabled
    _set(enabled)
    try:
        yield
    finally:
        _set(previous)


def _set(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def _serves(x: torch.Tensor) -> bool:
    """Switched on, and ``x`` an fp32 or bf16 (activations under autocast) CPU tensor."""
    return _enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def serves_batch_norm(bn: torch.nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` is one the kernels run: an affine ``nn.BatchNorm2d`` in training mode with running
    statistics and fp32 parameters (a model cast to bf16 as a whole keeps torch's ops)."""
    return (
        type(bn) is torch.nn.BatchNorm2d  # not SyncBatchNorm: its statistics span processes
        and bn.training
        and bn.track_running_stats
        and bn.affine
        and bn.weight.dtype == torch.float32
    )


def applies(x: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm | None = None) -> bool:
    """Whether the kernels serve a training-mode BatchNorm of ``x``: switched on, a non-empty channels-last
    fp32 or bf16 CPU image and, when ``bn`` is given, one :func:`serves_batch_norm` accepts. The caller
    checks that autograd records an eager backward."""
    return (
        _serves(x)
        and x.dim() == 4
        and x.numel() > 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and (bn is None or serves_batch_norm(bn))
    )


def count_batch(bn: torch.nn.modules.batchnorm._BatchNorm) -> float:
    """Count a training batch and return the running-statistics momentum, as ``nn.BatchNorm2d.forward`` does
    (for code that runs a BatchNorm's ops itself)."""
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def bn_train_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    gelu_output: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Training-mode BatchNorm of the [M, C] rows ``x``, then GELU with ``gelu_output``; updates the running
    statistics as ``F.batch_norm`` does.

    Returns ``(y, stats)``; ``stats`` is what :func:`bn_train_backward` takes.
    """
    rows = x.shape[0]
    if rows < 2:  # as F.batch_norm: one value per channel gives no variance
        raise ValueError(f"Expected more than 1 value per channel when training, got {rows} rows")
    mean, var = torch.ops.stl_cpu.bn_stats(x)
    stats = _batch_statistics(mean, var, rows, (weight, bias, running_mean, running_var), momentum, eps)
    _, _, _, scale, shift = stats
    return torch.ops.stl_cpu.bn_apply(x, scale, shift, gelu_output), stats


@torch.no_grad()
def _batch_statistics(
    mean: torch.Tensor,
    var: torch.Tensor,
    rows: int,
    bn: tuple[torch.Tensor, ...],
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """A training BatchNorm's per-channel terms from the batch's mean and biased variance over ``rows``
    values: updates the running statistics as ``F.batch_norm`` does and returns (mean, invstd, weight, scale,
    shift), the BatchNorm being ``x * scale + shift``. ``bn``: (weight, bias, running_mean, running_var)."""
    weight, bias, running_mean, running_var = bn
    running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * rows / (rows - 1))
    invstd = (var + eps).rsqrt_()
    scale = invstd * weight
    shift = bias - mean * scale
    return mean, invstd, weight.detach(), scale, shift


def bn_train_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    stats: tuple[torch.Tensor, ...],
    gelu_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`bn_train_forward` for its [M, C] input ``x``: (grad x, grad weight, grad bias)."""
    mean, invstd, weight, scale, shift = stats
    grad = grad.contiguous()
    return torch.ops.stl_cpu.bn_backward(grad, x, mean, invstd, weight, scale, shift, gelu_output)


def fan_dw_forward(
    h: torch.Tensor,
    conv1: tuple[torch.Tensor, torch.Tensor],
    bn: tuple[torch.Tensor, ...],
    momentum: float,
    eps: float,
    conv2: tuple[torch.Tensor, torch.Tensor],
    residual: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The FAN MLP's depthwise block in training, ``conv2(BN(GELU(conv1(h)))) [+ h]``, in two fused passes.

    ``h``: the [B, H, W, C] view of a channels-last image (fp32, or bf16 under autocast); ``conv1``,
    ``conv2``: (weight [C, 1, 3, 3], bias) of stride-1, same-padded depthwise convs (any float dtype, used
    as fp32); ``bn``: (weight, bias, running_mean, running_var), fp32, the running statistics updated as
    ``F.batch_norm`` does. Returns ``(s, saved)``: the output in ``h``'s dtype, and what
    :func:`fan_dw_backward_` takes (conv1's output, the GELU's and the BatchNorm's terms); the BatchNorm's
    output is not stored.
    """
    (w1, b1), (w2, b2) = conv1, conv2
    B, H, W, _ = h.shape
    if B * H * W < 2:  # as F.batch_norm: one value per channel gives no variance
        raise ValueError(f"Expected more than 1 value per channel when training, got {B * H * W} values")
    c1, act, mean, var = torch.ops.stl_cpu.fan_dw_forward_stats(h, w1.float(), b1.float())
    stats = _batch_statistics(mean, var, B * H * W, bn, momentum, eps)
    _, _, _, scale, shift = stats
    residual_input = h if residual else None
    s = torch.ops.stl_cpu.fan_dw_forward_apply(act, scale, shift, w2.float(), b2.float(), residual_input)
    return s, (c1, act, *stats)


def fan_dw_backward_(
    grad: torch.Tensor,
    h: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    weights: tuple[torch.Tensor, torch.Tensor],
    residual: bool,
) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`fan_dw_forward` given ``grad`` = dL/ds ([B, H, W, C], contiguous), which is
    overwritten with dL/dh. ``saved``: what the forward returned; ``weights``: (conv1's, conv2's). Returns
    (conv1 weight, conv1 bias, BN weight, BN bias, conv2 weight, conv2 bias, the column sums of dL/dh: the
    gradient of a bias added to ``h``), float32.
    """
    c1, act, mean, invstd, weight, scale, shift = saved
    w1, w2 = weights
    return torch.ops.stl_cpu.fan_dw_backward_(
        grad, c1, act, h, mean, invstd, weight, scale, shift, w1.float(), w2.float(), residual
    )


def applies_to_rows(x: torch.Tensor) -> bool:
    """Whether the kernels serve an op over the [M, C] rows ``x``: switched on, contiguous fp32 or bf16 on
    the CPU."""
    return _serves(x) and x.dim() == 2 and x.is_contiguous()


def gelu_backward_sum_(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * GELU'(x)`` written over ``x`` (exact GELU), and its column sums (float32): the backward of a
    GELU and of the bias added before it, in one pass; use where :func:`applies_to_rows` holds for ``x``."""
    return torch.ops.stl_cpu.gelu_backward_sum_(grad.contiguous(), x)


def depthwise_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, kernel_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad weight [C, 1, kh, kw], grad bias [C], float32) of a stride-1, same-padded depthwise conv of the
    channels-last image ``x`` (fp32, or bf16 with a bf16 ``grad_out``); use where :func:`applies` holds for
    ``x``."""
    kh, kw = kernel_size
    hwc = [t.permute(0, 2, 3, 1).contiguous() for t in (grad_out, x)]  # views for channels-last images
    return torch.ops.stl_cpu.depthwise_weight_grad(*hwc, kh, kw)


def applies_to_tokens(*tensors: torch.Tensor) -> bool:
    """Whether the kernels serve an op over the [B, N, C] token tensors: switched on, each a contiguous fp32
    or bf16 CPU tensor with tokens, all of one shape."""
    shape = tensors[0].shape
    return shape[1:2] != (0,) and all(
        _serves(t) and t.dim() == 3 and t.shape == shape and t.is_contiguous() for t in tensors
    )


class _ChannelGate(torch.autograd.Function):
    """FAN's channel gate before its sigmoid (see :func:`channel_gate`); saves its inputs and small
    statistics, the softmaxes are recomputed in backward."""

    @staticmethod
    def forward(ctx, q, x, heads):  # type: ignore[override]
        gate, k, stats = torch.ops.stl_cpu.channel_gate(q, x, heads)
        ctx.save_for_backward(q, x, gate, k, stats)
        ctx.heads = heads
        return gate.to(torch.promote_types(q.dtype, x.dtype))  # the dtype of torch's ops on q and x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gate):  # type: ignore[override]
        q, x, gate, k, stats = ctx.saved_tensors
        grad_q, grad_x = torch.ops.stl_cpu.channel_gate_backward(
            grad_gate.float().contiguous(), q, x, gate, k, stats, ctx.heads
        )
        return grad_q, grad_x, None


def channel_gate(q: torch.Tensor, x: torch.Tensor, heads: int) -> torch.Tensor:
    """``sum_n softmax_n(q) * mean_head(softmax_n(x))`` of the [B, N, C] tokens (FAN's channel gate before its
    sigmoid), [B, C]: computed in fp32, one image at a time with the softmaxes recomputed in backward, in the
    dtype torch's ops would give (fp32 unless both are bf16); use where :func:`applies_to_tokens` holds for
    ``q`` and ``x``."""
    return _ChannelGate.apply(q, x, heads)


def applies_to_attention(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether the kernels serve self-attention of the [B, N, C] queries ``q`` and [B, N, 2C] keys and values
    ``kv``: switched on, contiguous CPU tensors of one dtype, fp32, or bf16 where the CPU multiplies bf16
    matrices in AMX tiles (elsewhere the kernel's bf16 matmuls would fall back to a slower generic GEMM)."""
    return (
        _serves(q)
        and q.dim() == 3
        and q.shape[1] > 0
        and kv.shape == (*q.shape[:2], 2 * q.shape[2])
        and kv.dtype == q.dtype
        and q.is_contiguous()
        and kv.is_contiguous()
        and (q.dtype == torch.float32 or _packs_bf16())
    )


@functools.cache
def _packs_bf16() -> bool:
    """Whether oneDNN multiplies bf16 matrices on this CPU in AMX tiles (asked once per process)."""
    return bool(torch.ops.stl_cpu.attention_packs_bf16())


class _Attention(torch.autograd.Function):
    """Multi-head self-attention (see :func:`attention`); saves its inputs and two statistics per softmax row,
    the attention matrix is recomputed in backward."""

    @staticmethod
    def forward(ctx, q, kv, heads):  # type: ignore[override]
        out, stats = torch.ops.stl_cpu.attention(q, kv, heads)
        ctx.save_for_backward(q, kv, stats)
        ctx.heads = heads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        q, kv, stats = ctx.saved_tensors
        grad = grad.to(q.dtype).contiguous()
        grad_q, grad_kv = torch.ops.stl_cpu.attention_backward(grad, q, kv, stats, ctx.heads)
        return grad_q, grad_kv, None


def attention(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(q_h k_h^T / sqrt(d)) v_h`` for each head h, as [B, N, C] in ``q``'s dtype, from the queries
    ``q`` [B, N, C] and ``kv`` [B, N, 2C] (keys, then values) as the linears give them; scores and softmax in
    fp32, one (image, head) at a time, the attention matrix recomputed in backward. Use where
    :func:`applies_to_attention` holds."""
    return _Attention.apply(q, kv, heads)


class _Residual(torch.autograd.Function):
    """``x + v * gate`` (or ``x + v``) in one pass each way; saves ``v`` and the gate."""

    @staticmethod
    def forward(ctx, x, v, gate):  # type: ignore[override]
        ctx.save_for_backward(v if gate is not None else None, gate)
        ctx.dtypes = (x.dtype, v.dtype)
        return torch.ops.stl_cpu.residual(x, v, gate)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        v, gate = ctx.saved_tensors
        x_dtype, v_dtype = ctx.dtypes
        if gate is None:
            return grad.to(x_dtype), grad.to(v_dtype), None
        grad_v, grad_gate = torch.ops.stl_cpu.residual_backward(grad.contiguous(), v, gate)
        return grad.to(x_dtype), grad_v, grad_gate


def residual(x: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``x + v * gate`` for [B, N, C] tokens ``x``, ``v`` and a float32 [B, 1, C] ``gate`` (``x + v`` without
    one), computed in fp32, in the dtype torch's ops give; use where :func:`applies_to_tokens` holds for ``x``
    and ``v`` (and ``gate`` is a contiguous float32 [B, 1, C] CPU tensor)."""
    return _Residual.apply(x, v, gate)


def _bf16_autocast() -> bool:
    """Whether CPU autocast is on, to bfloat16."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def applies_to_layer_norm(x: torch.Tensor, norm: torch.nn.Module) -> bool:
    """Whether the kernels serve ``norm(x)`` for bf16 matmuls: switched on, bf16 CPU autocast on, ``x`` a
    contiguous fp32 CPU tensor of [..., C] tokens and ``norm`` an ``nn.LayerNorm`` over C with fp32 weight and
    bias (on bf16 ``x`` autocast runs LayerNorm in bf16, with no casts to save). The caller checks that
    autograd records an eager backward."""
    return (
        _serves(x)
        and x.dtype == torch.float32
        and x.dim() > 1
        and x.numel() > 0
        and x.is_contiguous()
        and _bf16_autocast()
        and _serves_layer_norm(norm, x.shape[-1])
    )


def _serves_layer_norm(norm: torch.nn.Module, C: int) -> bool:
    """Whether ``norm`` is one the LayerNorm kernels run: an ``nn.LayerNorm`` over C channels with fp32 weight
    and bias."""
    return (
        type(norm) is torch.nn.LayerNorm
        and norm.normalized_shape == (C,)
        and norm.weight is not None
        and norm.bias is not None
        and norm.weight.dtype == norm.bias.dtype == torch.float32
    )


class _LayerNormCast(torch.autograd.Function):
    """LayerNorm with bf16 copies of its output (see :func:`layer_norm_cast`); saves its input and two
    statistics per row."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta):  # type: ignore[override]
        eps, copies, keep_float = meta
        y, low, stats = torch.ops.stl_cpu.layer_norm_cast(x, weight, bias, eps, copies, keep_float)
        ctx.save_for_backward(x, weight, stats)
        ctx.keep_float = keep_float
        return (y, *low) if keep_float else tuple(low)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        x, weight, stats = ctx.saved_tensors
        grad_float = grads[0].float().contiguous() if ctx.keep_float else None
        low = [g.to(torch.bfloat16).contiguous() for g in grads[ctx.keep_float:]]
        grad_x, grad_w, grad_b = torch.ops.stl_cpu.layer_norm_cast_backward(low, grad_float, x, weight, stats)
        return grad_x, grad_w, grad_b, None


def layer_norm_cast(
    x: torch.Tensor, norm: torch.nn.LayerNorm, copies: int, keep_float: bool
) -> tuple[torch.Tensor, ...]:
    """``norm(x)`` as the ops after it read it under bf16 autocast: ``copies`` bf16 tensors, one per matmul
    (so that their gradients are summed in fp32, as autocast's casts do), preceded by the fp32 output when
    ``keep_float`` (for ops that autocast runs in fp32). One pass each way instead of a LayerNorm, a cast per
    matmul and their gradients' conversions and sums; use where :func:`applies_to_layer_norm` holds."""
    with torch.autocast("cpu", enabled=False):
        return _LayerNormCast.apply(x, norm.weight, norm.bias, (norm.eps, copies, keep_float))


def applies_to_layer_norm_residual(
    x: torch.Tensor, m: torch.Tensor, norm: torch.nn.Module, gate: torch.Tensor
) -> bool:
    """Whether the kernels serve ``x + norm(m) * gate`` (see :func:`layer_norm_residual`): switched on, ``x``
    and ``m`` contiguous [B, N, C] CPU tokens, ``x`` fp32 and ``m`` fp32 or bf16, ``gate`` a contiguous fp32
    [B, 1, C] tensor and ``norm`` an ``nn.LayerNorm`` over C with fp32 weight and bias. The caller checks
    that autograd records an eager backward."""
    return (
        applies_to_tokens(x, m)
        and x.dtype == torch.float32
        and gate.dtype == torch.float32
        and gate.shape == (x.shape[0], 1, x.shape[2])
        and gate.is_contiguous()
        and _serves_layer_norm(norm, x.shape[-1])
    )


class _LayerNormResidual(torch.autograd.Function):
    """``x + LN(m) * gate`` (see :func:`layer_norm_residual`); saves ``m``, the gate and two statistics per
    row, LN(m) is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, m, weight, bias, gate, eps):  # type: ignore[override]
        out, stats = torch.ops.stl_cpu.layer_norm_residual(x, m, weight, bias, gate, eps)
        ctx.save_for_backward(m, weight, bias, gate, stats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        m, weight, bias, gate, stats = ctx.saved_tensors
        grad = grad.float().contiguous()
        grad_m, grad_w, grad_b, grad_gate = torch.ops.stl_cpu.layer_norm_residual_backward(
            grad, m, weight, bias, gate, stats
        )
        return grad, grad_m, grad_w, grad_b, grad_gate, None


def layer_norm_residual(
    x: torch.Tensor, m: torch.Tensor, norm: torch.nn.LayerNorm, gate: torch.Tensor
) -> torch.Tensor:
    """``x + norm(m) * gate`` in one pass each way: a FAN block's channel branch (``m`` its MLP's output,
    ``gate`` the channel gate) added to the residual stream, with ``norm(m)`` rounded to ``m``'s dtype as
    torch's LayerNorm stores it (bf16 under autocast) and, backward, its gradient too; instead of a
    LayerNorm, the residual add and their backward passes. Use where :func:`applies_to_layer_norm_residual`
    holds."""
    with torch.autocast("cpu", enabled=False):
        return _LayerNormResidual.apply(x, m, norm.weight, norm.bias, gate, norm.eps)


_AUTOCAST_CASTS = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _has_linear_pointwise() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def applies_to_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels serve a linear of ``x`` under bf16 autocast (see :func:`linear`): switched on, bf16
    CPU autocast on, ``x`` and ``weight`` CPU tensors of the dtypes autocast casts (not float64), where oneDNN
    multiplies bf16 matrices in AMX tiles and torch exposes its matmul with a fused bias. The caller checks
    that autograd records an eager backward."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype in _AUTOCAST_CASTS
        and weight.dtype in _AUTOCAST_CASTS
        and _bf16_autocast()
        and _has_linear_pointwise()
        and _packs_bf16()
    )


def linear_with_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` (bf16, no autograd) by oneDNN with the bias added in the matmul's epilogue:
    torch's ``addmm`` copies the bias into the output first, a pass over it (~10 ms of a 0.4 s FAN-ViT-T bf16
    training step). The op is torch's private ``mkldnn._linear_pointwise`` (what inductor's CPU fusions
    call); use where :func:`applies_to_linear` holds."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A bf16 linear's weight and bias gradients in float32, ``(grad.T @ x, grad.sum(0) if bias else None)``
    for [R, O] and [R, I] bf16 rows, without autocast's bf16 rounding of them and its conversions (MKL's bf16
    GEMM with a float output where torch's build has it; see csrc/linear_grad.cpp)."""
    grad_w, grad_b = torch.ops.stl_cpu.linear_weight_grad(grad.contiguous(), x.contiguous(), bias)
    return grad_w, grad_b if bias else None


class _Linear(torch.autograd.Function):
    """A bf16 linear with its bias in the matmul's epilogue (see :func:`linear`). Takes the weight and bias in
    their own dtype and casts them itself, so that fp32 ones get their gradients computed in float
    (:func:`linear_weight_grad`) with nothing to convert; saves the bf16 input and weight. Its backward is not
    differentiable (``create_graph=True`` raises instead of dropping the weight gradient's graph)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        low_weight = weight.to(torch.bfloat16)
        ctx.save_for_backward(x, low_weight)
        ctx.dtypes = weight.dtype, bias.dtype if bias is not None else None
        return linear_with_bias(x, low_weight, bias.to(torch.bfloat16) if bias is not None else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad2.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            weight_dtype, bias_dtype = ctx.dtypes
            grad_w, grad_b = linear_weight_grad(grad2, x.reshape(-1, x.shape[-1]), ctx.needs_input_grad[2])
            grad_w = grad_w.to(weight_dtype) if ctx.needs_input_grad[1] else None
            grad_b = grad_b.to(bias_dtype) if grad_b is not None else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` under bf16 autocast: the inputs cast to bf16 as autocast casts them, the
    bias added in oneDNN's matmul (see :func:`linear_with_bias`), the input's gradient as torch's; torch's
    values to float rounding. The weight's and bias's gradients are computed in float and not rounded to bf16
    (:func:`linear_weight_grad`). Use where :func:`applies_to_linear` holds."""
    with torch.autocast("cpu", enabled=False):
        return _Linear.apply(x.to(torch.bfloat16), weight, bias)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The [B*H*W, C] view of a channels-last [B, C, H, W] tensor (a copy only if it is not channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _image(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    B, C, H, W = shape
    return rows.view(B, H, W, C).permute(0, 3, 1, 2)


class _BatchNormAct(torch.autograd.Function):
    """BatchNorm (training) [-> GELU] of a channels-last image; saves only its input and statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, meta):  # type: ignore[override]
        momentum, eps, gelu = meta
        rows = _rows(x)
        y, stats = bn_train_forward(rows, weight, bias, running_mean, running_var, momentum, eps,
                                    gelu_output=gelu)
        ctx.save_for_backward(rows, *stats)
        ctx.meta = (x.shape, gelu)
        return _image(y, x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        rows, *stats = ctx.saved_tensors
        shape, gelu = ctx.meta
        grad_x, grad_w, grad_b = bn_train_backward(_rows(grad_out), rows, tuple(stats), gelu_output=gelu)
        return _image(grad_x, shape), grad_w, grad_b, None, None, None


def batch_norm_act(x: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm, gelu: bool) -> torch.Tensor:
    """``GELU(bn(x))`` (or ``bn(x)``) through the kernels; use where :func:`applies` holds."""
    meta = (count_batch(bn), bn.eps, gelu)
    return _BatchNormAct.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, meta)
