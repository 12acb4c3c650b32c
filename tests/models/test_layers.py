"""Building blocks of ``stl.models.layers`` whose fast paths must equal the plain PyTorch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp

from stl.models.layers import GeluMlp, head_dim_of, linear_gelu_linear


def _plain(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _leaves(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


SHAPES = ((2, 5, 7, 8), (32, 8), (32,), (8, 32), (8,))  # x [B, H, W, C] channels-last, fc1, fc2


def _run(fn, tensors, grad_out, autocast: bool = False):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*tensors)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in tensors]


def test_linear_gelu_linear_matches_the_plain_ops() -> None:
    tensors = _leaves(*SHAPES)
    grad_out = torch.randn(2, 5, 7, 8)
    out, grads = _run(linear_gelu_linear, tensors, grad_out)
    ref_out, ref_grads = _run(_plain, tensors, grad_out)
    assert out.shape == ref_out.shape == (2, 5, 7, 8)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_linear_gelu_linear_under_bf16_autocast_matches_autocast_ops() -> None:
    tensors = _leaves(*SHAPES)
    grad_out = torch.randn(2, 5, 7, 8)
    out, grads = _run(linear_gelu_linear, tensors, grad_out, autocast=True)
    ref_out, ref_grads = _run(_plain, tensors, grad_out, autocast=True)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same bf16 ops
    for g, r, t in zip(grads, ref_grads, tensors, strict=True):
        assert g.dtype == t.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def test_linear_gelu_linear_inference_and_frozen_input() -> None:
    x, w1, b1, w2, b2 = _leaves(*SHAPES)
    with torch.no_grad():
        torch.testing.assert_close(linear_gelu_linear(x, w1, b1, w2, b2), _plain(x, w1, b1, w2, b2))
    frozen = x.detach()  # no grad for the input itself (a first layer): only the weights get one
    linear_gelu_linear(frozen, w1, b1, w2, b2).sum().backward()
    assert frozen.grad is None and w1.grad is not None and b2.grad is not None


def test_linear_gelu_linear_refuses_a_second_backward() -> None:
    # the backward overwrites its saved activations, so running the graph again would give wrong grads
    out = linear_gelu_linear(*_leaves(*SHAPES)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        out.backward()


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_gelu_mlp_is_timm_mlp(drop: float) -> None:
    ours, timm_mlp = GeluMlp(8, 32, drop=drop), Mlp(8, 32, drop=drop)
    assert ours.load_state_dict(timm_mlp.state_dict()) is not None  # same parameter names and shapes
    x = torch.randn(4, 6, 8)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(timm_mlp, mode)()
        torch.manual_seed(1)
        a = ours(x)
        torch.manual_seed(1)
        b = timm_mlp(x)
        torch.testing.assert_close(a, b)


def test_head_dim_of() -> None:
    assert head_dim_of(192, 4) == 48
    for dim, heads in ((192, 5), (192, 0)):
        with pytest.raises(ValueError, match=f"dim {dim} is not divisible by num_heads {heads}"):
            head_dim_of(dim, heads)
