"""FAN-ViT, FAN-Hybrid (incl. Xlarge) and the STL ``*_token`` models: one ``FAN`` class, registered in timm.

``import stl.models`` registers every name below with timm 1.0 (``register_model`` +
``generate_default_cfgs`` + ``build_model_with_cfg``), so ``timm.create_model(name, num_classes=K,
drop_path_rate=p, img_size=S)`` works. ``*_token`` models return ``(cls_logits [B,K], aux_logits [B,N,K])`` in
train and eval mode; the others return ``cls_logits``. Published weights are read by
``stl.models.load_checkpoint`` (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .convnext_stem import HybridEmbed
from .layers import (
    ClassAttentionBlock,
    ConvPatchEmbed,
    FANBlock,
    FANBlockSE,
    OverlapPatchEmbed,
    PositionalEncodingFourier,
    checkpoint_block,
    init_fan_weights,
)

__all__ = ["FAN", "FAN_MODEL_ARGS"]


class FAN(nn.Module):
    """Fully Attentional Network with class-attention head (and optional per-token ``aux_head``).

    Args:
        embed_dim: token dim of the first block; ``channel_dims`` gives one dim per block when it changes
            (an OverlapPatchEmbed after block i where dims i and i+1 differ, as in FAN-Xlarge).
        num_heads: an int or one per block; the class-attention blocks use the last.
        hybrid_depths: ConvNeXt stage depths of the hybrid stem (None: the /16 conv stem of FAN-ViT);
            ``hybrid_dims`` their widths.
        drop_path_rate: the same rate in every FAN block (no linear ramp); none in class attention or stem.
        return_dense: add ``aux_head`` on the patch tokens and return ``(cls_logits, aux_logits)``.
        img_size: only the nominal size (any size divisible by the stride works).
        drop_rate: timm 1.0 meaning, dropout before the heads; ``proj_drop_rate`` is the in-block dropout
            (the reference's ``drop_rate``), ``pos_drop_rate`` the dropout after the positional encoding.

    Gradient checkpointing (``set_grad_checkpointing``) recomputes each FAN block in backward; the BatchNorm
    running statistics of a recomputed block are then updated twice per step (as for any BN model in timm).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        channel_dims: Sequence[int] | None = None,
        num_heads: int | Sequence[int] = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        se_mlp: bool = False,
        cls_attn_layers: int = 2,
        eta: float = 1.0,
        tokens_norm: bool = True,
        hybrid_depths: Sequence[int] | None = None,
        hybrid_dims: Sequence[int] = (128, 256),
        hybrid_patch_size: int = 2,
        head_init_scale: float = 1.0,
        return_dense: bool = False,
    ):
        super().__init__()
        if global_pool not in ("token", ""):
            raise ValueError(
                f"FAN pools with its class token: global_pool must be 'token', got {global_pool!r}"
            )
        if hybrid_depths is None and patch_size != 16:
            raise ValueError(f"the FAN-ViT conv stem has stride 16; patch_size={patch_size} is not supported")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.return_dense = return_dense
        self.grad_checkpointing = False
        self.img_size = img_size
        channel_dims = list(channel_dims) if channel_dims is not None else [embed_dim] * depth
        if len(channel_dims) != depth:
            raise ValueError(f"channel_dims has {len(channel_dims)} entries for depth {depth}")
        heads = [num_heads] * depth if isinstance(num_heads, int) else list(num_heads)
        if len(heads) != depth:
            raise ValueError(f"num_heads has {len(heads)} entries for depth {depth}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        if hybrid_depths is None:
            self.patch_embed: nn.Module = ConvPatchEmbed(channel_dims[0], in_chans)
        else:
            self.patch_embed = HybridEmbed(
                hybrid_depths, channel_dims[0], in_chans, hybrid_patch_size, dims=hybrid_dims
            )
        self.patch_size = self.patch_embed.patch_size
        self.pos_embed = PositionalEncodingFourier(dim=channel_dims[0])
        self.pos_drop = nn.Dropout(pos_drop_rate)

        block_cls = FANBlockSE if se_mlp else FANBlock
        blocks = []
        for i in range(depth):
            downsample = None
            if i < depth - 1 and channel_dims[i] != channel_dims[i + 1]:
                if se_mlp:
                    raise ValueError("changing channel dims is not supported with se_mlp")
                downsample = OverlapPatchEmbed(channel_dims[i], channel_dims[i + 1])
                self.patch_size *= 2
            blocks.append(
                block_cls(
                    channel_dims[i],
                    heads[i],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path_rate,
                    norm_layer=norm_layer,
                    eta=eta,
                    downsample=downsample,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.num_features = self.head_hidden_size = self.embed_dim = channel_dims[-1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.num_features))
        self.cls_attn_blocks = nn.ModuleList(
            [
                ClassAttentionBlock(
                    self.num_features,
                    heads[-1],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    norm_layer=norm_layer,
                    eta=eta,
                    tokens_norm=tokens_norm,
                )
                for _ in range(cls_attn_layers)
            ]
        )
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if return_dense:
            self.aux_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_fan_weights)
        self.head_init_scale = head_init_scale
        self._scale_head()

    def _scale_head(self) -> None:
        """The published initialisation: the cls head's weights shrunk by ``head_init_scale`` (0.001 for
        ``fan_large_16_p4_hybrid``), at construction and for every new head."""
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    # timm conventions -------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Exact parameter names kept out of weight decay (1-D params are excluded by the optimizer)."""
        return {"cls_token", "pos_embed.token_projection.weight", "pos_embed.token_projection.bias"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem, each FAN block, then class attention + norm."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=r"^blocks\.(\d+)",
            cls_attn_blocks=[(r"^cls_attn_blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute FAN blocks in backward to save activation memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``head`` (and ``aux_head`` for token models) for ``num_classes`` (0: features only)."""
        if global_pool is not None and global_pool not in ("token", ""):
            raise ValueError(
                f"FAN pools with its class token: global_pool must be 'token', got {global_pool!r}"
            )
        self.num_classes = num_classes
        where = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        self.head = nn.Linear(self.num_features, num_classes, **where) if num_classes > 0 else nn.Identity()
        init_fan_weights(self.head)
        self._scale_head()
        if self.return_dense:
            self.aux_head = (
                nn.Linear(self.num_features, num_classes, **where) if num_classes > 0 else nn.Identity()
            )
            init_fan_weights(self.aux_head)

    # forward ----------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> normalised tokens ``[B, 1 + N, C]`` (class token first)."""
        x = self._tokens(x)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> the class-attention blocks' input, ``[B, 1 + N, C]``."""
        x, (H, W) = self.patch_embed(x)
        x = self.pos_drop(x + self.pos_embed(H, W))
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x, H, W = checkpoint_block(blk, x, H, W)
            else:
                x, H, W = blk(x, H, W)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def _forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features(x)[:, :1]``, bit for bit, without the last class-attention block's and the final
        norm's work on the patch tokens, which only the token models' aux head reads."""
        x = self._tokens(x)
        *blocks, last = self.cls_attn_blocks
        for blk in blocks:
            x = blk(x)
        return self.norm(last(x, cls_only=True))

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> ``cls_logits`` (token models: ``(cls_logits, aux_logits)``); pre_logits: cls features."""
        cls = self.head_drop(x[:, 0])
        if pre_logits:
            return cls
        if self.return_dense:
            return self.head(cls), self.aux_head(x[:, 1:])
        return self.head(cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``forward_head(forward_features(x))``. Models without the token head run their last class-attention
        block and the final norm on the class token alone (hooks on them see [B, 1, C]); same results."""
        if self.return_dense or not len(self.cls_attn_blocks):
            return self.forward_head(self.forward_features(x))
        return self.forward_head(self._forward_cls(x))


# registry ---------------------------------------------------------------------------------------------------

_VIT = dict(patch_size=16, eta=1.0, tokens_norm=True)
_HYBRID = dict(hybrid_depths=(3, 3), eta=1.0, tokens_norm=True)

#: Architecture arguments of every registered FAN name (the only place sizes are defined).
FAN_MODEL_ARGS: dict[str, dict[str, Any]] = {
    "fan_tiny_12_p16_224": dict(_VIT, embed_dim=192, depth=12, num_heads=4),
    "fan_small_12_p16_224": dict(_VIT, embed_dim=384, depth=12, num_heads=8),
    "fan_small_12_p16_224_se_attn": dict(_VIT, embed_dim=384, depth=12, num_heads=8, se_mlp=True),
    "fan_base_18_p16_224": dict(_VIT, embed_dim=448, depth=18, num_heads=8),
    "fan_large_24_p16_224": dict(_VIT, embed_dim=480, depth=24, num_heads=10),
    "fan_tiny_8_p4_hybrid": dict(_HYBRID, embed_dim=192, depth=8, num_heads=8),
    "fan_small_12_p4_hybrid": dict(_HYBRID, embed_dim=384, depth=10, num_heads=8),
    "fan_base_16_p4_hybrid": dict(_HYBRID, embed_dim=448, depth=16, num_heads=8),
    "fan_large_16_p4_hybrid": dict(
        _HYBRID, hybrid_depths=(3, 5), embed_dim=480, depth=22, num_heads=10, head_init_scale=0.001
    ),
    "fan_Xlarge_16_p4_hybrid": dict(
        _HYBRID,
        hybrid_depths=(3, 7),
        embed_dim=528,
        depth=23,
        channel_dims=[528] * 20 + [768] * 3,
        num_heads=[11] * 20 + [16] * 3,
    ),
    "fan_tiny_8_p4_hybrid_token": dict(_HYBRID, embed_dim=192, depth=8, num_heads=8, return_dense=True),
    "fan_small_12_p4_hybrid_token": dict(_HYBRID, embed_dim=384, depth=10, num_heads=8, return_dense=True),
    "fan_base_16_p4_hybrid_token": dict(_HYBRID, embed_dim=448, depth=16, num_heads=8, return_dense=True),
    # the reference's token-large has no head_init_scale
    "fan_large_16_p4_hybrid_token": dict(
        _HYBRID, hybrid_depths=(3, 5), embed_dim=480, depth=22, num_heads=10, return_dense=True
    ),
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0.0",
        "classifier": "head",
        "license": "nvidia-source-code-license-nc",
        "paper_ids": "arXiv:2204.12451",
        **kwargs,
    }


_HYBRID_CFG = dict(first_conv="patch_embed.backbone.stem.0")
default_cfgs = generate_default_cfgs(
    {
        name: _cfg(
            **(_HYBRID_CFG if "hybrid" in name else {}),
            **(dict(classifier=("head", "aux_head")) if args.get("return_dense") else {}),
        )
        for name, args in FAN_MODEL_ARGS.items()
    }
)


def _create_fan(variant: str, pretrained: bool = False, **kwargs: Any) -> FAN:
    if pretrained:
        raise RuntimeError(
            f"{variant}: pretrained=True cannot download weights here. Create the model with "
            "pretrained=False and read a published checkpoint with stl.models.load_checkpoint(model, path)."
        )
    model_args = dict(FAN_MODEL_ARGS[variant])
    # the hybrids derive the stem from hybrid_depths; a nominal patch_size from timm is ignored
    if model_args.get("hybrid_depths") is not None:
        kwargs.pop("patch_size", None)
    return build_model_with_cfg(FAN, variant, pretrained, **dict(model_args, **kwargs))


@register_model
def fan_tiny_12_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-ViT tiny: 12 blocks, dim 192, 4 heads (7.32M params)."""
    return _create_fan("fan_tiny_12_p16_224", pretrained, **kwargs)


@register_model
def fan_small_12_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-ViT small: 12 blocks, dim 384, 8 heads (28.35M)."""
    return _create_fan("fan_small_12_p16_224", pretrained, **kwargs)


@register_model
def fan_small_12_p16_224_se_attn(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-ViT small with squeeze-excite MLPs instead of channel attention (27.45M)."""
    return _create_fan("fan_small_12_p16_224_se_attn", pretrained, **kwargs)


@register_model
def fan_base_18_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-ViT base: 18 blocks, dim 448, 8 heads (54.35M)."""
    return _create_fan("fan_base_18_p16_224", pretrained, **kwargs)


@register_model
def fan_large_24_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-ViT large: 24 blocks, dim 480, 10 heads (80.57M)."""
    return _create_fan("fan_large_24_p16_224", pretrained, **kwargs)


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-Hybrid tiny: ConvNeXt [3,3] stem, 8 blocks, dim 192, 8 heads (7.47M)."""
    return _create_fan("fan_tiny_8_p4_hybrid", pretrained, **kwargs)


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-Hybrid small: ConvNeXt [3,3] stem, 10 blocks, dim 384, 8 heads (26.12M)."""
    return _create_fan("fan_small_12_p4_hybrid", pretrained, **kwargs)


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-Hybrid base: ConvNeXt [3,3] stem, 16 blocks, dim 448, 8 heads (50.48M)."""
    return _create_fan("fan_base_16_p4_hybrid", pretrained, **kwargs)


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-Hybrid large: ConvNeXt [3,5] stem, 22 blocks, dim 480, 10 heads (76.86M)."""
    return _create_fan("fan_large_16_p4_hybrid", pretrained, **kwargs)


@register_model
def fan_Xlarge_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:  # noqa: N802 (published name)
    """FAN-Hybrid xlarge: ConvNeXt [3,7] stem, 20 blocks at 528 then 3 at 768 (120.41M)."""
    return _create_fan("fan_Xlarge_16_p4_hybrid", pretrained, **kwargs)


@register_model
def fan_tiny_8_p4_hybrid_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    """STL token model on FAN-Hybrid tiny: returns (cls_logits, aux_logits) (7.66M)."""
    return _create_fan("fan_tiny_8_p4_hybrid_token", pretrained, **kwargs)


@register_model
def fan_small_12_p4_hybrid_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    """STL token model on FAN-Hybrid small (26.50M)."""
    return _create_fan("fan_small_12_p4_hybrid_token", pretrained, **kwargs)


@register_model
def fan_base_16_p4_hybrid_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    """STL token model on FAN-Hybrid base (50.92M)."""
    return _create_fan("fan_base_16_p4_hybrid_token", pretrained, **kwargs)


@register_model
def fan_large_16_p4_hybrid_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    """STL token model on FAN-Hybrid large (77.34M)."""
    return _create_fan("fan_large_16_p4_hybrid_token", pretrained, **kwargs)
