"""Reading published FAN / STL checkpoints (timm-0.5-style ``.pth.tar``) and the project's own into a model.

The published files pickle an ``argparse.Namespace`` under ``args``. They are read with
``torch.load(weights_only=True)`` and exactly that one class allow-listed: anything else a pickle tries to
construct is refused (no fallback to unsafe unpickling). Key fixes of the reference's filter are applied
(``module.`` prefixes, ``pos_embeder.`` -> ``pos_embed.``, fused class-attention ``qkv`` split into q/k/v).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_checkpoint", "read_checkpoint"]

_logger = logging.getLogger(__name__)

_STATE_KEYS = ("state_dict", "model", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_HEAD_RE = re.compile(r"^(head|aux_head)\.")
_FUSED_QKV_RE = re.compile(r"^(cls_attn_blocks\.\d+\.attn)\.qkv\.(weight|bias)$")
# buffers a model rebuilds from its geometry and replaces on load (FAN-Swin): never missing or mis-shaped
_GEOMETRY_RE = re.compile(r"(^|\.)(attn_mask|relative_position_index)$")


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file safely (tensors, containers, primitives and argparse.Namespace only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (check the path or the model key in params.yaml)"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to load: the file pickles objects other than tensors and argparse.Namespace, "
            f"so it is not a plain checkpoint. Only load files you trust; details: {err}"
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _select_state_dict(ckpt: Any, use_ema: bool, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if use_ema:
        for key in ("state_dict_ema", "ema"):  # published files; this project's training checkpoints
            if _is_state_dict(ckpt.get(key)):
                return dict(ckpt[key]), key
        if ckpt.get("source") == "ema" and _is_state_dict(ckpt.get("state_dict")):  # an exported model.pt
            return dict(ckpt["state_dict"]), "state_dict"
        raise ValueError(
            f"{path}: use_ema=True but the file holds no EMA weights ('state_dict_ema', 'ema', or a model "
            f"file exported from its EMA; top-level keys: {sorted(ckpt)}); load it with use_ema=False "
            "(train.pretrained_ema: false) to take the weights it has"
        )
    for key in _STATE_KEYS:
        if _is_state_dict(ckpt.get(key)):
            return dict(ckpt[key]), key
    if _is_state_dict(ckpt):
        return dict(ckpt), None
    raise ValueError(
        f"{path}: no state dict found: expected one of {list(_STATE_KEYS)} or a bare state_dict, "
        f"got top-level keys {sorted(ckpt)[:20]}"
    )


def _clean_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, rename pos_embeder, split fused class-attention qkv."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if key.startswith("pos_embeder."):
            key = "pos_embed." + key[len("pos_embeder.") :]
        match = _FUSED_QKV_RE.match(key)
        if match and f"{match[1]}.q.{match[2]}" in model_keys:
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{match[1]}.{name}.{match[2]}"] = part.clone()
            continue
        out[key] = value
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DistributedDataParallel / DataParallel wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    use_ema: bool = False,
    strict: bool = True,
    *,
    drop_mismatched_heads: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint file into ``model`` (in place) and report what happened.

    Classifier weights (``head.*``, ``aux_head.*``) that do not fit the model (fine-tuning to K classes, a
    token checkpoint into a plain model or the reverse) are dropped and the model keeps its freshly
    initialised head; they are logged and listed. Any other missing, unexpected or mis-shaped key raises
    ValueError when ``strict`` (and is only reported otherwise). ``drop_mismatched_heads=False`` treats heads
    like any other key (use it when evaluating, where a head mismatch is a bug).

    Returns a dict: path, source_key (which entry of the file held the weights), loaded (count), dropped,
    initialised (model keys left as initialised), missing, unexpected, mismatched, and the file's epoch, arch,
    metric and args (a plain dict) when present.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    state, source_key = _select_state_dict(ckpt, use_ema, path)
    model = _unwrap(model)
    model_state = model.state_dict()
    state = _clean_keys(state, set(model_state))

    dropped: list[str] = []
    mismatched: list[str] = []
    unexpected: list[str] = []
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        is_head = drop_mismatched_heads and bool(_HEAD_RE.match(key))
        if _GEOMETRY_RE.search(key):
            to_load[key] = value  # the owning module keeps (or drops) its own; see _GEOMETRY_RE
        elif key not in model_state:
            (dropped if is_head else unexpected).append(key)
        elif tuple(value.shape) != tuple(model_state[key].shape):
            if is_head:
                dropped.append(key)
            else:
                mismatched.append(
                    f"{key}: file {tuple(value.shape)} vs model {tuple(model_state[key].shape)}"
                )
        else:
            to_load[key] = value
    not_loaded = [k for k in model_state if k not in to_load and not _GEOMETRY_RE.search(k)]
    initialised = [k for k in not_loaded if drop_mismatched_heads and _HEAD_RE.match(k)]
    missing = [k for k in not_loaded if k not in initialised]

    if strict and (missing or unexpected or mismatched):
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                parts.append(f"{label}: {shown}")
        raise ValueError(
            f"{path} does not fit {type(model).__name__} (source {source_key or 'bare state_dict'}): "
            + "; ".join(parts)
            + ". Check that the model name matches the checkpoint, or pass strict=False."
        )

    model.load_state_dict(to_load, strict=False)
    if dropped or initialised:
        _logger.warning(
            "%s: classifier weights not loaded (dropped from file: %s; kept initialised in model: %s)",
            path,
            ", ".join(dropped) or "none",
            ", ".join(initialised) or "none",
        )
    if not strict and (missing or unexpected or mismatched):
        _logger.warning(
            "%s: non-strict load: missing %d, unexpected %d, wrong shape %d keys",
            path,
            len(missing),
            len(unexpected),
            len(mismatched),
        )

    info: dict[str, Any] = {
        "path": str(path),
        "source_key": source_key,
        "loaded": len(to_load),
        "dropped": dropped,
        "initialised": initialised,
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
    }
    if isinstance(ckpt, Mapping) and source_key is not None:
        for key in ("epoch", "arch", "metric"):
            if key in ckpt and not isinstance(ckpt[key], torch.Tensor | Mapping):
                info[key] = ckpt[key]
        args = ckpt.get("args")
        if isinstance(args, argparse.Namespace):
            info["args"] = dict(vars(args))
        elif isinstance(args, Mapping):
            info["args"] = dict(args)
    return info
