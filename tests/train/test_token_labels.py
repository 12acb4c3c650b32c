"""Token labels: land on the right student tokens after crop/flip/translate; sampling modes; grid handling."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stl.data.stl_transforms import AugOpParams, create_paired_transform
from stl.train.token_labels import make_token_labels

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FILL = (124, 116, 104)
QUAD_RGB = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 40)]  # TL, TR, BL, BR
PALETTE = QUAD_RGB + [FILL]  # class 4 = the fill of geometric ops
W, H, S, P = 96, 80, 64, 8  # source image, view size, labeler/student stride


def quadrant_image() -> Image.Image:
    y, x = np.mgrid[0:H, 0:W]
    quad = (y >= H // 2) * 2 + (x >= W // 2)
    arr = np.array(QUAD_RGB, dtype=np.int64)[quad] + ((x * 13 + y * 7) % 24 - 12)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


class ColourLabeler(nn.Module):
    """A labeler that READS the image: token class = palette colour nearest to the patch's mean colour."""

    def __init__(self, stride: int = P) -> None:
        super().__init__()
        self.stride = stride
        rgb = torch.tensor(PALETTE, dtype=torch.float32) / 255
        self.register_buffer("palette", (rgb - torch.tensor(MEAN)) / torch.tensor(STD))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor):
        self.calls.append((self.training, torch.is_grad_enabled()))
        mean = F.avg_pool2d(x.float(), self.stride).flatten(2).transpose(1, 2)  # [B, n, 3]
        aux = -10 * torch.cdist(mean, self.palette[None].expand(x.shape[0], -1, -1)) ** 2
        return aux.mean(dim=1), aux


class ConstLabeler(nn.Module):
    """Fixed aux logits for every token of a stride-``stride`` grid, or logits given per labeler position."""

    def __init__(self, logits: torch.Tensor, stride: int) -> None:
        super().__init__()
        self.logits, self.stride = logits, stride

    def forward(self, x: torch.Tensor):
        b, h, w = x.shape[0], x.shape[-2] // self.stride, x.shape[-1] // self.stride
        lg = self.logits.to(x.dtype)
        aux = lg.expand(b, h * w, -1) if lg.dim() == 1 else lg.expand(b, -1, -1)
        return aux.mean(dim=1), aux


def expected_classes(params, grid: int, pct: float = 0.0) -> np.ndarray:
    """Analytic class of each student token from the recorded crop, flip and a TranslateXRel ``pct``.

    -1 marks tokens whose patch straddles a boundary (quadrant or fill edge): they are not checked.
    """
    top, left, ch, cw = params.crop
    out = np.full((grid, grid), -1)
    pts = np.linspace(1.0, P - 1.0, 5)
    for r in range(grid):
        for c in range(grid):
            classes = set()
            for dy in pts:
                for dx in pts:
                    x, y = c * P + dx, r * P + dy
                    u = x + pct * S  # PIL affine (1, 0, pct*S, 0, 1, 0): output x samples input x + pct*S
                    if not 0 <= u <= S:
                        classes.add(4)
                        continue
                    v = S - u if params.hflip else u
                    xo, yo = left + v * cw / S, top + y * ch / S
                    classes.add(int(yo >= H / 2) * 2 + int(xo >= W / 2))
            if len(classes) == 1:
                out[r, c] = classes.pop()
    return out


def labels_map(labeler: nn.Module, view: torch.Tensor) -> np.ndarray:
    g = S // P
    y = make_token_labels(labeler, view[None], (g, g), len(PALETTE), mode="argmax", smoothing=0.0)
    assert y.shape == (1, g * g, len(PALETTE))
    return y[0].argmax(-1).reshape(g, g).numpy()


def test_token_labels_follow_crop_and_flip_onto_student_tokens():
    img, labeler = quadrant_image(), ColourLabeler()
    t = create_paired_transform(img_size=S, auto_augment="", reprob=0.0, hflip=1.0, scale_min=0.3,
                                mean=MEAN, std=STD)
    flip_mattered = False
    for seed in range(6):
        params = t.sample_params(img, random.Random(seed))
        assert params.hflip
        student, teacher = t.apply(img, params, teacher=False), t.apply(img, params, teacher=True)
        labels = labels_map(labeler, teacher)
        expected = expected_classes(params, S // P)
        known = expected >= 0
        assert known.sum() >= 32
        np.testing.assert_array_equal(labels[known], expected[known])
        # each token's label is what the student view shows at that token
        np.testing.assert_array_equal(labels, labels_map(labeler, student))
        unflipped = expected_classes(dataclasses.replace(params, hflip=False), S // P)
        both = known & (unflipped >= 0)
        flip_mattered |= bool((unflipped[both] != labels[both]).any())
    assert flip_mattered  # some crop spans both halves, so a misplaced flip would have been caught


def test_token_labels_follow_geometric_ops_but_not_photometric():
    img, labeler = quadrant_image(), ColourLabeler()
    t = create_paired_transform(img_size=S, auto_augment="rand-m9-mstd0.5-inc1", reprob=1.0, hflip=1.0,
                                scale_min=0.3, mean=MEAN, std=STD)
    bicubic = int(Image.Resampling.BICUBIC)
    pct = 0.25
    ops = (AugOpParams("TranslateXRel", (pct,), bicubic, FILL), AugOpParams("Invert", (), bicubic, FILL))
    for seed in range(4):
        params = dataclasses.replace(t.sample_params(img, random.Random(seed)), ops=ops)
        teacher = t.apply(img, params, teacher=True)
        labels = labels_map(labeler, teacher)
        expected = expected_classes(params, S // P, pct=pct)
        known = expected >= 0
        assert (expected == 4).sum() >= 8 and known.sum() >= 32  # the shift brought fill in
        np.testing.assert_array_equal(labels[known], expected[known])
        # the student view (inverted, erased) is mislabeled by its own colours: the teacher view is needed
        student = t.apply(img, params, teacher=False)
        assert (labels_map(labeler, student)[known] != expected[known]).mean() > 0.5


def test_labeler_runs_in_eval_without_grad_and_keeps_its_mode():
    labeler = ColourLabeler().train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y = make_token_labels(labeler, x, (4, 4), 5, mode="argmax", amp_dtype=torch.bfloat16)
    assert labeler.calls == [(False, False)]
    assert labeler.training
    assert y.dtype == torch.float32 and not y.requires_grad and y.shape == (2, 16, 5)


def test_gumbel_is_one_hot_and_matches_softmax_frequencies():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    labeler = ConstLabeler(logits, stride=1)
    torch.manual_seed(0)
    y = make_token_labels(labeler, torch.zeros(16, 3, 32, 32), (32, 32), 4, mode="gumbel", smoothing=0.0)
    assert y.shape == (16, 1024, 4) and y.dtype == torch.float32
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y.sum(-1), torch.ones(16, 1024))
    freq = y.reshape(-1, 4).mean(0)
    # 16384 draws: the standard error is <= 0.004, allow 5 of them
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.02, rtol=0)
    # the draws differ between tokens (a sample per token, not one per image)
    assert (y.argmax(-1) != y.argmax(-1)[:, :1]).any()


def test_argmax_soft_and_smoothing():
    logits = torch.tensor([0.5, 3.0, -1.0, 0.0])
    labeler = ConstLabeler(logits, stride=4)
    x = torch.zeros(2, 3, 16, 16)
    y = make_token_labels(labeler, x, (4, 4), 4, mode="argmax", smoothing=0.1)
    torch.testing.assert_close(y[0, 0], torch.tensor([0.025, 0.925, 0.025, 0.025]))
    assert torch.equal(y, y[:1, :1].expand_as(y))
    torch.testing.assert_close(y.sum(-1), torch.ones(2, 16))
    y = make_token_labels(labeler, x, (4, 4), 4, mode="argmax", smoothing=0.0)
    assert torch.equal(y[1, 5], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    y = make_token_labels(labeler, x, (4, 4), 4, mode="soft", smoothing=0.2)
    torch.testing.assert_close(y[0, 3], 0.8 * logits.softmax(-1) + 0.05)
    y = make_token_labels(labeler, x, (4, 4), 4, mode="soft", tau=2.0, smoothing=0.0)
    torch.testing.assert_close(y[0, 3], (logits / 2.0).softmax(-1))  # tau tempers the soft labels
    torch.manual_seed(1)
    y = make_token_labels(labeler, x, (4, 4), 4, mode="gumbel", smoothing=0.1)
    torch.testing.assert_close(y.unique(), torch.tensor([0.025, 0.925]))
    with pytest.raises(ValueError, match="stl.token_label"):
        make_token_labels(labeler, x, (4, 4), 4, mode="hard")


def _position_labeler(grid: int, stride: int) -> ConstLabeler:
    """Class of a labeler token = 2 * (row in the top/bottom half) + (column in the left/right half)."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    cls = (2 * (r >= grid // 2) + (c >= grid // 2)).flatten()
    return ConstLabeler(10.0 * F.one_hot(cls, 4).float()[None], stride=stride)


@pytest.mark.parametrize("lab_grid, student_grid", [(2, 4), (4, 8), (8, 4)])
def test_grid_mismatch_resample_keeps_the_layout(lab_grid, student_grid):
    labeler = _position_labeler(lab_grid, stride=64 // lab_grid)
    y = make_token_labels(labeler, torch.zeros(2, 3, 64, 64), (student_grid, student_grid), 4,
                          mode="argmax", smoothing=0.0)
    assert y.shape == (2, student_grid * student_grid, 4)
    got = y.argmax(-1).reshape(2, student_grid, student_grid)
    r, c = torch.meshgrid(torch.arange(student_grid), torch.arange(student_grid), indexing="ij")
    half = student_grid // 2
    assert torch.equal(got[1], 2 * (r >= half) + (c >= half))  # row-major, rows = y, columns = x


def test_grid_mismatch_error_names_grids_and_keys():
    labeler = _position_labeler(4, stride=16)
    with pytest.raises(ValueError) as e:
        make_token_labels(labeler, torch.zeros(1, 3, 64, 64), (8, 8), 4, grid_mismatch="error")
    msg = str(e.value)
    assert "4x4" in msg and "8x8" in msg and "train.img_size" in msg and "stl.labeler" in msg
    # matching grids are fine in 'error' mode
    y = make_token_labels(labeler, torch.zeros(1, 3, 64, 64), (4, 4), 4, grid_mismatch="error")
    assert y.shape == (1, 16, 4)


def test_bad_labeler_outputs_are_clear_errors():
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="cannot infer"):
        make_token_labels(ConstLabeler(torch.zeros(1, 10, 4), stride=16), x, (4, 4), 4)
    with pytest.raises(ValueError, match="K=5"):
        make_token_labels(ConstLabeler(torch.zeros(4), stride=16), x, (4, 4), 5)

    class PlainModel(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 4)

    with pytest.raises(TypeError, match="_token"):
        make_token_labels(PlainModel(), x, (4, 4), 4)
