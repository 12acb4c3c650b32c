"""params.yaml -> typed, validated config objects, one dataclass per section.

    from stl.config import load_config
    cfg = load_config("params.yaml")        # raises ConfigError naming the key on any problem

Every stage loads the whole file through :func:`load_config` before it does any work, so a typo, a wrong type,
an out-of-range value or an unknown model name is one clear error, whichever stage meets it first. Library
functions never receive the whole config: stages hand them a section or explicit values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params.yaml problem; the message names the file, the key and what is allowed."""


def _spec(
    default: Any,
    *,
    choices: tuple | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    help: str = "",
) -> Any:
    """A dataclass field with validation metadata (allowed values, closed/open range) and a one-line help."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)


@dataclass
class DataConfig:
    source: str = _spec(
        "digits", help="digits | http(s) URL of a zip/tar archive | local archive | local folder"
    )
    sha256: str = _spec("", help="sha256 of the archive; required for URLs")
    digits_size: int = _spec(32, lo=8, hi=512, help="side in px of the rendered digits images")


@dataclass
class SplitConfig:
    train: float = _spec(0.7, lo=0.0, hi=1.0, lo_open=True, help="fraction of each class for training")
    val: float = _spec(0.15, lo=0.0, hi=1.0, lo_open=True, help="fraction for validation (best checkpoint)")
    test: float = _spec(0.15, lo=0.0, hi=1.0, lo_open=True, help="fraction for the final test metrics")
    max_per_class: int = _spec(0, lo=0, hi=10**9, help="use at most this many images per class; 0 = all")


@dataclass
class TrainConfig:
    nproc_per_node: int = _spec(1, lo=1, hi=1024, help="torchrun processes per machine (GPUs per node)")
    threads: int = _spec(0, lo=0, hi=1024, help="CPU threads per process; 0 = cores / processes")
    img_size: int = _spec(32, lo=16, hi=1024, help="training and evaluation input size (multiple of 16)")
    epochs: int = _spec(30, lo=1, hi=10000, help="student epochs")
    batch_size: int = _spec(64, lo=1, hi=65536, help="images per process per step")
    workers: int = _spec(2, lo=0, hi=128, help="DataLoader workers per process")
    optimizer: str = _spec("adamw", choices=("adamw", "sophiag"), help="adamw (timm) or SophiaG")
    fused_optimizer: bool = _spec(False, help="AdamW as torch's fused kernel (same update, rounding aside)")
    cpu_kernels: bool = _spec(False, help="this project's CPU training kernels (the FAN MLP's depthwise "
                              "block, BatchNorm+GELU, depthwise weight gradients, GELU backward, FAN's "
                              "channel gate, self-attention, residual adds and, in bf16, LayerNorms and "
                              "bias-fused linears with float weight gradients; fp32 or bf16; built on "
                              "first use with a C++ compiler; "
                              "same results, rounding aside)")
    lr: float = _spec(2e-3, lo=0.0, hi=10.0, lo_open=True, help="peak learning rate")
    min_lr: float = _spec(1e-5, lo=0.0, hi=10.0, help="cosine schedule floor")
    warmup_lr: float = _spec(1e-6, lo=0.0, hi=10.0, help="learning rate at the start of warmup")
    warmup_epochs: int = _spec(2, lo=0, hi=10000, help="linear warmup epochs")
    weight_decay: float = _spec(0.05, lo=0.0, hi=10.0, help="decoupled weight decay (not on norms, biases)")
    sophia_rho: float = _spec(0.04, lo=0.0, hi=10.0, lo_open=True, help="SophiaG clipping rho")
    sophia_hessian_interval: int = _spec(10, lo=1, hi=100000, help="steps between SophiaG Hessian updates")
    clip_grad: float = _spec(0.0, lo=0.0, hi=1e6, help="max gradient norm; 0 = off")
    drop_path: float = _spec(0.05, lo=0.0, hi=1.0, help="stochastic depth rate of every FAN block")
    smoothing: float = _spec(0.1, lo=0.0, hi=1.0, help="label smoothing of the class label")
    mixup: float = _spec(0.8, lo=0.0, hi=100.0, help="Mixup alpha; 0 = off")
    cutmix: float = _spec(1.0, lo=0.0, hi=100.0, help="CutMix alpha; 0 = off")
    mixup_prob: float = _spec(1.0, lo=0.0, hi=1.0, help="probability of mixing a batch")
    mixup_switch_prob: float = _spec(0.5, lo=0.0, hi=1.0, help="probability of CutMix instead of Mixup")
    auto_augment: str = _spec("rand-m9-mstd0.5-inc1", help="timm RandAugment string; empty = off")
    reprob: float = _spec(0.25, lo=0.0, hi=1.0, help="random erasing probability")
    scale_min: float = _spec(0.08, lo=0.0, hi=1.0, lo_open=True, help="smallest random-resized-crop area")
    hflip: float = _spec(0.5, lo=0.0, hi=1.0, help="horizontal flip probability")
    amp: str = _spec("none", choices=("none", "bf16", "fp16"), help="autocast dtype (fp16 only on CUDA)")
    ema: bool = _spec(True, help="keep an EMA of the weights and validate it too")
    ema_decay: float = _spec(0.999, lo=0.0, hi=1.0, help="EMA decay per step")
    channels_last: bool = _spec(False, help="channels_last memory format (faster convs on GPU)")
    compile: bool = _spec(False, help="torch.compile the model")
    grad_checkpointing: bool = _spec(False, help="trade compute for memory")
    pretrained: str = _spec("", help="published or project checkpoint to fine-tune from; empty = scratch")
    pretrained_ema: bool = _spec(False, help="take the EMA weights of the pretrained checkpoint")


@dataclass
class StlConfig:
    enabled: bool = _spec(True, help="train a token labeler, then the student on its token labels")
    labeler: str = _spec("", help="published token-labeler checkpoint to import; empty = train one")
    labeler_epochs: int = _spec(30, lo=1, hi=10000, help="phase-1 epochs when the labeler is trained")
    aux_weight: float = _spec(1.0, lo=0.0, hi=100.0, help="phase 1: weight of the token-averaged aux loss")
    cls_weight: float = _spec(1.0, lo=0.0, hi=100.0, help="phase 2: weight of the class loss")
    dense_weight: float = _spec(1.0, lo=0.0, hi=100.0, help="phase 2: weight of the mean token loss")
    token_label: str = _spec(
        "gumbel", choices=("gumbel", "argmax", "soft"), help="how token labels are drawn"
    )
    gumbel_tau: float = _spec(
        1.0, lo=0.0, hi=100.0, lo_open=True,
        help="temperature of soft token labels (softmax(logits / tau)); hard samples ignore it",
    )
    token_smoothing: float = _spec(0.1, lo=0.0, hi=1.0, help="label smoothing of the token labels")
    grid_mismatch: str = _spec(
        "resample",
        choices=("resample", "error"),
        help="labeler and student token grids differ: resample or refuse",
    )


@dataclass
class RobustnessConfig:
    enabled: bool = _spec(True, help="evaluate the test split under ImageNet-C style corruptions")
    corruptions: list = _spec(list(CORRUPTIONS), choices=CORRUPTIONS, help="corruption types")
    severities: list = _spec([1, 2, 3, 4, 5], choices=(1, 2, 3, 4, 5), help="severities 1..5")
    max_samples: int = _spec(200, lo=0, hi=10**9, help="test images per corruption; 0 = all")


@dataclass
class EvaluateConfig:
    batch_size: int = _spec(128, lo=1, hi=65536, help="evaluation batch size per process")
    fused_weight: float = _spec(0.5, lo=0.0, hi=100.0, help="token models: cls + w * max over tokens of aux")
    token_maps: int = _spec(
        4, lo=0, hi=100, help="test images whose token-label maps are kept (token models)"
    )
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)


@dataclass
class ReportConfig:
    samples: int = _spec(16, lo=0, hi=1000, help="sample test predictions shown in the report")


@dataclass
class MlflowConfig:
    tracking_uri: str = _spec("", help="empty = sqlite:///<project>/mlflow.db; MLFLOW_TRACKING_URI wins")
    experiment: str = _spec("stl", help="MLflow experiment name")


@dataclass
class Config:
    seed: int = _spec(0, lo=0, hi=2**31 - 1, help="seed of the split, initialisation and augmentation")
    model: str = _spec("fan_tiny_hybrid", help="registered model name or alias (see README)")
    device: str = _spec("auto", choices=("auto", "cpu", "cuda"), help="auto = CUDA when available")
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stl: StlConfig = field(default_factory=StlConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    @property
    def model_name(self) -> str:
        """The official name of the student: the `*_token` variant of `model` when STL is on."""
        from stl.models import resolve_model_name, token_variant

        name = resolve_model_name(self.model)
        return (token_variant(name) or name) if self.stl.enabled else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Type-check (ints are accepted for floats), then range and choices; return the normalised value."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 (PyYAML, dvc -S) reads 1e-5 as a string
        try:
            parsed = float(value)
        except ValueError:
            pass
        else:
            value = parsed if math.isfinite(parsed) else value
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if meta.get("choices") is not None:
            bad = [v for v in value if v not in meta["choices"]]
            if bad:
                raise ConfigError(f"{key}: unknown value(s) {bad}; allowed: {list(meta['choices'])}")
        return value
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(
            f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, meta['choices']))}"
        )
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        rel = ">" if meta.get("lo_open") else ">="
        raise ConfigError(
            f"{key}: {value!r} is out of range; must be {rel} {lo}" + (f" and <= {hi}" if hi else "")
        )
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is out of range; must be <= {hi}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=3)
        hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
        raise ConfigError(f"unknown key {prefix}{k}{hint}; allowed keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        tp = hints[name]
        if isinstance(tp, types.GenericAlias):
            tp = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw.get(name), f"{prefix}{name}.")
        elif name in raw:
            values[name] = _check_value(prefix + name, raw[name], tp, dict(f.metadata))
    return cls(**values)


def _check_cross(cfg: Config) -> None:
    """Constraints between keys, checked before any work starts."""
    total = cfg.split.train + cfg.split.val + cfg.split.test
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"split.train + split.val + split.test must be 1.0, got {total:g}")
    if 0 < cfg.split.max_per_class < 3:
        raise ConfigError(
            f"split.max_per_class: {cfg.split.max_per_class} leaves no image for some split; "
            "use 0 (all images) or at least 3"
        )
    if cfg.train.img_size % 16:
        raise ConfigError(f"train.img_size: {cfg.train.img_size} must be a multiple of 16 (the FAN stride)")
    if cfg.data.source.startswith(("http://", "https://")) and not cfg.data.sha256:
        raise ConfigError("data.sha256 is required when data.source is a URL: put the archive's sha256 there")
    if cfg.stl.enabled and cfg.train.auto_augment and not cfg.train.auto_augment.startswith("rand"):
        raise ConfigError(
            f"train.auto_augment: {cfg.train.auto_augment!r}: the STL student's paired views support timm "
            "RandAugment strings ('rand-m9-mstd0.5-inc1') or '' (off)"
        )
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr ({cfg.train.min_lr:g}) must not exceed train.lr ({cfg.train.lr:g})")
    from stl.models import is_token_model, resolve_model_name, token_variant

    try:
        name = resolve_model_name(cfg.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.stl.enabled and token_variant(name) is None:
        raise ConfigError(
            f"model: {cfg.model!r} ({name}) has no token-labeling variant; STL needs a FAN-Hybrid model "
            "(fan_tiny_hybrid, fan_small_hybrid, fan_base_hybrid, fan_large_hybrid) or set stl.enabled: false"
        )
    if not cfg.stl.enabled and is_token_model(name):
        raise ConfigError(
            f"model: {cfg.model!r} ({name}) is a token model, but stl.enabled is false: its aux_head would "
            f"stay untrained and still count in the fused prediction. Use {name.removesuffix('_token')!r} "
            "(or enable STL, which picks the token variant itself)"
        )


def load_config(path: str | Path = "params.yaml", overrides: dict | None = None) -> Config:
    """Read and validate params.yaml (plus optional dotted-key overrides, used by tests)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file; run from the project root or pass its path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = _build(Config, raw, "")
        _check_cross(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.002, ...}``: the form MLflow params and the report table use."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(to_flat_dict(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out


def settings_key(cfg: Config) -> str:
    """A short hash of every setting: an interrupted stage's MLflow run is reopened only with the same."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(to_flat_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, help) for every key: the README's params table is generated from this."""
    rows: list[tuple[str, Any, str]] = []
    default = cls()
    for f in dataclasses.fields(cls):
        v = getattr(default, f.name)
        if dataclasses.is_dataclass(v):
            rows.extend(describe_keys(type(v), f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, v, f.metadata.get("help", "")))
    return rows
