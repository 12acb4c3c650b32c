"""Validate every image of the raw dataset and split it into stratified, seeded train/val/test manifests.

Each image is decoded once here (with the same loader training uses), so unreadable files are reported in
`skipped.csv` instead of crashing a DataLoader worker hours into training. The split is an exact per-class
allocation: every class appears in every split with a non-zero fraction, and a class's assignment depends
only on the seed, its name and its files, so adding a class does not reshuffle the others.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import UnidentifiedImageError

from stl.data.datasets import load_image_rgb
from stl.io import atomic_output_dir

__all__ = ["SPLITS", "split_dataset"]

SPLITS = ("train", "val", "test")
_TOLERANCE = 1e-6


def split_dataset(
    raw_dir: Path,
    out_dir: Path,
    train: float,
    val: float,
    test: float,
    seed: int,
    workers: int = 1,
    max_per_class: int = 0,
) -> dict:
    """Write train/val/test.csv (`path,label`), classes.json, contents.json and skipped.csv to `out_dir`;
    return a summary.

    contents.json holds one sha256 per split over its images' paths, labels and bytes, so a training run whose
    images changed under the same file names is not mistaken for one that can resume.

    Class folders are the subdirectories of `raw_dir` (sorted names give the label order); images may sit
    in nested folders inside a class folder. Paths in the manifests are relative to `raw_dir` with '/'.
    `workers` threads decode images in parallel (the result does not depend on it). `max_per_class` > 0
    keeps a seeded random subset of that many valid images per class before splitting (quick trials).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    fractions = _check_fractions(train, val, test)
    if not raw_dir.is_dir():
        raise ValueError(f"raw dataset folder {raw_dir} does not exist: run the download stage first")
    if raw_dir.resolve() in out_dir.resolve().parents or raw_dir.resolve() == out_dir.resolve():
        raise ValueError(f"the split output {out_dir} must not be inside the raw dataset folder {raw_dir}")

    classes, files, skipped = _scan(raw_dir)
    if len(classes) < 2:
        found = ", ".join(repr(c) for c in classes) or "none"
        raise ValueError(
            f"{raw_dir} has {len(classes)} class folder(s) ({found}): a classifier needs at least two, "
            f"one folder per class with its images inside."
        )
    paths = [path for class_files in files.values() for path in class_files]
    reasons: dict[Path, str | None] = {}
    digests: dict[str, str] = {}  # relative path -> file sha256
    for path, (reason, digest) in zip(paths, _validate(paths, workers), strict=True):
        reasons[path] = reason
        digests[path.relative_to(raw_dir).as_posix()] = digest
    valid: dict[str, list[str]] = {}
    for name in classes:
        valid[name] = []
        for path in files[name]:
            rel = path.relative_to(raw_dir).as_posix()
            if reasons[path] is None:
                valid[name].append(rel)
            else:
                skipped.append((rel, reasons[path]))
    _check_class_sizes(raw_dir, classes, files, valid, reasons, fractions)

    rows: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    per_class: dict[str, dict[str, int]] = {}
    for label, name in enumerate(classes):
        shuffled = sorted(valid[name])
        random.Random(f"{seed}:{name}").shuffle(shuffled)
        if max_per_class > 0:
            shuffled = shuffled[:max_per_class]
        counts = _allocate(len(shuffled), fractions)
        start = 0
        for split, count in zip(SPLITS, counts, strict=True):
            rows[split].extend((rel, label) for rel in shuffled[start : start + count])
            start += count
        per_class[name] = dict(zip(SPLITS, counts, strict=True))

    skipped.sort()
    with atomic_output_dir(out_dir) as staging:
        for split in SPLITS:
            ordered = sorted(rows[split], key=lambda row: (row[1], row[0]))
            _write_csv(staging / f"{split}.csv", ("path", "label"), ordered)
        classes_json = json.dumps(classes, ensure_ascii=False, indent=2) + "\n"
        (staging / "classes.json").write_text(classes_json, encoding="utf-8")
        _write_csv(staging / "skipped.csv", ("path", "reason"), skipped)
        contents = {split: _split_digest(rows[split], digests) for split in SPLITS}
        (staging / "contents.json").write_text(json.dumps(contents, indent=2) + "\n", encoding="utf-8")

    counts = {split: len(rows[split]) for split in SPLITS}
    print(
        f"split {sum(counts.values())} images of {len(classes)} classes into "
        + ", ".join(f"{n} {split}" for split, n in counts.items())
        + f"; skipped {len(skipped)} file(s)" + (f" (listed in {out_dir / 'skipped.csv'})" if skipped else "")
    )
    return {
        "classes": classes,
        "num_classes": len(classes),
        "counts": counts,
        "per_class": per_class,
        "num_images": sum(counts.values()),
        "skipped": len(skipped),
        "fractions": dict(zip(SPLITS, fractions, strict=True)),
        "seed": seed,
    }


def _check_fractions(train: float, val: float, test: float) -> tuple[float, float, float]:
    fractions = (float(train), float(val), float(test))
    text = ", ".join(f"{s}={f:g}" for s, f in zip(SPLITS, fractions, strict=True))
    if any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"split fractions must be finite and >= 0, got {text}")
    if fractions[0] == 0:
        raise ValueError(f"the train fraction must be > 0, got {text}")
    if abs(sum(fractions) - 1.0) > _TOLERANCE:
        raise ValueError(f"split fractions must sum to 1, got {text} (sum {sum(fractions):g}): fix them")
    return fractions


def _scan(raw_dir: Path) -> tuple[list[str], dict[str, list[Path]], list[tuple[str, str]]]:
    """List class folders, their candidate files, and files that are skipped without decoding."""
    classes: list[str] = []
    files: dict[str, list[Path]] = {}
    skipped: list[tuple[str, str]] = []
    for entry in sorted(raw_dir.iterdir()):
        if entry.name.startswith("."):
            if not entry.is_dir():
                skipped.append((entry.name, "hidden file"))
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            skipped.append((entry.name, "not inside a class folder"))
    for name in classes:
        files[name] = []
        for current, dirs, names in os.walk(raw_dir / name):
            hidden_dirs = [d for d in dirs if d.startswith(".")]
            for d in hidden_dirs:
                skipped.append(((Path(current) / d).relative_to(raw_dir).as_posix() + "/", "hidden folder"))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file_name in sorted(names):
                path = Path(current) / file_name
                if file_name.startswith("."):
                    skipped.append((path.relative_to(raw_dir).as_posix(), "hidden file"))
                else:
                    files[name].append(path)
    return classes, files, skipped


def _split_digest(rows: list[tuple[str, int]], digests: dict[str, str]) -> str:
    """sha256 over a split's (path, label, file sha256), in path order."""
    h = hashlib.sha256()
    for rel, label in sorted(rows):
        h.update(f"{rel}\t{label}\t{digests[rel]}\n".encode())
    return h.hexdigest()


def _validate(paths: list[Path], workers: int) -> list[tuple[str | None, str]]:
    """Return, per file, (None when it decodes to an RGB image, else why it is skipped; its bytes' sha256)."""
    from tqdm.auto import tqdm

    disable = True if os.environ.get("CI") else None
    with tqdm(total=len(paths), desc="checking images", unit="img", disable=disable, leave=False) as bar:
        def check(path: Path) -> tuple[str | None, str]:
            result = _check_image(path)
            bar.update()
            return result

        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(check, paths))
        return [check(path) for path in paths]


def _check_image(path: Path) -> tuple[str | None, str]:
    """(None, sha256) for a file that decodes to an RGB image, else (why it is skipped, ""); read once."""
    try:
        data = path.read_bytes()
        if not data:
            return "empty file (0 bytes)", ""
        image = load_image_rgb(io.BytesIO(data))
        if image.width < 1 or image.height < 1:
            return "image has no pixels", ""
    except UnidentifiedImageError:
        return "not an image (unknown or unsupported format)", ""
    except Exception as err:  # any decoder failure means the file cannot be trained on
        message = str(err).replace(str(path), "<file>")
        if "truncated" in message.lower():
            return f"truncated image ({message})", ""
        return f"unreadable image ({type(err).__name__}: {message})", ""
    return None, hashlib.sha256(data).hexdigest()


def _check_class_sizes(
    raw_dir: Path,
    classes: list[str],
    files: dict[str, list[Path]],
    valid: dict[str, list[str]],
    reasons: dict[Path, str | None],
    fractions: tuple[float, float, float],
) -> None:
    needed_splits = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0]
    problems = []
    for name in classes:
        folder = raw_dir / name
        if not files[name]:
            problems.append(f"class folder {folder} is empty: add images or remove the folder")
        elif not valid[name]:
            first = files[name][0]
            problems.append(
                f"class folder {folder} has no readable images ({len(files[name])} file(s), all skipped, "
                f"e.g. {first.name}: {reasons[first]}): add images or remove the folder"
            )
        elif len(valid[name]) < len(needed_splits):
            problems.append(
                f"class {name!r} ({folder}) has {len(valid[name])} readable image(s) but the split needs at "
                f"least {len(needed_splits)}, one for each of {', '.join(needed_splits)}: add images or "
                f"remove the class folder"
            )
    if problems:
        raise ValueError("cannot split the dataset:\n  " + "\n  ".join(problems))


def _allocate(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Split n items by fractions (largest remainder), then give each non-zero split at least one item."""
    exact = [n * f for f in fractions]
    counts = [math.floor(x + _TOLERANCE) for x in exact]
    remainders = [x - c for x, c in zip(exact, counts, strict=True)]
    for i in sorted(range(len(counts)), key=lambda i: (-remainders[i], i))[: n - sum(counts)]:
        counts[i] += 1
    for i, fraction in enumerate(fractions):
        if fraction > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _write_csv(path: Path, header: tuple[str, str], rows: Iterable[tuple]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
