"""Optimizer and learning-rate schedule of every training phase.

    optimizer = create_optimizer(model, name="adamw", lr=2e-3, weight_decay=0.05)
    scheduler = create_scheduler(optimizer, epochs=30, updates_per_epoch=len(loader), warmup_epochs=2,
                                 warmup_lr=1e-6, min_lr=1e-5)
    # after every optimizer update:  scheduler.step_update(num_updates)
    # after every epoch:             scheduler.step(epoch + 1)

Weight decay skips 1-D parameters (biases, norms, layer scales) and the names in ``model.no_weight_decay()``
(class token, positional encoding), as the FAN recipe does. The cosine schedule runs per optimizer update
(``t_in_epochs=False``), so it only depends on ``num_updates``: restoring that count restores the schedule
exactly on resume (``step(epoch + 1)`` is still called, as timm's loop does, and is a no-op here).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import timm.optim
import timm.scheduler
import torch
from torch import nn

from stl.train.sophia import SophiaG

SOPHIA_BETAS = (0.965, 0.99)


def _no_decay(name: str, param: torch.Tensor, skip: Iterable[str]) -> bool:
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return any(name == s or name.startswith(s + ".") or fnmatch.fnmatchcase(name, s) for s in skip)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights and the rest (1-D params and ``model.no_weight_decay()`` names).

    A ``no_weight_decay`` entry matches the exact parameter name, a module prefix (``pos_embed`` covers
    ``pos_embed.token_projection.weight``) or an fnmatch pattern.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p, skip) else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def create_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                     sophia_rho: float = 0.04, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (timm's ``create_optimizer_v2``) or :class:`SophiaG` over :func:`param_groups`.

    Call it on the bare model (not the DDP wrapper), so parameter names carry no ``module.`` prefix.
    ``fused`` selects torch's fused AdamW kernel: the same update in one pass over all parameters instead of a
    Python loop of small ops (on the CPU ~4x faster; float rounding differs in the last bit, so runs diverge
    slowly from the loop's; torch raises for devices without the kernel).
    """
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        extra = {"fused": True} if fused else {}  # fused=False would also turn off the CUDA foreach default
        return timm.optim.create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=weight_decay, **extra)
    if name == "sophiag":
        return SophiaG(groups, lr=lr, betas=SOPHIA_BETAS, rho=sophia_rho, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r}; use adamw or sophiag")


def create_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int,
                     warmup_epochs: int, warmup_lr: float, min_lr: float) -> timm.scheduler.CosineLRScheduler:
    """Linear warmup from ``warmup_lr`` to the optimizer's lr over ``warmup_epochs``, cosine to ``min_lr``.

    Counted in optimizer updates: the lr reaches its peak exactly after the warmup updates and ``min_lr``
    at the last update. A warmup as long as the run never reaches the cosine part (the lr then only rises).
    """
    if updates_per_epoch < 1:
        raise ValueError(f"updates_per_epoch must be >= 1, got {updates_per_epoch}")
    total = epochs * updates_per_epoch
    warmup = warmup_epochs * updates_per_epoch
    return timm.scheduler.CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
