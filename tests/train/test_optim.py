"""Optimizer parameter groups, SophiaG, and the per-update cosine schedule (incl. resume).

    pytest tests/train/test_optim.py -q
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from stl.train.optim import create_optimizer, create_scheduler, param_groups
from stl.train.sophia import SophiaG

from .tiny import TINY, register_tiny_models


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    register_tiny_models()
    torch.manual_seed(0)
    return timm.create_model(TINY, num_classes=3, img_size=32)


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_skip_1d_and_no_weight_decay(tiny_model: nn.Module) -> None:
    groups = param_groups(tiny_model, 0.05)
    no_decay, decay = groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    nd, d = _names(tiny_model, no_decay["params"]), _names(tiny_model, decay["params"])
    assert not nd & d and nd | d == {n for n, _ in tiny_model.named_parameters()}
    assert {"cls_token", "pos_embed.token_projection.weight", "pos_embed.token_projection.bias"} <= nd
    for n, p in tiny_model.named_parameters():
        if p.ndim <= 1:
            assert n in nd, n
    assert "head.weight" in d and "blocks.0.attn.q.weight" in d


def test_no_weight_decay_prefix_and_pattern() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Conv2d(2, 2, 1)
            self.fc = nn.Linear(2, 2)
            self.extra = nn.Linear(2, 2)

        def no_weight_decay(self) -> set[str]:
            return {"pos", "ext*"}

    m = M()
    nd = _names(m, param_groups(m, 0.1)[0]["params"])
    assert nd == {"pos.weight", "pos.bias", "fc.bias", "extra.weight", "extra.bias"}


def test_create_optimizer_kinds(tiny_model: nn.Module) -> None:
    adamw = create_optimizer(tiny_model, name="adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 0.05]
    sophia = create_optimizer(tiny_model, name="sophiag", lr=1e-3, weight_decay=0.05, sophia_rho=0.03)
    assert isinstance(sophia, SophiaG)
    assert sophia.param_groups[0]["betas"] == (0.965, 0.99) and sophia.param_groups[0]["rho"] == 0.03
    with pytest.raises(ValueError, match="train.optimizer"):
        create_optimizer(tiny_model, name="lamb", lr=1e-3, weight_decay=0.0)


def test_fused_adamw_matches_the_loop_to_rounding(tiny_model: nn.Module) -> None:
    """train.fused_optimizer changes the kernel, not the update: one step agrees to float rounding."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(TINY, num_classes=3, img_size=32)
        opt = create_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.05, fused=fused)
        assert bool(opt.defaults.get("fused")) is fused
        before = model.head.weight.detach().clone()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert (model.head.weight - before).abs().max() > 1e-3  # it stepped
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-6, atol=1e-7, msg=key)
    with pytest.raises(ValueError, match="train.optimizer"):
        create_optimizer(tiny_model, name="lamb", lr=1e-3, weight_decay=0.0, fused=True)


def _toy_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    w = torch.randn(10, 4, generator=g)
    return x, (x @ w).argmax(1)


def test_sophia_decreases_loss_and_keeps_hessian() -> None:
    x, y = _toy_problem()
    torch.manual_seed(0)
    model = nn.Linear(10, 4)
    opt = SophiaG(model.parameters(), lr=0.05, rho=0.05, weight_decay=0.0)
    first = F.cross_entropy(model(x), y).item()
    for step in range(60):
        if step % 5 == 0:  # GNB: loss on labels sampled from the model's own softmax
            logits = model(x)
            y_hat = torch.distributions.Categorical(logits=logits.detach()).sample()
            F.cross_entropy(logits, y_hat).backward()
            opt.update_hessian(batch_size=x.shape[0])
            opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    last = F.cross_entropy(model(x), y).item()
    assert last < 0.5 * first
    for p in model.parameters():
        state = opt.state[p]
        assert set(state) >= {"exp_avg", "hessian", "step"}
        assert (state["hessian"] > 0).all() and state["step"].item() == 60


def test_sophia_step_is_clipped_to_lr() -> None:
    """With rho * h tiny the ratio clips at 1: every coordinate moves by exactly lr (sign step)."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = SophiaG([p], lr=0.1, rho=0.04, weight_decay=0.0)
    p.grad = torch.tensor([5.0, -0.5, 1e-3])
    before = p.detach().clone()
    opt.step()
    assert torch.allclose(before - p.detach(), torch.tensor([0.1, -0.1, 0.1]))
    # weight decay is decoupled: p *= 1 - lr * wd before the step
    q = nn.Parameter(torch.tensor([2.0]))
    opt = SophiaG([q], lr=0.1, weight_decay=0.5)
    q.grad = torch.zeros(1)
    opt.step()
    assert q.item() == pytest.approx(2.0 * (1 - 0.05))


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


def test_scheduler_warmup_and_cosine_points() -> None:
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = create_scheduler(opt, epochs=10, updates_per_epoch=4, warmup_epochs=2, warmup_lr=1e-4,
                             min_lr=1e-5)
    assert _lrs(opt) == [pytest.approx(1e-4)]  # before the first update
    sched.step_update(4)  # half of the 8 warmup updates
    assert _lrs(opt)[0] == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))
    sched.step_update(8)  # warmup done: peak
    assert _lrs(opt)[0] == pytest.approx(1e-2)
    sched.step_update(8 + 16)  # half of the 32 cosine updates
    assert _lrs(opt)[0] == pytest.approx(1e-5 + 0.5 * (1e-2 - 1e-5))
    sched.step_update(8 + 32)  # last update: floor
    assert _lrs(opt)[0] == pytest.approx(1e-5)
    sched.step(3)  # per-epoch stepping is a no-op for an update-based schedule
    assert _lrs(opt)[0] == pytest.approx(1e-5)
    sched.step_update(20)
    expected = 1e-5 + 0.5 * (1e-2 - 1e-5) * (1 + math.cos(math.pi * 12 / 32))
    assert _lrs(opt)[0] == pytest.approx(expected)


def test_scheduler_after_resume_matches() -> None:
    """A scheduler rebuilt from state_dict and step_update(num_updates) sets the very same lr."""
    def build() -> tuple[torch.optim.Optimizer, object]:
        p = nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([{"params": [p]}, {"params": [nn.Parameter(torch.zeros(1))]}], lr=2e-3)
        return opt, create_scheduler(opt, epochs=5, updates_per_epoch=3, warmup_epochs=1, warmup_lr=1e-6,
                                     min_lr=1e-6)

    opt, sched = build()
    for n in range(1, 8):
        sched.step_update(n)
    sched.step(2)
    opt2, sched2 = build()
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    sched2.step_update(7)
    assert _lrs(opt2) == _lrs(opt)
    for n in range(8, 16):
        sched.step_update(n)
        sched2.step_update(n)
        assert _lrs(opt2) == _lrs(opt)
