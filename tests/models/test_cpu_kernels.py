"""The fused BatchNorm + GELU CPU kernels (stl.models.cpu_kernels): built here for real (the CI machine has a
C++ compiler), checked against torch's ops, and kept out of everywhere they must not apply."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import timm
import torch
import torch.nn.functional as F

from stl.models import cpu_kernels, fused_backward
from stl.models.convnext_stem import ConvNeXtBlock
from stl.models.layers import (
    ChannelProcessing,
    ClassAttention,
    ConvPatchEmbed,
    DWConv,
    FanMlp,
    GeluMlp,
    TokenMixing,
)

_T = TypeVar("_T")
_N = TypeVar("_N", torch.nn.BatchNorm2d, torch.nn.LayerNorm)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the kernels cannot be built here")


@pytest.fixture
def kernels() -> Iterator[None]:
    """The kernels on for one test, the previous setting back afterwards."""
    previous = cpu_kernels.cpu_kernels_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build must fail these tests, not fall back
        assert cpu_kernels.use_cpu_kernels(True)
    yield
    cpu_kernels._set(previous)


def _channels_last(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    B, C, H, W = shape
    return (torch.randn(B, H, W, C) * scale + offset).permute(0, 3, 1, 2)


def _randomised(norm: _N, seed: int = 0) -> _N:
    """A normalisation layer with weights around 1 and biases around 0 (not its init's ones and zeros)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def _bn(C: int, seed: int = 0) -> torch.nn.BatchNorm2d:
    return _randomised(torch.nn.BatchNorm2d(C), seed)


# C = 24 and 48: the stem's widths (24 read two rows at a time, as three vectors); 24 with an odd number of
# rows (one at a time); 8 and 56: two rows at a time too; 20: a vector and a partial tail; 3 x 5 x 7: rows
# not a multiple of 4
@pytest.mark.parametrize("shape", [(4, 24, 16, 16), (1, 24, 3, 5), (2, 8, 3, 3), (2, 56, 4, 4), (2, 48, 8, 8),
                                   (2, 20, 5, 3), (3, 5, 5, 7)])
@pytest.mark.parametrize("gelu", [False, True])
def test_batch_norm_act_matches_torch(kernels: None, shape: tuple[int, ...], gelu: bool) -> None:
    x = _channels_last(*shape, scale=2.0, offset=3.0).requires_grad_()  # a mean far from zero
    grad = _channels_last(*shape)
    bn, ref_bn = _bn(shape[1]), _bn(shape[1])
    for step in range(2):  # running statistics and the batch count advance as torch's
        assert cpu_kernels.applies(x, bn)
        y = cpu_kernels.batch_norm_act(x, bn, gelu=gelu)
        ref = ref_bn(x)
        ref = F.gelu(ref) if gelu else ref
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(y, (x, bn.weight, bn.bias), grad)
        want = torch.autograd.grad(ref, (x, ref_bn.weight, ref_bn.bias), grad)
        for name, g, w in zip(("input", "weight", "bias"), got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"step {step}: grad {name}")
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, buf in bn.named_buffers():
        torch.testing.assert_close(buf, dict(ref_bn.named_buffers())[name], msg=name)


def _torch_batch_norm_act(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor, grad: torch.Tensor,
                          gelu_output: bool) -> tuple[torch.Tensor, ...]:
    """torch's ops on [M, C] rows (as an NCHW [1, C, M, 1] image), in the rows' dtype: output, grads."""
    x = rows.detach().clone().requires_grad_()
    w, b = (t.to(torch.float64) if rows.dtype == torch.float64 else t for t in (w, b))
    w, b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    img = x.t().contiguous().view(1, *x.t().shape, 1)  # contiguous: torch's NCHW path
    y = F.batch_norm(img, None, None, w, b, training=True, eps=1e-5)
    y = F.gelu(y) if gelu_output else y
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad.to(y.dtype).t().contiguous().view_as(y))
    return y.detach().view(y.shape[1], -1).t(), gx, gw, gb


# C = 24: the stem's first width (a vector and a tail of bf16); 768: its last; 37: a partial vector
@pytest.mark.parametrize("C", [24, 37, 768])
@pytest.mark.parametrize("gelu_output", [True, False])  # BN -> GELU (the stem), BN alone
def test_bf16_rows_are_as_accurate_as_torchs_bf16_ops(kernels: None, C: int, gelu_output: bool) -> None:
    """Under bf16 autocast the kernels read and write bf16 and compute in fp32, as torch's BatchNorm and GELU
    do: against float64 their error is the size of torch's bf16 error."""
    torch.manual_seed(C)
    x = (torch.randn(300, C) * 2 + 0.5).to(torch.bfloat16)
    grad = torch.randn(300, C).to(torch.bfloat16)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    y, stats = cpu_kernels.bn_train_forward(x, w, b, running_mean, running_var, 0.1, 1e-5,
                                            gelu_output=gelu_output)
    got = (y, *cpu_kernels.bn_train_backward(grad, x, stats, gelu_output=gelu_output))
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    torch_bf16 = _torch_batch_norm_act(x, w, b, grad, gelu_output)
    exact = _torch_batch_norm_act(x.double(), w, b, grad, gelu_output)
    for name, g, t, e in zip(("output", "input grad", "weight grad", "bias grad"), got, torch_bf16, exact,
                             strict=True):
        err, torch_err = (float((v.double() - e).abs().max() / e.abs().max()) for v in (g, t))
        assert err <= 1.5 * torch_err + 1e-6, (name, err, torch_err)
    # every output element within bf16 rounding of the exact value (plus fp32 rounding near zero)
    torch.testing.assert_close(y.double(), exact[0], rtol=2**-8, atol=1e-5 * float(exact[0].abs().max()))
    torch.testing.assert_close(running_mean.double(), 0.1 * x.double().mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(running_var.double(), 0.9 + 0.1 * x.double().var(0), rtol=1e-5, atol=1e-7)


# 40 channels: two vectors and a tail; images narrower and shorter than the kernel; non-square kernels;
# the FAN MLPs' 3x3
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "kernel"), [((2, 40, 9, 7), (7, 7)), ((3, 16, 2, 3), (7, 7)),
                                               ((2, 24, 6, 5), (5, 3)), ((1, 70, 4, 4), (1, 1)),
                                               ((3, 48, 5, 6), (3, 3))])
def test_depthwise_weight_grad_matches_float64(kernels: None, shape: tuple[int, ...], kernel: tuple[int, int],
                                               dtype: torch.dtype) -> None:
    """Depthwise weight and bias gradients (stride 1, same padding) as oneDNN's in float64, to fp32 rounding;
    bf16 images are summed in fp32 (against float64 of the same bf16 values)."""
    torch.manual_seed(0)
    x, grad = (t.to(dtype) for t in (_channels_last(*shape, offset=1.0), _channels_last(*shape)))
    C, (kh, kw) = shape[1], kernel
    weight = torch.randn(C, 1, kh, kw)
    got_w, got_b = cpu_kernels.depthwise_weight_grad(grad, x, kernel)
    _, want_w, want_b = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight.double(), [C], (1, 1), (kh // 2, kw // 2), (1, 1), False, (0, 0), C,
        [False, True, True])
    assert got_w.shape == weight.shape and got_w.dtype == got_b.dtype == torch.float32
    for got, want in ((got_w, want_w), (got_b, want_b)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * float(want.abs().max()))


# 37 channels: two vectors and a tail; 301 rows: not a multiple of the 4-row step; no rows at all
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("M", "C"), [(301, 37), (64, 512), (0, 16)])
def test_gelu_backward_sum_matches_torch(kernels: None, dtype: torch.dtype, M: int, C: int) -> None:
    """GELU's backward written over its input, with the column sums (fc1's bias gradient): as accurate
    against float64 as torch's gelu_backward and sum."""
    torch.manual_seed(M + C)
    x, grad = (torch.randn(M, C) * 2).to(dtype), torch.randn(M, C).to(dtype)
    buffer = x.clone()
    sums = cpu_kernels.gelu_backward_sum_(grad, buffer)
    assert sums.dtype == torch.float32 and sums.shape == (C,)
    torch_grad = torch.ops.aten.gelu_backward(grad, x)
    exact = torch.ops.aten.gelu_backward(grad.double(), x.double())
    if M == 0:
        assert torch.equal(sums, torch.zeros(C))
        return
    for got, theirs, want in ((buffer, torch_grad, exact), (sums, torch_grad.sum(0), exact.sum(0))):
        err, torch_err = (float((v.double() - want).abs().max() / want.abs().max()) for v in (got, theirs))
        assert err <= 1.5 * torch_err + 1e-6, (err, torch_err)
    with pytest.raises(RuntimeError, match="grad and x must be different tensors"):
        cpu_kernels.gelu_backward_sum_(buffer, buffer)


def _on_one_and_two_threads(fn: Callable[[], _T]) -> tuple[_T, _T]:
    """fn() with torch on one thread, then on two (the kernels' results must not depend on it)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        return one, fn()
    finally:
        torch.set_num_threads(threads)


def test_gelu_backward_sum_does_not_depend_on_the_thread_count(kernels: None) -> None:
    x, grad = torch.randn(1000, 40), torch.randn(1000, 40)
    one, two = _on_one_and_two_threads(lambda: cpu_kernels.gelu_backward_sum_(grad, x.clone()))
    assert torch.equal(one, two)


def test_depthwise_weight_grad_does_not_depend_on_the_thread_count(kernels: None) -> None:
    x, grad = _channels_last(5, 40, 12, 12), _channels_last(5, 40, 12, 12)
    one, two = _on_one_and_two_threads(lambda: cpu_kernels.depthwise_weight_grad(grad, x, (7, 7)))
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_depthwise_weight_grad_names_wrong_arguments(kernels: None) -> None:
    x = torch.randn(2, 4, 4, 8)
    with pytest.raises(RuntimeError, match="the kernel must have odd sides, got 6x7"):
        torch.ops.stl_cpu.depthwise_weight_grad(x, x, 6, 7)
    with pytest.raises(RuntimeError,
                       match=r"grad must be a contiguous \[B, H, W, C\] CPU tensor of x's dtype, got Float"):
        torch.ops.stl_cpu.depthwise_weight_grad(x, x.bfloat16(), 7, 7)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Half"):
        torch.ops.stl_cpu.depthwise_weight_grad(x.half(), x.half(), 7, 7)
    with pytest.raises(RuntimeError, match=r"grad \[2, 4, 4, 4\] and x \[2, 4, 4, 8\] differ"):
        torch.ops.stl_cpu.depthwise_weight_grad(x[..., :4].contiguous(), x, 7, 7)


def _torch_channel_gate(q: torch.Tensor, x: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C = q.shape
    q = q.softmax(dim=1).view(B, N, heads, C // heads)
    k = x.softmax(dim=1).view(B, N, heads, C // heads).mean(dim=-1, keepdim=True)
    return (q * k).sum(dim=1).reshape(B, C)


# ViT-T's 4 heads of 48; heads of 20 (a vector and a tail) and of 3 channels; one token; 197 tokens
@pytest.mark.parametrize(("B", "N", "C", "heads"),
                         [(2, 196, 192, 4), (3, 7, 40, 2), (2, 5, 12, 4), (2, 1, 16, 2), (1, 197, 48, 1)])
@pytest.mark.parametrize(("q_dtype", "x_dtype"), [(torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_channel_gate_matches_float64(kernels: None, B: int, N: int, C: int, heads: int, q_dtype: torch.dtype,
                                      x_dtype: torch.dtype) -> None:
    """FAN's channel gate and its gradients against float64 of the same inputs: as accurate as torch's ops on
    them (fp32: fp32 rounding, large in q's gradient, a difference of near-equal terms; bf16 inputs, as under
    autocast: torch's ops round the softmaxes to bf16, ours round only the outputs)."""
    torch.manual_seed(N + C)
    q0, x0 = torch.randn(B, N, C) * 4, torch.randn(B, N, C) * 2  # peaked softmaxes over the tokens
    q, x = q0.to(q_dtype).requires_grad_(), x0.to(x_dtype).requires_grad_()
    grad = torch.randn(B, C)
    gate = cpu_kernels.channel_gate(q, x, heads)
    gate.backward(grad)
    gate = gate.detach()
    assert gate.dtype == torch.promote_types(q_dtype, x_dtype) and gate.shape == (B, C)
    assert q.grad.dtype == q_dtype and x.grad.dtype == x_dtype
    exact_q, exact_x = (t.detach().double().requires_grad_() for t in (q, x))
    exact = _torch_channel_gate(exact_q, exact_x, heads)
    exact.backward(grad.to(gate.dtype).double())  # the gradient as the op received it
    torch_q, torch_x = (t.detach().clone().requires_grad_() for t in (q, x))
    theirs = _torch_channel_gate(torch_q, torch_x, heads)
    theirs.float().backward(grad)
    for got, torch_got, want in ((gate, theirs.detach(), exact.detach()),
                                 (q.grad, torch_q.grad, exact_q.grad), (x.grad, torch_x.grad, exact_x.grad)):
        # (one token: the gradients are 0, and so are ours)
        scale = want.abs().max().clamp_min(1e-12)
        err, torch_err = (float((v.double() - want).abs().max() / scale) for v in (got, torch_got))
        assert err <= 2 * torch_err + 1e-5, (err, torch_err)  # (fp32: measured up to 7e-6 for both)


@pytest.mark.parametrize(("q_dtype", "x_dtype"), [(torch.bfloat16, torch.float32),
                                                  (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_channel_gate_on_bf16_is_the_fp32_kernel_rounded(kernels: None, q_dtype: torch.dtype,
                                                         x_dtype: torch.dtype) -> None:
    """bf16 inputs are computed in fp32 and only the results rounded (to nearest even), bit for bit; 40
    channels: vector tails in the loads and stores."""
    torch.manual_seed(0)
    q, x = (torch.randn(3, 9, 40) * 3).to(q_dtype), torch.randn(3, 9, 40).to(x_dtype)
    out_dtype = torch.promote_types(q_dtype, x_dtype)
    grad = torch.randn(3, 40).to(out_dtype)  # the gradient as the op receives it
    results = []
    for q_, x_ in ((q, x), (q.float(), x.float())):
        q_, x_ = q_.clone().requires_grad_(), x_.clone().requires_grad_()
        gate = cpu_kernels.channel_gate(q_, x_, 4)
        gate.backward(grad.to(gate.dtype))
        results.append((gate.detach(), q_.grad, x_.grad))
    for got, fp32 in zip(*results, strict=True):
        assert torch.equal(got, fp32.to(got.dtype))


def test_channel_gate_does_not_depend_on_the_thread_count(kernels: None) -> None:
    q, x, grad = torch.randn(5, 50, 24), torch.randn(5, 50, 24), torch.randn(5, 24)

    def step() -> tuple[torch.Tensor, ...]:
        q_, x_ = q.clone().requires_grad_(), x.clone().requires_grad_()
        gate = cpu_kernels.channel_gate(q_, x_, 3)
        gate.backward(grad)
        return gate, q_.grad, x_.grad

    for a, b in zip(*_on_one_and_two_threads(step), strict=True):
        assert torch.equal(a, b)


def test_channel_gate_names_wrong_arguments(kernels: None) -> None:
    q = torch.randn(2, 5, 12)
    with pytest.raises(RuntimeError, match="12 channels do not split into 5 heads"):
        torch.ops.stl_cpu.channel_gate(q, q, 5)
    with pytest.raises(RuntimeError,
                       match=r"x must be a contiguous \[2, 5, 12\] CPU tensor, got \[2, 5, 8\]"):
        torch.ops.stl_cpu.channel_gate(q, q[..., :8].contiguous(), 4)
    with pytest.raises(RuntimeError, match=r"q must be \[B, N, C\] with N > 0, got \[2, 0, 12\]"):
        torch.ops.stl_cpu.channel_gate(q[:, :0], q[:, :0], 4)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Half"):
        torch.ops.stl_cpu.channel_gate(q, q.half(), 4)
    gate, k, stats = torch.ops.stl_cpu.channel_gate(q, q, 4)
    with pytest.raises(RuntimeError, match=r"stats must be a contiguous float32 \[2, 4, 12\] CPU tensor"):
        torch.ops.stl_cpu.channel_gate_backward(gate, q, q, gate, k, stats[:, :2].contiguous(), 4)
    assert not cpu_kernels.applies_to_tokens(q, q[:, :4])  # shapes differ
    assert not cpu_kernels.applies_to_tokens(q, q.transpose(1, 2).contiguous().transpose(1, 2))
    assert not cpu_kernels.applies_to_tokens(q[:, :0], q[:, :0])
    assert cpu_kernels.applies_to_tokens(q.bfloat16(), q)


def _torch_attention(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C = q.shape
    d = C // heads
    q = q.view(B, N, heads, d).transpose(1, 2)
    k, v = kv.view(B, N, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # torch's bf16 route in TokenMixing
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


# ViT-T's 4 heads of 48 over 196 tokens; 32 px (4 tokens); odd token counts (a bf16 matmul's K padded);
# heads of 20 (a vector and a tail) and of 130 channels (three column blocks); one token
@pytest.mark.parametrize(("B", "N", "C", "heads"), [(2, 196, 192, 4), (1, 4, 192, 4), (1, 49, 48, 2),
                                                    (2, 7, 40, 2), (3, 5, 24, 1), (2, 70, 130, 1),
                                                    (2, 1, 16, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_as_accurate_as_torch(kernels: None, B: int, N: int, C: int, heads: int,
                                           dtype: torch.dtype) -> None:
    """Self-attention and its gradients against float64 of the same inputs, largest error of the output, q's
    gradient and kv's: as accurate as torch's ops on them (fp32: up to 2x their error, measured 0.56-1.22x;
    bf16: ours keeps the scores in fp32, measured 0.14-0.72x)."""
    torch.manual_seed(N + C)
    q = (torch.randn(B, N, C) * 2).to(dtype).requires_grad_()  # peaked softmaxes
    kv = (torch.randn(B, N, 2 * C) * 2).to(dtype).requires_grad_()
    grad = torch.randn(B, N, C).to(dtype)
    out = cpu_kernels.attention(q, kv, heads)
    out.backward(grad)
    assert out.dtype == q.grad.dtype == kv.grad.dtype == dtype and out.shape == (B, N, C)
    exact_q, exact_kv = (t.detach().double().requires_grad_() for t in (q, kv))
    exact = _torch_attention(exact_q, exact_kv, heads)
    exact.backward(grad.double())
    torch_q, torch_kv = (t.detach().clone().requires_grad_() for t in (q, kv))
    theirs = _torch_attention(torch_q, torch_kv, heads)
    theirs.backward(grad)
    results = ((out, theirs, exact), (q.grad, torch_q.grad, exact_q.grad),
               (kv.grad, torch_kv.grad, exact_kv.grad))
    # (one token: q's gradient is 0 exactly, ours is rounding noise; the floor is relative to all results)
    floor = 1e-6 * max(float(want.detach().abs().max()) for *_, want in results)
    for got, torch_got, want in results:
        err, torch_err = (float((v.detach().double() - want.detach()).abs().max()) for v in (got, torch_got))
        assert err <= 2 * torch_err + floor, (err, torch_err)


@pytest.mark.parametrize("N", [17, 197])  # a partial vector at the end of each row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_finite_where_torch_is(kernels: None, N: int, dtype: torch.dtype) -> None:
    """Rows whose scores are all very negative (exp of the partial vector's zero lanes used to overflow and
    turn the row's gradient into NaN), and scores of ~1e9 (a fused scale * s - scale * max used to miss the
    max's exp(0) = 1): the output against float64, the gradients finite as torch's are."""
    torch.manual_seed(0)
    q, kv, grad = torch.randn(2, N, 32), torch.randn(2, N, 64), torch.randn(2, N, 32)
    kv[..., :32] += 3
    q[0, 0] = -8  # every score of this query ~ -130
    huge_q, huge_kv = q * 3e4, kv * 3e4  # scores ~1e9 and more
    for q_, kv_ in ((q, kv), (huge_q, huge_kv)):
        q_, kv_ = (t.to(dtype).requires_grad_() for t in (q_, kv_))
        out = cpu_kernels.attention(q_, kv_, 1)
        out.backward(grad.to(dtype))
        want = _torch_attention(q_.detach().double(), kv_.detach().double(), 1)
        assert all(bool(t.isfinite().all()) for t in (out, q_.grad, kv_.grad))
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-2 * float(want.abs().max()))


def test_attention_is_not_asked_for_under_torch_compile(kernels: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the kernel serves an attention asks an op (AMX packing); torch.compile must never reach that
    question (a graph break per block)."""
    def refuse(*args: object) -> bool:
        raise AssertionError("applies_to_attention called while compiling")

    monkeypatch.setattr(cpu_kernels, "applies_to_attention", refuse)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    mixing = TokenMixing(16, num_heads=2)
    mixing(torch.randn(2, 5, 16, requires_grad=True)).sum().backward()


def test_attention_does_not_depend_on_the_thread_count(kernels: None) -> None:
    q, kv, grad = torch.randn(3, 50, 24), torch.randn(3, 50, 48), torch.randn(3, 50, 24)

    def step(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        q_, kv_ = (t.to(dtype, copy=True).requires_grad_() for t in (q, kv))
        out = cpu_kernels.attention(q_, kv_, 2)
        out.backward(grad.to(dtype))
        return out, q_.grad, kv_.grad

    for dtype in (torch.float32, torch.bfloat16):
        for a, b in zip(*_on_one_and_two_threads(lambda: step(dtype)), strict=True):  # noqa: B023
            assert torch.equal(a, b)


def test_attention_names_wrong_arguments(kernels: None) -> None:
    q, kv = torch.randn(2, 5, 12), torch.randn(2, 5, 24)
    with pytest.raises(RuntimeError, match="attention: 12 channels do not split into 5 heads"):
        torch.ops.stl_cpu.attention(q, kv, 5)
    with pytest.raises(RuntimeError, match=r"kv must be a contiguous \[2, 5, 24\] CPU tensor, got \[2, 5,"):
        torch.ops.stl_cpu.attention(q, q, 2)
    with pytest.raises(RuntimeError, match="kv must have q's dtype Float, got BFloat16"):
        torch.ops.stl_cpu.attention(q, kv.bfloat16(), 2)
    with pytest.raises(RuntimeError, match=r"q must be a contiguous \[B, N, C\] CPU tensor with N > 0"):
        torch.ops.stl_cpu.attention(q[:, :0], kv[:, :0], 2)
    with pytest.raises(RuntimeError, match="q must be float32 or bfloat16, got Half"):
        torch.ops.stl_cpu.attention(q.half(), kv.half(), 2)
    out, stats = torch.ops.stl_cpu.attention(q, kv, 2)
    assert stats.shape == (2, 2, 5, 2) and stats.dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"stats must be a contiguous float32 \[2, 2, 5, 2\] CPU tensor"):
        torch.ops.stl_cpu.attention_backward(out, q, kv, stats[:, :1].contiguous(), 2)
    with pytest.raises(RuntimeError, match="grad must have q's dtype Float, got BFloat16"):
        torch.ops.stl_cpu.attention_backward(out.bfloat16(), q, kv, stats, 2)
    assert cpu_kernels.applies_to_attention(q, kv)
    assert not cpu_kernels.applies_to_attention(q, kv[..., :12].contiguous())  # not [B, N, 2C]
    assert not cpu_kernels.applies_to_attention(q, kv.bfloat16())
    assert not cpu_kernels.applies_to_attention(q.half(), kv.half())
    assert not cpu_kernels.applies_to_attention(q.transpose(0, 1).contiguous().transpose(0, 1), kv)
    assert not cpu_kernels.applies_to_attention(q[:, :0], kv[:, :0])
    # bf16 only where the matmuls use AMX tiles (elsewhere the kernel runs, but slower than torch's ops)
    amx = torch.ops.stl_cpu.attention_packs_bf16()
    assert cpu_kernels.applies_to_attention(q.bfloat16(), kv.bfloat16()) is amx
    cpu_kernels._set(False)
    assert not cpu_kernels.applies_to_attention(q, kv)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize(("x_dtype", "v_dtype"), [(torch.float32, torch.float32),
                                                  (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_residual_matches_torch(kernels: None, gated: bool, x_dtype: torch.dtype,
                                v_dtype: torch.dtype) -> None:
    """A FAN block's residual add (x + v * gate, or x + v) and its gradients: torch's dtypes and, to one
    rounding (a fused multiply-add), torch's values; the gate's gradient, a sum over the tokens, to float
    rounding. 20 channels: vector tails."""
    torch.manual_seed(0)
    x0, v0 = torch.randn(3, 7, 20).to(x_dtype), torch.randn(3, 7, 20).to(v_dtype)
    gate0 = torch.rand(3, 1, 20) if gated else None
    grad = torch.randn(3, 7, 20)
    results = []
    for fn in (cpu_kernels.residual, lambda x, v, g: x + v if g is None else torch.addcmul(x, v, g)):
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        gate = gate0.clone().requires_grad_() if gated else None
        out = fn(x, v, gate)
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), x.grad, v.grad) + ((gate.grad,) if gated else ()))
    ours, theirs = results
    for got, want in zip(ours[:3], theirs[:3], strict=True):
        assert got.dtype == want.dtype
        ulp = 2.0**-7 if got.dtype == torch.bfloat16 else 2.0**-23
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp * float(want.abs().max()))
    if gated:
        torch.testing.assert_close(ours[3], theirs[3], rtol=1e-6, atol=1e-6)


def test_residual_does_not_depend_on_the_thread_count_and_names_wrong_arguments(kernels: None) -> None:
    x, v, grad = torch.randn(5, 50, 24), torch.randn(5, 50, 24), torch.randn(5, 50, 24)
    gate = torch.rand(5, 1, 24)
    one, two = _on_one_and_two_threads(lambda: torch.ops.stl_cpu.residual_backward(grad, v, gate))
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    with pytest.raises(RuntimeError, match=r"residual: v must be a contiguous \[5, 50, 24\] CPU tensor, got"):
        torch.ops.stl_cpu.residual(x, v[:, :4].contiguous(), gate)
    with pytest.raises(RuntimeError, match=r"gate must be a contiguous float32 \[5, 1, 24\] CPU tensor"):
        torch.ops.stl_cpu.residual(x, v, gate.bfloat16())
    with pytest.raises(RuntimeError, match="v must be float32 or bfloat16, got Half"):
        torch.ops.stl_cpu.residual_backward(grad, v.half(), gate)


def _norm(C: int, seed: int = 0) -> torch.nn.LayerNorm:
    return _randomised(torch.nn.LayerNorm(C), seed)


# ViT-T's tokens; 20 channels (a vector and a tail), 7 (a tail only); rows not a multiple of the 32-row blocks
@pytest.mark.parametrize(("shape", "C"), [((2, 196), 192), ((3, 7), 20), ((5,), 7)])
@pytest.mark.parametrize(("copies", "keep_float"), [(2, False), (2, True), (1, True), (0, True)])
def test_layer_norm_cast_is_as_accurate_as_torch(kernels: None, shape: tuple[int, ...], C: int, copies: int,
                                                  keep_float: bool) -> None:
    """LayerNorm with bf16 copies of its output for the matmuls after it, against float64 of the same inputs
    and gradients (largest error of y and of the input, weight and bias gradients): as accurate as torch's
    LayerNorm with autocast's casts (up to 2x its error plus a floor at fp32 rounding; measured 0-2.07x, 0.90x
    in the median, the largest on 5 x 7 values). Each copy is y rounded to bf16, autocast's cast of y."""
    norm = _norm(C)
    x = (torch.randn(*shape, C) * 3 + 1).requires_grad_()
    grads = [torch.randn(*shape, C) for _ in range(keep_float)] + [
        torch.randn(*shape, C).bfloat16() for _ in range(copies)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.applies_to_layer_norm(x, norm)
        outs = cpu_kernels.layer_norm_cast(x, norm, copies, keep_float)
    assert [o.dtype for o in outs] == [torch.float32] * keep_float + [torch.bfloat16] * copies
    y = outs[0].detach() if keep_float else None
    torch.autograd.backward(outs, grads)
    ours = (x.grad, norm.weight.grad, norm.bias.grad)

    def torch_step(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """torch's LayerNorm in dtype, its output cast per matmul (what autocast does), the gradients."""
        ref = copy.deepcopy(norm).to(dtype)
        xr = x.detach().to(dtype).requires_grad_()
        yr = ref(xr)
        cast = [yr.bfloat16().to(dtype) if dtype == torch.float64 else yr.bfloat16() for _ in range(copies)]
        torch.autograd.backward([yr] * keep_float + cast, [g.to(dtype) for g in grads[:keep_float]] +
                                [g.to(dtype) if dtype == torch.float64 else g for g in grads[keep_float:]])
        return yr.detach(), xr.grad, ref.weight.grad, ref.bias.grad

    exact, theirs = torch_step(torch.float64), torch_step(torch.float32)
    for low in outs[keep_float:]:
        ours_y = y if y is not None else low.float()
        assert torch.equal(low, ours_y.bfloat16())
        assert (low == theirs[0].bfloat16()).float().mean() >= 0.999
    results = list(zip(ours, theirs[1:], exact[1:], strict=True))
    if y is not None:
        results.append((y, theirs[0], exact[0]))
    for got, torch_got, want in results:
        err, torch_err = (float((v.double() - want).abs().max()) for v in (got, torch_got))
        assert err <= 2 * torch_err + 1e-7 * float(want.abs().max()), (err, torch_err)


def test_layer_norms_give_a_constant_row_its_bias_as_torch_does(kernels: None) -> None:
    """A constant row normalises to exactly 0 (its deviations are scaled by 1 / sqrt(eps), so a mean off by
    one rounding would give ~1e-3), in both ops, with any number of channels."""
    for C in (1, 7, 192):
        norm = torch.nn.LayerNorm(C, eps=1e-6)
        x = torch.full((2, 3, C), 3.29999995)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, low = cpu_kernels.layer_norm_cast(x, norm, 1, True)
        assert torch.equal(y, norm(x)) and torch.equal(y, torch.zeros_like(y)) and not low.any()
        out = cpu_kernels.layer_norm_residual(torch.ones(2, 3, C), x, norm, torch.ones(2, 1, C))
        assert torch.equal(out, torch.ones(2, 3, C))


def test_layer_norm_cast_does_not_depend_on_the_thread_count_and_names_wrong_arguments(kernels: None) -> None:
    norm = _norm(24)
    w, b = norm.weight.detach(), norm.bias.detach()
    x = torch.randn(300, 24) * 2  # ten blocks of rows for the weight's and bias's gradients
    y, low, stats = torch.ops.stl_cpu.layer_norm_cast(x, w, b, 1e-5, 2, True)
    grads = [torch.randn(300, 24).bfloat16() for _ in low]
    grad_y = torch.randn(300, 24)
    one, two = _on_one_and_two_threads(
        lambda: torch.ops.stl_cpu.layer_norm_cast_backward(grads, grad_y, x, w, stats))
    assert all(torch.equal(a, c) for a, c in zip(one, two, strict=True))
    with pytest.raises(RuntimeError, match=r"layer_norm_cast: x must be a contiguous float32 CPU tensor"):
        torch.ops.stl_cpu.layer_norm_cast(x.bfloat16(), w, b, 1e-5, 2, True)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous float32 \[24\] CPU tensor"):
        torch.ops.stl_cpu.layer_norm_cast(x, w[:20], b, 1e-5, 2, True)
    with pytest.raises(RuntimeError, match=r"asked for no output \(copies 0, keep_float false\)"):
        torch.ops.stl_cpu.layer_norm_cast(x, w, b, 1e-5, 0, False)
    with pytest.raises(RuntimeError, match="grads must be bfloat16, got Float"):
        torch.ops.stl_cpu.layer_norm_cast_backward([grad_y], None, x, w, stats)
    with pytest.raises(RuntimeError, match=r"grad_float must be a contiguous float32 \[300, 24\] CPU tensor"):
        torch.ops.stl_cpu.layer_norm_cast_backward(grads, grad_y.t().contiguous().t(), x, w, stats)
    with pytest.raises(RuntimeError, match="no gradient given"):
        torch.ops.stl_cpu.layer_norm_cast_backward([], None, x, w, stats)
    # only under bf16 autocast, on fp32 tokens, for an affine nn.LayerNorm over their channels
    assert not cpu_kernels.applies_to_layer_norm(x, norm)  # no autocast: no casts to save
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.applies_to_layer_norm(x, norm)
        assert not cpu_kernels.applies_to_layer_norm(x.bfloat16(), norm)  # torch's LayerNorm runs in bf16
        assert not cpu_kernels.applies_to_layer_norm(x.t(), _norm(300))
        assert not cpu_kernels.applies_to_layer_norm(x, torch.nn.LayerNorm(24, elementwise_affine=False))
        assert not cpu_kernels.applies_to_layer_norm(x, torch.nn.LayerNorm([300, 24]))
        assert not cpu_kernels.applies_to_layer_norm(x, torch.nn.GroupNorm(1, 24))
    with torch.autocast("cpu", dtype=torch.float16):
        assert not cpu_kernels.applies_to_layer_norm(x, norm)


@pytest.mark.parametrize("m_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 196, 192), (3, 5, 20), (1, 3, 7)])
def test_layer_norm_residual_matches_torch(kernels: None, m_dtype: torch.dtype,
                                           shape: tuple[int, ...]) -> None:
    """``x + LN(m) * gate`` (a FAN block's channel branch added) against torch's LayerNorm and addcmul: the
    output, x's, m's and the gate's gradients to float rounding (bf16 m: LN(m) and its gradient rounded to
    bf16 where torch's ops store them); the LayerNorm's weight and bias gradients against float64 at least as
    accurate as torch's (on bf16 m torch's are off by ~1.5% of their size, ours by ~2e-7)."""
    B, N, C = shape
    norm = _norm(C)
    torch.manual_seed(1)
    x0, m0 = torch.randn(B, N, C), (torch.randn(B, N, C) * 2 + 1).to(m_dtype)
    gate0, grad = torch.rand(B, 1, C), torch.randn(B, N, C)
    results = []
    for fn in (cpu_kernels.layer_norm_residual, lambda x, m, n, g: torch.addcmul(x, n(m), g)):
        x, m, gate = (t.clone().requires_grad_() for t in (x0, m0, gate0))
        norm.zero_grad(set_to_none=True)
        assert cpu_kernels.applies_to_layer_norm_residual(x, m, norm, gate)
        out = fn(x, m, norm, gate)
        out.backward(grad)
        results.append((out.detach(), x.grad, m.grad, gate.grad, norm.weight.grad, norm.bias.grad))
    ours, theirs = results
    for got, want in zip(ours[:4], theirs[:4], strict=True):
        assert got.dtype == want.dtype
        rtol = 2.0**-7 if m_dtype == torch.bfloat16 else 2e-6
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    exact = copy.deepcopy(norm).double()
    m = m0.double().requires_grad_()
    exact(m).backward((grad * gate0).to(m_dtype).double())  # LN(m)'s gradient as torch's residual stores it
    for got, torch_got, want in zip(ours[4:], theirs[4:], (exact.weight.grad, exact.bias.grad), strict=True):
        err, torch_err = (float((v.double() - want).abs().max()) for v in (got, torch_got))
        assert err <= 2 * torch_err + 1e-6 * float(want.abs().max()), (err, torch_err)


def test_layer_norm_residual_is_thread_independent_and_names_wrong_arguments(kernels: None) -> None:
    norm = _norm(24)
    w, b = norm.weight.detach(), norm.bias.detach()
    x, m, grad, gate = torch.randn(5, 50, 24), torch.randn(5, 50, 24).bfloat16(), torch.randn(5, 50, 24), \
        torch.rand(5, 1, 24)
    out, stats = torch.ops.stl_cpu.layer_norm_residual(x, m, w, b, gate, 1e-5)
    one, two = _on_one_and_two_threads(
        lambda: torch.ops.stl_cpu.layer_norm_residual_backward(grad, m, w, b, gate, stats))
    assert all(torch.equal(a, c) for a, c in zip(one, two, strict=True))
    with pytest.raises(RuntimeError, match=r"residual: x must be a contiguous float32 \[B, N, C\]"):
        torch.ops.stl_cpu.layer_norm_residual(x.bfloat16(), m, w, b, gate, 1e-5)
    with pytest.raises(RuntimeError, match=r"m must be a contiguous \[5, 50, 24\] CPU tensor"):
        torch.ops.stl_cpu.layer_norm_residual(x, m[:, :3].contiguous(), w, b, gate, 1e-5)
    with pytest.raises(RuntimeError, match=r"gate must be a contiguous float32 \[5, 1, 24\] CPU tensor"):
        torch.ops.stl_cpu.layer_norm_residual(x, m, w, b, gate.bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match=r"stats must be a contiguous float32 \[250, 2\] CPU tensor"):
        torch.ops.stl_cpu.layer_norm_residual_backward(grad, m, w, b, gate, stats[:5])
    with pytest.raises(RuntimeError, match="m must be float32 or bfloat16, got Half"):
        torch.ops.stl_cpu.layer_norm_residual(x, m.half(), w, b, gate, 1e-5)
    assert cpu_kernels.applies_to_layer_norm_residual(x, m, norm, gate)
    assert not cpu_kernels.applies_to_layer_norm_residual(x.bfloat16(), m, norm, gate)
    assert not cpu_kernels.applies_to_layer_norm_residual(x, m, norm, gate.bfloat16())
    assert not cpu_kernels.applies_to_layer_norm_residual(x, m, norm, gate.expand(5, 50, 24))
    assert not cpu_kernels.applies_to_layer_norm_residual(x, m, torch.nn.LayerNorm(24, bias=False), gate)
    cpu_kernels._set(False)
    assert not cpu_kernels.applies_to_layer_norm_residual(x, m, norm, gate)


@pytest.mark.parametrize("rows, outs, ins", [(3136, 192, 768), (130, 37, 20), (1, 16, 8), (0, 5, 3)])
def test_linear_weight_grad_in_float(kernels: None, rows: int, outs: int, ins: int) -> None:
    """A bf16 linear's weight and bias gradients in float32, to float rounding of the exact (float64) ones;
    the bias's (column sums) the same at any thread count."""
    torch.manual_seed(0)
    grad, x = torch.randn(rows, outs).bfloat16(), torch.randn(rows, ins).bfloat16()
    grad_w, grad_b = cpu_kernels.linear_weight_grad(grad, x, bias=True)
    assert grad_w.dtype == grad_b.dtype == torch.float32 and grad_w.shape == (outs, ins)
    exact_w, exact_b = grad.double().t() @ x.double(), grad.double().sum(0)
    # (without MKL, torch's bf16 matmul: its output rounded to bf16)
    rtol = 0 if torch.ops.stl_cpu.has_mkl_bf16_gemm() else 2.0**-8
    torch.testing.assert_close(grad_w.double(), exact_w, rtol=rtol, atol=1e-6 * max(1.0, rows) ** 0.5 * 4)
    torch.testing.assert_close(grad_b.double(), exact_b, rtol=0, atol=1e-6 * max(1.0, rows) ** 0.5)
    one, two = _on_one_and_two_threads(lambda: cpu_kernels.linear_weight_grad(grad, x, bias=True)[1])
    assert torch.equal(one, two) and torch.equal(two, grad_b)
    assert cpu_kernels.linear_weight_grad(grad, x, bias=False)[1] is None
    for outs_, ins_ in ((0, ins), (outs, 0)):  # empty weights: zeros of their shape
        empty = cpu_kernels.linear_weight_grad(grad[:, :outs_], x[:, :ins_], bias=True)
        assert empty[0].shape == (outs_, ins_) and empty[1].shape == (outs_,)
    # strided inputs are made contiguous; the op itself refuses them, and other dtypes or row counts
    assert torch.equal(cpu_kernels.linear_weight_grad(grad.t().contiguous().t(), x, bias=True)[1], grad_b)
    grad, x = torch.zeros(4, 5).bfloat16(), torch.zeros(4, 6).bfloat16()
    with pytest.raises(RuntimeError, match="grad must be a contiguous 2-d bfloat16 CPU tensor"):
        torch.ops.stl_cpu.linear_weight_grad(grad.float(), x, True)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-d bfloat16 CPU tensor"):
        torch.ops.stl_cpu.linear_weight_grad(grad, torch.zeros(4, 12).bfloat16()[:, ::2], True)
    with pytest.raises(RuntimeError, match="grad and x must have as many rows"):
        torch.ops.stl_cpu.linear_weight_grad(grad, x[:3], True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 196, 192), (7, 20)])
def test_linear_with_the_bias_in_the_epilogue_matches_torch(kernels: None, bias: bool,
                                                            shape: tuple[int, ...]) -> None:
    """The kernels' bf16 linear under autocast: torch's output and input gradient (its bf16 matmuls) to a bf16
    rounding of the output, float rounding of the gradient; the weight's and bias's float gradients closer to
    float64 than torch's (rounded to bf16)."""
    if not (cpu_kernels._packs_bf16() and cpu_kernels._has_linear_pointwise()):
        pytest.skip("no AMX tiles or no oneDNN linear here: the kernels leave bf16 linears to torch")
    torch.manual_seed(0)
    layer = torch.nn.Linear(shape[-1], 48, bias=bias)
    x0, grad = torch.randn(*shape), torch.randn(*shape[:-1], 48).bfloat16()
    results = []
    for fn in (cpu_kernels.linear, F.linear):
        x = x0.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_kernels.applies_to_linear(x, layer.weight)
            out = fn(x, layer.weight, layer.bias)
        out.backward(grad)
        results.append([out.detach(), x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else []))
    ours, theirs = results
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    for got, want in zip(ours[:2], theirs[:2], strict=True):
        ulp = 2.0**-7 if got.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp * float(want.abs().max()))
    rows = grad.reshape(-1, 48).double()
    exact = [rows.t() @ x0.bfloat16().reshape(-1, shape[-1]).double()] + ([rows.sum(0)] if bias else [])
    for got, want, exact_one in zip(ours[2:], theirs[2:], exact, strict=True):
        error, torch_error = (float((t.double() - exact_one).abs().max()) for t in (got, want))
        if got.dim() == 1 or torch.ops.stl_cpu.has_mkl_bf16_gemm():  # (else torch's bf16 weight gradient)
            assert error <= 1e-5 * float(exact_one.abs().max()) and error < torch_error / 10
        else:
            assert error <= torch_error * 1.01
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # no silent zero through a second backward
        out = cpu_kernels.linear(x, layer.weight, layer.bias)
        (grad_w,) = torch.autograd.grad(out.float().square().sum(), layer.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_w.square().sum().backward()
    assert not cpu_kernels.applies_to_linear(x, layer.weight)  # no autocast
    with torch.autocast("cpu", dtype=torch.float16):
        assert not cpu_kernels.applies_to_linear(x, layer.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone
        assert not cpu_kernels.applies_to_linear(x.double(), layer.weight)
        assert not cpu_kernels.applies_to_linear(x, layer.weight.double())
        cpu_kernels._set(False)
        assert not cpu_kernels.applies_to_linear(x, layer.weight)


def test_cumulative_momentum_and_a_strided_gradient(kernels: None) -> None:
    """momentum=None (a cumulative average over batches) as torch; a gradient that is not channels-last."""
    bn, ref_bn = _bn(8), _bn(8)
    bn.momentum = ref_bn.momentum = None
    for _ in range(3):
        x = _channels_last(2, 8, 3, 3).requires_grad_()
        y = cpu_kernels.batch_norm_act(x, bn, gelu=True)
        ref = F.gelu(ref_bn(x))
        grad = torch.randn(2, 8, 3, 3)  # NCHW-contiguous
        got, want = torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(ref, x, grad)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, buf in bn.named_buffers():
        torch.testing.assert_close(buf, dict(ref_bn.named_buffers())[name], msg=name)


@pytest.mark.parametrize("C", [24, 37])  # rows read two at a time, and one at a time
def test_statistics_and_gradients_do_not_depend_on_the_thread_count(kernels: None, C: int) -> None:
    x = _channels_last(8, C, 20, 20).permute(0, 2, 3, 1).reshape(-1, C).contiguous()
    grad, w, b = torch.randn_like(x), torch.rand(C) + 0.5, torch.randn(C)

    def run() -> tuple[torch.Tensor, ...]:
        y, stats = cpu_kernels.bn_train_forward(x, w, b, torch.zeros(C), torch.ones(C), 0.1, 1e-5,
                                                gelu_output=True)
        return (y, *stats, *cpu_kernels.bn_train_backward(grad, x, stats, gelu_output=True))

    one, two = _on_one_and_two_threads(run)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_one_row_per_channel_is_refused_as_torch_does(kernels: None) -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cpu_kernels.batch_norm_act(_channels_last(1, 8, 1, 1).requires_grad_(), _bn(8), gelu=True)


def test_ops_name_a_wrong_layout(kernels: None) -> None:
    with pytest.raises(RuntimeError, match=r"bn_stats: x must be a contiguous \[6, 4\]"):
        torch.ops.stl_cpu.bn_stats(torch.randn(4, 6).t())
    with pytest.raises(RuntimeError, match="bn_stats: x must be float32 or bfloat16, got Double"):
        torch.ops.stl_cpu.bn_stats(torch.randn(6, 4, dtype=torch.float64))
    x, C = torch.randn(6, 4, dtype=torch.bfloat16), torch.ones(4)
    with pytest.raises(RuntimeError, match="bn_backward: grad must be a BFloat16 CPU tensor, got Float"):
        torch.ops.stl_cpu.bn_backward(torch.randn(6, 4), x, C, C, C, C, C, False)


def test_kernels_apply_only_to_eager_training_statistics(kernels: None) -> None:
    bn = _bn(8)
    x = _channels_last(2, 8, 4, 4)
    assert cpu_kernels.applies(x, bn)
    assert cpu_kernels.applies(x.to(torch.bfloat16), bn)  # activations under autocast
    assert not cpu_kernels.applies(x.to(torch.float16), bn)
    assert not cpu_kernels.applies(x.contiguous(), bn)  # NCHW
    assert not cpu_kernels.applies(x, bn.eval())  # running statistics
    assert not cpu_kernels.applies(x[:0], bn.train())  # an empty batch: torch's ops handle it
    sync = torch.nn.SyncBatchNorm(8).train()  # statistics across processes: not these kernels'
    assert not cpu_kernels.applies(x, sync)
    cpu_kernels._set(False)
    assert not cpu_kernels.applies(x, bn.train())


def test_the_stem_runs_its_sequential_unless_the_kernels_serve_it() -> None:
    """With the kernels off (or in eval mode) ConvPatchEmbed calls its nn.Sequential, so hooks on it fire."""
    stem = ConvPatchEmbed(32).train()
    seen: list[int] = []
    stem.proj.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    previous = cpu_kernels.cpu_kernels_enabled()
    cpu_kernels._set(False)
    try:
        stem(torch.randn(2, 3, 32, 32))
    finally:
        cpu_kernels._set(previous)
    assert seen == [32]


def _dw_block_inputs(B: int, C: int, H: int, W: int, seed: int = 0) -> list[torch.Tensor]:
    """h (channels-last [B, C, H, W]), conv1 weight and bias, BN weight and bias, conv2 weight and bias, the
    output's gradient: values that bf16 holds exactly (so every dtype starts from the same numbers)."""
    torch.manual_seed(seed)
    sizes = [(B, C, H, W), (C, 1, 3, 3), (C,), (C,), (C,), (C, 1, 3, 3), (C,), (B, C, H, W)]
    scales = [2.0, 0.4, 0.3, 0.2, 0.5, 0.4, 0.3, 1.0]
    tensors = [(torch.randn(size) * k).bfloat16().float() for size, k in zip(sizes, scales, strict=True)]
    tensors[3] += 1.0  # BN weight around 1
    for i in (0, 7):
        tensors[i] = tensors[i].contiguous(memory_format=torch.channels_last)
    return tensors


def _torch_dw_block(h, w1, b1, bn_w, bn_b, w2, b2, residual: bool) -> torch.Tensor:
    """The FAN MLP's depthwise block by torch's ops (what FanMlp's plain path computes)."""
    C = h.shape[1]
    act = F.gelu(F.conv2d(h, w1, b1, padding=1, groups=C))
    s = F.conv2d(F.batch_norm(act, None, None, bn_w, bn_b, True, 0.0, 1e-5), w2, b2, padding=1, groups=C)
    return s + h if residual else s


def _torch_dw_grads(inputs: list[torch.Tensor], residual: bool, autocast: bool = False) -> list[torch.Tensor]:
    """(s, dL/dh, then the gradients of the conv and BN parameters) by torch's ops; under bf16 autocast as a
    model's (h and the gradient in bf16, the parameters fp32)."""
    *args, grad = inputs
    if autocast:
        args[0], grad = args[0].bfloat16(), grad.bfloat16()
    args = [a.detach().requires_grad_() for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _torch_dw_block(*args, residual)
    return [out.detach(), *torch.autograd.grad(out, args, grad)]


def _kernel_dw_grads(inputs: list[torch.Tensor], residual: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    """The same through cpu_kernels.fan_dw_forward / fan_dw_backward_ on [B, H, W, C] images of ``dtype``."""
    h, w1, b1, bn_w, bn_b, w2, b2, grad = inputs
    rows = [t.permute(0, 2, 3, 1).to(dtype, copy=True) for t in (h, grad)]  # copies: the backward writes
    C = h.shape[1]
    s, saved = cpu_kernels.fan_dw_forward(rows[0], (w1, b1), (bn_w, bn_b, torch.zeros(C), torch.ones(C)),
                                          0.1, 1e-5, (w2, b2), residual)
    gw1, gb1, gbn_w, gbn_b, gw2, gb2, grad_sum = cpu_kernels.fan_dw_backward_(
        rows[1], rows[0], saved, (w1, w2), residual
    )
    torch.testing.assert_close(grad_sum, rows[1].float().sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
    image = [t.permute(0, 3, 1, 2) for t in (s, rows[1])]  # rows[1]: dL/dh, written over the gradient
    return [*image, gw1, gb1, gbn_w, gbn_b, gw2, gb2]


_DW_NAMES = ["output", "grad h", "grad conv1 weight", "grad conv1 bias", "grad BN weight", "grad BN bias",
             "grad conv2 weight", "grad conv2 bias"]


# C = 20: a vector and a tail; 100: two units, the second partial; one pixel per image; 17 columns: three
# runs of pixels; one image of two rows, a last unit of one channel; 768 channels at 14 x 14: FAN-ViT-T's
@pytest.mark.parametrize(("B", "C", "H", "W"), [(2, 20, 3, 4), (3, 100, 9, 6), (4, 64, 1, 1), (2, 24, 3, 17),
                                                (1, 65, 2, 9), (2, 768, 14, 14)])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fan_dw_block_is_as_accurate_as_torch(kernels: None, B: int, C: int, H: int, W: int, residual: bool,
                                              dtype: torch.dtype) -> None:
    """The fused depthwise block against float64, output and every gradient: its error is of the size of
    torch's own on the same inputs (fp32 ops; bf16 autocast ops for bf16 images), relative to each result's
    largest entry. Measured over 5 seeds: at most 4.4x torch's (fp32 with 4 values per channel, where the
    BatchNorm backward cancels; 1.5x at 14 x 14), 2.6x (bf16), 0.1-1.1x in the median; a wrong tap or a
    missed edge gives errors of order one; the bf16 output's error is at least torch's (1.0x)."""
    inputs = _dw_block_inputs(B, C, H, W)
    exact = _torch_dw_grads([t.double() for t in inputs], residual)
    theirs = _torch_dw_grads(inputs, residual, autocast=dtype == torch.bfloat16)
    ours = _kernel_dw_grads(inputs, residual, dtype)
    assert ours[0].dtype == ours[1].dtype == dtype
    ratios = []
    for name, got, torch_got, want in zip(_DW_NAMES, ours, theirs, exact, strict=True):
        size = float(want.abs().max())
        err, torch_err = (float((v.double() - want).abs().max()) / size for v in (got, torch_got))
        assert err <= 6 * torch_err + 1e-6, (name, err, torch_err)
        ratios.append(err / max(torch_err, 1e-6))
    assert sorted(ratios)[len(ratios) // 2] <= 1.5, ratios
    if dtype == torch.bfloat16:  # rounded to bf16 where torch's ops store (fp32 intermediates: ~0.01x)
        assert ratios[0] >= 0.3, ratios


def _bf16_stored(x: torch.Tensor) -> torch.Tensor:
    """x stored in bf16 from an fp32 value, back in float64."""
    return x.float().bfloat16().double()


def _bf16_dw_block_by_hand(inputs: list[torch.Tensor], residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, dL/dh) of the depthwise block in float64, rounded to bf16 where the kernel stores bf16 as torch's
    ops under autocast do: conv1's output, the GELU's, the BatchNorm's, conv2's output and its input
    gradient, the BatchNorm + GELU backward's output, conv1's input gradient and the residual sums. (The
    BatchNorm's input gradient stays fp32 inside the fused pass; torch's ops store it in bf16.)"""
    h, w1, b1, bn_w, bn_b, w2, b2, g = (t.double() for t in inputs)
    C = h.shape[1]
    c1 = _bf16_stored(F.conv2d(h, w1, b1, padding=1, groups=C))
    c1.requires_grad_()
    z = F.gelu(c1)
    (slope,) = torch.autograd.grad(z.sum(), c1)
    c1, z = c1.detach(), _bf16_stored(z.detach())
    mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    invstd, weight = (var + 1e-5).rsqrt(), bn_w.view(1, C, 1, 1)
    bn = _bf16_stored((z - mean) * invstd * weight + bn_b.view(1, C, 1, 1))
    s = _bf16_stored(F.conv2d(bn, w2, b2, padding=1, groups=C))
    gy = _bf16_stored(F.conv_transpose2d(g, w2, padding=1, groups=C))
    M = z.numel() // C
    sum_g, sum_gx = gy.sum((0, 2, 3), keepdim=True), (gy * (z - mean)).sum((0, 2, 3), keepdim=True)
    grad_z = invstd * weight * (gy - sum_g / M - (z - mean) * invstd**2 * sum_gx / M)
    gh = _bf16_stored(F.conv_transpose2d(_bf16_stored(grad_z * slope), w1, padding=1, groups=C))
    return (_bf16_stored(s + h), _bf16_stored(gh + g)) if residual else (s, gh)


@pytest.mark.parametrize(("B", "C", "H", "W"), [(3, 100, 9, 6), (2, 768, 14, 14)])
@pytest.mark.parametrize("residual", [True, False])
def test_fan_dw_block_on_bf16_rounds_where_it_says(kernels: None, B: int, C: int, H: int, W: int,
                                                  residual: bool) -> None:
    """bf16 images: the output and dL/dh are the float64 block rounded to bf16 at each tensor the kernel
    declares stored, in all but rare entries (fp32 sums round across a bf16 boundary: 99.99-100% equal, the
    others one bf16 step apart). Leaving out any one rounding (conv1's output, the BatchNorm's, conv2's input
    gradient) leaves 60-90%; the GELU's, 84% of the outputs and 95-96% of dL/dh."""
    inputs = _dw_block_inputs(B, C, H, W)
    got = _kernel_dw_grads(inputs, residual, torch.bfloat16)[:2]
    by_hand = _bf16_dw_block_by_hand(inputs, residual)
    for name, ours, want in zip(("output", "grad h"), got, by_hand, strict=True):
        assert float((ours.double() == want).double().mean()) >= 0.999, name
        step = 2**-7 * float(want.abs().max())  # one bf16 step at the largest entry (a residual sum's)
        torch.testing.assert_close(ours.double(), want, rtol=2**-7, atol=step, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fan_dw_block_does_not_depend_on_the_thread_count(kernels: None, dtype: torch.dtype) -> None:
    inputs = _dw_block_inputs(5, 100, 7, 9)
    one, two = _on_one_and_two_threads(lambda: _kernel_dw_grads(inputs, True, dtype))
    for name, a, b in zip(_DW_NAMES, one, two, strict=True):
        assert torch.equal(a, b), name


def test_fan_dw_block_names_wrong_arguments(kernels: None) -> None:
    h, w, v = torch.randn(2, 4, 5, 8), torch.randn(8, 1, 3, 3), torch.randn(8)
    ops = torch.ops.stl_cpu
    with pytest.raises(RuntimeError, match=r"w1 must be a contiguous float32 \[8, 1, 3, 3\] CPU tensor, got "
                                           r"\[8, 1, 5, 5\]"):
        ops.fan_dw_forward_stats(h, torch.randn(8, 1, 5, 5), v)
    with pytest.raises(RuntimeError, match="b1 must be a contiguous float32 \\[8\\] CPU tensor"):
        ops.fan_dw_forward_stats(h, w, v.bfloat16())
    with pytest.raises(RuntimeError, match="h must be float32 or bfloat16, got Half"):
        ops.fan_dw_forward_stats(h.half(), w, v)
    with pytest.raises(RuntimeError, match=r"the images are empty: \[0, 4, 5, 8\]"):
        ops.fan_dw_forward_stats(h[:0], w, v)
    with pytest.raises(RuntimeError, match=r"h must be a contiguous \[B, H, W, C\] CPU tensor like act "
                                           r"\(\[2, 4, 5, 8\] Float\), got \[2, 4, 5, 8\] BFloat16"):
        ops.fan_dw_forward_apply(h, v, v, w, v, h.bfloat16())
    with pytest.raises(RuntimeError, match="c1 must be a contiguous"):
        ops.fan_dw_backward_(h, h.transpose(1, 2).contiguous().transpose(1, 2), h.clone(), h.clone(), v, v, v,
                             v, v, w, w, True)
    with pytest.raises(RuntimeError, match=r"grad \(overwritten with dL/dh\) must not share memory with c1, "
                                           r"act or h"):
        ops.fan_dw_backward_(h, h.clone(), h.view(2, 4, 5, 8), h.clone(), v, v, v, v, v, w, w, True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cpu_kernels.fan_dw_forward(h[:1, :1, :1], (w, v), (v, v, v, v), 0.1, 1e-5, (w, v), True)


def _mlp_pair(hidden: int, residual: bool) -> tuple[FanMlp, FanMlp]:
    torch.manual_seed(0)
    mlp = FanMlp(8, hidden, dwconv_residual=residual)
    with torch.no_grad():  # non-trivial BN and layer-scale parameters
        mlp.gamma.uniform_(0.5, 1.5)
        mlp.dwconv.bn.weight.uniform_(0.5, 1.5)
        mlp.dwconv.bn.bias.uniform_(-0.5, 0.5)
    return mlp.train(), copy.deepcopy(mlp).train()


def _mlp_step(mlp: FanMlp, x: torch.Tensor, grad: torch.Tensor, H: int, W: int):
    x = x.detach().clone().requires_grad_()
    out = mlp(x, H, W)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in mlp.named_parameters()}


# hidden 20: a vector and a tail; one row or one column of tokens
@pytest.mark.parametrize(("B", "H", "W", "hidden"),
                         [(2, 3, 4, 20), (3, 1, 5, 16), (2, 5, 1, 40), (4, 7, 7, 64)])
@pytest.mark.parametrize("residual", [True, False])
def test_fan_mlp_with_kernels_is_as_accurate_as_torch(kernels: None, kernel_calls: list, B: int, H: int,
                                                      W: int, hidden: int, residual: bool) -> None:
    """The FAN MLP's training step with the kernels against float64: its error is of the size of torch's own
    fp32 error (BatchNorm over few rows cancels, so a fixed tolerance would say little)."""
    fused, plain = _mlp_pair(hidden, residual)
    exact = copy.deepcopy(plain).double()
    x, grad = torch.randn(B, H * W, 8) * 2, torch.randn(B, H * W, 8)
    for step in range(2):  # running statistics and the batch count advance as torch's
        cpu_kernels._set(True)
        got = _mlp_step(fused, x, grad, H, W)
        cpu_kernels._set(False)
        torch_ops = _mlp_step(plain, x, grad, H, W)
        want = _mlp_step(exact, x.double(), grad.double(), H, W)
        for what, g, t, w in zip(("output", "input grad", "param grads"), got, torch_ops, want, strict=True):
            pairs = [(what, g, t, w)] if isinstance(w, torch.Tensor) else [(n, g[n], t[n], w[n]) for n in w]
            for name, g_, t_, w_ in pairs:
                err, torch_err = (float((v.double() - w_).abs().max()) for v in (g_, t_))
                assert err <= 8 * torch_err + 1e-7 * float(w_.abs().max()), (step, name, err, torch_err)
        for name, buf in plain.named_buffers():
            torch.testing.assert_close(dict(fused.named_buffers())[name], buf, msg=name)
    assert kernel_calls == ["dwconv"] * 2


def _model_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each BatchNorm the kernels run ("bn"), each FAN MLP's depthwise block
    ("dwconv"), each depthwise weight gradient ("depthwise7x7", with its kernel size), each GELU backward with
    its bias sum ("gelu"), each channel gate ("gate"), each self-attention ("attention"), each residual
    add of a FAN block's branch ("residual", or "norm+residual" with the channel branch's LayerNorm), each
    LayerNorm with bf16 copies ("layer_norm"), each bf16 linear with its bias in the matmul ("linear") and
    each bf16 linear's float weight gradient ("weight_grad")."""
    calls: list[str] = []

    def count(attr: str, label: Callable[..., str]) -> None:
        original = getattr(cpu_kernels, attr)

        def counted(*args, **kwargs):
            calls.append(label(*args, **kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, attr, counted)

    for attr, name in (("bn_train_forward", "bn"), ("fan_dw_forward", "dwconv"),
                       ("gelu_backward_sum_", "gelu"), ("channel_gate", "gate"), ("attention", "attention"),
                       ("residual", "residual"), ("layer_norm_cast", "layer_norm"), ("linear", "linear"),
                       ("layer_norm_residual", "norm+residual"), ("linear_weight_grad", "weight_grad")):
        count(attr, lambda *args, name=name, **kwargs: name)
    count("depthwise_weight_grad", lambda grad_out, x, kernel_size: "depthwise{}x{}".format(*kernel_size))
    return calls


@pytest.mark.parametrize("name", ["fan_tiny_12_p16_224", "fan_tiny_8_p4_hybrid_token"])
def test_models_train_the_same_with_and_without_kernels(name: str, kernels: None, kernel_calls: list) -> None:
    """A training step of a real FAN model (32 px) with the kernels gives torch's outputs, gradients and
    running statistics to float rounding."""
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=5, img_size=32).train()
    fused = copy.deepcopy(plain)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cpu_kernels._set(False)
    out_p, grads_p = _model_step(plain, x, y)
    cpu_kernels._set(True)
    out_f, grads_f = _model_step(fused, x, y)
    blocks = len(plain.blocks)
    # every FAN block's attention, channel gate and MLP (its depthwise block); FAN-ViT's stem too (four
    # BatchNorms, three GELUs after); the hybrid's ConvNeXt blocks' 7x7 depthwise convs
    assert kernel_calls.count("dwconv") == kernel_calls.count("gate") == blocks
    assert kernel_calls.count("attention") == blocks
    assert kernel_calls.count("residual") == kernel_calls.count("norm+residual") == blocks
    assert kernel_calls.count("bn") == (4 if isinstance(plain.patch_embed, ConvPatchEmbed) else 0)
    assert kernel_calls.count("depthwise7x7") == sum(isinstance(m, ConvNeXtBlock) for m in plain.modules())
    # fc1 -> GELU -> fc2 MLPs: the class-attention blocks' and the ConvNeXt blocks'
    assert kernel_calls.count("gelu") == len(plain.cls_attn_blocks) + kernel_calls.count("depthwise7x7")
    assert kernel_calls.count("layer_norm") == 0  # in fp32 there are no casts to save
    torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-5)
    assert grads_f.keys() == grads_p.keys()
    scale = max(g.abs().max() for g in grads_p.values())
    for n, g in grads_p.items():  # each relative to its own size, plus a floor (measured: <= 22% of bound)
        # (the floor for gradients that are zero in exact arithmetic: a bias before a softmax)
        torch.testing.assert_close(grads_f[n], g, rtol=0, atol=1e-4 * g.abs().max() + 1e-8 * scale, msg=n)
    for (n, b_f), b_p in zip(fused.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b_f, b_p, rtol=1e-4, atol=1e-6, msg=n)


def test_fan_swin_trains_the_same_with_and_without_kernels(kernels: None, kernel_calls: list) -> None:
    """FAN-Swin's channel processing (the gate over a stage's tokens, MLPs without the depthwise residual) and
    GELU MLPs through the kernels: torch's outputs and gradients to float rounding."""
    torch.manual_seed(0)
    plain = timm.create_model("fan_swin_tiny_patch4_window7_224", num_classes=5, img_size=56,
                              drop_path_rate=0.0).train()
    fused = copy.deepcopy(plain)
    x, y = torch.randn(2, 3, 56, 56), torch.tensor([0, 1])
    cpu_kernels._set(False)
    out_p, grads_p = _model_step(plain, x, y)
    cpu_kernels._set(True)
    out_f, grads_f = _model_step(fused, x, y)
    gates = sum(isinstance(m, ChannelProcessing) for m in plain.modules())
    gelu_mlps = sum(isinstance(m, GeluMlp) for m in plain.modules())
    assert gates > 0 and gelu_mlps > 0
    assert kernel_calls.count("gate") == kernel_calls.count("dwconv") == gates
    assert kernel_calls.count("gelu") == gelu_mlps
    torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max() for g in grads_p.values())
    for n, g in grads_p.items():
        torch.testing.assert_close(grads_f[n], g, rtol=0, atol=1e-4 * g.abs().max() + 1e-8 * scale, msg=n)


@pytest.mark.parametrize("name", ["fan_tiny_12_p16_224", "fan_tiny_8_p4_hybrid_token"])
def test_models_train_under_bf16_autocast_as_accurately_as_torch(name: str, kernels: None,
                                                                 kernel_calls: list) -> None:
    """A bf16-autocast training step with the kernels is as close to the fp32 step as torch's bf16 step is:
    for the output and every gradient of 1000 or more entries (a few-entry gradient's distance is noise), the
    relative L2 distance to the fp32 step over torch's (measured here: at most 1.12x, 0.96-1.00x in the
    median; with bf16 stores biased by 1/64, at most 1.46-1.94x, 1.08-1.28x in the median)."""
    torch.manual_seed(0)
    fp32 = timm.create_model(name, num_classes=5, img_size=32).train()
    plain, fused = copy.deepcopy(fp32), copy.deepcopy(fp32)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cpu_kernels._set(False)
    out_e, grads_e = _model_step(fp32, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, grads_p = _model_step(plain, x, y)
        assert kernel_calls == []
        cpu_kernels._set(True)
        out_f, grads_f = _model_step(fused, x, y)
    assert kernel_calls.count("dwconv") == kernel_calls.count("gate") == len(plain.blocks)  # on bf16 images
    # (bf16 attention where the CPU has AMX tiles for its matmuls)
    assert kernel_calls.count("attention") == len(plain.blocks) * torch.ops.stl_cpu.attention_packs_bf16()
    assert kernel_calls.count("bn") == (4 if isinstance(plain.patch_embed, ConvPatchEmbed) else 0)
    # both LayerNorms of each block but the first, whose input is bf16 (the positional encoding's output); the
    # class-attention blocks' norm1
    cls_blocks = len(plain.cls_attn_blocks)
    assert kernel_calls.count("layer_norm") == 2 * len(plain.blocks) - 2 + cls_blocks
    # q, kv and the projection of each block's attention, q of its channel gate; q, k, v and the projection of
    # the class attention (where AMX serves bf16)
    linears = 4 * len(plain.blocks) + 4 * cls_blocks
    assert kernel_calls.count("linear") == linears * cpu_kernels._packs_bf16()
    # their weight gradients in float, and the FAN MLPs' fc1's and fc2's
    assert kernel_calls.count("weight_grad") == (linears + 2 * len(plain.blocks)) * cpu_kernels._packs_bf16()
    # each block's residual adds; its channel branch's with the LayerNorm, but in the first (bf16 tokens)
    assert kernel_calls.count("residual") == len(plain.blocks) + 1
    assert kernel_calls.count("norm+residual") == len(plain.blocks) - 1

    large = [n for n, g in grads_e.items() if g.numel() >= 1000]

    def distance(out: torch.Tensor, grads: dict) -> list[float]:
        pairs = [(out, out_e)] + [(grads[n], grads_e[n]) for n in large]
        return [float((a.float() - b).norm() / b.norm().clamp_min(1e-12)) for a, b in pairs]

    ratios = {what: ours / max(theirs, 1e-12) for what, ours, theirs in
              zip(["output", *large], distance(out_f, grads_f), distance(out_p, grads_p), strict=True)}
    assert max(ratios.values()) <= 1.3, sorted(ratios.items(), key=lambda kv: kv[1])[-3:]
    assert sorted(ratios.values())[len(ratios) // 2] <= 1.05
    for (n, b_f), b_p in zip(fused.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b_f, b_p, rtol=2e-2, atol=1e-3, msg=n)


@pytest.mark.parametrize("bf16", [False, True])
def test_forward_on_the_class_token_alone_matches_the_features_with_kernels(kernels: None,
                                                                           bf16: bool) -> None:
    """With the kernels, model(x) (its last class-attention block and norm on the class token alone) gives
    forward_head(forward_features(x)) and its gradients to float rounding."""
    torch.manual_seed(0)
    model = timm.create_model("fan_tiny_12_p16_224", num_classes=5, img_size=32).train()
    x = torch.randn(4, 3, 32, 32)
    results = []
    for forward in (lambda t: model.forward_head(model.forward_features(t)), model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x)
        out.float().square().sum().backward()
        results.append((out.detach().float(), {n: p.grad for n, p in model.named_parameters()}))
    (want, grads_want), (got, grads_got) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in grads_want.items():
        torch.testing.assert_close(grads_got[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_checkpointed_blocks_recompute_with_the_kernel_setting_of_their_forward(kernels: None,
                                                                               kernel_calls: list) -> None:
    """Switching the kernels off between forward and backward does not change what gradient checkpointing
    recomputes (other ops would save other tensors: torch's checkpoint refuses that)."""
    torch.manual_seed(0)
    plain = timm.create_model("fan_tiny_12_p16_224", num_classes=5, img_size=32).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, want = _model_step(plain, x, y)
    loss = F.cross_entropy(checkpointed(x), y)
    cpu_kernels._set(False)
    loss.backward()
    assert not cpu_kernels.cpu_kernels_enabled()
    assert kernel_calls.count("dwconv") == 3 * len(plain.blocks)  # both forwards and the recomputation
    for n, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_models_keep_torch_ops_where_the_kernels_do_not_apply(kernels: None, kernel_calls: list) -> None:
    torch.manual_seed(0)
    model = timm.create_model("fan_tiny_12_p16_224", num_classes=5, img_size=32).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with fused_backward(False):  # double backward, torch.func: the plain graph
        _model_step(model, x, y)
    with torch.autocast("cpu", dtype=torch.float16):  # fp16 activations
        _model_step(model, x, y)
    with torch.no_grad():  # inference in training mode
        model(x)
    assert kernel_calls == []
    model.eval()(x)  # eval mode recording autograd: all but the BatchNorms (none in training mode)
    assert kernel_calls == ["attention", "residual", "gate", "norm+residual"] * len(model.blocks)
    kernel_calls.clear()
    # a model cast to bf16: no BatchNorm kernels (bf16 parameters); attention where AMX serves it, the channel
    # gates and token-mixing residuals (in bf16, as torch's ops give them; the channel branch's add has a bf16
    # gate: torch's ops) and the class-attention MLPs' GELU backward
    _model_step(copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16), y)
    per_block = ["attention"] * torch.ops.stl_cpu.attention_packs_bf16() + ["residual", "gate"]
    assert kernel_calls == per_block * len(model.blocks) + ["gelu"] * len(model.cls_attn_blocks)
    kernel_calls.clear()
    dropping = timm.create_model("fan_tiny_12_p16_224", num_classes=5, img_size=32, drop_path_rate=0.1)
    _model_step(dropping.train(), x, y)  # drop path in training: torch's adds
    assert "residual" not in kernel_calls and "norm+residual" not in kernel_calls
    assert kernel_calls.count("gate") == len(model.blocks)
    kernel_calls.clear()
    mixing = TokenMixing(16, num_heads=2, attn_drop=0.1)  # attention dropout in training: torch's ops
    mixing(torch.randn(2, 5, 16, requires_grad=True)).sum().backward()
    assert kernel_calls == []
    mixing.eval()(torch.randn(2, 5, 16, requires_grad=True)).sum().backward()
    assert kernel_calls == ["attention"]
    kernel_calls.clear()
    mlp = FanMlp(8, 16).train()  # a module outside a model: the same rule
    mlp(torch.randn(2, 12, 8, requires_grad=True), 3, 4).sum().backward()
    assert kernel_calls == ["dwconv"]
    kernel_calls.clear()
    mlp.dwconv = DWConv(16, kernel_size=5)  # the fused block is 3x3 only: torch's ops, the same results
    mlp.zero_grad(set_to_none=True)
    plain, x = copy.deepcopy(mlp), torch.randn(2, 12, 8)
    with_kernels = _mlp_step(mlp, x, torch.ones(2, 12, 8), 3, 4)
    cpu_kernels._set(False)
    without = _mlp_step(plain, x, torch.ones(2, 12, 8), 3, 4)
    assert kernel_calls == []
    torch.testing.assert_close(with_kernels, without)


def test_class_attention_keeps_sdpa_unless_the_kernels_are_on(kernels: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 class attention: SDPA with the kernels off (default results unchanged), two matmuls with them on
    (SDPA's flash backward for one query is ~3 ms per block), the same values to bf16 rounding."""
    calls: list[int] = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    attn = ClassAttention(32, num_heads=2)
    x = torch.randn(2, 9, 32)
    outs = []
    for on in (False, True):
        cpu_kernels._set(on)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(attn(x).detach())
        assert len(calls) == 1  # the first pass only
    torch.testing.assert_close(outs[1], outs[0], rtol=2**-6, atol=2**-6 * float(outs[0].abs().max()))


def test_a_failed_build_warns_and_keeps_torch_ops(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bn_gelu.cpp"
    bad.write_text("this is not C++\n")
    previous = cpu_kernels.cpu_kernels_enabled()
    monkeypatch.setattr(cpu_kernels, "_SOURCES", (bad,))
    cpu_kernels._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*using torch's ops"):
            assert cpu_kernels.use_cpu_kernels(True) is False
        assert not cpu_kernels.cpu_kernels_enabled()
    finally:
        cpu_kernels._build.cache_clear()  # the next use loads the real build again
        cpu_kernels._set(previous)


def test_keeps_cpu_kernels_setting_restores_it_after_errors() -> None:
    @cpu_kernels.keeps_cpu_kernels_setting
    def switch_on_and_fail() -> None:
        cpu_kernels._set(True)
        raise KeyError("boom")

    cpu_kernels._set(False)
    with pytest.raises(KeyError):
        switch_on_and_fail()
    assert not cpu_kernels.cpu_kernels_enabled()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_kernels_use_torchs_thread_pool() -> None:
    """One OpenMP runtime in the process (torch's libgomp): torch.set_num_threads governs the kernels."""
    code = textwrap.dedent("""
        import json
        from stl.models import cpu_kernels
        assert cpu_kernels.use_cpu_kernels(True)
        maps = open("/proc/self/maps").read().splitlines()
        print(json.dumps(sorted({line.split()[-1] for line in maps if "libgomp" in line})))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    libraries = json.loads(out.strip().splitlines()[-1])
    assert len(libraries) == 1 and "torch" in libraries[0], libraries
