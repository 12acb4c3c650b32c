"""ImageNet-C style corruptions and the robustness evaluation: shapes, determinism, severity order, exact
top-1 numbers with a stub classifier, and the files the evaluate stage writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from stl.config import CORRUPTIONS
from stl.evaluate.robustness import (
    SEVERITIES,
    corrupt,
    evaluate_robustness,
    robustness_heatmap,
    robustness_metrics,
    select_subset,
    write_robustness,
)

# Corruptions whose output does not depend on the seed.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
# Severity 1 <= 2 <= ... <= 5 in damage by construction of the ImageNet-C tables. Not listed: glass blur
# (iterations 2, 1, 3, 2, 2), snow (severity 3 changes flake statistics), pixelate (block sizes alias with the
# grid at 32 px), elastic (severities 1-2 are large affine warps, 3-5 small local displacements).
MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
            "frost", "fog", "brightness", "contrast", "jpeg_compression")
# Corruptions with parameters in pixels, scaled by image size: severity 1 should hurt a 32 px image about as
# much as a 64 px one (it would wipe a 32 px image out if the 224 px parameters were used as they are).
SIZE_SCALED = ("defocus_blur", "glass_blur", "motion_blur", "snow", "frost", "fog", "elastic_transform")


def _scene(side: int) -> np.ndarray:
    """The same smooth scene (waves, a disc, a box) at any size: rendered at 256 px, box-downsampled."""
    n = 256
    v, u = (np.mgrid[0:n, 0:n] + 0.5) / n
    img = np.stack([0.45 + 0.3 * np.sin(2 * np.pi * (2.3 * u + 1.1 * v)),
                    0.5 + 0.3 * np.sin(2 * np.pi * (0.7 * u - 3.1 * v) + 1.0),
                    0.5 + 0.25 * np.cos(2 * np.pi * 5.3 * u * v)], axis=2)
    img[(v - 0.35) ** 2 + (u - 0.62) ** 2 < 0.045] = (0.95, 0.85, 0.1)
    img[(v > 0.58) & (v < 0.9) & (u > 0.12) & (u < 0.43)] = (0.1, 0.25, 0.75)
    big = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return np.asarray(big.resize((side, side), Image.Resampling.BOX))


def _damage(clean: np.ndarray, corrupted: Image.Image) -> float:
    """1 - Pearson correlation with the clean image: structure lost (not fooled by a uniform shift)."""
    a, b = clean.astype(float).ravel(), np.asarray(corrupted, dtype=float).ravel()
    return float(1.0 - np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def damage_table() -> dict[tuple[str, int], np.ndarray]:
    """Mean damage over two seeds, per (corruption, side): an array over severities 1..5."""
    out = {}
    for side in (32, 64):
        clean = _scene(side)
        for name in CORRUPTIONS:
            per_severity = [[_damage(clean, corrupt(clean, name, s, seed)) for seed in (0, 1)]
                            for s in SEVERITIES]
            out[name, side] = np.mean(per_severity, axis=1)
    return out


# ------------------------------------------------------------------------------------------------ corrupt


@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_shape_mode_and_determinism(name: str, side: int) -> None:
    clean = _scene(side)
    for severity in SEVERITIES:
        out = corrupt(clean, name, severity, seed=7)
        assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (side, side)
        again = corrupt(Image.fromarray(clean), name, severity, seed=7)
        assert out.tobytes() == again.tobytes(), "same image, name, severity and seed must be bit-identical"
        other = corrupt(clean, name, severity, seed=8)
        if name in DETERMINISTIC:
            assert other.tobytes() == out.tobytes()
        else:
            assert other.tobytes() != out.tobytes(), f"{name} severity {severity} ignores the seed"
        changed = out.tobytes() != Image.fromarray(clean).tobytes()
        assert changed or (name, severity) == ("motion_blur", 1), f"{name} {severity}: no change"


def test_corrupt_leaves_global_rng_alone() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    for name in CORRUPTIONS:
        corrupt(_scene(32), name, 3, seed=1)
    assert np.random.random() == expected


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (24, 40), (40, 24)])
def test_corrupt_any_size_and_input_kind(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, shape, dtype=np.uint8)
    rgba = Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8))
    for name in CORRUPTIONS:
        for image in (grey, Image.fromarray(grey), rgba):
            out = corrupt(image, name, 5, seed=3)
            assert out.mode == "RGB" and out.size == (shape[1], shape[0])
    # grey input is treated as its RGB version
    as_rgb = Image.fromarray(grey).convert("RGB")
    assert corrupt(grey, "fog", 2, 5).tobytes() == corrupt(as_rgb, "fog", 2, 5).tobytes()


def test_severity_five_hurts_more_than_one(damage_table: dict) -> None:
    for (name, side), damage in damage_table.items():
        if name == "elastic_transform":  # 1-2 are affine warps in the ImageNet-C table; 3-5 grow
            assert damage[4] > damage[2], (name, side, damage)
        else:
            assert damage[4] > damage[0], (name, side, damage)


def test_damage_grows_with_severity_where_the_table_is_monotone(damage_table: dict) -> None:
    for name in MONOTONE:
        for side in (32, 64):
            damage = damage_table[name, side]
            assert np.all(np.diff(damage) >= -1e-4), (name, side, damage)


def test_pixel_parameters_scale_with_image_size(damage_table: dict) -> None:
    for name in SIZE_SCALED:
        small, large = damage_table[name, 32][0], damage_table[name, 64][0]
        assert small <= 2.0 * large + 0.01, (name, small, large)
    # severity 1 leaves a 32 px image recognisable for the blurs (high correlation with the clean image)
    for name in ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "pixelate"):
        assert damage_table[name, 32][0] < 0.05, name


def test_corrupt_known_values() -> None:
    grey = np.full((8, 8, 3), 100, dtype=np.uint8)
    # brightness raises HSV value by 0.1..0.5: grey stays grey
    assert np.all(np.asarray(corrupt(grey, "brightness", 1, 0)) == round(100 + 25.5))
    # contrast keeps a flat image; blurs keep it too
    for name in ("contrast", "defocus_blur", "zoom_blur", "pixelate"):
        assert np.all(np.asarray(corrupt(grey, name, 5, 0)) == 100), name
    # impulse noise only writes 0 or 255, on about 27% of values at severity 5
    big = np.full((64, 64, 3), 100, dtype=np.uint8)
    out = np.asarray(corrupt(big, "impulse_noise", 5, 0))
    assert set(np.unique(out)) <= {0, 100, 255}
    assert abs(np.mean(out != 100) - 0.27) < 0.02
    # gaussian noise std 0.08 at severity 1 (mid-grey, hardly clipped)
    noisy = np.asarray(corrupt(np.full((64, 64, 3), 128, np.uint8), "gaussian_noise", 1, 0)).astype(float)
    assert abs(noisy.std() / 255 - 0.08) < 0.005


@pytest.mark.parametrize("name, severity", [("gaussian", 1), ("speckle_noise", 1), ("", 1)])
def test_corrupt_unknown_name(name: str, severity: int) -> None:
    with pytest.raises(ValueError, match="unknown corruption") as err:
        corrupt(_scene(32), name, severity, 0)
    assert all(c in str(err.value) for c in CORRUPTIONS)


@pytest.mark.parametrize("severity", [0, 6, -1, "3", 2.0, True])
def test_corrupt_bad_severity(severity: object) -> None:
    with pytest.raises(ValueError, match="severity must be one of 1, 2, 3, 4, 5"):
        corrupt(_scene(32), "fog", severity, 0)  # type: ignore[arg-type]


def test_corrupt_bad_seed_and_array() -> None:
    with pytest.raises(ValueError, match="seed"):
        corrupt(_scene(32), "fog", 1, -1)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(_scene(32).astype(np.float32), "fog", 1, 0)
    with pytest.raises(ValueError, match="shape"):
        corrupt(np.zeros((8, 8, 2), np.uint8), "fog", 1, 0)


# --------------------------------------------------------------------------------------- evaluate_robustness

# Grey images; the stub classifier says 1 when the mean is above mid-grey. The last one is mislabelled.
LEVELS = [10, 40, 70, 100, 115, 140, 160, 190, 220, 250, 250]
LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0])


def _grey_images() -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), (v, v, v)) for v in LEVELS]


def _mean_classifier(calls: list[int] | None = None):
    def predict(batch: list[Image.Image]) -> np.ndarray:
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in batch)
        if calls is not None:
            calls.append(len(batch))
        return np.array([int(np.asarray(im).mean() > 127.5) for im in batch])
    return predict


def test_evaluate_robustness_exact_numbers() -> None:
    calls: list[int] = []
    result = evaluate_robustness(_mean_classifier(calls), _grey_images(), LABELS, ["brightness", "contrast"],
                                 [1, 2, 3, 4, 5], max_samples=0, seed=0, batch_size=4, progress=False)
    # brightness adds 25.5 k grey levels at severity k: k more dark images cross mid-grey; contrast keeps
    # flat images; the mislabelled image is always wrong
    assert result["samples"] == 11
    assert result["clean_top1"] == pytest.approx(10 / 11, abs=1e-12)
    expected = ([("brightness", k, (10 - k) / 11) for k in SEVERITIES]
                + [("contrast", k, 10 / 11) for k in SEVERITIES])
    assert [(r["corruption"], r["severity"]) for r in result["table"]] == [(c, k) for c, k, _ in expected]
    assert [r["top1"] for r in result["table"]] == pytest.approx([t for _, _, t in expected], abs=1e-12)
    assert result["per_corruption"] == pytest.approx({"brightness": 7 / 11, "contrast": 10 / 11}, abs=1e-12)
    assert result["mean_corruption_top1"] == pytest.approx(17 / 22, abs=1e-12)
    assert result["relative_robustness"] == pytest.approx(0.85, abs=1e-12)
    assert max(calls) <= 4 and sum(calls) == 11 * 11  # clean + 10 corrupted passes, batches of at most 4
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_evaluate_robustness_independent_of_batch_size() -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(90, 166, (16, 16, 3), dtype=np.uint8)) for _ in range(12)]
    labels = np.array([0, 1] * 6)
    args = (images, labels, ["gaussian_noise", "glass_blur"], [1, 5], 8, 3)
    one = evaluate_robustness(_mean_classifier(), *args, batch_size=1, progress=False)
    many = evaluate_robustness(_mean_classifier(), *args, batch_size=64, progress=False)
    assert one == many and one["samples"] == 8
    assert evaluate_robustness(_mean_classifier(), *args[:-1], 4, batch_size=5, progress=False) != one


def test_select_subset_is_seeded_and_class_proportional() -> None:
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    # shares 3, 1.5, 0.5: floors 3, 1, 0; the one left goes to the largest remainder, ties to the lower label
    chosen = select_subset(labels, 5, seed=1)
    assert np.all(np.diff(chosen) > 0)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [3, 2, 0]
    assert np.array_equal(chosen, select_subset(labels, 5, seed=1))
    assert any(not np.array_equal(chosen, select_subset(labels, 5, seed=s)) for s in range(2, 6))
    assert np.array_equal(select_subset(labels, 0, seed=1), np.arange(10))
    assert np.array_equal(select_subset(labels, 99, seed=1), np.arange(10))
    with pytest.raises(ValueError, match="max_samples"):
        select_subset(labels, -1, seed=1)


def test_evaluate_robustness_errors() -> None:
    images, predict = _grey_images(), _mean_classifier()
    with pytest.raises(ValueError, match="one label per image"):
        evaluate_robustness(predict, images, LABELS[:-1], ["fog"], [1], 0, 0, progress=False)
    with pytest.raises(ValueError, match="enabled: false"):
        evaluate_robustness(predict, images, LABELS, [], [1], 0, 0, progress=False)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        evaluate_robustness(predict, images, LABELS, ["fog", "rain"], [1], 0, 0, progress=False)
    with pytest.raises(ValueError, match="severity"):
        evaluate_robustness(predict, images, LABELS, ["fog"], [1, 7], 0, 0, progress=False)
    with pytest.raises(ValueError, match="predictions for 4 images"):
        evaluate_robustness(lambda batch: np.zeros(1), images, LABELS, ["fog"], [1], 0, 0, batch_size=4,
                            progress=False)


# ------------------------------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def result() -> dict:
    return evaluate_robustness(_mean_classifier(), _grey_images(), LABELS, ["brightness", "contrast"],
                               [1, 2, 3, 4, 5], max_samples=0, seed=0, progress=False)


def test_write_robustness_files(result: dict, tmp_path) -> None:
    out_dir = tmp_path / "eval"
    paths = write_robustness(result, out_dir)
    assert paths == {"json": out_dir / "robustness.json", "csv": out_dir / "robustness.csv",
                     "heatmap": out_dir / "robustness_heatmap.png"}
    # nothing else (no temp files) is left behind
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in paths.values())
    assert json.loads(paths["json"].read_text()) == result
    with paths["csv"].open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["corruption", "severity", "top1"]
    assert rows[1] == ["brightness", "1", "0.818182"] and rows[-1] == ["contrast", "5", "0.909091"]
    assert len(rows) == 11
    with Image.open(paths["heatmap"]) as png:
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 150


def test_robustness_metrics(result: dict) -> None:
    assert robustness_metrics(result) == {
        "clean_top1": 0.909091, "mean_corruption_top1": 0.772727, "relative_robustness": 0.85,
        "brightness": 0.636364, "contrast": 0.909091,
    }
    no_clean = {**result, "clean_top1": 0.0, "relative_robustness": None}
    assert "relative_robustness" not in robustness_metrics(no_clean)


def test_robustness_heatmap(result: dict) -> None:
    fig = robustness_heatmap(result)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert "clean 90.9" in ax.get_title() and "relative 0.850" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["brightness", "contrast"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4", "5", "mean"]
    assert "81.8" in [t.get_text() for t in ax.texts]
    robustness_heatmap({**result, "clean_top1": 0.0, "relative_robustness": None})  # no ratio: still draws
