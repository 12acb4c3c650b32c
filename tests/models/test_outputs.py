"""The model-output contract (``stl.models.outputs``) every consumer reads outputs through."""

from __future__ import annotations

import pytest
import torch

from stl.config import EvaluateConfig
from stl.models.outputs import FUSED_WEIGHT, fused_logits, prediction_logits, split_outputs, token_grid


def test_split_outputs_plain_and_token() -> None:
    logits = torch.randn(2, 3)
    assert split_outputs(logits) == (logits, None)
    aux = torch.randn(2, 5, 3)
    cls, got_aux = split_outputs((logits, aux))
    assert cls is logits and got_aux is aux
    assert split_outputs([logits, aux])[1] is aux


@pytest.mark.parametrize(
    "out, shown",
    [
        (torch.randn(2, 3, 4), "(2, 3, 4)"),
        ((torch.randn(2, 3), torch.randn(2, 5, 4)), "[(2, 3), (2, 5, 4)]"),  # K differs
        ((torch.randn(2, 3), torch.randn(1, 5, 3)), "[(2, 3), (1, 5, 3)]"),  # B differs
        ((torch.randn(2, 3),), "[(2, 3)]"),
        ("logits", "str"),
    ],
)
def test_split_outputs_refuses_other_shapes(out: object, shown: str) -> None:
    with pytest.raises(ValueError, match="unexpected model output") as err:
        split_outputs(out)
    assert shown in str(err.value)


def test_fused_and_prediction_logits() -> None:
    cls = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    aux = torch.tensor([[[0.0, 4.0, 0.0], [0.0, 1.0, 2.0]]])
    fused = fused_logits(cls, aux, 0.5)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, torch.tensor([[1.0, 2.0, 1.0]]))
    torch.testing.assert_close(prediction_logits((cls, aux), 0.5), fused)
    torch.testing.assert_close(prediction_logits((cls, aux), None), cls.float())  # class token only
    torch.testing.assert_close(prediction_logits(cls, 0.5), cls.float())  # plain model: the logits


def test_default_fused_weight_is_the_params_default() -> None:
    assert EvaluateConfig().fused_weight == FUSED_WEIGHT == 0.5


def test_token_grid() -> None:
    assert token_grid((32, 32), 4) == (2, 2)
    assert token_grid((224, 224), 196) == (14, 14)
    assert token_grid((32, 64), 8) == (2, 4)
    assert token_grid((48, 32), 6) == (3, 2)
    # no whole-pixel stride; no tokens; stride 16 (sqrt(24*32/3)) does not divide 24
    for hw, n in (((32, 32), 5), ((32, 32), 0), ((24, 32), 3)):
        with pytest.raises(ValueError, match="token grid"):
            token_grid(hw, n)
