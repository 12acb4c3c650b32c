"""FAN models: importing this package registers every FAN / FAN-Hybrid / STL token / FAN-Swin name with timm.

Typical use (the labeler checkpoint's 1000-class heads are dropped for a 5-class model)::

    name = resolve_model_name("fan_tiny_hybrid_token")   # -> "fan_tiny_8_p4_hybrid_token"
    model = timm.create_model(name, num_classes=5)
    load_checkpoint(model, "fan_tiny_tl.pth.tar", use_ema=True)
"""

from . import fan, fan_swin  # noqa: F401  (registration side effect)
from .checkpoint import load_checkpoint, read_checkpoint
from .cpu_kernels import use_cpu_kernels
from .fan import FAN
from .layers import fused_backward
from .outputs import FUSED_WEIGHT, fused_logits, prediction_logits, split_outputs, token_grid
from .registry import (
    MODEL_ALIASES,
    is_token_model,
    list_models,
    models_markdown_table,
    resolve_model_name,
    token_variant,
)
from .trained import CheckpointError, export_model, load_trained_model

__all__ = [
    "FAN",
    "FUSED_WEIGHT",
    "CheckpointError",
    "MODEL_ALIASES",
    "export_model",
    "fused_backward",
    "fused_logits",
    "is_token_model",
    "list_models",
    "load_checkpoint",
    "load_trained_model",
    "models_markdown_table",
    "prediction_logits",
    "read_checkpoint",
    "resolve_model_name",
    "split_outputs",
    "token_grid",
    "token_variant",
    "use_cpu_kernels",
]
