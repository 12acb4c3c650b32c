"""Paired (student, teacher) views of one image for STL phase 2.

The frozen token labeler labels a *teacher* view and the student learns those labels token by token on its
own *student* view, so the two views must show the same content at the same token. Each sample therefore
draws its random decisions once (:meth:`PairedTransform.sample_params`): the random-resized-crop box and
interpolation, the horizontal flip, and the RandAugment ops with their final arguments (magnitude noise and
random sign included). :meth:`PairedTransform.apply` then replays them:

- student: crop + flip + every RandAugment op in order, normalise, random erasing (timm, pixel mode);
- teacher: crop + flip + only the geometric ops (Rotate, ShearX/Y, TranslateX/Y[Rel]) with the very same
  arguments and fill, normalise; no photometric op and no random erasing.

Photometric ops (colour, contrast, solarize, invert, ...) map pixel values only, so dropping them from the
teacher keeps the geometry of the two views identical.

Mixup/CutMix is batch level and is NOT done here. The engine must apply it to the student batch only and hand
the teacher batch to the labeler untouched: timm's ``Mixup`` mixes images in place, so never pass it a tensor
that shares storage with the teacher batch (the views returned here never share storage).

Randomness comes from python's ``random`` module (or a ``random.Random`` passed to ``sample_params``), the
same source timm's transforms use, so the per-worker seeding of a DataLoader makes the views reproducible.
Random erasing draws from the global ``random`` and torch generators, as timm's does; it is student-only and
not part of the recorded state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image
from timm.data.auto_augment import NAME_TO_OP, AugmentOp, RandAugment, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_interp_mode, str_to_pil_interp
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

# RandAugment ops that move pixels: the teacher replays these (same arguments, same fill).
GEOMETRIC_OPS = frozenset({
    "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel",
})
# Ops that only change pixel values: student only.
PHOTOMETRIC_OPS = frozenset({
    "AutoContrast", "Equalize", "Invert",
    "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
    "Solarize", "SolarizeIncreasing", "SolarizeAdd",
    "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing",
    "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing",
    "Desaturate", "GaussianBlur", "GaussianBlurRand",
})

_RRC_SCALE_MAX = 1.0
_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_LEVEL_DENOM = 10.0  # timm's magnitude scale: M10 = full strength
_RANDOM_INTERP = ("bilinear", "bicubic")  # timm's choice for interpolation='random'


@dataclass(frozen=True)
class AugOpParams:
    """One RandAugment op as it will be applied: timm op name, final level arguments, resample, fill."""

    name: str
    args: tuple
    resample: int
    fill: tuple[int, ...]

    @property
    def geometric(self) -> bool:
        return self.name in GEOMETRIC_OPS


@dataclass(frozen=True)
class PairedParams:
    """Every random decision of one sample, shared by its student and teacher views."""

    crop: tuple[int, int, int, int]  # top, left, height, width in the source image (torchvision order)
    crop_interpolation: InterpolationMode
    hflip: bool
    ops: tuple[AugOpParams, ...]  # the ops that fire, in order (skipped ones are not listed)


@contextmanager
def _global_random_as(rng: random.Random | None):
    """Run timm code that draws from the global ``random`` on ``rng``'s stream instead (then sync back)."""
    if rng is None:
        yield
        return
    saved = random.getstate()
    random.setstate(rng.getstate())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        random.setstate(saved)


def _classify(op_name: str) -> bool:
    """True for geometric ops; an op timm may add later must be classified before it can misalign views."""
    if op_name in GEOMETRIC_OPS:
        return True
    if op_name in PHOTOMETRIC_OPS:
        return False
    raise ValueError(
        f"RandAugment op {op_name!r} is neither a known geometric nor a known photometric op; add it to "
        "GEOMETRIC_OPS or PHOTOMETRIC_OPS in stl/data/stl_transforms.py so the teacher view stays aligned"
    )


def _parse_rand_augment(auto_augment: str, img_size: int, mean: Sequence[float],
                        interpolation: str) -> RandAugment | None:
    """timm's own parser, with the hparams timm's train transform passes (translate, fill, resample)."""
    if not auto_augment:
        return None
    if not auto_augment.startswith("rand"):
        raise ValueError(
            f"auto_augment {auto_augment!r}: STL paired views support RandAugment strings "
            "('rand-m9-mstd0.5-inc1') or '' (off); set train.auto_augment accordingly"
        )
    hparams: dict = {
        "translate_const": int(img_size * 0.45),
        "img_mean": tuple(min(255, round(255 * x)) for x in mean),
    }
    if interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    try:
        ra = rand_augment_transform(auto_augment, hparams)
    except (AssertionError, ValueError, KeyError) as e:
        raise ValueError(
            f"auto_augment {auto_augment!r} is not a valid timm RandAugment string ({e!r}); "
            "fix train.auto_augment"
        ) from None
    for op in ra.ops:
        _classify(op.name)
    return ra


def _sample_rrc(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: random.Random) -> tuple[int, int, int, int]:
    """The standard random-resized-crop box (timm/torchvision algorithm) drawn from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PairedTransform:
    """Callable PIL image -> (student_view, teacher_view), both normalised float tensors [3, S, S]."""

    def __init__(self, img_size: int, auto_augment: str, reprob: float, hflip: float, scale_min: float,
                 mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic") -> None:
        if interpolation != "random":
            str_to_interp_mode(interpolation)  # fail early on an unknown name
        self.img_size = int(img_size)
        self.scale = (float(scale_min), _RRC_SCALE_MAX)
        self.ratio = _RRC_RATIO
        self.hflip = float(hflip)
        self.interpolation = interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.rand_augment = _parse_rand_augment(auto_augment, self.img_size, self.mean, interpolation)
        self.random_erasing = (
            RandomErasing(reprob, mode="pixel", max_count=1, device="cpu") if reprob > 0 else None
        )

    # -- sampling ---------------------------------------------------------------------------------------

    def sample_params(self, img: Image.Image, rng: random.Random | None = None) -> PairedParams:
        """Draw every random decision of one sample once (``rng`` None = the global ``random``)."""
        r = rng if rng is not None else random
        crop = _sample_rrc(img.width, img.height, self.scale, self.ratio, r)
        interp_name = r.choice(_RANDOM_INTERP) if self.interpolation == "random" else self.interpolation
        flip = self.hflip > 0 and r.random() < self.hflip
        ops = self._sample_ops(r, rng)
        return PairedParams(crop=crop, crop_interpolation=str_to_interp_mode(interp_name), hflip=flip,
                            ops=ops)

    def _sample_ops(self, r, rng: random.Random | None) -> tuple[AugOpParams, ...]:
        """RandAugment's choices as timm makes them, but recorded: which ops, whether each fires, its args."""
        ra = self.rand_augment
        if ra is None:
            return ()
        n = ra.num_layers
        if ra.choice_weights is None:
            chosen = [r.choice(ra.ops) for _ in range(n)]  # with replacement, as timm
        else:
            chosen = self._weighted_without_replacement(ra.ops, list(ra.choice_weights), n, r)
        out = []
        for op in chosen:
            if op.prob < 1.0 and r.random() > op.prob:
                continue
            out.append(self._sample_op(op, r, rng))
        return tuple(out)

    @staticmethod
    def _weighted_without_replacement(ops: list, weights: list[float], n: int, r) -> list:
        pool, w, picked = list(ops), list(weights), []
        for _ in range(min(n, len(pool))):
            k = r.choices(range(len(pool)), weights=w)[0]
            picked.append(pool.pop(k))
            w.pop(k)
        return picked

    @staticmethod
    def _sample_op(op: AugmentOp, r, rng: random.Random | None) -> AugOpParams:
        """Final magnitude (mstd noise, clipping) and level args (random sign) of one op, as timm computes."""
        magnitude = op.magnitude
        if op.magnitude_std == float("inf"):
            magnitude = r.uniform(0, magnitude)
        elif op.magnitude_std > 0:
            magnitude = r.gauss(magnitude, op.magnitude_std)
        magnitude = max(0.0, min(magnitude, op.magnitude_max or _LEVEL_DENOM))
        args: tuple = ()
        if op.level_fn is not None:
            with _global_random_as(rng):  # timm's level functions draw the sign from the global random
                args = tuple(op.level_fn(magnitude, op.hparams))
        resample = op.kwargs["resample"]
        if isinstance(resample, (list, tuple)):
            resample = r.choice(resample)
        fill = tuple(op.kwargs["fillcolor"])
        return AugOpParams(name=op.name, args=args, resample=int(resample), fill=fill)

    # -- replay -------------------------------------------------------------------------------------------

    def crop_flip(self, img: Image.Image, params: PairedParams) -> Image.Image:
        """The shared first stage of both views: crop box resized to S x S, then the optional flip."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        top, left, h, w = params.crop
        size = [self.img_size, self.img_size]
        out = tvf.resized_crop(img, top, left, h, w, size, params.crop_interpolation)
        return tvf.hflip(out) if params.hflip else out

    @staticmethod
    def apply_ops(img: Image.Image, ops: Sequence[AugOpParams], teacher: bool) -> Image.Image:
        """Replay recorded RandAugment ops in order; the teacher skips the photometric ones."""
        for op in ops:
            if teacher and not op.geometric:
                continue
            img = NAME_TO_OP[op.name](img, *op.args, fillcolor=op.fill, resample=op.resample)
        return img

    def to_tensor(self, img: Image.Image) -> Tensor:
        """PIL -> normalised float tensor [3, S, S]."""
        return tvf.normalize(tvf.to_tensor(img), self.mean, self.std)

    def apply(self, img: Image.Image, params: PairedParams, teacher: bool) -> Tensor:
        """One view of ``img`` from recorded ``params``: the teacher's, or the student's (with erasing)."""
        x = self.to_tensor(self.apply_ops(self.crop_flip(img, params), params.ops, teacher))
        if not teacher and self.random_erasing is not None:
            x = self.random_erasing(x)
        return x

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        params = self.sample_params(img)
        base = self.crop_flip(img, params)  # shared work: crop once
        teacher_img = self.apply_ops(base, params.ops, teacher=True)
        if all(op.geometric for op in params.ops):
            student_img = teacher_img  # nothing photometric fired: same pixels, skip replaying the ops
        else:
            student_img = self.apply_ops(base, params.ops, teacher=False)
        teacher = self.to_tensor(teacher_img)
        student = self.to_tensor(student_img)  # always a fresh tensor: erasing and Mixup work in place
        if self.random_erasing is not None:
            student = self.random_erasing(student)
        return student, teacher

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, hflip={self.hflip}, "
                f"interpolation={self.interpolation!r}, rand_augment={self.rand_augment!r}, "
                f"random_erasing={self.random_erasing!r})")


def create_paired_transform(img_size: int, auto_augment: str, reprob: float, hflip: float, scale_min: float,
                            mean: Sequence[float], std: Sequence[float],
                            interpolation: str = "bicubic") -> Callable[[Image.Image], tuple[Tensor, Tensor]]:
    """The STL phase-2 train transform: PIL image -> (student_view, teacher_view), geometry shared."""
    return PairedTransform(img_size=img_size, auto_augment=auto_augment, reprob=reprob, hflip=hflip,
                           scale_min=scale_min, mean=mean, std=std, interpolation=interpolation)
