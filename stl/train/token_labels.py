"""Online token labels for STL phase 2, made by the frozen token labeler on the teacher view.

Every training step the labeler (eval mode, no grad, EMA weights) reads the teacher view of each image (same
crop, flip and geometric ops as the student view, no photometric ops, no erasing, no Mixup/CutMix) and its aux
head gives per-token class logits. Each token's label is a hard Gumbel-softmax sample of those logits (the
reference's default; 'argmax' and 'soft' are its options), then label-smoothed: (1 - s) * label + s / K.

The labeler's token grid is inferred from its output (n tokens for an H x W teacher image means a stride
of sqrt(H * W / n)). When it differs from the student's grid, the labeler's logits are resampled bilinearly
to the student grid before sampling, or the mismatch is refused (``grid_mismatch='error'``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stl.models.outputs import split_outputs, token_grid

TOKEN_LABEL_MODES = ("gumbel", "argmax", "soft")
GRID_MISMATCH_MODES = ("resample", "error")


def _sample(logits: Tensor, mode: str, tau: float) -> Tensor:
    """Per-token label distribution [..., K] from logits [..., K]."""
    num_classes = logits.shape[-1]
    if mode == "soft":
        return (logits / tau).softmax(dim=-1)
    if mode == "argmax":
        index = logits.argmax(dim=-1)
    else:
        # Hard Gumbel-softmax; taking the argmax of its straight-through output gives an exact 0/1 one-hot
        # (y_hard - y_soft + y_soft is not always bit-exact). The argmax of a Gumbel sample does not depend
        # on tau (it scales logits and noise alike); tau matters for the soft labels only.
        index = F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1).argmax(dim=-1)
    return F.one_hot(index, num_classes).to(logits.dtype)


def make_token_labels(labeler: nn.Module, teacher_images: Tensor, grid_hw: tuple[int, int], num_classes: int,
                      mode: str = "gumbel", tau: float = 1.0, smoothing: float = 0.1,
                      grid_mismatch: str = "resample", amp_dtype: torch.dtype | None = None) -> Tensor:
    """Token targets [B, N, K] (N = grid_hw[0] * grid_hw[1], row-major like the student's tokens), float32.

    ``labeler(teacher_images)`` must return ``(cls_logits, aux_logits [B, n, K])``. The labeler is run in
    eval mode without grad; its previous train/eval mode is restored afterwards.
    """
    if mode not in TOKEN_LABEL_MODES:
        raise ValueError(f"token label mode {mode!r} is not one of {TOKEN_LABEL_MODES} (stl.token_label)")
    if grid_mismatch not in GRID_MISMATCH_MODES:
        raise ValueError(
            f"grid_mismatch {grid_mismatch!r} is not one of {GRID_MISMATCH_MODES} (stl.grid_mismatch)"
        )
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"token smoothing must be in [0, 1], got {smoothing} (stl.token_smoothing)")
    if tau <= 0:
        raise ValueError(f"gumbel tau must be > 0, got {tau} (stl.gumbel_tau)")
    if teacher_images.dim() != 4:
        raise ValueError(f"teacher_images must be [B, C, H, W], got shape {tuple(teacher_images.shape)}")
    grid_h, grid_w = int(grid_hw[0]), int(grid_hw[1])

    was_training = labeler.training
    labeler.eval()
    autocast = (torch.autocast(device_type=teacher_images.device.type, dtype=amp_dtype)
                if amp_dtype is not None else contextlib.nullcontext())
    try:
        with torch.no_grad(), autocast:
            out = labeler(teacher_images)
    finally:
        labeler.train(was_training)
    aux = split_outputs(out)[1] if isinstance(out, (tuple, list)) else None
    if aux is None:
        raise TypeError("the token labeler must return (cls_logits, aux_logits): use a *_token FAN model")

    with torch.no_grad():
        aux = aux.detach().float()
        batch = teacher_images.shape[0]
        if aux.shape[0] != batch or aux.shape[-1] != num_classes:
            raise ValueError(
                f"token labeler aux_logits have shape {tuple(aux.shape)}, expected "
                f"[B={batch}, n, K={num_classes}]; the labeler must be trained on the same classes as the "
                "student"
            )
        img_h, img_w = teacher_images.shape[-2], teacher_images.shape[-1]
        try:
            lab_h, lab_w = token_grid((img_h, img_w), aux.shape[1])
        except ValueError as err:
            raise ValueError(f"token labeler: {err}") from None
        if (lab_h, lab_w) != (grid_h, grid_w):
            if grid_mismatch == "error":
                raise ValueError(
                    f"token grid mismatch: the labeler gives {lab_h}x{lab_w} tokens for {img_h}x{img_w} "
                    f"teacher images but the student has a {grid_h}x{grid_w} token grid; use the same input "
                    "size and stride for both (train.img_size, model / stl.labeler) or set "
                    "stl.grid_mismatch: resample"
                )
            grid = aux.transpose(1, 2).reshape(batch, num_classes, lab_h, lab_w)
            shrink = grid_h < lab_h or grid_w < lab_w
            grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False,
                                 antialias=shrink)
            aux = grid.flatten(2).transpose(1, 2)
        labels = _sample(aux, mode, tau)
        if smoothing > 0:
            labels = labels * (1.0 - smoothing) + smoothing / num_classes
    return labels.float().contiguous()
