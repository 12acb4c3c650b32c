"""Image decoding to 8-bit RGB for every PIL mode, the manifest dataset, and the timm-based transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as tv

from stl.data import (
    ManifestDataset,
    create_transforms,
    load_display_image,
    load_image_rgb,
    read_classes,
    split_dataset,
    to_rgb,
)

from .helpers import png_bytes


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    assert image.mode == "RGB"
    return [tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)]


def saved(tmp_path, image: Image.Image, name: str, **kwargs) -> Image.Image:
    """Round-trip through a file, so the decoder's own mode is what load_image_rgb sees."""
    path = tmp_path / name
    image.save(path, **kwargs)
    return load_image_rgb(path)


def test_grayscale_and_bilevel(tmp_path) -> None:
    gray = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    assert pixels(saved(tmp_path, gray, "g.png")) == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert pixels(saved(tmp_path, bilevel, "b.png")) == [(0, 0, 0), (255, 255, 255)]


def test_palette_with_and_without_transparency(tmp_path) -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 255] + [0] * 759)
    image.putdata([0, 1, 2])
    assert pixels(saved(tmp_path, image, "p.png")) == [(10, 20, 30), (200, 0, 0), (0, 0, 255)]
    white = (255, 255, 255)
    assert pixels(saved(tmp_path, image, "pt.png", transparency=0)) == [white, (200, 0, 0), (0, 0, 255)]
    assert pixels(saved(tmp_path, image, "pt.gif", transparency=2)) == [(10, 20, 30), (200, 0, 0), white]


def test_alpha_is_composited_on_white(tmp_path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    out = pixels(saved(tmp_path, rgba, "a.png"))
    assert out[:2] == [(255, 255, 255), (0, 0, 255)]
    assert all(abs(v - 127) <= 1 for v in out[2])  # half-transparent black over white
    la = Image.new("LA", (2, 1))
    la.putdata([(50, 0), (50, 255)])
    assert pixels(saved(tmp_path, la, "la.png")) == [(255, 255, 255), (50, 50, 50)]


def test_cmyk(tmp_path) -> None:
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    assert pixels(saved(tmp_path, cmyk, "c.tif")) == [(255, 255, 255), (0, 255, 255), (0, 0, 0)]
    jpeg = saved(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "c.jpg", quality=100)
    assert all(abs(a - b) <= 3 for p in pixels(jpeg) for a, b in zip(p, (255, 0, 0), strict=True))


def test_16_bit_is_rescaled_not_clipped(tmp_path) -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    expected = [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]
    assert pixels(saved(tmp_path, image, "16.png")) == expected
    assert pixels(to_rgb(image)) == expected
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode I, as older PIL reads 16-bit PNGs
    assert pixels(to_rgb(as_int32)) == expected
    wide = Image.fromarray(np.array([[-50, 0, 150]], dtype=np.int32))  # outside 0..65535: min-max
    assert pixels(to_rgb(wide)) == [(0, 0, 0), (64, 64, 64), (255, 255, 255)]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert pixels(to_rgb(floats)) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_exif_orientation_is_applied(tmp_path) -> None:
    image = Image.new("RGB", (4, 2), (0, 128, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert saved(tmp_path, image, "o.jpg", exif=exif).size == (2, 4)


def test_unreadable_files_raise(tmp_path) -> None:
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(UnidentifiedImageError):
        load_image_rgb(tmp_path / "t.txt")
    data = png_bytes(0, size=(32, 32))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_image_rgb(tmp_path / "cut.png")


# ------------------------------------------------------------------------------------------ datasets


@pytest.fixture
def split_dir(tmp_path, make_tree):
    raw = make_tree(tmp_path / "raw", {"cat": 4, "dog": 5})
    split_dataset(raw, tmp_path / "split", 0.5, 0.25, 0.25, seed=0)
    return raw, tmp_path / "split"


def test_manifest_dataset(split_dir) -> None:
    raw, split = split_dir
    dataset = ManifestDataset(split / "train.csv", raw)
    assert dataset.classes == read_classes(split) == ["cat", "dog"]
    assert len(dataset) == 5 and dataset.targets == [0, 0, 1, 1, 1]
    assert [p.parent.name for p in dataset.paths] == ["cat", "cat", "dog", "dog", "dog"]
    assert all(p.is_file() and p.is_absolute() for p in dataset.paths)
    image, label = dataset[2]
    assert (image.mode, image.size, label) == ("RGB", (8, 8), 1)
    tensors = ManifestDataset(split / "val.csv", raw, create_transforms(16, train=False))
    batch = torch.utils.data.DataLoader(tensors, batch_size=4)
    x, y = next(iter(batch))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [0, 1]


def test_manifest_dataset_errors(split_dir, tmp_path) -> None:
    raw, split = split_dir
    first = ManifestDataset(split / "test.csv", raw).paths[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match="1 image\\(s\\) listed in .*test.csv are missing"):
        ManifestDataset(split / "test.csv", raw)
    (split / "val.csv").write_text("path,label\ncat/000.png,7\n")
    with pytest.raises(ValueError, match="line 2: label '7' is not an index into the 2 classes"):
        ManifestDataset(split / "val.csv", raw)
    (split / "val.csv").write_text("file,class\n")
    with pytest.raises(ValueError, match="columns path,label"):
        ManifestDataset(split / "val.csv", raw)
    with pytest.raises(FileNotFoundError, match="run the split stage"):
        read_classes(tmp_path)
    (tmp_path / "classes.json").write_text('["a", "a"]')
    with pytest.raises(ValueError, match="distinct class names"):
        read_classes(tmp_path)


# ---------------------------------------------------------------------------------------- transforms


def test_train_transform(tmp_path) -> None:
    transform = create_transforms(32, train=True, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, hflip=0.3,
                                  scale_min=0.5)
    steps = transform.transforms
    crop = next(t for t in steps if isinstance(t, RandomResizedCropAndInterpolation))
    assert crop.size == (32, 32) and crop.scale == (0.5, 1.0)
    assert next(t for t in steps if isinstance(t, tv.RandomHorizontalFlip)).p == 0.3
    assert any(type(t).__name__ == "RandAugment" for t in steps)
    assert not any(isinstance(t, tv.ColorJitter) for t in steps)  # timm drops jitter under RandAugment
    erasing = next(t for t in steps if isinstance(t, RandomErasing))
    assert (erasing.probability, erasing.mode) == (0.25, "pixel")
    out = transform(Image.new("RGB", (40, 30), (120, 60, 30)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    plain = create_transforms(32, train=True).transforms
    assert any(isinstance(t, tv.ColorJitter) for t in plain)
    assert not any(isinstance(t, RandomErasing) for t in plain)


def test_eval_transform_resizes_then_center_crops() -> None:
    transform = create_transforms(32, train=False, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    resize, crop = transform.transforms[:2]
    assert isinstance(resize, tv.Resize) and resize.size == 36  # floor(32 / 0.875), short side
    assert isinstance(crop, tv.CenterCrop) and tuple(crop.size) == (32, 32)
    image = Image.new("RGB", (72, 36), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 18, 36))  # the left quarter is cut away by the crop
    out = transform(image)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(out, transform(image))
    full = create_transforms(32, train=False)
    assert full.transforms[0].size == 32


def test_display_image_is_the_eval_transforms_input(tmp_path) -> None:
    image = Image.new("RGB", (96, 48), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 16, 48))  # a band on the left: outside the centre crop
    path = tmp_path / "wide.png"
    image.save(path)
    shown = load_display_image(path, 32)
    assert shown.size == (32, 32) and np.all(np.asarray(shown) == (255, 0, 0))
    to_tensor = create_transforms(32, train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.testing.assert_close(tv.functional.to_tensor(shown), to_tensor(load_image_rgb(path)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"auto_augment": "bogus-m9"}, "invalid auto_augment 'bogus-m9'"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"scale_min": 0.0}, "scale_min"),
        ({"interpolation": "cubic"}, "interpolation must be one of"),
        ({"reprob": 2.0}, "probabilities"),
    ],
)
def test_transform_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        create_transforms(32, train=True, **kwargs)
