"""The ConvNeXt stem's depthwise conv: its CPU training path must equal ``nn.Conv2d``'s forward and gradients.

    pytest tests/models/test_convnext_stem.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stl.models.convnext_stem import ConvNeXtBlock, _depthwise_conv, _depthwise_weight_grad


def _conv(channels: int, k: int, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels).to(dtype)


def _forward_backward(fn, conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    conv.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = fn(conv, x)
    out.backward(grad)
    return out.detach(), x.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize("k", [5, 7])
@pytest.mark.parametrize("channels_last", [True, False])
def test_depthwise_conv_training_path_matches_conv2d(k: int, channels_last: bool) -> None:
    conv = _conv(6, k, torch.float64)  # float64: the split weight gradient is the same sum, so ~exact
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 9, 11, generator=gen, dtype=torch.float64)  # H != W, W not a multiple of 3
    grad = torch.randn(3, 6, 9, 11, generator=gen, dtype=torch.float64)
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    ours = _forward_backward(_depthwise_conv, conv, x, grad)
    plain = _forward_backward(lambda c, t: c(t), conv, x, grad)
    assert ours[0].equal(plain[0])  # the same forward op
    for a, b, name in zip(ours[1:], plain[1:], ("input", "weight", "bias"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_depthwise_conv_in_fp32_and_under_bf16_autocast() -> None:
    conv = _conv(16, 7)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, 14, 14, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 16, 14, 14, generator=gen)
    ours = _forward_backward(_depthwise_conv, conv, x, grad)
    plain = _forward_backward(lambda c, t: c(t), conv, x, grad)
    for a, b in zip(ours, plain, strict=True):  # weight grads: sums of 784 products of size ~1
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # runs in fp32, as before
        auto = _forward_backward(_depthwise_conv, conv, x, grad)
    assert auto[0].dtype == torch.float32
    for a, b in zip(auto, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_depthwise_weight_grad_of_a_3x3_kernel_and_frozen_parts() -> None:
    conv = _conv(4, 3, torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    expected = torch.ops.aten.convolution_backward(
        grad, x, conv.weight, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 4, [False, True, False]
    )[1]
    torch.testing.assert_close(_depthwise_weight_grad(grad, x, conv.weight.detach()), expected)
    conv7 = _conv(4, 7)
    conv7.weight.requires_grad_(False)  # a frozen weight: only the input and bias gradients
    x7 = torch.randn(2, 4, 8, 8, requires_grad=True)
    _depthwise_conv(conv7, x7).sum().backward()
    assert x7.grad is not None and conv7.weight.grad is None and conv7.bias.grad is not None


def test_convnext_block_trains_through_the_function_and_infers_with_the_module() -> None:
    torch.manual_seed(0)
    block = ConvNeXtBlock(8)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    out = block(x)
    seen, names, stack = set(), set(), [out.grad_fn]
    while stack:  # the autograd graph holds the custom function
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.add(type(fn).__name__)
            stack += [f for f, _ in fn.next_functions]
    assert "_DepthwiseConvFunctionBackward" in names
    out.sum().backward()
    assert block.conv_dw.weight.grad is not None and block.conv_dw.weight.grad.abs().sum() > 0
    with torch.inference_mode():
        torch.testing.assert_close(block(x.detach()), out.detach())
