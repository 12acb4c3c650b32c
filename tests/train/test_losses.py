"""STL losses against hand-computed values; float32 under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stl.train.losses import labeler_loss, soft_cross_entropy, student_loss

LN2, LN3 = math.log(2), math.log(3)


def test_soft_cross_entropy_hand_values():
    for k in (2, 5, 1000):
        target = torch.rand(3, 7, k).softmax(-1)
        assert soft_cross_entropy(torch.zeros(3, 7, k), target).item() == pytest.approx(math.log(k), rel=1e-6)
    # softmax([0, ln 3]) = [1/4, 3/4]
    loss = soft_cross_entropy(torch.tensor([[0.0, LN3]]), torch.tensor([[0.5, 0.5]]))
    assert loss.item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)
    # mean over leading dims
    logits = torch.tensor([[0.0, LN3], [0.0, 0.0]])
    loss = soft_cross_entropy(logits, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert loss.item() == pytest.approx((-math.log(0.75) + LN2) / 2, rel=1e-6)


def test_soft_cross_entropy_class_indices_and_shape_errors():
    logits, idx = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    torch.testing.assert_close(soft_cross_entropy(logits, idx), F.cross_entropy(logits, idx))
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(logits, torch.rand(6, 5))


def test_labeler_loss_uses_token_averaged_logits():
    cls_logits = torch.zeros(1, 2)
    aux_logits = torch.tensor([[[0.0, 2 * LN3], [0.0, 0.0]]])  # mean over tokens = [0, ln 3]
    target = torch.tensor([[0.0, 1.0]])
    loss, parts = labeler_loss(cls_logits, aux_logits, target, aux_weight=0.5, return_parts=True)
    assert parts["cls"].item() == pytest.approx(LN2, rel=1e-6)
    assert parts["aux"].item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert loss.item() == pytest.approx(LN2 - 0.5 * math.log(0.75), rel=1e-6)
    default = labeler_loss(cls_logits, aux_logits, target)
    assert default.item() == pytest.approx(LN2 - math.log(0.75), rel=1e-6)


def test_student_loss_hand_values():
    cls_logits = torch.zeros(1, 2)
    target = torch.tensor([[1.0, 0.0]])
    aux_logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])
    token_target = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    dense = (-math.log(0.75) + LN2) / 2
    loss, parts = student_loss(cls_logits, aux_logits, target, token_target, cls_weight=2.0, dense_weight=0.5,
                               return_parts=True)
    assert parts["cls"].item() == pytest.approx(LN2, rel=1e-6)
    assert parts["dense"].item() == pytest.approx(dense, rel=1e-6)
    assert loss.item() == pytest.approx(2 * LN2 + 0.5 * dense, rel=1e-6)
    assert student_loss(cls_logits, aux_logits, target, token_target).item() == pytest.approx(LN2 + dense)
    with pytest.raises(ValueError, match="token grid"):
        student_loss(cls_logits, aux_logits, target, token_target[:, :1])


def test_losses_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5)
    x = torch.randn(2, 4, 8)
    target = torch.rand(2, 5).softmax(-1)
    token_target = torch.rand(2, 4, 5).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aux = head(x)
        cls = aux.mean(1)
        assert aux.dtype == torch.bfloat16
        s_loss = student_loss(cls, aux, target, token_target)
        l_loss = labeler_loss(cls, aux, target)
    assert s_loss.dtype == torch.float32 and l_loss.dtype == torch.float32
    s_loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    ref = student_loss(cls.float(), aux.float(), target, token_target)
    assert s_loss.item() == pytest.approx(ref.item(), rel=1e-6)
