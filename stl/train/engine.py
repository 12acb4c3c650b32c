"""The training and validation loops, shared by the three phases (supervised, STL labeler, STL student).

    loss_fn = PhaseLoss(phase="supervised", num_classes=K, mixup_active=True, smoothing=0.1)
    metrics, num_updates = train_one_epoch(ddp_model, loader, optimizer, loss_fn, epoch=e, epochs=E, ...)
    val = evaluate(model, val_loader, device=device)        # {'top1': %, 'loss': CE, 'count': n}

The loops return plain dicts of metrics averaged over all ranks and never log: :mod:`stl.train.run` logs them
in one place on rank 0. A non-finite loss on any rank stops every rank with :class:`NonFiniteLossError`
(the per-step loss is all-reduced before the backward pass, so no rank waits forever on the others and no
corrupted update is applied).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from tqdm import tqdm

from stl.distributed import all_reduce_sum, get_world_size, is_main_process
from stl.models.outputs import split_outputs, token_grid

PHASES = ("supervised", "labeler", "student")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised on every rank at the same step."""


@dataclass
class PhaseLoss:
    """The training loss of one phase, and the sampled-label loss SophiaG's Hessian estimate needs.

    supervised: SoftTargetCrossEntropy on Mixup/CutMix targets, else LabelSmoothingCrossEntropy (cls logits
    only, also for token models). labeler: ``stl.train.losses.labeler_loss`` on soft targets. student:
    ``stl.train.losses.student_loss`` with token labels made online by the frozen ``labeler`` from the
    unmixed teacher view (``stl.train.token_labels.make_token_labels``).
    """

    phase: str
    num_classes: int
    mixup_active: bool
    smoothing: float = 0.0
    aux_weight: float = 1.0
    cls_weight: float = 1.0
    dense_weight: float = 1.0
    labeler: nn.Module | None = None
    token_label: str = "gumbel"
    gumbel_tau: float = 1.0
    token_smoothing: float = 0.1
    grid_mismatch: str = "resample"
    amp_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}; use one of {', '.join(PHASES)}")
        if self.phase == "student" and self.labeler is None:
            raise ValueError("the student phase needs the frozen token labeler (labeler=...)")
        if self.mixup_active:
            self._base: nn.Module = SoftTargetCrossEntropy()
        elif self.smoothing > 0:
            self._base = LabelSmoothingCrossEntropy(smoothing=self.smoothing)
        else:
            self._base = nn.CrossEntropyLoss()

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Targets without Mixup: class indices (supervised) or smoothed one-hot [B, K] (STL phases)."""
        if self.phase == "supervised":
            return labels
        return mixup_target(labels, self.num_classes, lam=1.0, smoothing=self.smoothing)

    def __call__(self, outputs: Any, target: torch.Tensor, teacher: torch.Tensor | None = None,
                 image_hw: tuple[int, int] | None = None) -> torch.Tensor:
        cls_logits, aux_logits = split_outputs(outputs)
        if self.phase == "supervised":
            return self._base(cls_logits, target)
        if aux_logits is None:
            raise ValueError(f"the {self.phase} phase needs a token model (a '*_token' name) that returns "
                             "(cls_logits, aux_logits)")
        if self.phase == "labeler":
            from stl.train.losses import labeler_loss

            return labeler_loss(cls_logits, aux_logits, target, self.aux_weight)
        from stl.train.losses import student_loss
        from stl.train.token_labels import make_token_labels

        if teacher is None:
            raise ValueError("the student phase needs (student_img, teacher_img, label) batches: build the "
                             "dataset with stl.data.stl_transforms.create_paired_transform")
        grid = token_grid(image_hw or tuple(teacher.shape[-2:]), aux_logits.shape[1])
        token_target = make_token_labels(self.labeler, teacher, grid, self.num_classes, self.token_label,
                                         self.gumbel_tau, self.token_smoothing, self.grid_mismatch,
                                         self.amp_dtype)
        return student_loss(cls_logits, aux_logits, target, token_target, self.cls_weight, self.dense_weight)

    def sampled_loss(self, outputs: Any) -> torch.Tensor:
        """Cross-entropy against labels drawn from the model's own softmax (the GNB estimator of Sophia).

        Each head that the phase trains gets its own sampled labels, with the phase's loss weights: cls
        logits always; the token-mean aux logits (labeler); every token's aux logits (student).
        """
        cls_logits, aux_logits = split_outputs(outputs)

        def ce_sampled(logits: torch.Tensor) -> torch.Tensor:
            logits = logits.float().reshape(-1, logits.shape[-1])
            y = torch.distributions.Categorical(logits=logits.detach()).sample()
            return F.cross_entropy(logits, y)

        if self.phase == "supervised" or aux_logits is None:
            return ce_sampled(cls_logits)
        if self.phase == "labeler":
            return ce_sampled(cls_logits) + self.aux_weight * ce_sampled(aux_logits.mean(1))
        return self.cls_weight * ce_sampled(cls_logits) + self.dense_weight * ce_sampled(aux_logits)


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(images, teacher images or None, labels) from (x, y), (x, t, y) or ((x, t), y) batches."""
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    x, y = batch
    if isinstance(x, (tuple, list)):
        return x[0], x[1], y
    return x, None, y


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: PhaseLoss,
    *,
    epoch: int,
    epochs: int,
    device: torch.device,
    num_updates: int,
    scheduler: Any = None,
    mixup_fn: Any = None,
    ema: Any = None,
    ema_source: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    clip_grad: float = 0.0,
    hessian_interval: int = 0,
    channels_last: bool = False,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns (metrics averaged over ranks, updated ``num_updates``).

    ``model`` is what runs forward (DDP wrapper and/or compiled); ``ema_source`` is the bare module the EMA
    copies from (defaults to ``model``). ``hessian_interval > 0`` (SophiaG) refreshes the Hessian estimate
    before every update whose index is a multiple of it, starting with the first.
    """
    phase = loss_fn.phase
    world = get_world_size()
    model.train()
    ema_source = ema_source if ema_source is not None else model
    params = [p for g in optimizer.param_groups for p in g["params"]]
    steps = len(loader)  # type: ignore[arg-type]
    loss_sum = torch.zeros((), dtype=torch.float64)
    images = 0
    start = time.perf_counter()
    bar = tqdm(loader, total=steps, desc=f"{phase} {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
               disable=not is_main_process())
    for step, batch in enumerate(bar):
        x, teacher, labels = _unpack(batch)
        x = _to(x, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        if teacher is not None:
            teacher = _to(teacher, device, channels_last)
        if mixup_fn is not None:
            x, target = mixup_fn(x, labels)
        else:
            target = loss_fn.targets(labels)

        if hessian_interval and num_updates % hessian_interval == 0:
            _update_hessian(model, optimizer, loss_fn, x, device, amp_dtype, world, scaler)

        with _autocast(device, amp_dtype):
            outputs = model(x)
            loss = loss_fn(outputs, target, teacher, image_hw=tuple(x.shape[-2:]))
        reduced = all_reduce_sum(loss.detach().to(torch.float64).reshape(1).clone())[0] / world
        if not torch.isfinite(reduced):
            raise NonFiniteLossError(
                f"{phase}: the training loss is {reduced.item()} at epoch {epoch + 1}/{epochs}, step "
                f"{step + 1}/{steps} (update {num_updates + 1}); training stopped before applying it. Lower "
                "train.lr, set train.clip_grad (e.g. 1.0), raise train.warmup_epochs, or use train.amp: none"
            )

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            optimizer.step()
        num_updates += 1
        if ema is not None:
            ema.update(ema_source, step=num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)

        loss_sum += reduced.cpu()
        images += x.shape[0] * world
        if is_main_process():
            bar.set_postfix(loss=f"{reduced.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    if steps == 0:
        raise RuntimeError(f"{phase}: the training loader yielded no batch (epoch {epoch + 1})")
    seconds = time.perf_counter() - start
    return {
        "train_loss": float(loss_sum / steps),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "train_images": float(images),
        "epoch_time": seconds,
        "images_per_second": images / max(seconds, 1e-9),
    }, num_updates


def _update_hessian(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: PhaseLoss, x: torch.Tensor,
                    device: torch.device, amp_dtype: torch.dtype | None, world: int,
                    scaler: torch.amp.GradScaler | None) -> None:
    """SophiaG's GNB step: backprop the loss on labels sampled from the model itself, fold grad^2 in.

    Under fp16 the loss is scaled like the training loss (and the gradients unscaled) so small gradients do
    not flush to zero; an estimate with inf/NaN gradients is skipped (the same on every rank: DDP averaged
    the gradients).
    """
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, amp_dtype):
        outputs = model(x)
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    (loss_fn.sampled_loss(outputs) * scale).backward()
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if scale != 1.0:
        torch._foreach_div_(grads, scale)
    if all(bool(torch.isfinite(g).all()) for g in grads):
        optimizer.update_hessian(batch_size=x.shape[0] * world)  # type: ignore[attr-defined]
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, float]:
    """Top-1 (%) and cross-entropy of the cls logits over this rank's shard, summed over all ranks.

    Give each rank a disjoint shard without padding (see ``stl.train.run``), and the bare model (not the DDP
    wrapper, whose forward would wait on collectives that ranks with fewer batches never join).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, count
    for batch in loader:
        x, _, labels = _unpack(batch)
        x = _to(x, device, channels_last)
        labels = labels.to(device)
        with _autocast(device, amp_dtype):
            logits, _ = split_outputs(model(x))
        logits = logits.float()
        totals[0] += (logits.argmax(1) == labels).sum().item()
        totals[1] += F.cross_entropy(logits, labels, reduction="sum").item()
        totals[2] += labels.numel()
    model.train(was_training)
    totals = all_reduce_sum(totals.to(device)).cpu()  # on the device: NCCL reduces CUDA tensors only
    n = max(totals[2].item(), 1.0)
    return {"top1": 100.0 * totals[0].item() / n, "loss": totals[1].item() / n, "count": totals[2].item()}
