"""FAN-Swin: Swin Transformer v1 whose stages 1-3 use FAN channel attention instead of the MLP.

The four ``fan_swin_{tiny,small,base,large}_patch4_window7_224`` models of the FAN paper, registered
with timm. Their ``state_dict`` keys and shapes are those of the reference implementation (Swin "v1" as in
timm 0.5: ``layers.i.blocks.j``, the patch merging at the END of stages 0-2 as ``layers.i.downsample``, a
persistent ``attn.relative_position_index`` in every block and a persistent ``attn_mask`` in shifted blocks),
so weights trained with the reference load with ``strict=True``. Stage 4 keeps the plain MLP
(``mlp.fc1``/``mlp.fc2``).

Differences from the reference, all invisible at the default 224 px:

- Any input size works: the feature maps are padded to whole windows (and to even sizes before patch merging),
  and the window / shift are re-derived from the actual feature size at every call. The window is padded
  before the cyclic shift so the shift mask lines up with the padded grid (timm rolls first, then pads).
- A window smaller than the configured one (feature map smaller than 7) reuses the centre of the same
  (2*7-1)^2 relative-position table instead of building a smaller table, so the weights do not depend on the
  input size. The geometry buffers (``relative_position_index``, ``attn_mask``) are rebuilt, never loaded,
  which lets a checkpoint made at one size load strictly into a model built for another.
- Attention runs through ``scaled_dot_product_attention`` with the relative bias (+ shift mask) as attn_mask.
- timm 1.0 argument meanings: ``drop_rate`` is the head dropout, ``proj_drop_rate`` the in-block dropout.

Tensors between stages are channels-last ``[B, H, W, C]`` (timm 1.0 Swin convention); the FAN channel
attention (``stl.models.layers.ChannelProcessing``) sees ``[B, H*W, C]`` tokens plus H, W.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .layers import ChannelProcessing, GeluMlp, checkpoint_block, head_dim_of, init_fan_weights

__all__ = ["FanSwinTransformer"]

_SHIFT_MASK_VALUE = -100.0  # the reference's additive mask value between shift regions


def _window_and_shift(
    feat_size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per dimension: a feature map no larger than the window is one window, and is not shifted."""
    win = tuple(f if f <= w else w for f, w in zip(feat_size, window, strict=True))
    sft = tuple(0 if f <= w else s for f, w, s in zip(feat_size, window, shift, strict=True))
    return win, sft  # type: ignore[return-value]


def _window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of the window) -> [B * num_windows, wh * ww, C]."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def _window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of ``_window_partition``: [B * num_windows, wh * ww, C] -> [B, H, W, C]."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def _relative_position_index(
    window: tuple[int, int], table_window: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """[wh*ww, wh*ww] indices into a (2*Th-1)*(2*Tw-1) bias table, for a window no larger than the table's.

    For ``window == table_window`` this is the standard Swin index.
    """
    wh, ww = window
    th, tw = table_window
    coords = torch.stack(
        torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ).flatten(1)  # [2, wh*ww]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]: position i minus position j
    return (rel[0] + th - 1) * (2 * tw - 1) + (rel[1] + tw - 1)


def _shift_mask(
    padded_size: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Additive mask [num_windows, N, N] (0 / -100) that keeps shifted windows from mixing wrapped regions."""
    H, W = padded_size
    (wh, ww), (sh, sw) = window, shift
    region = torch.zeros(1, H, W, 1, device=device)
    label = 0
    for hs in (slice(0, H - wh), slice(H - wh, H - sh), slice(H - sh, H)):
        for ws in (slice(0, W - ww), slice(W - ww, W - sw), slice(W - sw, W)):
            region[:, hs, ws, :] = label
            label += 1
    region = _window_partition(region, window).squeeze(-1)  # [num_windows, N]
    diff = region[:, None, :] - region[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, _SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias (Swin v1)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        head_dim_of(dim, num_heads)  # checks the split
        self.num_heads = num_heads
        self.window_size = window_size  # the table's window; smaller windows use the centre of the table
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        # persistent to match the reference key list; overwritten with the own value on load (see below)
        self.register_buffer("relative_position_index", _relative_position_index(window_size, window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # the index is pure geometry: keep our own so strict loading works for any window / table layout
        key = prefix + "relative_position_index"
        if key in state_dict:
            state_dict[key] = self.relative_position_index
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def relative_position_bias(self, window: tuple[int, int]) -> torch.Tensor:
        """The [heads, N, N] bias for a window of the given size (at most the table's window)."""
        if window == self.window_size:
            index = self.relative_position_index
        else:
            index = _relative_position_index(window, self.window_size, self.relative_position_index.device)
        n = window[0] * window[1]
        return self.relative_position_bias_table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(
        self, x: torch.Tensor, window: tuple[int, int], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B * num_windows, N, C] windows; mask: [num_windows, N, N] additive shift mask or None."""
        B_, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias(window).unsqueeze(0)  # [1, h, N, N]
        if mask is not None:
            num_windows = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).unsqueeze(0)  # [1, nW, h, N, N]
            bias = bias.expand(B_ // num_windows, -1, -1, -1, -1).reshape(B_, h, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


class FanSwinBlock(nn.Module):
    """Swin block: (shifted) window attention, then FAN channel attention or a plain MLP.

    ``forward`` takes and returns ``[B, H, W, C]``. The ``attn_mask`` buffer is the shift mask for the build
    resolution (persistent, as in the reference key list); other resolutions compute their mask on the fly.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_resolution: tuple[int, int],
        window_size: int = 7,
        shifted: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        channel_attention: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.target_window = to_2tuple(window_size)
        self.target_shift = (window_size // 2, window_size // 2) if shifted else (0, 0)
        self.channel_attention = channel_attention

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim, num_heads, self.target_window, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if channel_attention:
            # the FAN-Swin reference drops the "+ x" around the DWConv inside the channel MLP
            self.mlp = ChannelProcessing(
                dim, num_heads, qkv_bias=qkv_bias, mlp_hidden_dim=hidden, attn_drop=attn_drop,
                drop=proj_drop, norm_layer=norm_layer, dwconv_residual=False,
            )
        else:
            self.mlp = GeluMlp(dim, hidden, drop=proj_drop)
        self.register_buffer("attn_mask", self._build_mask(input_resolution))

    def _build_mask(self, feat_size: tuple[int, int]) -> torch.Tensor | None:
        window, shift = _window_and_shift(feat_size, self.target_window, self.target_shift)
        if not any(shift):
            return None
        padded = tuple(-(-f // w) * w for f, w in zip(feat_size, window, strict=True))
        return _shift_mask(padded, window, shift)  # type: ignore[arg-type]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # the shift mask is pure geometry of the build size: use our own (or none), whatever was saved
        key = prefix + "attn_mask"
        if self.attn_mask is None:
            state_dict.pop(key, None)
        else:
            state_dict[key] = self.attn_mask
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window, shift = _window_and_shift((H, W), self.target_window, self.target_shift)
        pad_h, pad_w = (-H) % window[0], (-W) % window[1]
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        mask = None
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            if (H, W) == tuple(self.input_resolution) and self.attn_mask is not None:
                mask = self.attn_mask
            else:
                mask = _shift_mask((Hp, Wp), window, shift, device=x.device)
        x = self.attn(_window_partition(x, window), window, mask)
        x = _window_reverse(x, window, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path(self._window_attention(self.norm1(x)))
        x = x.reshape(B, H * W, C)
        y = self.norm2(x)
        y = self.mlp(y, H, W) if self.channel_attention else self.mlp(y)
        x = x + self.drop_path(y)
        return x.view(B, H, W, C)


class PatchMerging(nn.Module):
    """Concat of each 2x2 neighbourhood (x00, x10, x01, x11) -> LayerNorm(4C) -> Linear(4C, 2C).

    Odd sizes are zero-padded first (the reference requires even sizes).
    """

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class FanSwinStage(nn.Module):
    """One Swin stage: blocks alternating plain / shifted windows, then the optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        input_resolution: tuple[int, int],
        window_size: int,
        drop_path: Sequence[float],
        downsample: bool,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        **block_kwargs: Any,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            FanSwinBlock(
                dim, num_heads, input_resolution, window_size=window_size, shifted=i % 2 == 1,
                drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_block(blk, x)
            else:
                x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class FanSwinTransformer(nn.Module):
    """Swin Transformer v1 with FAN channel attention in the stages flagged by ``channel_attention``.

    Defaults are FAN-Swin-T. ``img_size`` only fixes the resolution of the stored shift masks; the forward
    pass accepts any input size.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        channel_attention: Sequence[bool] = (True, True, True, False),
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        num_stages = len(depths)
        if not len(num_heads) == len(channel_attention) == num_stages:
            raise ValueError("depths, num_heads and channel_attention need one entry per stage")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_stages - 1))

        img_size = to_2tuple(img_size)
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer, output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True,
        )
        self.pos_drop = nn.Dropout(proj_drop_rate)

        # stochastic depth: linear ramp over all blocks, as in the reference Swin
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        feat = tuple(-(-s // patch_size) for s in img_size)
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            dim = embed_dim * 2**i
            start = sum(depths[:i])
            stages.append(
                FanSwinStage(
                    dim, depth, num_heads[i], feat, window_size, dpr[start : start + depth],
                    downsample=i < num_stages - 1, norm_layer=norm_layer, mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                    channel_attention=channel_attention[i],
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2**i, module=f"layers.{i}"))
            feat = tuple(-(-f // 2) for f in feat)
        self.layers = nn.Sequential(*stages)

        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_fan_weights)  # Linear trunc-normal .02 / LayerNorm (1, 0), as the reference

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the relative position bias tables (timm's optimizer matches names exactly)."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem, then stages (coarse) or blocks."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (e.g. for fine-tuning on K classes); 0 classes leaves pooled features."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.norm.weight
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            init_fan_weights(self.head)
        else:
            self.head = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> normalised last-stage features [B, H/32, W/32, C]."""
        x = self.pos_drop(self.patch_embed(x))
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Unwrap the reference's training checkpoints (``state_dict_ema`` / ``state_dict`` / ``model``)."""
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _create_fan_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> FanSwinTransformer:
    if kwargs.get("features_only"):
        raise RuntimeError(f"features_only is not supported by {variant}")
    return build_model_with_cfg(
        FanSwinTransformer, variant, pretrained, pretrained_filter_fn=_checkpoint_filter_fn, **kwargs
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


# no FAN-Swin weights were published: untagged cfgs without a url
default_cfgs = generate_default_cfgs(
    {
        "fan_swin_tiny_patch4_window7_224": _cfg(),
        "fan_swin_small_patch4_window7_224": _cfg(),
        "fan_swin_base_patch4_window7_224": _cfg(),
        "fan_swin_large_patch4_window7_224": _cfg(),
    }
)


@register_model
def fan_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FanSwinTransformer:
    """FAN-Swin-T: dims 96-768, depths (2, 2, 6, 2), 29.54M params."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_fan_swin("fan_swin_tiny_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FanSwinTransformer:
    """FAN-Swin-S: dims 96-768, depths (2, 2, 18, 2), 53.06M params."""
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_fan_swin("fan_swin_small_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FanSwinTransformer:
    """FAN-Swin-B: dims 128-1024, depths (2, 2, 18, 2), 93.60M params."""
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_fan_swin("fan_swin_base_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_swin_large_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FanSwinTransformer:
    """FAN-Swin-L: dims 192-1536, depths (2, 2, 18, 2), 208.94M params."""
    args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
    return _create_fan_swin("fan_swin_large_patch4_window7_224", pretrained, **dict(args, **kwargs))
