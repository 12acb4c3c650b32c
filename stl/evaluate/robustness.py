"""ImageNet-C style corruptions, and the robustness evaluation the evaluate stage reports.

:func:`corrupt` applies one of the 15 ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019) at severity
1..5 with numpy, scipy.ndimage and PIL only (the reference code needs OpenCV, scikit-image and ImageMagick).
:func:`evaluate_robustness` measures top-1 on a seeded subset of a split under every (corruption, severity);
:func:`write_robustness` writes it as JSON, a DVC plots CSV and a heatmap PNG.

Parameters are the ImageNet-C tables, which were tuned on 224 px images. Parameters that are lengths in pixels
are multiplied by ``s = min(height, width) / 224`` so a corruption covers the same *fraction* of the image at
any size (a 32 px image gets the look of the 224 px corruption shrunk 7x, not a 224 px blur that wipes it
out). Scaled: blur radii and sigmas (defocus, glass, motion, snow streaks), glass-blur shuffle distance,
snow-flake size, elastic displacement and smoothness, and the fog fractal's size (one fractal per image, as
ImageNet-C's 256 px fractal for 224 px). Not scaled: noise amplitudes, zoom factors, pixelate and brightness /
contrast factors, JPEG quality, which do not depend on the pixel size. Where scaling meets the pixel grid:

- defocus and motion kernels are rendered with sub-pixel accuracy (a disk / line of samples splatted
  bilinearly), so a 0.4 px defocus is a slight blur rather than nothing or a full 3x3 box;
- glass blur moves pixels by whole pixels: a shuffle distance ``d * s`` below one pixel moves that fraction
  of the pixels by one pixel (each pixel takes a random neighbour: a vectorised stand-in for the reference's
  sequential swaps); snow flakes are at least one pixel;
- elastic keeps the displacement field's smoothness and expected magnitude relative to the image side (the
  gain is corrected by the L2 norm of the discrete Gaussian, which at small sigma is not ``1 / sigma``).

Two corruptions differ from the reference by necessity: frost blends procedurally generated ice textures (the
reference blends six frost photographs that are not available here: five textures are rendered once per
process from a fixed seed, then cropped at random and resampled like the photos); motion blur is a one-sided
Gaussian-weighted line kernel as ImageMagick's ``MotionBlurImage`` (the reference calls ImageMagick).

Randomness comes only from ``np.random.default_rng(seed)``: the same (image, name, severity, seed) gives
bit-identical output on the same platform; the global numpy and torch generators are never touched.
Corruptions are applied at the size given: corrupt images at the resolution the model sees (after the
evaluation resize / crop), as ImageNet-C corrupts 224 px centre crops.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage, signal
from tqdm import tqdm

from stl.config import CORRUPTIONS
from stl.io import write_bytes_atomic

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 224  # the image side the ImageNet-C parameter tables were tuned for
_DIGITS = 6

# ImageNet-C parameter tables (224 px), one entry per severity 1..5; lengths are in 224 px pixels.
_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # std on 0..1
_SHOT_NOISE = (60, 25, 12, 5, 3)  # Poisson photons per unit intensity
_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of salt-and-pepper values
_DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, anti-alias sigma
_GLASS_BLUR = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, max shift, iterations
_MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # kernel radius, sigma
_ZOOM_BLUR = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))  # arange
# snow: flake mean, std, zoom (flake size), threshold, streak radius, streak sigma, image weight
_SNOW = ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
         (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))
_FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # image weight, frost weight
_FOG = ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4))  # fog strength, fractal roughness decay
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor on the deviation from the channel mean
# elastic: displacement gain, displacement smoothing sigma, affine corner jitter (the reference writes 244 px)
_ELASTIC = ((244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
            (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
            (244 * 0.12, 244 * 0.01, 244 * 0.02))
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # downscale factor
_JPEG = (25, 18, 15, 10, 7)  # quality

# Frost textures: rendered once per process (fixed seed), cropped like the reference's photographs.
_FROST_BANK_SIZE = 512
_FROST_BANK_COUNT = 5
_FROST_SEED = 2019
_FROST_TINT = np.array([0.86, 0.93, 1.0], dtype=np.float32)
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as OpenCV's RGB2GRAY
_DIRECT_KERNEL_MAX = 225  # kernels with more taps are applied by FFT


# ----------------------------------------------------------------------------------------------- corruptions


def corrupt(image: Image.Image | np.ndarray, name: str, severity: int, seed: int) -> Image.Image:
    """``image`` under ImageNet-C corruption ``name`` at ``severity`` (1..5): RGB, the same size.

    ``image`` is a PIL image (any mode; alpha is dropped) or a uint8 array ``[H, W]`` / ``[H, W, C]``. All
    randomness comes from ``np.random.default_rng(seed)``, so equal inputs give bit-identical outputs.
    """
    fn = _resolve_corruption(name, severity)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"corrupt: seed must be a non-negative integer, got {seed!r}")
    rgb = _as_rgb_array(image)
    scale = min(rgb.shape[:2]) / REFERENCE_SIDE
    out = fn(rgb, severity - 1, np.random.default_rng(int(seed)), scale)
    if out.dtype != np.uint8:
        out = np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out))


def _resolve_corruption(name: str, severity: int) -> Callable[..., np.ndarray]:
    """The implementation of ``name``, after checking ``name`` and ``severity`` (errors list the allowed)."""
    if name not in _CORRUPTION_FNS:
        raise ValueError(f"unknown corruption {name!r}; allowed: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity!r}")
    return _CORRUPTION_FNS[name]


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 from a PIL image or a uint8 array (grey is repeated, alpha dropped)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"corrupt: arrays must be uint8 (0..255), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"corrupt: expected an [H, W] or [H, W, 1|3|4] array, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _unit(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) / np.float32(255.0)


def _gaussian_noise(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    return _unit(rgb) + rng.normal(0.0, _GAUSSIAN_NOISE[k], rgb.shape).astype(np.float32)


def _shot_noise(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    photons = _SHOT_NOISE[k]
    return (rng.poisson(_unit(rgb) * photons) / photons).astype(np.float32)


def _impulse_noise(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Salt and pepper on each channel value independently (as scikit-image's ``random_noise('s&p')``)."""
    x = _unit(rgb)
    hit = rng.random(rgb.shape) < _IMPULSE_NOISE[k]
    salt = rng.random(rgb.shape) < 0.5
    return np.where(hit, salt.astype(np.float32), x)


def _defocus_blur(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    radius, alias = _DEFOCUS_BLUR[k]
    return _filter2d(_unit(rgb), _disk_kernel(round(radius * scale, 4), alias), mode="mirror")


def _glass_blur(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Blur, shuffle pixels locally, blur again; see the module docstring for sub-pixel shuffle distances."""
    sigma, max_shift, iterations = _GLASS_BLUR[k]
    sigma = sigma * scale
    x = ndimage.gaussian_filter(_unit(rgb), sigma=(sigma, sigma, 0), mode="nearest")
    shift = max_shift * scale
    reach, moving = max(1, round(shift)), min(1.0, shift)
    h, w = x.shape[:2]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    for _ in range(iterations):
        dy = rng.integers(-reach, reach + 1, (h, w))
        dx = rng.integers(-reach, reach + 1, (h, w))
        if moving < 1.0:
            still = rng.random((h, w)) >= moving
            dy[still], dx[still] = 0, 0
        x = x[np.clip(rows + dy, 0, h - 1), np.clip(cols + dx, 0, w - 1)]
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest")


def _motion_blur(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    radius, sigma = _MOTION_BLUR[k]
    kernel = _line_kernel(radius * scale, sigma * scale, rng.uniform(-45.0, 45.0))
    return _filter2d(_unit(rgb), kernel, mode="nearest")


def _zoom_blur(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """The mean of the image and its centre zooms (zoom factors are relative: nothing to scale)."""
    x = _unit(rgb)
    factors = np.arange(*_ZOOM_BLUR[k])
    out = x.copy()
    for factor in factors:
        out += _centre_zoom(x, float(factor))
    return out / np.float32(len(factors) + 1)


def _snow(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Thresholded zoomed noise as flakes, streaked by a motion blur, added twice (once turned 180 deg)."""
    mean, std, zoom, threshold, streak_radius, streak_sigma, keep = _SNOW[k]
    x = _unit(rgb)
    flakes = rng.normal(mean, std, x.shape[:2]).astype(np.float32)
    flakes = _centre_zoom(flakes, max(1.0, zoom * scale))
    flakes[flakes < threshold] = 0.0
    flakes = np.clip(flakes, 0.0, 1.0)
    kernel = _line_kernel(streak_radius * scale, streak_sigma * scale, rng.uniform(-135.0, -45.0))
    flakes = _filter2d(flakes, kernel, mode="nearest")[:, :, None]
    grey = (x @ _GRAY_WEIGHTS)[:, :, None]
    x = keep * x + (1.0 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, k=2)


def _frost(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Blend a random crop of a procedural frost texture, resampled as a 224 px crop is to this image."""
    keep, amount = _FROST[k]
    h, w = rgb.shape[:2]
    bank = _frost_bank()
    side = min(h, w)
    crop_h = min(_FROST_BANK_SIZE, max(1, round(REFERENCE_SIDE * h / side)))
    crop_w = min(_FROST_BANK_SIZE, max(1, round(REFERENCE_SIDE * w / side)))
    index = int(rng.integers(len(bank)))
    top = int(rng.integers(0, _FROST_BANK_SIZE - crop_h + 1))
    left = int(rng.integers(0, _FROST_BANK_SIZE - crop_w + 1))
    crop = Image.fromarray(np.ascontiguousarray(bank[index, top:top + crop_h, left:left + crop_w]))
    resample = Image.Resampling.BOX if crop_h >= h else Image.Resampling.BILINEAR
    frost = np.asarray(crop.resize((w, h), resample), dtype=np.float32)[:, :, None] * _FROST_TINT
    return keep * _unit(rgb) + amount * frost


def _fog(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Add a plasma fractal the size of the image, then rescale so the brightest value is kept."""
    strength, decay = _FOG[k]
    x = _unit(rgb)
    h, w = x.shape[:2]
    plasma = _plasma_fractal(_next_pow2(max(h, w, 2)), decay, rng)[:h, :w, None]
    peak = x.max()
    return (x + strength * plasma) * (peak / (peak + strength))


def _brightness(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Raise HSV value by a constant, hue and saturation kept: RGB scales by ``V' / V`` (black -> grey)."""
    x = _unit(rgb)
    value = x.max(axis=2, keepdims=True)
    raised = np.minimum(value + np.float32(_BRIGHTNESS[k]), 1.0)
    ratio = np.divide(raised, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * ratio, raised)


def _contrast(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    x = _unit(rgb)
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * np.float32(_CONTRAST[k]) + means


def _elastic_transform(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """A random affine warp then a smooth random displacement, sampled in one bilinear pass."""
    gain, smooth, jitter = _ELASTIC[k]
    x = _unit(rgb)
    h, w = x.shape[:2]
    centre = np.array([h // 2, w // 2], dtype=np.float64)
    half = max(1, min(h, w) // 3)
    src = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + rng.uniform(-jitter * scale, jitter * scale, src.shape)
    # affine A with A @ [p, 1] = q for the three point pairs; output(p) = input(A^-1 p), as warpAffine
    forward = np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]

    sigma = smooth * scale
    gain = gain * scale * _gauss_l2(smooth) / _gauss_l2(sigma)  # same displacement relative to the side
    dy = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, (h, w)), sigma, mode="reflect", truncate=3.0) * gain
    dx = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, (h, w)), sigma, mode="reflect", truncate=3.0) * gain
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    py, px = rows + dy, cols + dx
    coords = np.stack([inverse[0, 0] * py + inverse[0, 1] * px + inverse[0, 2],
                       inverse[1, 0] * py + inverse[1, 1] * px + inverse[1, 2]])
    return np.stack([ndimage.map_coordinates(x[:, :, c], coords, order=1, mode="reflect") for c in range(3)],
                    axis=2)


def _pixelate(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    factor = _PIXELATE[k]
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    img = Image.fromarray(rgb).resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)
    return np.asarray(img)


def _jpeg_compression(rgb: np.ndarray, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=_JPEG[k])
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB"))


_CORRUPTION_FNS: dict[str, Callable[[np.ndarray, int, np.random.Generator, float], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
    "contrast": _contrast, "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
assert tuple(_CORRUPTION_FNS) == CORRUPTIONS, "corruption implementations out of sync with stl.config"


# ------------------------------------------------------------------------------------------------- helpers


def _splat(ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Accumulate weighted points at sub-pixel positions onto a grid with bilinear weights."""
    h, w = shape
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = ys - y0, xs - x0
    acc = np.zeros(h * w)
    for oy, ox, part in ((0, 0, (1 - fy) * (1 - fx)), (1, 0, fy * (1 - fx)), (0, 1, (1 - fy) * fx),
                         (1, 1, fy * fx)):
        yy, xx = y0 + oy, x0 + ox
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        acc += np.bincount((yy * w + xx)[ok], weights=(weights * part)[ok], minlength=h * w)
    return acc.reshape(h, w)


def _trimmed(kernel: np.ndarray) -> np.ndarray:
    """Drop all-zero border rings (keeping the centre) and normalise to sum 1, as float32."""
    c = kernel.shape[0] // 2
    nz = np.argwhere(kernel > 1e-12)
    r = int(np.abs(nz - c).max()) if len(nz) else 0
    kernel = kernel[c - r:c + r + 1, c - r:c + r + 1]
    return (kernel / kernel.sum()).astype(np.float32)


@lru_cache(maxsize=64)
def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """A disk of ``radius`` px, supersampled 8x per axis and splatted, then softened by ``alias_sigma``."""
    half = math.ceil(radius) + 3
    steps = np.arange(-math.ceil(radius) * 8, math.ceil(radius) * 8 + 1) / 8.0
    ys, xs = np.meshgrid(steps, steps, indexing="ij")
    inside = ys**2 + xs**2 <= radius**2
    kernel = _splat(ys[inside] + half, xs[inside] + half, np.ones(int(inside.sum())), (2 * half + 1,) * 2)
    kernel = ndimage.gaussian_filter(kernel / kernel.sum(), alias_sigma, mode="constant")
    out = _trimmed(kernel)
    out.flags.writeable = False
    return out


def _line_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """One-sided motion kernel as ImageMagick's: ``2 ceil(radius) + 1`` taps along ``angle_deg`` weighted by
    ``exp(-i^2 / 2 sigma^2)``, here at sub-pixel positions (bilinear) rather than rounded ones."""
    taps = 2 * math.ceil(max(radius, 1e-6)) + 1
    i = np.arange(taps, dtype=np.float64)
    weights = np.exp(-(i**2) / (2.0 * max(sigma, 1e-3) ** 2))
    angle = math.radians(angle_deg)
    half = taps + 1
    kernel = _splat(half + i * math.sin(angle), half + i * math.cos(angle), weights, (2 * half + 1,) * 2)
    return _trimmed(kernel)


def _filter2d(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """Correlate each channel of ``x`` ([H, W] or [H, W, C]) with a 2-D kernel; FFT for large kernels."""
    k = kernel if x.ndim == 2 else kernel[:, :, None]
    if kernel.size <= _DIRECT_KERNEL_MAX:
        return ndimage.correlate(x, k, mode=mode)
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    pad = ((ph, ph), (pw, pw)) + ((0, 0),) * (x.ndim - 2)
    padded = np.pad(x, pad, mode={"mirror": "reflect", "nearest": "edge", "reflect": "symmetric"}[mode])
    return signal.fftconvolve(padded, k[::-1, ::-1], mode="valid", axes=(0, 1)).astype(np.float32)


@lru_cache(maxsize=256)
def _zoom_axis(n: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices and weights along one axis for a zoom by ``factor`` about the centre."""
    c = (n - 1) / 2.0
    src = np.clip(c + (np.arange(n) - c) / factor, 0, n - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _centre_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """``x`` ([H, W] or [H, W, C]) magnified by ``factor`` about its centre, cropped to its size (bilinear,
    separable: exact for any factor, unlike cropping whole pixels then resizing)."""
    h, w = x.shape[:2]
    y0, y1, fy = _zoom_axis(h, factor)
    x0, x1, fx = _zoom_axis(w, factor)
    extra = (None,) * (x.ndim - 2)
    fy, fx = fy[(slice(None), None, *extra)], fx[(None, slice(None), *extra)]
    rows = x[y0] * (1 - fy) + x[y1] * fy
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` (power of two) diamond-square height map in 0..1, wrapping at the edges.

    Each level's noise amplitude is ``wibble**2`` with ``wibble`` divided by ``decay`` per level (the form the
    ImageNet-C fog uses), so larger ``decay`` gives a smoother fog.
    """
    grid = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        noise = wibble * rng.uniform(-wibble, wibble, square.shape)
        grid[half:size:step, half:size:step] = square / 4 + noise
        centres = grid[half:size:step, half:size:step]
        # points between two corners of a row: those corners and the centres above and below
        across = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=0)
        grid[0:size:step, half:size:step] = across / 4 + wibble * rng.uniform(-wibble, wibble, across.shape)
        # points between two corners of a column: those corners and the centres left and right
        down = corners + np.roll(corners, -1, axis=0) + centres + np.roll(centres, 1, axis=1)
        grid[half:size:step, 0:size:step] = down / 4 + wibble * rng.uniform(-wibble, wibble, down.shape)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    peak = grid.max()
    return (grid / peak if peak > 0 else grid).astype(np.float32)


def _gauss_l2(sigma: float, truncate: float = 3.0) -> float:
    """L2 norm of the 2-D discrete Gaussian scipy uses: the std of filtered unit white noise (no borders)."""
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    return float((k**2).sum())


@lru_cache(maxsize=1)
def _frost_bank() -> np.ndarray:
    """``[5, 512, 512]`` float32 frost intensities, rendered once from a fixed seed (deterministic)."""
    rng = np.random.default_rng(_FROST_SEED)
    bank = np.stack([_frost_texture(_FROST_BANK_SIZE, rng) for _ in range(_FROST_BANK_COUNT)])
    bank.flags.writeable = False
    return bank


def _frost_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Ice on a window: a patchy haze (plasma fractal) with fine grain, and dendritic crystals (needles with
    side branches near 60 degrees, thin bright lines, denser where the haze is), at a density meant for 224 px
    crops as in the reference's photographs."""
    haze = _plasma_fractal(size, 1.7, rng) ** 1.5
    grain = ndimage.gaussian_filter(rng.random((size, size)), 0.8, mode="wrap")
    grain = np.clip((grain - 0.5) * 8.0 + 0.5, 0.0, 1.0) * haze
    n = int(size * size / 1100)
    y0, x0 = rng.uniform(0, size, n), rng.uniform(0, size, n)
    angle = rng.uniform(0, np.pi, n)
    length = size * rng.uniform(0.03, 0.16, n)
    at = haze[y0.astype(np.int64), x0.astype(np.int64)]
    bright = rng.uniform(0.3, 1.0, n) * (0.4 + 0.6 * at)
    seg = [(y0, x0, angle, length, bright)]
    for side in (-1.0, 1.0):  # side branches at fractions of each needle, shorter towards its tip
        for frac in (0.2, 0.4, 0.6, 0.8):
            sub = length * (1 - frac) * rng.uniform(0.25, 0.6, n)
            turn = side * (np.pi / 3 + rng.normal(0.0, 0.12, n))
            seg.append((y0 + frac * length * np.sin(angle), x0 + frac * length * np.cos(angle),
                        angle + turn, sub, bright * 0.8))
    sy, sx, sa, sl, sb = (np.concatenate(parts) for parts in zip(*seg, strict=True))
    counts = np.maximum(1, np.ceil(sl / 0.5).astype(np.int64))
    idx = np.repeat(np.arange(len(sl)), counts)
    t = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) * 0.5
    canvas = _splat(sy[idx] + t * np.sin(sa[idx]), sx[idx] + t * np.cos(sa[idx]), 0.5 * sb[idx], (size, size))
    crystals = 1.0 - np.exp(-1.8 * ndimage.gaussian_filter(canvas, 0.6, mode="wrap"))
    return np.clip(0.1 + 0.45 * haze + 0.2 * grain + 0.75 * crystals, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_robustness(predict_fn: Callable[[list[Image.Image]], np.ndarray],
                        images: Sequence[Image.Image], labels: np.ndarray, corruptions: list[str],
                        severities: list[int], max_samples: int, seed: int, batch_size: int = 64,
                        progress: bool = True) -> dict[str, Any]:
    """Top-1 of ``predict_fn`` on clean and corrupted images: the numbers behind ``robustness.json``.

    ``predict_fn`` maps a list of RGB PIL images to predicted class indices (the caller owns transforms,
    model and device; pass images at the resolution the model sees). With ``max_samples`` > 0 a seeded,
    class-proportional subset is used (see :func:`select_subset`); the same images are scored clean and under
    every corruption. Image ``i`` (its index in ``images``) under (corruption, severity) is corrupted with a
    seed derived from ``(seed, corruption, severity, i)``, so results do not depend on ``batch_size`` or on
    which other images were chosen. ``mean_corruption_top1`` averages all (corruption, severity) pairs;
    ``relative_robustness`` is it over ``clean_top1`` (None when clean top-1 is 0).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"evaluate_robustness: labels must be 1-D with one label per image, got shape "
                         f"{labels.shape} for {len(images)} images")
    if len(images) == 0:
        raise ValueError("evaluate_robustness: no images to evaluate")
    if not corruptions or not severities:
        raise ValueError("evaluate_robustness: no corruptions or severities given; set "
                         "evaluate.robustness.enabled: false to skip the robustness evaluation")
    corruptions, severities = list(dict.fromkeys(corruptions)), list(dict.fromkeys(severities))
    for name in corruptions:
        for severity in severities:
            _resolve_corruption(name, severity)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"evaluate_robustness: seed must be a non-negative integer, got {seed!r}")
    if batch_size < 1:
        raise ValueError(f"evaluate_robustness: batch_size must be >= 1, got {batch_size}")

    subset = select_subset(labels, max_samples, seed)
    clean = [_as_rgb_image(images[int(i)]) for i in subset]
    targets = labels[subset]
    clean_top1 = _top1(predict_fn, clean, targets, batch_size)

    table: list[dict[str, Any]] = []
    pairs = [(name, severity) for name in corruptions for severity in severities]
    for name, severity in tqdm(pairs, desc="robustness", disable=not progress, leave=False):
        corrupted = [corrupt(img, name, severity, _image_seed(seed, name, severity, int(i)))
                     for img, i in zip(clean, subset, strict=True)]
        table.append({"corruption": name, "severity": int(severity),
                      "top1": _top1(predict_fn, corrupted, targets, batch_size)})

    mean_top1 = float(np.mean([row["top1"] for row in table]))
    per_corruption = {name: float(np.mean([row["top1"] for row in table if row["corruption"] == name]))
                      for name in corruptions}
    return {
        "clean_top1": clean_top1,
        "mean_corruption_top1": mean_top1,
        "relative_robustness": mean_top1 / clean_top1 if clean_top1 > 0 else None,
        "per_corruption": per_corruption,
        "table": table,
        "samples": len(subset),
    }


def select_subset(labels: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-proportional sample of ``max_samples`` (0 or >= N: all, in order).

    Each class gets ``max_samples * class_share`` images, rounded by largest remainder (ties to the smaller
    label), drawn by a seeded permutation within the class: the subset keeps the split's class mix, so its
    clean top-1 estimates the split's. A class rarer than ``1 / max_samples`` can get no image.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0 (0 = all), got {max_samples}")
    if max_samples == 0 or max_samples >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = max_samples * counts / n
    quota = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - quota), kind="stable")
    quota[order[:max_samples - int(quota.sum())]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(chosen))


def _image_seed(seed: int, name: str, severity: int, index: int) -> int:
    """An independent seed per (run seed, corruption, severity, image index)."""
    state = np.random.SeedSequence([int(seed), CORRUPTIONS.index(name), int(severity), int(index)])
    return int(state.generate_state(1)[0])


def _as_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(_as_rgb_array(image))


def _top1(predict_fn: Callable[[list[Image.Image]], np.ndarray], images: list[Image.Image],
          targets: np.ndarray, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        preds = np.asarray(predict_fn(batch)).reshape(-1)
        if len(preds) != len(batch):
            raise ValueError(f"predict_fn returned {len(preds)} predictions for {len(batch)} images")
        correct += int(np.sum(preds == targets[start:start + len(batch)]))
    return correct / len(images)


# --------------------------------------------------------------------------------------------------- outputs


def robustness_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Scalars for ``reports/metrics.json``'s ``robustness`` group (fractions, 6 digits; None left out)."""
    out = {key: result[key] for key in ("clean_top1", "mean_corruption_top1", "relative_robustness")}
    out.update(result["per_corruption"])
    return {key: round(float(value), _DIGITS) for key, value in out.items() if value is not None}


def robustness_heatmap(result: dict[str, Any]) -> Any:
    """A matplotlib Figure: top-1 (%) per corruption (rows) and severity (columns), plus each row's mean.

    Built on ``matplotlib.figure.Figure`` (no pyplot state, Agg canvas), so the report can embed it too.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = result["table"]
    names = list(dict.fromkeys(row["corruption"] for row in table))
    severities = sorted({int(row["severity"]) for row in table})
    grid = np.full((len(names), len(severities) + 1), np.nan)
    for row in table:
        grid[names.index(row["corruption"]), severities.index(int(row["severity"]))] = 100.0 * row["top1"]
    for r, name in enumerate(names):
        grid[r, -1] = 100.0 * result["per_corruption"][name]

    fig = Figure(figsize=(1.1 * len(severities) + 3.6, 0.42 * len(names) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    ax.axvline(len(severities) - 0.5, color="white", linewidth=3)
    ax.set_xticks(range(len(severities) + 1), [str(s) for s in severities] + ["mean"])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    for (r, c), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 60 else "white")
    relative = result.get("relative_robustness")
    title = (f"Top-1 (%) under corruption: clean {100 * result['clean_top1']:.1f}, "
             f"mean corrupted {100 * result['mean_corruption_top1']:.1f}")
    if relative is not None:
        title += f", relative {relative:.3f}"
    ax.set_title(f"{title}\n({result['samples']} images)", fontsize=9)
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    return fig


def _write_robustness_csv(table: list[dict[str, Any]], path: Path) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["corruption", "severity", "top1"])
    for row in table:
        writer.writerow([row["corruption"], int(row["severity"]), round(float(row["top1"]), _DIGITS)])
    write_bytes_atomic(path, text.getvalue())


def write_robustness_disabled(out_dir: Path) -> Path:
    """Write a header-only ``robustness.csv``: the DVC plots file exists (and plots empty, without a warning)
    when ``evaluate.robustness.enabled`` is false, so the stage's outputs do not depend on the setting."""
    path = Path(out_dir) / "robustness.csv"
    _write_robustness_csv([], path)
    return path


def write_robustness(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``robustness.json`` (the result), ``robustness.csv`` (``corruption,severity,top1``: a DVC plots
    file) and ``robustness_heatmap.png`` into ``out_dir``, each atomically; return their paths by kind.

    The scalars for ``reports/metrics.json`` come from :func:`robustness_metrics`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "robustness.json", "csv": out_dir / "robustness.csv",
             "heatmap": out_dir / "robustness_heatmap.png"}
    write_bytes_atomic(paths["json"], json.dumps(result, indent=2, allow_nan=False) + "\n")
    _write_robustness_csv(result["table"], paths["csv"])

    png = io.BytesIO()
    robustness_heatmap(result).savefig(png, format="png", dpi=120)
    write_bytes_atomic(paths["heatmap"], png.getvalue())
    return paths


