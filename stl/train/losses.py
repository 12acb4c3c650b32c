"""STL losses: soft-target cross-entropy, the phase-1 labeler loss and the phase-2 student loss.

Targets are soft (Mixup/CutMix and label smoothing make them so). Everything is computed in float32 with
autocast off, so a bf16/fp16 forward pass never reduces the loss in low precision.

- phase 1 (token labeler): SoftCE(cls_logits, y) + aux_weight * SoftCE(mean over tokens of aux_logits, y);
  no token is supervised on its own, per-token predictions "self-emerge".
- phase 2 (student): cls_weight * SoftCE(cls_logits, y) + dense_weight * mean over the B*N tokens of
  SoftCE(aux_logits[b, n], token_target[b, n]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _fp32(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over all leading dims of -sum_k target_k * log_softmax(logits)_k, in float32.

    ``target`` is a distribution of the same shape as ``logits`` ([..., K]); integer class indices of shape
    ``logits.shape[:-1]`` are accepted too (plain cross-entropy, e.g. when Mixup and smoothing are off).
    """
    if not target.is_floating_point() and target.shape == logits.shape[:-1]:
        target = F.one_hot(target.long(), logits.shape[-1])
    if target.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy: logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                         "must have the same shape [..., K]")
    with _fp32(logits.device):
        log_p = F.log_softmax(logits.float(), dim=-1)
        return -(target.float() * log_p).sum(dim=-1).mean()


def labeler_loss(cls_logits: Tensor, aux_logits: Tensor, target: Tensor, aux_weight: float = 1.0,
                 return_parts: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """STL phase 1: the class head and the token-AVERAGED aux logits both learn the image label.

    cls_logits [B, K], aux_logits [B, N, K], target [B, K]. With ``return_parts`` also returns
    ``{"cls": ..., "aux": ...}`` (unweighted, detached) for logging.
    """
    if aux_logits.dim() != 3:
        raise ValueError(f"labeler_loss: aux_logits must be [B, N, K], got {tuple(aux_logits.shape)}")
    with _fp32(cls_logits.device):
        cls = soft_cross_entropy(cls_logits, target)
        aux = soft_cross_entropy(aux_logits.float().mean(dim=1), target)
        loss = cls + aux_weight * aux
    if return_parts:
        return loss, {"cls": cls.detach(), "aux": aux.detach()}
    return loss


def student_loss(cls_logits: Tensor, aux_logits: Tensor, target: Tensor, token_target: Tensor,
                 cls_weight: float = 1.0, dense_weight: float = 1.0,
                 return_parts: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """STL phase 2: class loss on the (mixed) image label plus the mean per-token loss on the token labels.

    cls_logits [B, K], aux_logits [B, N, K], target [B, K], token_target [B, N, K]. With ``return_parts``
    also returns ``{"cls": ..., "dense": ...}`` (unweighted, detached) for logging.
    """
    if aux_logits.shape != token_target.shape:
        raise ValueError(
            f"student_loss: aux_logits {tuple(aux_logits.shape)} and token_target "
            f"{tuple(token_target.shape)} differ; token labels must be made on the student's token grid "
            "(see make_token_labels)"
        )
    with _fp32(cls_logits.device):
        cls = soft_cross_entropy(cls_logits, target)
        dense = soft_cross_entropy(aux_logits, token_target)  # mean over B*N tokens
        loss = cls_weight * cls + dense_weight * dense
    if return_parts:
        return loss, {"cls": cls.detach(), "dense": dense.detach()}
    return loss
