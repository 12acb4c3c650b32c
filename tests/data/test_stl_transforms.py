"""Paired STL views: the teacher shares the student's geometry, never its photometric ops, erasing, Mixup."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import Mixup
from torch.utils.data import default_collate
from torchvision.transforms import functional as tvf

from stl.data.stl_transforms import AugOpParams, PairedTransform, create_paired_transform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FILL = (124, 116, 104)  # timm's RandAugment fill for the ImageNet mean
RA = "rand-m9-mstd0.5-inc1"


def quadrant_image(width: int = 96, height: int = 80) -> Image.Image:
    """Four distinct colours by quadrant plus a mild gradient, so any misalignment changes pixels."""
    y, x = np.mgrid[0:height, 0:width]
    colours = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [230, 220, 40]], dtype=np.int64)
    quad = (y >= height // 2) * 2 + (x >= width // 2)
    arr = colours[quad] + ((x * 13 + y * 7) % 24 - 12)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make(auto_augment: str = RA, reprob: float = 0.0, hflip: float = 0.5, img_size: int = 64,
         scale_min: float = 0.08) -> PairedTransform:
    t = create_paired_transform(img_size=img_size, auto_augment=auto_augment, reprob=reprob, hflip=hflip,
                                scale_min=scale_min, mean=MEAN, std=STD, interpolation="bicubic")
    assert isinstance(t, PairedTransform)
    return t


def reference_teacher(img: Image.Image, params, size: int) -> torch.Tensor:
    """The teacher view rebuilt independently: torchvision crop/flip, PIL affine maths spelled out."""
    out = tvf.resized_crop(img, *params.crop, [size, size], params.crop_interpolation)
    if params.hflip:
        out = tvf.hflip(out)
    for op in params.ops:
        kw = {"resample": op.resample, "fillcolor": op.fill}
        (arg,) = op.args if op.args else (None,)
        if op.name == "Rotate":
            out = out.rotate(arg, **kw)
        elif op.name == "ShearX":
            out = out.transform(out.size, Image.AFFINE, (1, arg, 0, 0, 1, 0), **kw)
        elif op.name == "ShearY":
            out = out.transform(out.size, Image.AFFINE, (1, 0, 0, arg, 1, 0), **kw)
        elif op.name == "TranslateXRel":
            out = out.transform(out.size, Image.AFFINE, (1, 0, arg * out.size[0], 0, 1, 0), **kw)
        elif op.name == "TranslateYRel":
            out = out.transform(out.size, Image.AFFINE, (1, 0, 0, 0, 1, arg * out.size[1]), **kw)
        else:
            assert not op.geometric, op.name  # photometric: not part of the teacher
    return tvf.normalize(tvf.to_tensor(out), MEAN, STD)


def test_teacher_equals_student_before_photometric_ops():
    img, t = quadrant_image(), make(hflip=0.5)
    n_geo = n_photo = n_flip = 0
    for seed in range(40):
        params = t.sample_params(img, random.Random(seed))
        teacher = t.apply(img, params, teacher=True)
        assert teacher.shape == (3, 64, 64) and teacher.dtype == torch.float32
        # the same params with the photometric ops removed give the student view bit-exactly
        geo_only = dataclasses.replace(params, ops=tuple(op for op in params.ops if op.geometric))
        assert torch.equal(teacher, t.apply(img, geo_only, teacher=False))
        # and an independent rebuild of crop + flip + geometric ops agrees
        assert torch.equal(teacher, reference_teacher(img, params, 64))
        student = t.apply(img, params, teacher=False)
        photometric = [op for op in params.ops if not op.geometric]
        if not photometric:
            assert torch.equal(student, teacher)
        n_geo += any(op.geometric for op in params.ops)
        n_photo += bool(photometric)
        n_flip += params.hflip
    # the loop exercised every branch
    assert n_geo >= 5 and n_photo >= 5 and 5 <= n_flip <= 35


def test_call_replays_the_recorded_params():
    img, t = quadrant_image(), make()
    for seed in range(8):
        random.seed(seed)
        student, teacher = t(img)
        random.seed(seed)
        params = t.sample_params(img)
        assert torch.equal(teacher, t.apply(img, params, teacher=True))
        assert torch.equal(student, t.apply(img, params, teacher=False))


def test_sampling_is_reproducible_and_leaves_global_random_alone():
    img, t = quadrant_image(), make()
    state = random.getstate()
    a = [t.sample_params(img, random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    assert random.getstate() == state
    assert t.sample_params(img, random.Random(4)) != a[0]


def test_rand_augment_string_parsed_by_timm():
    t = make("rand-m9-mstd0-n3-p1.0")
    assert t.rand_augment is not None and t.rand_augment.num_layers == 3
    signs = set()
    for seed in range(60):
        params = t.sample_params(quadrant_image(), random.Random(seed))
        assert len(params.ops) == 3  # p=1: every chosen op fires
        for op in params.ops:
            if op.name == "Rotate":
                assert math.isclose(abs(op.args[0]), 27.0)  # m9 of 30 degrees, no magnitude noise
                signs.add(op.args[0] > 0)
            if op.geometric:
                assert op.fill == FILL
    assert signs == {True, False}  # the random sign is drawn and recorded
    assert make("").rand_augment is None
    assert make("").sample_params(quadrant_image(), random.Random(0)).ops == ()
    with pytest.raises(ValueError, match="train.auto_augment"):
        make("v0")
    with pytest.raises(ValueError, match="RandAugment"):
        make("rand-m9-zz3")


def test_forced_photometric_ops_change_student_only():
    img, t = quadrant_image(), make()
    params = t.sample_params(img, random.Random(0))
    bicubic = int(Image.Resampling.BICUBIC)
    shift = AugOpParams("TranslateXRel", (0.2,), bicubic, FILL)
    rotate = AugOpParams("Rotate", (-15.0,), bicubic, FILL)
    invert = AugOpParams("Invert", (), bicubic, FILL)
    solarize = AugOpParams("Solarize", (0,), bicubic, FILL)
    for photo in (invert, solarize):
        params = dataclasses.replace(params, ops=(shift, photo, rotate))
        student = t.apply(img, params, teacher=False)
        teacher = t.apply(img, params, teacher=True)
        geo = dataclasses.replace(params, ops=(shift, rotate))
        assert torch.equal(teacher, t.apply(img, geo, teacher=False))
        assert not torch.allclose(student, teacher, atol=0.5)
        # the student is exactly the photometric op inserted between the geometric ones
        base = t.crop_flip(img, params)
        manual = ImageOps.invert(base.transform(base.size, Image.AFFINE, (1, 0, 0.2 * 64, 0, 1, 0),
                                                resample=bicubic, fillcolor=FILL))
        manual = manual.rotate(-15.0, resample=bicubic, fillcolor=FILL)
        if photo is invert:
            assert torch.equal(student, t.to_tensor(manual))


def test_random_erasing_on_student_only():
    img, t = quadrant_image(), make(auto_augment="", reprob=1.0)
    for seed in range(4):
        random.seed(seed)
        torch.manual_seed(seed)
        student, teacher = t(img)
        random.seed(seed)
        clean = t.to_tensor(t.crop_flip(img, t.sample_params(img)))
        assert torch.equal(teacher, clean)
        assert not torch.equal(student, clean)
        erased = (student != clean).any(dim=0)
        assert 0 < erased.float().mean() < 0.5  # one box of at most a third of the image


def test_views_never_share_storage():
    img, t = quadrant_image(), make(auto_augment="", reprob=0.0)
    student, teacher = t(img)
    assert torch.equal(student, teacher)
    assert student.untyped_storage().data_ptr() != teacher.untyped_storage().data_ptr()
    student.mul_(0)
    assert teacher.abs().sum() > 0


def test_mixup_cutmix_on_student_batch_never_reaches_teacher():
    """The engine's order: collate (student, teacher) pairs, Mixup/CutMix the student batch only."""
    img, t = quadrant_image(), make(reprob=0.25)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                  num_classes=4)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(4):  # both Mixup and CutMix get drawn
        batch = default_collate([(t(img), k) for k in range(4)])
        (student, teacher), labels = batch
        teacher_before, student_before = teacher.clone(), student.clone()
        student, target = mixup(student, labels)
        assert torch.equal(teacher, teacher_before)
        assert not torch.equal(student, student_before)
        assert target.shape == (4, 4)
