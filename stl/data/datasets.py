"""Image loading, the manifest-backed dataset and the train/eval transforms.

Every image goes through `load_image_rgb`, so the split stage's validation and training see exactly the
same pixels, whatever the file's mode (grayscale, palette, alpha, CMYK, 16-bit).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

__all__ = [
    "ManifestDataset", "create_transforms", "load_display_image", "load_image_rgb", "read_classes", "to_rgb",
]

_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as a viewer shows them
_EXIF_ORIENTATION = 0x0112
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, valid on Pillow >= 12: Pillow now refuses 0 bits, which timm's 'PosterizeIncreasing'
    reaches at full magnitude; 0 bits keeps nothing (a black image), as older Pillow returned."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


_patch_timm_posterize()


def load_image_rgb(path: str | Path | IO[bytes]) -> Image.Image:
    """Decode an image file fully and return it as 8-bit RGB, upright per its EXIF orientation.

    Raises the decoder's error (OSError, `PIL.UnidentifiedImageError`, ...) for files that are not images,
    are truncated or unreadable: the split stage relies on this to skip them. See `to_rgb` for modes.
    """
    with Image.open(path) as image:
        image.load()  # decode everything now: truncated files fail here, not in a training worker
        try:
            if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # a camera's sideways photo, shown upright
                image = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block must not make a good image unreadable
            pass
        return to_rgb(image)


def load_display_image(path: str | Path, img_size: int) -> Image.Image:
    """The image as the eval transform hands it to the model, before normalisation: short side resized to
    ``img_size`` (bicubic), centre-cropped to ``img_size`` square. For figures drawn over the model's input
    (token-label maps) and for example inputs."""
    from torchvision.transforms import functional as TF

    image = TF.resize(load_image_rgb(path), img_size, interpolation=TF.InterpolationMode.BICUBIC)
    return TF.center_crop(image, img_size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, returning a new image.

    - L, 1, P without transparency, YCbCr, CMYK: PIL's conversion (CMYK (0,0,0,0) is white).
    - RGBA, LA, PA and P with a transparency entry: composited on white, so transparent areas look as in a
      viewer instead of revealing whatever colour the encoder stored under alpha 0.
    - I;16* (16-bit): rescaled from 0..65535 to 0..255; I (32-bit int, how some decoders hold 16-bit data)
      likewise when its values fit 0..65535, else min-max scaled; F (float) scaled from 0..1 when it fits,
      else min-max scaled. Never clipped, so 16-bit images do not come out white.
    """
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(image)).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        vmin, vmax = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "I" and vmin >= 0 and vmax <= 65535:
            low, high = 0.0, 65535.0
        elif image.mode == "F" and vmin >= 0 and vmax <= 1:
            low, high = 0.0, 1.0
        else:
            low, high = vmin, vmax if vmax > vmin else vmin + 1.0
    scaled = np.rint((values - low) * (255.0 / (high - low)))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def read_classes(split_dir: str | Path) -> list[str]:
    """Read `classes.json` (class names in label order) written by the split stage."""
    path = Path(split_dir) / "classes.json"
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} not found: run the split stage (dvc repro split) first") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): run the split stage again") from err
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValueError(f"{path} must hold a non-empty list of distinct class names: run the split again")
    return classes


class ManifestDataset(torch.utils.data.Dataset):
    """The images listed in one split manifest (`path,label` CSV, paths relative to `root`).

    Items are `(transform(image), label)`, or `(PIL RGB image, label)` without a transform. `classes` comes
    from `classes.json` beside the manifest; `targets`, `paths` (absolute) and `rel_paths` (as in the CSV)
    are aligned with the items, for samplers, metrics and prediction files.
    """

    def __init__(self, manifest_csv: str | Path, root: str | Path, transform: Callable | None = None) -> None:
        self.manifest = Path(manifest_csv)
        self.root = Path(root)
        self.transform = transform
        self.classes: list[str] = read_classes(self.manifest.parent)
        self.rel_paths: list[str] = []
        self.targets: list[int] = []
        with open(self.manifest, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{self.manifest} must have the columns path,label: run the split again")
            for line, row in enumerate(reader, start=2):
                label = _parse_label(row["label"])
                if label is None or not 0 <= label < len(self.classes):
                    raise ValueError(
                        f"{self.manifest} line {line}: label {row['label']!r} is not an index into the "
                        f"{len(self.classes)} classes of classes.json: run the split stage again"
                    )
                self.rel_paths.append(row["path"])
                self.targets.append(label)
        self.paths: list[Path] = [self.root / p for p in self.rel_paths]
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {self.manifest} are missing under {self.root}, e.g. "
                f"{missing[0]}: the raw data changed since the split; run `dvc repro` to split again"
            )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_image_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _parse_label(text: str | None) -> int | None:
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def create_transforms(
    img_size: int,
    train: bool,
    auto_augment: str = "",
    reprob: float = 0.0,
    hflip: float = 0.5,
    scale_min: float = 0.08,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float = 1.0,
    color_jitter: float = 0.0,
) -> Callable:
    """Build the train or eval transform (PIL RGB image -> normalized tensor) with timm's factory.

    Train: random resized crop (scale `scale_min`..1), horizontal flip, RandAugment when `auto_augment` is a
    timm string such as 'rand-m9-mstd0.5-inc1' (timm then skips colour jitter), random erasing with
    per-pixel noise. Colour jitter is off by default (timm's 0.4 would apply only without RandAugment, and
    the STL student's paired transform has none), so every phase sees the same augmentations.
    Eval: resize the short side to floor(img_size / crop_pct), center crop img_size.
    """
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    if not 0.0 <= reprob <= 1.0 or not 0.0 <= hflip <= 1.0:
        raise ValueError(f"reprob and hflip are probabilities in [0, 1], got reprob={reprob}, hflip={hflip}")
    if not 0.0 < scale_min <= 1.0:
        raise ValueError(f"scale_min must be in (0, 1], got {scale_min}")
    if not 0.0 < crop_pct <= 1.0 or not math.isfinite(crop_pct):
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    allowed = _INTERPOLATIONS + (("random",) if train else ())
    if interpolation not in allowed:
        raise ValueError(f"interpolation must be one of {', '.join(allowed)}, got {interpolation!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need three values each (std > 0), got mean={mean}, std={std}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if not train:
        return create_transform(
            img_size, is_training=False, interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct
        )
    try:
        return create_transform(
            img_size,
            is_training=True,
            scale=(scale_min, 1.0),
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment or None,
            interpolation=interpolation,
            mean=mean,
            std=std,
            re_prob=reprob,
            re_mode="pixel",
            re_count=1,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ValueError(
            f"invalid auto_augment {auto_augment!r} ({type(err).__name__}: {err}): use a timm policy string "
            f"such as 'rand-m9-mstd0.5-inc1', or '' for none"
        ) from err
