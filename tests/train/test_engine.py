"""The training/validation loops: metrics, the non-finite loss stop, phase losses and the SophiaG wiring.

    pytest tests/train/test_engine.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stl.train.engine import NonFiniteLossError, PhaseLoss, evaluate, train_one_epoch
from stl.train.optim import create_optimizer


class _Toy(nn.Module):
    """Linear classifier on flattened 4x4 images; ``poison`` makes the output NaN from a given call on."""

    def __init__(self, poison_after: int | None = None, token: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)
        self.aux = nn.Linear(3, 2) if token else None
        self.calls, self.poison_after, self.modes = 0, poison_after, []

    def forward(self, x: torch.Tensor):
        self.calls += 1
        self.modes.append(self.training)
        out = self.fc(x.flatten(1))
        if self.poison_after is not None and self.calls > self.poison_after:
            out = out * float("nan")
        if self.aux is not None:
            return out, self.aux(x.flatten(2).transpose(1, 2))  # 16 "tokens" of 3 channels
        return out


def _loader(n: int = 16, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 4, 4, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def test_train_one_epoch_returns_averaged_metrics() -> None:
    torch.manual_seed(0)
    model = _Toy()
    opt = create_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.0)
    loss_fn = PhaseLoss(phase="supervised", num_classes=2, mixup_active=False, smoothing=0.1)
    metrics, n = train_one_epoch(model, _loader(), opt, loss_fn, epoch=0, epochs=1,
                                 device=torch.device("cpu"), num_updates=5)
    assert n == 9
    assert set(metrics) >= {"train_loss", "lr", "epoch_time", "images_per_second", "train_images"}
    assert metrics["train_images"] == 16 and 0 < metrics["train_loss"] < 5


def test_non_finite_loss_names_phase_epoch_and_step() -> None:
    torch.manual_seed(0)
    model = _Toy(poison_after=2)
    before = model.fc.weight.detach().clone()
    opt = create_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.0)
    loss_fn = PhaseLoss(phase="supervised", num_classes=2, mixup_active=False)
    with pytest.raises(NonFiniteLossError) as err:
        train_one_epoch(model, _loader(), opt, loss_fn, epoch=2, epochs=4, device=torch.device("cpu"),
                        num_updates=0)
    text = str(err.value)
    assert text.startswith("supervised: the training loss is nan at epoch 3/4, step 3/4")
    assert "train.lr" in text and "train.clip_grad" in text
    assert not torch.equal(model.fc.weight, before)  # two good steps were applied ...
    assert torch.isfinite(model.fc.weight).all()  # ... and not the poisoned one


def test_sophia_hessian_updates_are_wired() -> None:
    torch.manual_seed(0)
    model = _Toy()
    opt = create_optimizer(model, name="sophiag", lr=1e-2, weight_decay=0.0)
    loss_fn = PhaseLoss(phase="supervised", num_classes=2, mixup_active=False)
    calls = []
    original = opt.update_hessian
    opt.update_hessian = lambda batch_size: (calls.append(batch_size), original(batch_size))  # type: ignore
    train_one_epoch(model, _loader(), opt, loss_fn, epoch=0, epochs=1, device=torch.device("cpu"),
                    num_updates=0, hessian_interval=3)
    assert calls == [4, 4]  # before updates 0 and 3 of the 4
    assert all(opt.state[p]["hessian"].abs().sum() > 0 for p in model.parameters())


def test_phase_loss_targets_and_sampled_loss() -> None:
    sup = PhaseLoss(phase="supervised", num_classes=3, mixup_active=False, smoothing=0.1)
    labels = torch.tensor([0, 2])
    assert torch.equal(sup.targets(labels), labels)
    lab = PhaseLoss(phase="labeler", num_classes=3, mixup_active=False, smoothing=0.3)
    soft = lab.targets(labels)
    assert soft.shape == (2, 3) and torch.allclose(soft.sum(1), torch.ones(2))
    assert soft[0, 0].item() == pytest.approx(0.7 + 0.1)
    cls, aux = torch.randn(2, 3, requires_grad=True), torch.randn(2, 4, 3, requires_grad=True)
    lab.sampled_loss((cls, aux)).backward()
    assert cls.grad is not None and aux.grad is not None
    with pytest.raises(ValueError, match="token model"):
        lab(cls, soft)
    with pytest.raises(ValueError, match="labeler"):
        PhaseLoss(phase="student", num_classes=3, mixup_active=True)


def test_evaluate_counts_every_image_once() -> None:
    torch.manual_seed(0)
    model = _Toy(token=True)
    metrics = evaluate(model, _loader(n=10, batch=4), device=torch.device("cpu"))
    assert metrics["count"] == 10 and 0 <= metrics["top1"] <= 100 and metrics["loss"] > 0
    assert model.modes == [False, False, False]  # every batch in eval mode ...
    assert model.training  # ... and the mode restored


class _RecordingLabeler(nn.Module):
    """A token labeler that remembers the images it labelled (16 tokens, 2 classes, like ``_Toy``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor):
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 2), x[:, :2].flatten(2).transpose(1, 2)


def test_student_token_labels_come_from_the_unmixed_teacher_view() -> None:
    from timm.data import Mixup

    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    teacher = x + 10.0  # a view the student never sees, told apart from any mix of x
    labels = torch.tensor([0, 1] * 4)
    loader = DataLoader(TensorDataset(x, teacher, labels), batch_size=4)
    labeler = _RecordingLabeler()
    model = _Toy(token=True)
    opt = create_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.0)
    loss_fn = PhaseLoss(phase="student", num_classes=2, mixup_active=True, labeler=labeler)
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, num_classes=2, label_smoothing=0.1)
    mixed: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _, args: mixed.append(args[0].clone()))
    train_one_epoch(model, loader, opt, loss_fn, epoch=0, epochs=1, device=torch.device("cpu"),
                    num_updates=0, mixup_fn=mixup)
    assert len(labeler.seen) == 2
    for step in range(2):
        torch.testing.assert_close(labeler.seen[step], teacher[4 * step:4 * step + 4], rtol=0, atol=0)
        assert not torch.allclose(mixed[step], x[4 * step:4 * step + 4])  # the student's batch was mixed
