"""The model table: official (published) names, short aliases, sizes and what each model returns.

params.yaml's ``model`` key and the CLI take either form; ``resolve_model_name`` turns it into the official
name that ``timm.create_model`` knows (after ``import stl.models``). This module imports no model code, so
the config layer can validate a name cheaply.
"""

from __future__ import annotations

import difflib

from torch import nn

__all__ = [
    "MODEL_ALIASES",
    "is_token_model",
    "list_models",
    "models_markdown_table",
    "resolve_model_name",
    "token_variant",
]

#: Short alias -> official name. The single source of the alias table (README, CLI, params.yaml).
MODEL_ALIASES: dict[str, str] = {
    "fan_tiny_vit": "fan_tiny_12_p16_224",
    "fan_small_vit": "fan_small_12_p16_224",
    "fan_small_vit_se": "fan_small_12_p16_224_se_attn",
    "fan_base_vit": "fan_base_18_p16_224",
    "fan_large_vit": "fan_large_24_p16_224",
    "fan_tiny_hybrid": "fan_tiny_8_p4_hybrid",
    "fan_small_hybrid": "fan_small_12_p4_hybrid",
    "fan_base_hybrid": "fan_base_16_p4_hybrid",
    "fan_large_hybrid": "fan_large_16_p4_hybrid",
    "fan_xlarge_hybrid": "fan_Xlarge_16_p4_hybrid",
    "fan_tiny_hybrid_token": "fan_tiny_8_p4_hybrid_token",
    "fan_small_hybrid_token": "fan_small_12_p4_hybrid_token",
    "fan_base_hybrid_token": "fan_base_16_p4_hybrid_token",
    "fan_large_hybrid_token": "fan_large_16_p4_hybrid_token",
    "fan_swin_tiny": "fan_swin_tiny_patch4_window7_224",
    "fan_swin_small": "fan_swin_small_patch4_window7_224",
    "fan_swin_base": "fan_swin_base_patch4_window7_224",
    "fan_swin_large": "fan_swin_large_patch4_window7_224",
}

# official name -> (family, parameter count with 1000 classes); counts are checked against the models in tests
_MODELS: dict[str, tuple[str, int]] = {
    "fan_tiny_12_p16_224": ("FAN-ViT", 7_319_920),
    "fan_small_12_p16_224": ("FAN-ViT", 28_345_336),
    "fan_small_12_p16_224_se_attn": ("FAN-ViT (SE MLP)", 27_452_440),
    "fan_base_18_p16_224": ("FAN-ViT", 54_350_320),
    "fan_large_24_p16_224": ("FAN-ViT", 80_574_100),
    "fan_tiny_8_p4_hybrid": ("FAN-Hybrid", 7_467_240),
    "fan_small_12_p4_hybrid": ("FAN-Hybrid", 26_117_944),
    "fan_base_16_p4_hybrid": ("FAN-Hybrid", 50_475_048),
    "fan_large_16_p4_hybrid": ("FAN-Hybrid", 76_855_140),
    "fan_Xlarge_16_p4_hybrid": ("FAN-Hybrid", 120_407_316),
    "fan_tiny_8_p4_hybrid_token": ("FAN-Hybrid + STL token head", 7_660_240),
    "fan_small_12_p4_hybrid_token": ("FAN-Hybrid + STL token head", 26_502_944),
    "fan_base_16_p4_hybrid_token": ("FAN-Hybrid + STL token head", 50_924_048),
    "fan_large_16_p4_hybrid_token": ("FAN-Hybrid + STL token head", 77_336_140),
    "fan_swin_tiny_patch4_window7_224": ("FAN-Swin", 29_538_940),
    "fan_swin_small_patch4_window7_224": ("FAN-Swin", 53_064_220),
    "fan_swin_base_patch4_window7_224": ("FAN-Swin", 93_599_448),
    "fan_swin_large_patch4_window7_224": ("FAN-Swin", 208_941_136),
}

_TOKEN_SUFFIX = "_token"
_RETURNS_TOKEN = "(cls_logits [B,K], aux_logits [B,N,K])"
_RETURNS_PLAIN = "cls_logits [B,K]"
_ALIAS_OF = {official: alias for alias, official in MODEL_ALIASES.items()}
_BY_LOWER = {name.lower(): name for name in (*_MODELS, *MODEL_ALIASES)}


def resolve_model_name(name_or_alias: str) -> str:
    """Official model name for an official name or alias (case-insensitive); ValueError with suggestions."""
    if not isinstance(name_or_alias, str) or not name_or_alias.strip():
        raise ValueError(f"model name must be a non-empty string, got {name_or_alias!r}")
    key = name_or_alias.strip()
    found = _BY_LOWER.get(key.lower())
    if found is None:
        close = difflib.get_close_matches(key.lower(), list(_BY_LOWER), n=5, cutoff=0.5)
        hint = ", ".join(_BY_LOWER[c] for c in close) if close else ", ".join(MODEL_ALIASES)
        raise ValueError(
            f"unknown model {name_or_alias!r}; closest names: {hint}. "
            "See stl.models.list_models() for every name and alias."
        )
    return MODEL_ALIASES.get(found, found)


def is_token_model(name_or_model: str | nn.Module) -> bool:
    """True when the model returns (cls_logits, aux_logits): a ``*_token`` name/alias or such a module."""
    if isinstance(name_or_model, nn.Module):
        return bool(getattr(name_or_model, "return_dense", False))
    return resolve_model_name(name_or_model).endswith(_TOKEN_SUFFIX)


def token_variant(name: str) -> str | None:
    """Official name of the ``*_token`` variant of a model (itself if already token; None if none exists).

    STL needs a token model; this lets a user name the plain hybrid and still get the right architecture.
    """
    official = resolve_model_name(name)
    if official.endswith(_TOKEN_SUFFIX):
        return official
    candidate = official + _TOKEN_SUFFIX
    return candidate if candidate in _MODELS else None


def list_models() -> list[dict[str, object]]:
    """One dict per model: name, alias, family, params (1000 classes), returns, token_variant."""
    rows = []
    for name, (family, params) in _MODELS.items():
        rows.append(
            {
                "name": name,
                "alias": _ALIAS_OF.get(name),
                "family": family,
                "params": params,
                "returns": _RETURNS_TOKEN if name.endswith(_TOKEN_SUFFIX) else _RETURNS_PLAIN,
                "token_variant": token_variant(name),
            }
        )
    return rows


def models_markdown_table() -> str:
    """The model/alias table as markdown, for the README and ``stl list-models``."""
    lines = [
        "| alias | official name | family | params (1000 classes) | returns |",
        "|---|---|---|---|---|",
    ]
    for row in list_models():
        lines.append(
            f"| `{row['alias']}` | `{row['name']}` | {row['family']} | "
            f"{row['params'] / 1e6:.2f}M | {row['returns']} |"
        )
    return "\n".join(lines) + "\n"
