"""Registration with timm, aliases, name resolution and the model table."""

from __future__ import annotations

import pytest
import timm
import torch

import stl.models
from stl.models import (
    MODEL_ALIASES,
    is_token_model,
    list_models,
    models_markdown_table,
    resolve_model_name,
    token_variant,
)
from stl.models.fan import FAN_MODEL_ARGS

FAN_NAMES = list(FAN_MODEL_ARGS)


def test_all_fan_names_registered_with_timm() -> None:
    registered = set(timm.list_models("fan_*"))
    assert set(FAN_NAMES) <= registered
    for name in MODEL_ALIASES.values():
        assert name in registered, name


@pytest.mark.parametrize("name", FAN_NAMES)
def test_create_model_with_timm_kwargs_and_cfg(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=3, drop_path_rate=0.2, img_size=64)
    assert model.num_classes == 3
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 1000
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 224, 224)
    # the same drop path rate in every FAN block
    assert {blk.drop_path.drop_prob for blk in model.blocks} == {0.2}


def test_pretrained_true_points_to_load_checkpoint() -> None:
    with pytest.raises(RuntimeError, match="load_checkpoint"):
        timm.create_model("fan_tiny_12_p16_224", pretrained=True)


def test_aliases_resolve() -> None:
    assert resolve_model_name("fan_tiny_hybrid") == "fan_tiny_8_p4_hybrid"
    assert resolve_model_name("fan_xlarge_hybrid") == "fan_Xlarge_16_p4_hybrid"
    assert resolve_model_name("fan_small_vit_se") == "fan_small_12_p16_224_se_attn"
    assert resolve_model_name("fan_swin_base") == "fan_swin_base_patch4_window7_224"
    assert resolve_model_name("fan_large_hybrid_token") == "fan_large_16_p4_hybrid_token"
    # official names pass through; case and surrounding space do not matter
    for name in FAN_NAMES:
        assert resolve_model_name(name) == name
    assert resolve_model_name(" FAN_XLARGE_16_P4_HYBRID ") == "fan_Xlarge_16_p4_hybrid"
    expected = {
        f"fan_{s}_{k}" for s in ("tiny", "small", "base", "large") for k in ("vit", "hybrid", "hybrid_token")
    }
    expected |= {"fan_small_vit_se", "fan_xlarge_hybrid"} | {
        f"fan_swin_{s}" for s in ("tiny", "small", "base", "large")
    }
    assert set(MODEL_ALIASES) == expected


def test_unknown_name_lists_closest() -> None:
    with pytest.raises(ValueError, match="fan_tiny_hybrid") as err:
        resolve_model_name("fan_tiny_hybird")
    assert "fan_tiny_hybird" in str(err.value)
    with pytest.raises(ValueError):
        resolve_model_name("")


def test_token_variant_and_is_token_model() -> None:
    assert token_variant("fan_tiny_hybrid") == "fan_tiny_8_p4_hybrid_token"
    assert token_variant("fan_base_16_p4_hybrid") == "fan_base_16_p4_hybrid_token"
    assert token_variant("fan_small_hybrid_token") == "fan_small_12_p4_hybrid_token"
    assert token_variant("fan_tiny_vit") is None
    assert token_variant("fan_xlarge_hybrid") is None
    assert token_variant("fan_swin_tiny") is None
    assert is_token_model("fan_large_hybrid_token") and not is_token_model("fan_large_hybrid")
    with torch.device("meta"):
        assert is_token_model(timm.create_model("fan_tiny_8_p4_hybrid_token"))
        assert not is_token_model(timm.create_model("fan_tiny_8_p4_hybrid"))
    with pytest.raises(ValueError):
        token_variant("resnet50")


def test_list_models_and_markdown_table() -> None:
    rows = list_models()
    assert len(rows) == 18
    assert {r["name"] for r in rows} == set(MODEL_ALIASES.values())
    for row in rows:
        assert set(row) >= {"name", "alias", "params", "returns"}
        assert resolve_model_name(row["alias"]) == row["name"]
        assert ("aux_logits" in row["returns"]) == row["name"].endswith("_token")
    table = models_markdown_table()
    assert table.count("\n") == 2 + len(rows)
    for alias, name in MODEL_ALIASES.items():
        assert f"`{alias}`" in table and f"`{name}`" in table
    assert stl.models.list_models is list_models
