"""SophiaG: a light-weight second-order optimizer (Liu et al. 2023, "Sophia", arXiv 2305.14342).

    opt = SophiaG(param_groups, lr=2e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    loss.backward(); opt.step(); opt.zero_grad()
    # every k steps, the Gauss-Newton-Bartlett (GNB) estimate of the Hessian diagonal:
    logits = model(x); y_hat = Categorical(logits=logits).sample()
    F.cross_entropy(logits, y_hat).backward(); opt.update_hessian(batch_size=x.shape[0]); opt.zero_grad()

The update is a sign-momentum step whose size per coordinate is the momentum divided by the (EMA of the)
Hessian diagonal, clipped elementwise to 1:  theta -= lr * sign(m) * min(|m| / (rho * h + eps), 1), plus
decoupled weight decay. Labels sampled from the model's own softmax make E[g g^T] equal the Gauss-Newton
matrix, so ``batch_size * g * g`` (g: the gradient of the batch-mean loss on sampled labels) is an unbiased
estimate of its diagonal. The engine in :mod:`stl.train.engine` does the sampling and calls
:meth:`SophiaG.update_hessian`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class SophiaG(Optimizer):
    """SophiaG with the GNB Hessian estimator; ``hessian`` and ``exp_avg`` live in the optimizer state."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, eps: float = 1e-15) -> None:
        if lr <= 0.0:
            raise ValueError(f"SophiaG: lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SophiaG: betas must be in [0, 1), got {betas}")
        if rho <= 0.0:
            raise ValueError(f"SophiaG: rho must be > 0, got {rho}")
        if weight_decay < 0.0:
            raise ValueError(f"SophiaG: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps))

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, batch_size: int = 1) -> None:
        """Fold the current gradients (of the loss on *sampled* labels) into the Hessian EMA.

        ``batch_size`` is the number of samples the loss was averaged over (all ranks together under DDP,
        whose gradients are the mean over ranks): the GNB estimate is ``batch_size * grad * grad``.
        """
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=(1.0 - beta2) * batch_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, rho, eps, wd = group["lr"], group["rho"], group["eps"], group["weight_decay"]
            beta1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                if wd:
                    p.mul_(1.0 - lr * wd)
                exp_avg = state["exp_avg"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                ratio = (exp_avg.abs() / (rho * state["hessian"] + eps)).clamp_(max=1.0)
                p.addcmul_(exp_avg.sign(), ratio, value=-lr)
        return loss
