"""The split: image validation with a skipped-files report, exact stratified seeded allocation, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from stl.data import ManifestDataset, split_dataset

from .helpers import png_bytes


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def split_counts(out: Path, classes: list[str]) -> dict[str, dict[str, int]]:
    counts = {name: {"train": 0, "val": 0, "test": 0} for name in classes}
    for split in ("train", "val", "test"):
        for row in read_rows(out / f"{split}.csv"):
            counts[classes[int(row["label"])]][split] += 1
    return counts


def test_stratified_exact_allocation_and_outputs(tmp_path, make_tree, capsys) -> None:
    raw = make_tree(tmp_path / "raw", {"b_class": 20, "a_class": 10, "c_class": 7})
    summary = split_dataset(raw, tmp_path / "split", 0.6, 0.2, 0.2, seed=0)
    out = tmp_path / "split"
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json", "contents.json", "skipped.csv", "test.csv", "train.csv", "val.csv"
    ]
    classes = json.loads((out / "classes.json").read_text())
    assert classes == ["a_class", "b_class", "c_class"]  # sorted names give the label order
    expected = {
        "a_class": {"train": 6, "val": 2, "test": 2},
        "b_class": {"train": 12, "val": 4, "test": 4},
        "c_class": {"train": 4, "val": 2, "test": 1},  # 4.2 / 1.4 / 1.4, largest remainder, ties to val
    }
    assert split_counts(out, classes) == expected
    assert summary["per_class"] == expected
    assert summary["counts"] == {"train": 22, "val": 8, "test": 7}
    assert summary["num_images"] == 37 and summary["skipped"] == 0 and summary["classes"] == classes
    rows = {s: read_rows(out / f"{s}.csv") for s in ("train", "val", "test")}
    paths = [r["path"] for s in rows.values() for r in s]
    assert len(paths) == len(set(paths)) == 37  # disjoint and complete
    assert set(paths) == {p.relative_to(raw).as_posix() for p in raw.rglob("*.png")}
    for split_rows in rows.values():
        for row in split_rows:
            assert classes[int(row["label"])] == row["path"].split("/")[0]
    assert read_rows(out / "skipped.csv") == []
    assert (out / "skipped.csv").read_text() == "path,reason\n"
    assert "skipped 0 file(s)" in capsys.readouterr().out


def test_split_is_deterministic_per_seed(tmp_path, make_tree) -> None:
    raw = make_tree(tmp_path / "raw", {"a": 12, "b": 15})
    split_dataset(raw, tmp_path / "s0", 0.5, 0.25, 0.25, seed=7)
    split_dataset(raw, tmp_path / "s0_again", 0.5, 0.25, 0.25, seed=7, workers=2)
    split_dataset(raw, tmp_path / "s1", 0.5, 0.25, 0.25, seed=8)
    for name in ("train.csv", "val.csv", "test.csv", "classes.json", "contents.json"):
        assert (tmp_path / "s0" / name).read_bytes() == (tmp_path / "s0_again" / name).read_bytes()
    assert (tmp_path / "s0" / "train.csv").read_bytes() != (tmp_path / "s1" / "train.csv").read_bytes()
    assert split_counts(tmp_path / "s1", ["a", "b"]) == split_counts(tmp_path / "s0", ["a", "b"])


def test_contents_digest_follows_the_image_bytes(tmp_path, make_tree, make_png) -> None:
    raw = make_tree(tmp_path / "raw", {"a": 8, "b": 8})
    split_dataset(raw, tmp_path / "before", 0.5, 0.25, 0.25, seed=0)
    before = json.loads((tmp_path / "before" / "contents.json").read_text())
    assert set(before) == {"train", "val", "test"} and len(set(before.values())) == 3
    first_train = read_rows(tmp_path / "before" / "train.csv")[0]["path"]
    make_png(raw / first_train, seed=999)  # same name, other pixels
    split_dataset(raw, tmp_path / "after", 0.5, 0.25, 0.25, seed=0)
    after = json.loads((tmp_path / "after" / "contents.json").read_text())
    for name in ("train.csv", "val.csv", "test.csv"):  # the manifests cannot tell
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    assert after["train"] != before["train"]
    assert (after["val"], after["test"]) == (before["val"], before["test"])


def test_adding_a_class_does_not_reshuffle_the_others(tmp_path, make_tree) -> None:
    raw = make_tree(tmp_path / "raw", {"a": 12, "b": 15})
    split_dataset(raw, tmp_path / "before", 0.5, 0.25, 0.25, seed=3)
    make_tree(raw, {"c": 5})
    split_dataset(raw, tmp_path / "after", 0.5, 0.25, 0.25, seed=3)
    before = [r["path"] for r in read_rows(tmp_path / "before" / "val.csv")]
    after = [r["path"] for r in read_rows(tmp_path / "after" / "val.csv") if not r["path"].startswith("c/")]
    assert before == after


def test_small_class_gets_one_image_per_split(tmp_path, make_tree) -> None:
    raw = make_tree(tmp_path / "raw", {"big": 30, "small": 3})
    summary = split_dataset(raw, tmp_path / "split", 0.8, 0.1, 0.1, seed=0)
    assert summary["per_class"]["small"] == {"train": 1, "val": 1, "test": 1}
    assert summary["per_class"]["big"] == {"train": 24, "val": 3, "test": 3}


def test_zero_fraction_split_is_empty(tmp_path, make_tree) -> None:
    raw = make_tree(tmp_path / "raw", {"a": 5, "b": 4})
    summary = split_dataset(raw, tmp_path / "split", 0.75, 0.0, 0.25, seed=0)
    assert (tmp_path / "split" / "val.csv").read_text() == "path,label\n"
    assert summary["counts"] == {"train": 7, "val": 0, "test": 2}  # a: 3.75/1.25 -> 4/1, b: 3/1


def test_bad_files_are_skipped_and_reported(tmp_path, make_tree, capsys) -> None:
    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3})
    big = png_bytes(5, size=(32, 32))
    (raw / "a" / "truncated.png").write_bytes(big[: len(big) // 2])
    (raw / "a" / "empty.jpg").write_bytes(b"")
    (raw / "b" / "notes.txt").write_text("not an image")
    (raw / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (raw / "b" / ".thumbs").mkdir()
    (raw / "README.md").write_text("top-level file")
    summary = split_dataset(raw, tmp_path / "split", 0.34, 0.33, 0.33, seed=0)
    skipped = {r["path"]: r["reason"] for r in read_rows(tmp_path / "split" / "skipped.csv")}
    assert set(skipped) == {"a/truncated.png", "a/empty.jpg", "b/notes.txt", "b/.DS_Store", "b/.thumbs/",
                            "README.md"}
    assert skipped["a/truncated.png"].startswith("truncated image")
    assert skipped["a/empty.jpg"] == "empty file (0 bytes)"
    assert skipped["b/notes.txt"] == "not an image (unknown or unsupported format)"
    assert skipped["b/.DS_Store"] == "hidden file"
    assert skipped["README.md"] == "not inside a class folder"
    assert str(tmp_path) not in (tmp_path / "split" / "skipped.csv").read_text()  # machine-independent
    assert summary["skipped"] == 6 and summary["num_images"] == 6
    assert "skipped 6 file(s)" in capsys.readouterr().out
    manifests = [tmp_path / "split" / f"{s}.csv" for s in ("train", "val", "test")]
    manifest_paths = {r["path"] for manifest in manifests for r in read_rows(manifest)}
    assert manifest_paths == {f"{c}/{i:03d}.png" for c in "ab" for i in range(3)}


def test_odd_names_and_formats(tmp_path, make_tree) -> None:
    raw = tmp_path / "raw"
    odd = raw / "Ünïcödé class"
    odd.mkdir(parents=True)
    image = Image.new("RGB", (6, 5), (10, 200, 30))
    names = ["my photo.JPG", "x.PNG", "y.JPEG", "z.webp", "w.bmp", "v.gif", "u.TIF", "comma, \"quoted\".png"]
    for name in names:
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF"}.get(name.rsplit(".", 1)[1].lower())
        image.save(odd / name, format=fmt)
    (raw / "UPPER" / "nested" / "deeper").mkdir(parents=True)
    for i in range(3):
        image.save(raw / "UPPER" / "nested" / "deeper" / f"{i}.png")
    summary = split_dataset(raw, tmp_path / "split", 0.5, 0.25, 0.25, seed=1)
    assert summary["skipped"] == 0
    assert summary["classes"] == ["UPPER", "Ünïcödé class"]
    assert json.loads((tmp_path / "split" / "classes.json").read_text(encoding="utf-8")) == summary["classes"]
    datasets = [ManifestDataset(tmp_path / "split" / f"{s}.csv", raw) for s in ("train", "val", "test")]
    paths = {p for d in datasets for p in d.rel_paths}
    assert paths == {f"Ünïcödé class/{n}" for n in names} | {f"UPPER/nested/deeper/{i}.png" for i in range(3)}
    for dataset in datasets:
        for i in range(len(dataset)):
            picture, label = dataset[i]
            assert picture.mode == "RGB" and picture.size == (6, 5)
            assert dataset.classes[label] == dataset.rel_paths[i].split("/")[0]


@pytest.mark.parametrize(
    "counts,fractions,match",
    [
        ({"only": 5}, (0.6, 0.2, 0.2), r"has 1 class folder\(s\) \('only'\).*at least two"),
        ({}, (0.6, 0.2, 0.2), r"has 0 class folder\(s\) \(none\)"),
        ({"a": 5, "b": 5}, (0.7, 0.2, 0.2), r"must sum to 1, got train=0.7, val=0.2, test=0.2 \(sum 1.1\)"),
        ({"a": 5, "b": 5}, (0.0, 0.5, 0.5), "train fraction must be > 0"),
        ({"a": 5, "b": 5}, (1.2, -0.1, -0.1), "finite and >= 0"),
        ({"a": 5, "tiny": 2}, (0.6, 0.2, 0.2),
         r"class 'tiny' \(.*tiny\) has 2 readable image\(s\) but the split needs at least 3, one for each of "
         r"train, val, test"),
    ],
    ids=["one-class", "no-class", "sum", "no-train", "negative", "too-small"],
)
def test_split_errors(tmp_path, make_tree, counts, fractions, match) -> None:
    raw = make_tree(tmp_path / "raw", counts)
    raw.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=match):
        split_dataset(raw, tmp_path / "work" / "split", *fractions, seed=0)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_empty_and_unreadable_class_folders(tmp_path, make_tree) -> None:
    raw = make_tree(tmp_path / "raw", {"a": 4, "b": 4, "empty": 0})
    (raw / "junk").mkdir()
    (raw / "junk" / "x.txt").write_text("text")
    (raw / "empty" / ".DS_Store").write_bytes(b"x")
    old = make_tree(tmp_path / "work" / "split", {"previous": 1})
    with pytest.raises(ValueError) as info:
        split_dataset(raw, old, 0.5, 0.25, 0.25, seed=0)
    message = str(info.value)
    assert f"class folder {raw / 'empty'} is empty" in message
    junk = f"class folder {raw / 'junk'} has no readable images (1 file(s), all skipped, e.g. x.txt: not an"
    assert junk in message
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["split"]  # old output kept, no temp dir
    assert [p.name for p in old.iterdir()] == ["previous"]


def test_missing_raw_dir(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist: run the download stage"):
        split_dataset(tmp_path / "nope", tmp_path / "split", 0.8, 0.1, 0.1, seed=0)


def test_output_inside_raw_is_refused(tmp_path, make_tree) -> None:
    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3})
    with pytest.raises(ValueError, match="must not be inside"):
        split_dataset(raw, raw / "split", 0.8, 0.1, 0.1, seed=0)
