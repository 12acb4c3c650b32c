"""load_checkpoint on small checkpoints written here: layouts, key fixes, heads, errors, unsafe pickles."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from stl.models import load_checkpoint
from stl.models.fan import FAN

MakeTiny = Callable[..., FAN]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if not key.startswith(skip):
            torch.testing.assert_close(value, sb[key], msg=key)


@pytest.fixture
def source(make_tiny: MakeTiny) -> FAN:
    model = make_tiny("token", num_classes=5)
    torch.nn.init.normal_(model.head.weight)  # distinguishable from a fresh init
    return model


def test_timm05_style_file_with_namespace_module_prefix_and_ema(
    tmp_path: Path, source: FAN, make_tiny: MakeTiny
) -> None:
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "model_best.pth.tar"
    args = argparse.Namespace(model="fan_tiny_8_p4_hybrid_token", lr=2e-3, drop_path=0.05)
    torch.save(
        {
            "epoch": 299,
            "arch": "fan",
            "state_dict": state,
            "state_dict_ema": ema,
            "args": args,
            "metric": 79.9,
        },
        path,
    )
    target = make_tiny("token", num_classes=5)
    info = load_checkpoint(target, path)
    _assert_same_weights(source, target)
    assert info["source_key"] == "state_dict" and info["dropped"] == [] and info["epoch"] == 299
    assert info["args"]["model"] == "fan_tiny_8_p4_hybrid_token" and info["metric"] == 79.9

    info = load_checkpoint(target, path, use_ema=True)
    assert info["source_key"] == "state_dict_ema"
    torch.testing.assert_close(target.cls_token, source.cls_token + 1)


def test_model_key_bare_state_dict_pos_embeder_and_fused_qkv(
    tmp_path: Path, source: FAN, make_tiny: MakeTiny
) -> None:
    state = dict(source.state_dict())
    for key in [k for k in state if k.startswith("pos_embed.")]:
        state[key.replace("pos_embed.", "pos_embeder.")] = state.pop(key)
    for i in range(len(source.cls_attn_blocks)):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"cls_attn_blocks.{i}.attn.{n}.{kind}") for n in "qkv"]
            state[f"cls_attn_blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    for layout in ({"model": state}, state):
        path = tmp_path / "ckpt.pth"
        torch.save(layout, path)
        target = make_tiny("token", num_classes=5)
        info = load_checkpoint(target, path)
        _assert_same_weights(source, target)
        assert info["source_key"] == ("model" if "model" in layout else None)


def test_finetune_drops_mismatched_heads(
    tmp_path: Path, source: FAN, make_tiny: MakeTiny, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "labeler.pth.tar"
    torch.save({"state_dict_ema": source.state_dict()}, path)
    target = make_tiny("token", num_classes=3)
    fresh_head = target.head.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        info = load_checkpoint(target, path, use_ema=True)
    assert sorted(info["dropped"]) == ["aux_head.bias", "aux_head.weight", "head.bias", "head.weight"]
    assert "aux_head.weight" in caplog.text and str(path) in caplog.text
    torch.testing.assert_close(target.head.weight, fresh_head)
    _assert_same_weights(source, target, skip=("head.", "aux_head."))
    # a token checkpoint into the plain model: aux_head is dropped, the rest loads
    plain = make_tiny("hybrid", num_classes=5)
    info = load_checkpoint(plain, path, use_ema=True)
    assert info["dropped"] == ["aux_head.weight", "aux_head.bias"]
    # evaluation wants a mismatch to be an error
    with pytest.raises(ValueError, match="aux_head.weight"):
        load_checkpoint(make_tiny("token", num_classes=3), path, use_ema=True, drop_mismatched_heads=False)


def test_other_mismatches_raise_naming_file_and_keys(
    tmp_path: Path, source: FAN, make_tiny: MakeTiny
) -> None:
    path = tmp_path / "other.pth.tar"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(make_tiny("token", embed_dim=48, num_heads=2), path)
    assert str(path) in str(err.value) and "wrong shape" in str(err.value)
    state = dict(source.state_dict())
    state["blocks.9.extra"] = torch.zeros(1)
    del state["norm.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="missing: norm.weight.*unexpected: blocks.9.extra"):
        load_checkpoint(make_tiny("token"), path)
    info = load_checkpoint(make_tiny("token"), path, strict=False)
    assert info["missing"] == ["norm.weight"] and info["unexpected"] == ["blocks.9.extra"]


def test_missing_file_and_missing_ema(tmp_path: Path, source: FAN) -> None:
    missing = tmp_path / "nope.pth.tar"
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load_checkpoint(source, missing)
    path = tmp_path / "no_ema.pth.tar"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.raises(ValueError, match=r"no EMA weights \('state_dict_ema', 'ema'.*use_ema=False"):
        load_checkpoint(source, path, use_ema=True)


class _Payload:
    """Unpickling this would create a marker directory (stands in for arbitrary code execution)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path: Path, source: FAN) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": source.state_dict(), "args": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(source, path)
    assert not marker.exists()


def test_use_ema_reads_this_projects_files_and_wrapped_models_load(tmp_path: Path, source: FAN,
                                                                   make_tiny: MakeTiny) -> None:
    from stl.models import export_model

    ema = make_tiny("token", num_classes=5)
    torch.nn.init.normal_(ema.head.weight)
    last = tmp_path / "last.pt"  # a training checkpoint: raw weights under model, EMA under ema
    torch.save({"model": source.state_dict(), "ema": ema.state_dict(), "epoch": 3}, last)
    target = make_tiny("token", num_classes=5)
    assert load_checkpoint(target, last, use_ema=True)["source_key"] == "ema"
    _assert_same_weights(target, ema)
    assert load_checkpoint(target, last)["source_key"] == "model"
    _assert_same_weights(target, source)
    exported = tmp_path / "model.pt"
    export_model(exported, model_name="x", num_classes=5, classes=list("abcde"), img_size=32,
                 state_dict=ema.state_dict(), source="ema", epoch=3, val_top1=1.0, phase="labeler",
                 mean=(0.5,) * 3, std=(0.5,) * 3)
    from_export = make_tiny("token", num_classes=5)
    assert load_checkpoint(from_export, exported, use_ema=True)["source_key"] == "state_dict"
    _assert_same_weights(from_export, ema)
    for wrapped in (torch.compile(make_tiny("token", num_classes=5)),
                    torch.nn.DataParallel(make_tiny("token", num_classes=5))):
        assert load_checkpoint(wrapped, last, use_ema=True)["missing"] == []
        _assert_same_weights(getattr(wrapped, "_orig_mod", None) or wrapped.module, ema)
