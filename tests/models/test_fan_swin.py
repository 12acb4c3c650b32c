"""Tests of the FAN-Swin models: checkpoint layout, timm integration, any input size, speed-related paths.

Full-size models are built on the meta device (layout, parameter counts); forward passes use FAN-Swin-T at
small batch or a narrow custom configuration so the file stays fast on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from stl.models.fan_swin import FanSwinTransformer

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DICT_DIR = REPO_ROOT.parent / "shared" / "reference" / "state_dict"

PARAMS = {  # reference parameter counts with 1000 classes (STL_METHOD.md section 1)
    "fan_swin_tiny_patch4_window7_224": 29_538_940,
    "fan_swin_small_patch4_window7_224": 53_064_220,
    "fan_swin_base_patch4_window7_224": 93_599_448,
    "fan_swin_large_patch4_window7_224": 208_941_136,
}
NAMES = list(PARAMS)
TINY = NAMES[0]


def _meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _narrow(**kwargs) -> FanSwinTransformer:
    """A narrow FAN-Swin (dims 16-128) with both block kinds in every stage, for fast numeric tests."""
    torch.manual_seed(0)
    args = dict(img_size=112, num_classes=5, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                drop_path_rate=0.0)
    return FanSwinTransformer(**(args | kwargs))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TINY, num_classes=10, drop_path_rate=0.0).eval()


@pytest.mark.parametrize("name", NAMES)
def test_param_count(name: str) -> None:
    model = _meta_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAMS[name]
    summary = STATE_DICT_DIR / "SUMMARY.json"
    if summary.is_file():
        assert n == json.loads(summary.read_text())[name]["params"]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_reference(name: str) -> None:
    ref_file = STATE_DICT_DIR / f"{name}.txt"
    if not ref_file.is_file():
        pytest.skip(f"reference key list absent: {ref_file}")
    expected = []
    for line in ref_file.read_text().splitlines():
        key, shape = line.split("\t")
        expected.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    got = [(k, tuple(v.shape)) for k, v in _meta_model(name).state_dict().items()]
    assert dict(got) == dict(expected)
    assert [k for k, _ in got] == [k for k, _ in expected]  # same order too


def test_registered_with_pretrained_cfg() -> None:
    assert set(NAMES) <= set(timm.list_models("fan_swin_*"))
    cfg = _meta_model(TINY).pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 224, 224)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN
    assert tuple(cfg["std"]) == timm.data.IMAGENET_DEFAULT_STD


def test_create_model_kwargs() -> None:
    model = _meta_model(TINY, num_classes=7, drop_path_rate=0.3, img_size=112)
    assert model.head.out_features == 7
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    assert blocks[0].drop_path.__class__ is nn.Identity  # linear ramp from 0, as the reference Swin
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    # shift masks are built for the requested size: 28 -> 16 windows; stage 3 (7 px) is not shifted at 112
    assert tuple(model.layers[0].blocks[1].attn_mask.shape) == (16, 49, 49)
    assert model.layers[2].blocks[1].attn_mask is None


def test_forward_shapes(tiny: nn.Module) -> None:
    with torch.inference_mode():
        assert tiny(torch.randn(2, 3, 224, 224)).shape == (2, 10)
        feats = tiny.forward_features(torch.randn(1, 3, 224, 224))
        assert feats.shape == (1, 7, 7, 768)
        assert tiny.forward_head(feats, pre_logits=True).shape == (1, 768)
        # 112: stages at 28/14/7 then 4 after a padded merge; 160: 40 -> windows padded to 42, 20 -> 21, ...
        for size in (112, 160):
            y = tiny(torch.randn(1, 3, size, size))
            assert y.shape == (1, 10) and torch.isfinite(y).all()


def test_strict_load_across_build_sizes(tiny: nn.Module) -> None:
    """Geometry buffers are rebuilt on load, and on-the-fly shift masks equal the stored ones."""
    torch.manual_seed(0)
    other = timm.create_model(TINY, num_classes=10, drop_path_rate=0.0, img_size=112).eval()
    assert set(other.state_dict()) != set(tiny.state_dict())  # different attn_mask buffers
    other.load_state_dict(tiny.state_dict(), strict=True)
    x = torch.randn(1, 3, 112, 112)
    with torch.inference_mode():
        torch.testing.assert_close(other(x), tiny(x))


def test_num_classes_change() -> None:
    model = _narrow(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 5)
    model.reset_classifier(3)
    assert isinstance(model.get_classifier(), nn.Linear) and model(x).shape == (1, 3)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(4, global_pool="")
    assert model(x).shape == (1, 2, 2, 4)  # per-position logits without pooling


def test_no_weight_decay_names() -> None:
    model = _narrow()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert len(names) == 8 and all(n in params and n.endswith("relative_position_bias_table") for n in names)


def test_grad_checkpointing_same_output(monkeypatch: pytest.MonkeyPatch) -> None:
    from stl.models import fan_swin

    recomputed = []
    checkpoint_block = fan_swin.checkpoint_block
    monkeypatch.setattr(fan_swin, "checkpoint_block",
                        lambda blk, *a: (recomputed.append(blk), checkpoint_block(blk, *a))[1])
    model = _narrow().train()
    x = torch.randn(2, 3, 64, 64)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    y0, g0 = run()
    assert recomputed == []
    model.set_grad_checkpointing(True)
    y1, g1 = run()
    assert len(recomputed) == sum(len(layer.blocks) for layer in model.layers)  # every block, once
    torch.testing.assert_close(y1, y0)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)


def test_bf16_autocast() -> None:
    model = _narrow().eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.1)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_load_checkpoint_across_build_sizes(tmp_path: Path) -> None:
    """The geometry buffers (shift masks, relative-position indices) are rebuilt, never loaded."""
    from stl.models import load_checkpoint

    small = _narrow(img_size=112)
    path = tmp_path / "small.pth"
    torch.save({"state_dict": small.state_dict()}, path)
    big = _narrow(img_size=160)
    info = load_checkpoint(big, path)
    assert info["missing"] == info["mismatched"] == []
    for key, value in small.state_dict().items():
        if not key.endswith(("attn_mask", "relative_position_index")):
            torch.testing.assert_close(big.state_dict()[key], value, msg=key)
    x = torch.randn(1, 3, 160, 160)
    big.eval()
    with torch.inference_mode():
        assert torch.isfinite(big(x)).all()
