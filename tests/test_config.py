"""params.yaml validation: every kind of bad input is one error naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stl.config import Config, ConfigError, load_config, to_flat_dict
from tests.conftest import REPO_ROOT


def _load(tmp_path: Path, **overrides: object) -> Config:
    path = tmp_path / "params.yaml"
    path.write_text((REPO_ROOT / "params.yaml").read_text())
    return load_config(path, overrides=overrides)


def test_the_committed_params_load_and_stl_trains_the_token_variant(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert cfg.model == "fan_tiny_hybrid" and cfg.model_name == "fan_tiny_8_p4_hybrid_token"
    assert isinstance(cfg.train.lr, float) and cfg.evaluate.robustness.severities == [1, 2, 3, 4, 5]
    assert to_flat_dict(cfg)["train.lr"] == cfg.train.lr


def test_aliases_and_official_names_resolve(tmp_path: Path) -> None:
    assert _load(tmp_path, model="fan_base_hybrid").model_name == "fan_base_16_p4_hybrid_token"
    cfg = _load(tmp_path, model="fan_tiny_vit", **{"stl.enabled": False})
    assert cfg.model_name == "fan_tiny_12_p16_224"
    assert _load(tmp_path, **{"train.lr": 1}).train.lr == 1.0  # an int is a fine float
    assert _load(tmp_path, **{"train.min_lr": "1e-5"}).train.min_lr == 1e-5  # YAML 1.1 reads 1e-5 as str
    plain = _load(tmp_path, model="fan_tiny_vit",
                  **{"stl.enabled": False, "train.auto_augment": "augmix-m5-w3"})
    assert plain.train.auto_augment == "augmix-m5-w3"  # any timm policy without STL


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.lrr": 0.1}, "unknown key train.lrr (did you mean train.lr?); allowed keys here: nproc_"),
        ({"colour": 1}, "unknown key colour; allowed keys here: seed, model"),
        ({"train.epochs": "ten"}, "train.epochs: expected int, got str 'ten'"),
        ({"stl.enabled": "yes"}, "stl.enabled: expected bool, got str 'yes'"),
        ({"train.epochs": 1.5}, "train.epochs: expected int, got float 1.5"),
        ({"train.lr": -1.0}, "train.lr: -1.0 is out of range; must be > 0.0 and <= 10.0"),
        ({"train.amp": "fp8"}, "train.amp: 'fp8' is not allowed; allowed values: none, bf16, fp16"),
        ({"stl.token_label": "max"}, "stl.token_label: 'max' is not allowed; allowed values: gumbel, argmax"),
        ({"evaluate.robustness.severities": [0, 6]}, "unknown value(s) [0, 6]; allowed: [1, 2, 3, 4, 5]"),
        ({"evaluate.robustness.corruptions": ["rain"]}, "robustness.corruptions: unknown value(s) ['rain']"),
        ({"split.test": 0.3}, "split.train + split.val + split.test must be 1.0, got 1.15"),
        ({"train.img_size": 40}, "train.img_size: 40 must be a multiple of 16"),
        ({"data.source": "https://example.com/x.zip"}, "data.sha256 is required when data.source is a URL"),
        ({"model": "fan_tiny_hybird"}, "model: unknown model 'fan_tiny_hybird'"),
        ({"model": "fan_tiny_vit"}, "has no token-labeling variant; STL needs a FAN-Hybrid model"),
        ({"train.auto_augment": "augmix-m5-w3"}, "the STL student's paired views support timm RandAugment"),
        ({"train.min_lr": "nan"}, "train.min_lr: expected float, got str 'nan'"),
        ({"model": "fan_tiny_hybrid_token", "stl.enabled": False},
         "is a token model, but stl.enabled is false: its aux_head would stay untrained"),
        ({"split.max_per_class": 2}, "split.max_per_class: 2 leaves no image for some split"),
        ({"train": 3}, "train: expected a mapping of keys, got 3"),
    ],
)
def test_bad_params_give_one_clear_error(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, **overrides)
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'params.yaml'}: ")
    assert message in text, text


def test_unknown_model_lists_the_closest_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fan_tiny_hybrid"):
        _load(tmp_path, model="fan_tiny_hybird")


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_key_of_params_yaml_round_trips(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    cfg = _load(tmp_path)
    flat = to_flat_dict(cfg)

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                assert flat[prefix + k] == v, prefix + k

    walk(raw)
