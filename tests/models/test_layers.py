"""Building blocks of ``stl.models.layers`` whose fast paths must equal the plain PyTorch ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp

from stl.models.layers import (
    _POOL,
    ClassAttentionBlock,
    FanMlp,
    GeluMlp,
    _BufferPool,
    clear_buffer_pool,
    head_dim_of,
    linear_gelu_linear,
)


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
    result = ours.load_state_dict(timm_mlp.state_dict())  # same parameter names and shapes
    assert result.missing_keys == result.unexpected_keys == []
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


def _fan_mlp_pair(residual: bool, seed: int = 0) -> tuple[FanMlp, FanMlp]:
    torch.manual_seed(seed)
    fused = FanMlp(8, 24, dwconv_residual=residual)
    with torch.no_grad():  # non-trivial BN and layer-scale parameters
        fused.gamma.uniform_(0.5, 1.5)
        fused.dwconv.bn.weight.uniform_(0.5, 1.5)
        fused.dwconv.bn.bias.uniform_(-0.5, 0.5)
    plain = copy.deepcopy(fused)
    plain._use_fused = lambda x: False  # type: ignore[method-assign]
    return fused, plain


def _fan_mlp_step(mlp: FanMlp, x: torch.Tensor, grad_out: torch.Tensor, autocast: bool = False):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = mlp(x, 3, 4)
    out.backward(grad_out.to(out.dtype))
    grads = {n: p.grad for n, p in mlp.named_parameters()}
    return out.detach(), x.grad, grads


def _assert_same_step(fused: FanMlp, plain: FanMlp, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """One training step of each gives the same output, input gradient and parameter gradients."""
    out_f, gx_f, grads_f = _fan_mlp_step(fused, x, grad_out)
    out_p, gx_p, grads_p = _fan_mlp_step(plain, x, grad_out)
    torch.testing.assert_close(out_f, out_p)
    torch.testing.assert_close(gx_f, gx_p)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], msg=name)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bn_train", [True, False])
def test_fan_mlp_fused_training_path_matches_plain_ops(residual: bool, bn_train: bool) -> None:
    fused, plain = _fan_mlp_pair(residual)
    for m in (fused, plain):
        m.train()
        m.dwconv.bn.train(bn_train)
    assert fused._use_fused(torch.ones(1, requires_grad=True))
    x, grad_out = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    for _ in range(2):  # the running statistics and the step count advance identically
        _assert_same_step(fused, plain, x, grad_out)
    for name, buf in fused.named_buffers():
        torch.testing.assert_close(buf, dict(plain.named_buffers())[name], msg=name)


def test_fan_mlp_fused_with_a_batch_norm_without_affine_parameters() -> None:
    """An ``affine=False`` BatchNorm (no weight or bias to give gradients to) trains as the plain ops do."""
    fused, plain = _fan_mlp_pair(residual=True)
    for m in (fused, plain):
        m.dwconv.bn = torch.nn.BatchNorm2d(24, affine=False)
        m.train()
    assert fused._use_fused(torch.ones(1, requires_grad=True))
    _assert_same_step(fused, plain, torch.randn(2, 12, 8), torch.randn(2, 12, 8))


def test_fan_mlp_fused_under_bf16_autocast() -> None:
    fused, plain = _fan_mlp_pair(True)
    x, grad_out = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    out_f, gx_f, grads_f = _fan_mlp_step(fused, x, grad_out, autocast=True)
    out_p, gx_p, grads_p = _fan_mlp_step(plain, x, grad_out, autocast=True)
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=0)  # the same bf16 ops in the same order
    torch.testing.assert_close(gx_f, gx_p, rtol=2e-2, atol=2e-2)
    for name in grads_f:
        assert grads_f[name].dtype == torch.float32
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=3e-2, atol=3e-2, msg=name)


def test_fan_mlp_uses_plain_ops_for_inference_and_dropout() -> None:
    mlp = FanMlp(8, 24, drop=0.1).train()
    x = torch.randn(1, 12, 8, requires_grad=True)
    assert not mlp._use_fused(x)  # active dropout: the plain path draws the masks
    mlp.eval()
    assert mlp._use_fused(x)
    with torch.no_grad():
        assert not mlp._use_fused(x)


def test_fan_mlp_leaves_sync_batch_norm_to_its_module() -> None:
    """After nn.SyncBatchNorm.convert_sync_batchnorm the statistics span processes: the plain path runs it."""
    mlp = torch.nn.SyncBatchNorm.convert_sync_batchnorm(FanMlp(8, 24)).train()
    assert type(mlp.dwconv.bn) is torch.nn.SyncBatchNorm
    assert not mlp._use_fused(torch.ones(1, requires_grad=True))


def test_fan_mlp_fused_refuses_a_second_backward() -> None:
    fused, _ = _fan_mlp_pair(True)
    out = fused(torch.randn(2, 12, 8, requires_grad=True), 3, 4).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        out.backward()


def test_buffer_pool_reuses_exact_sizes_and_stays_bounded() -> None:
    pool = _BufferPool(max_bytes=3 * 4 * 12, min_bytes=40)  # three 12-float buffers
    pool.give(torch.empty(8))  # below min_bytes: glibc's heap reuses such sizes itself
    assert pool.nbytes == 0
    a = pool.take((3, 4), torch.float32, torch.device("cpu"))
    pool.give(a)
    b = pool.take((2, 6), torch.float32, torch.device("cpu"))  # same numel and dtype: the same memory
    assert b.shape == (2, 6) and b.data_ptr() == a.data_ptr() and pool.nbytes == 0
    assert pool.take((2, 6), torch.float64, "cpu").data_ptr() != a.data_ptr()  # another dtype: new
    pool.give(b, torch.empty(4, 6)[:, :3])  # a non-contiguous view is not pooled
    assert pool.nbytes == 48
    bufs = [torch.empty(12) for _ in range(4)]
    pool.give(*bufs)  # five given, three fit: the oldest two dropped
    assert pool.nbytes == 3 * 48
    taken = {pool.take((12,), torch.float32, "cpu").data_ptr() for _ in range(3)}
    assert taken == {t.data_ptr() for t in bufs[1:]}
    pool.give(torch.empty(100))  # larger than the whole pool
    assert pool.nbytes == 0
    pool.give(torch.empty(12))
    pool.clear()
    assert pool.nbytes == 0


def test_linear_gelu_linear_reuses_its_buffers_across_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 2 runs on step 1's buffers; a second forward before any backward gets fresh ones. Every result
    equals the plain ops."""
    monkeypatch.setattr(_POOL, "min_bytes", 0)  # pool these tiny tensors too
    clear_buffer_pool()
    tensors = _leaves(*SHAPES)
    grad_out = torch.randn(2, 5, 7, 8)
    xs = [torch.randn(2, 5, 7, 8) for _ in range(3)]
    for x in xs[:2]:  # consecutive steps
        args = [x.requires_grad_(), *tensors[1:]]
        out, grads = _run(linear_gelu_linear, args, grad_out)
        ref_out, ref_grads = _run(_plain, args, grad_out)
        torch.testing.assert_close(out, ref_out)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r)
    assert _POOL.nbytes == 2 * 2 * 5 * 7 * 32 * 4  # pre and act of the last step, kept for the next
    w = [t.detach().clone().requires_grad_() for t in tensors[1:]]
    outs = [linear_gelu_linear(x, *w) for x in xs[1:]]  # two graphs alive at once
    grads = torch.autograd.grad([o.sum() for o in outs], w)
    ref = torch.autograd.grad([_plain(x, *w).sum() for x in xs[1:]], w)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r)
    clear_buffer_pool()
    assert _POOL.nbytes == 0


def test_fused_backward_switch_is_per_thread() -> None:
    import threading

    from stl.models import fused_backward
    from stl.models.layers import _records_eager_backward

    x = torch.randn(2, requires_grad=True)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def other() -> None:
        with fused_backward(False):
            seen["other"] = _records_eager_backward(x)
            inside.set()
            release.wait()

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait()
    seen["main"] = _records_eager_backward(x)  # another thread's switch does not reach this one
    release.set()
    thread.join()
    assert seen == {"other": False, "main": True}
    with fused_backward(False):
        with fused_backward(True):
            assert _records_eager_backward(x)
        assert not _records_eager_backward(x)
    assert _records_eager_backward(x)


@pytest.mark.parametrize("tokens_norm", [True, False])
def test_class_attention_block_on_the_class_token_alone_is_bit_for_bit(tokens_norm: bool) -> None:
    """cls_only=True gives forward(x)[:, :1] and the same gradients exactly, with drop path and dropout
    drawing the same random numbers (FAN's class-attention blocks have no drop path; this one has)."""
    torch.manual_seed(0)
    block = ClassAttentionBlock(32, 2, qkv_bias=True, drop=0.1, attn_drop=0.1, drop_path=0.4,
                                eta=0.5, tokens_norm=tokens_norm).train()
    x0 = torch.randn(6, 9, 32)
    calls: list[torch.Size] = []
    block.register_forward_hook(lambda module, args, out: calls.append(out.shape))  # the module is called

    def run(cls_only: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(1)
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = block(x, cls_only=True) if cls_only else block(x)[:, :1]
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        return out, [x.grad, *(p.grad for p in block.parameters())]

    (out_full, grads_full), (out, grads) = run(False), run(True)
    assert calls == [(6, 9, 32), (6, 1, 32)]
    assert torch.equal(out, out_full)
    for a, b in zip(grads, grads_full, strict=True):
        assert torch.equal(a, b)
