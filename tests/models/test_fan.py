"""FAN model behaviour on tiny configs: outputs, timm conventions, input sizes, bf16, checkpointing."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import group_parameters

from stl.models.fan import FAN

MakeTiny = Callable[..., FAN]


@pytest.mark.parametrize("kind", ["vit", "se", "hybrid", "token", "xlarge"])
@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_output_shapes_any_size(make_tiny: MakeTiny, kind: str, size: tuple[int, int]) -> None:
    model = make_tiny(kind)
    x = torch.randn(2, 3, *size)
    n_tokens = (size[0] // 16) * (size[1] // 16)
    for train in (True, False):
        model.train(train)
        out = model(x)
        if kind == "token":
            cls_logits, aux_logits = out
            assert cls_logits.shape == (2, 5) and aux_logits.shape == (2, n_tokens, 5)
        else:
            assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
        assert torch.isfinite(out[0] if kind == "token" else out).all()


def test_forward_features_and_head(make_tiny: MakeTiny) -> None:
    model = make_tiny("token").eval()
    x = torch.randn(2, 3, 32, 48)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 2 * 3, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    cls_logits, aux_logits = model.forward_head(feats)
    torch.testing.assert_close(cls_logits, model.head(feats[:, 0]))
    torch.testing.assert_close(aux_logits, model.aux_head(feats[:, 1:]))


def test_num_classes_zero_and_reset_classifier(make_tiny: MakeTiny) -> None:
    x = torch.randn(2, 3, 32, 32)
    model = make_tiny("vit", num_classes=0).eval()
    assert model(x).shape == (2, 32)
    token = make_tiny("token").eval()
    token.reset_classifier(3)
    cls_logits, aux_logits = token(x)
    assert cls_logits.shape == (2, 3) and aux_logits.shape == (2, 4, 3)
    assert token.get_classifier() is token.head
    token.reset_classifier(0)
    cls_feats, token_feats = token(x)
    assert cls_feats.shape == (2, 32) and token_feats.shape == (2, 4, 32)


def test_drop_path_same_rate_in_fan_blocks_only(make_tiny: MakeTiny) -> None:
    model = make_tiny("xlarge", drop_path_rate=0.3)
    assert [blk.drop_path.drop_prob for blk in model.blocks] == [0.3, 0.3, 0.3]
    for module in (*model.cls_attn_blocks, model.patch_embed):
        assert not any(isinstance(m, DropPath) for m in module.modules())


def test_no_weight_decay_and_group_matcher(make_tiny: MakeTiny) -> None:
    model = make_tiny("hybrid")
    names = dict(model.named_parameters())
    no_wd = model.no_weight_decay()
    assert "cls_token" in no_wd and any(n.startswith("pos_embed.") for n in no_wd)
    assert no_wd <= set(names)
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(names)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(names["cls_token"]) not in decayed
    assert id(names["pos_embed.token_projection.weight"]) not in decayed
    assert id(names["blocks.0.attn.q.weight"]) in decayed


def test_grad_checkpointing_same_result(make_tiny: MakeTiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from stl.models import layers

    recomputed = []
    checkpoint_block = layers.checkpoint_block
    monkeypatch.setattr(layers, "checkpoint_block", lambda blk, *a: (recomputed.append(blk),
                                                                     checkpoint_block(blk, *a))[1])
    monkeypatch.setattr("stl.models.fan.checkpoint_block", layers.checkpoint_block)
    model = make_tiny("token").train()
    model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    x = torch.randn(2, 3, 32, 32)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        cls_logits, aux_logits = model(x)
        loss = cls_logits.sum() + aux_logits.mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_a, grads_a = run()
    assert recomputed == []
    model.set_grad_checkpointing(True)
    loss_b, grads_b = run()
    assert recomputed == list(model.blocks)  # every FAN block, once
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["vit", "hybrid"])
@pytest.mark.parametrize("bf16", [False, True])
def test_forward_computes_only_the_class_token_after_the_last_class_block(
    make_tiny: MakeTiny, kind: str, bf16: bool
) -> None:
    # model(x) runs the last class-attention block and the final norm on the class token alone; logits and
    # every gradient equal forward_head(forward_features(x)) bit for bit, with every dropout on
    model = make_tiny(kind, drop_rate=0.3, drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1).train()
    x = torch.randn(3, 3, 32, 48)
    shapes: list[torch.Size] = []
    hook = model.norm.register_forward_hook(lambda module, args, out: shapes.append(args[0].shape))

    def run(forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x)
        (out.float() * torch.arange(out.numel()).view_as(out)).sum().backward()
        return out, [p.grad for p in model.parameters()]

    out_full, grads_full = run(lambda t: model.forward_head(model.forward_features(t)))
    out, grads = run(model)
    hook.remove()
    assert shapes == [(3, 1 + 6, 32), (3, 1, 32)]
    assert torch.equal(out, out_full)
    assert all(g is not None for g in grads)
    for a, b in zip(grads, grads_full, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["token", "se", "xlarge"])
def test_bf16_autocast_forward_backward(make_tiny: MakeTiny, kind: str) -> None:
    model = make_tiny(kind).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    # a model cast to bf16 runs too (the cached positional features follow the dtype)
    model.to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(x.to(torch.bfloat16))
    assert (out[0] if isinstance(out, tuple) else out).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["vit", "token"])
def test_compiled_model_trains_after_inference_mode_eval(make_tiny: MakeTiny, kind: str) -> None:
    # torch.compile (as train.compile does) must not capture the cached positional features of an
    # inference_mode forward: they would be inference tensors saved for backward in the training graph.
    # The token model covers the hybrid stem, the FAN MLPs and the token head under the compiler too.
    model = make_tiny(kind)
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + autograd tracing, no C++ build
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.inference_mode():
        out = compiled(x)  # the first call traces
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    model.train()
    out = compiled(x)
    loss = out[0].sum() + out[1].mean() if isinstance(out, tuple) else out.sum()
    loss.backward()
    assert all(p.grad is not None for p in model.patch_embed.parameters())


def test_deepcopy_and_pickle_keep_working(make_tiny: MakeTiny) -> None:
    model = make_tiny("token").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)[0]
        clone = copy.deepcopy(model)
        restored = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(clone(x)[0], ref)
        torch.testing.assert_close(restored(x)[0], ref)
    assert not restored.pos_embed._cache or restored.pos_embed._cache is not model.pos_embed._cache


def _naive_fourier(hidden: int, H: int, W: int, temperature: float = 1e4) -> torch.Tensor:
    """[2*hidden, H, W] following the description: normalised 1..H grids, sin/cos interleaved, [y, x]."""
    eps, scale = 1e-6, 2 * math.pi
    ys = torch.arange(1, H + 1, dtype=torch.float64) / (H + eps) * scale
    xs = torch.arange(1, W + 1, dtype=torch.float64) / (W + eps) * scale
    chans = []
    for grid in (ys[:, None].expand(H, W), xs[None, :].expand(H, W)):
        for i in range(hidden):
            arg = grid / temperature ** (2 * (i // 2) / hidden)
            chans.append(arg.sin() if i % 2 == 0 else arg.cos())
    return torch.stack(chans)


def test_fourier_positional_encoding_formula_and_cache(make_tiny: MakeTiny) -> None:
    pos_embed = make_tiny("vit").pos_embed
    H, W = 3, 5
    pos = pos_embed(H, W)
    assert pos.shape == (1, H * W, 32)
    feats = _naive_fourier(32, H, W).float()
    expected = F.conv2d(feats[None], pos_embed.token_projection.weight, pos_embed.token_projection.bias)
    torch.testing.assert_close(pos[0], expected[0].flatten(1).T, rtol=1e-5, atol=1e-5)
    cached = pos_embed._features(H, W, torch.device("cpu"), torch.float32)
    assert pos_embed._features(H, W, torch.device("cpu"), torch.float32) is cached
    assert pos_embed._features(4, W, torch.device("cpu"), torch.float32) is not cached
    # usable in training after being cached under inference mode
    with torch.inference_mode():
        pos_embed(6, 6)
    pos_embed(6, 6).sum().backward()
    assert pos_embed.token_projection.weight.grad is not None


def test_channel_processing_is_a_channel_gate(make_tiny: MakeTiny) -> None:
    """out_h = v_h * (sigmoid(softmax_N(q_h)^T @ mean_d(softmax_N(x_h))) * temperature_h), per head."""
    cp = make_tiny("vit").blocks[0].mlp.eval()
    torch.nn.init.uniform_(cp.temperature, 0.5, 1.5)
    B, H, W, C, h = 2, 3, 4, 32, 2
    x = torch.randn(B, H * W, C)
    with torch.no_grad():
        out = cp(x, H, W)
        v = cp.norm_v(cp.mlp_v(x, H, W))
        q = cp.q(x)
        d = C // h
        for b in range(B):
            for head in range(h):
                cols = slice(head * d, (head + 1) * d)
                q_soft = q[b, :, cols].softmax(dim=0)  # [N, d]
                k_mean = x[b, :, cols].softmax(dim=0).mean(dim=1, keepdim=True)  # [N, 1]
                gate = torch.sigmoid(q_soft.T @ k_mean) * cp.temperature[head]  # [d, 1]
                torch.testing.assert_close(out[b, :, cols], v[b, :, cols] * gate.T)


def test_se_model_is_registered_and_works() -> None:
    model = timm.create_model("fan_small_12_p16_224_se_attn", num_classes=4, depth=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 48)).shape == (1, 4)


def test_large_hybrid_head_init_scale() -> None:
    """The large hybrid's head starts 1000x smaller than the others', and so does a new head (fine-tuning)."""
    torch.manual_seed(0)
    model = timm.create_model("fan_large_16_p4_hybrid", depth=1, num_classes=10)
    assert model.head.weight.abs().max() < 1e-3
    model.reset_classifier(7)
    assert model.head.weight.shape == (7, model.num_features) and model.head.weight.abs().max() < 1e-3
    assert timm.create_model("fan_tiny_8_p4_hybrid", num_classes=7).head.weight.abs().max() > 1e-2


def test_bad_arguments_raise(make_tiny: MakeTiny) -> None:
    with pytest.raises(ValueError, match="global_pool"):
        make_tiny("vit", global_pool="avg")
    with pytest.raises(ValueError, match="num_heads"):
        make_tiny("vit", num_heads=3)
    with pytest.raises(ValueError, match="grid"):
        make_tiny("vit").blocks[0](torch.randn(1, 6, 32), 2, 2)


@pytest.mark.parametrize("kind", ["token", "vit"])
def test_channels_last_model_gives_same_output(make_tiny: MakeTiny, kind: str) -> None:
    model = make_tiny(kind).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    refs = ref if isinstance(ref, tuple) else (ref,)
    outs = out if isinstance(out, tuple) else (out,)
    for a, b in zip(refs, outs, strict=True):
        torch.testing.assert_close(a, b)


def test_folded_layer_scales_match_the_unfolded_formula(make_tiny: MakeTiny) -> None:
    """Layer scales folded into weights give the same outputs and gradients as multiplying activations."""
    block = make_tiny("vit").blocks[0].train()
    block.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    for p in (block.gamma1, block.gamma2, block.mlp.mlp_v.gamma):
        torch.nn.init.uniform_(p, 0.5, 1.5)
    H, W = 3, 4
    x = torch.randn(2, H * W, 32)

    def unfolded(x: torch.Tensor) -> torch.Tensor:
        mlp_v = block.mlp.mlp_v
        h = mlp_v.fc1(block.norm2(x := x + block.gamma1 * block.attn(block.norm1(x))))
        h = h + mlp_v.gamma * mlp_v.dwconv(h, H, W)
        v = block.mlp.norm_v(mlp_v.fc2(h))
        return x + block.gamma2 * (v * block.mlp.channel_gate(block.norm2(x)))

    results = []
    for fn in (lambda t: block(t, H, W)[0], unfolded):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in block.parameters()]))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b)
    for a, b in zip(gp_a, gp_b, strict=True):  # float32 rounding relative to each gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6 + 1e-5 * b.abs().max().item())


@pytest.mark.parametrize("kind", ["vit", "token"])
def test_plain_autograd_when_fused_backward_is_off(make_tiny: MakeTiny, kind: str) -> None:
    """Two backward calls on one graph and double backward need the plain ops: fused_backward(False)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stl.models import fused_backward

    model = make_tiny(kind).train()
    model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)

    def loss_of(out) -> torch.Tensor:
        return (out[0] if isinstance(out, tuple) else out).square().sum()

    loss = loss_of(model(x))
    loss.backward(retain_graph=True)
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(fused) > 10
    with pytest.raises(RuntimeError, match=r"with stl.models.fused_backward\(False\)"):
        loss.backward()
    model.zero_grad()
    with fused_backward(False):
        loss = loss_of(model(x))
    loss.backward(retain_graph=True)
    params = dict(model.named_parameters())
    for name, grad in fused.items():  # the same gradients either way
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    loss.backward()  # a second backward on the plain graph
    x.grad = None
    with fused_backward(False), sdpa_kernel(SDPBackend.MATH):  # (the CPU flash kernel is first-order)
        (grad_x,) = torch.autograd.grad(loss_of(model(x)), x, create_graph=True)
        grad_x.square().sum().backward()  # second order
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
def test_trace_without_no_grad_and_batch_one_in_training(make_tiny: MakeTiny) -> None:
    model = make_tiny("token").eval()
    x = torch.randn(1, 3, 32, 32)
    traced = torch.jit.trace(model, x, check_trace=False)  # the fused functions stay out of traces
    for got, want in zip(traced(x), model(x), strict=True):
        torch.testing.assert_close(got, want)
    model.train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.randn(1, 3, 16, 16))  # a 1x1 token grid: BatchNorm has one value per channel


def test_reset_classifier_keeps_dtype_and_device(make_tiny: MakeTiny) -> None:
    model = make_tiny("token").to(torch.bfloat16)
    model.reset_classifier(3)
    assert model.head.weight.dtype == model.aux_head.weight.dtype == torch.bfloat16
    cls_logits, aux_logits = model.eval()(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    assert cls_logits.shape == (1, 3) and aux_logits.shape[-1] == 3


def test_checkpointed_blocks_recompute_with_the_forwards_fused_backward_setting(make_tiny: MakeTiny) -> None:
    from stl.models import fused_backward

    model = make_tiny("token").train()
    model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    with fused_backward(False):
        cls_logits, aux_logits = model(x)
    (cls_logits.sum() + aux_logits.mean()).backward()  # recomputes outside the block, as the forward ran
    assert all(p.grad is not None for p in model.blocks.parameters())
