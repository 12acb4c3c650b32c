"""Raw dataset sources: embedded digits, pinned downloads with retries, safe extraction, atomic output."""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from stl.data import DataSourceError, create_raw_dataset

from .helpers import flower_members, png_bytes, sha256_of, write_tar, write_zip


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root (relative POSIX path -> bytes); fails on symlinks."""
    files = {}
    for path in sorted(root.rglob("*")):
        assert not path.is_symlink(), f"{path} is a symlink"
        if path.is_file():
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def assert_nothing_left(parent: Path, expected: set[str] | None = None) -> None:
    """The output's parent holds exactly `expected` (no output, no temp or scratch directories)."""
    assert {p.name for p in parent.iterdir()} == (expected or set())


FLOWER_TREE = {"daisy/a.png": png_bytes(1), "daisy/b.png": png_bytes(2), "roses/c.png": png_bytes(3)}


# ------------------------------------------------------------------------------------------------ digits


def test_digits_exact_pixels_counts_and_names(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    summary = create_raw_dataset("digits", out, digits_size=8)
    digits = load_digits()
    expected_counts = np.bincount(digits.target, minlength=10)
    assert summary["kind"] == "digits"
    assert summary["classes"] == [str(i) for i in range(10)]
    assert summary["num_images"] == 1797
    assert summary["counts"] == {str(i): int(n) for i, n in enumerate(expected_counts)}
    assert sorted(p.name for p in out.iterdir()) == [str(i) for i in range(10)]
    files = sorted(out.rglob("*.png"))
    assert len(files) == 1797
    for index in (0, 1, 1796):  # file name = sample index, folder = its digit
        path = out / str(digits.target[index]) / f"{index:04d}.png"
        image = Image.open(path)
        assert (image.mode, image.size) == ("RGB", (8, 8))
        pixels = np.asarray(image)
        expected = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(pixels[..., 0], expected)
        np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    assert {p.name for p in tmp_path.iterdir()} == {"raw"}


def test_digits_upscaled_and_deterministic(tmp_path: Path) -> None:
    first = create_raw_dataset("digits", tmp_path / "a", digits_size=20)
    create_raw_dataset("digits", tmp_path / "b", digits_size=20)
    assert first["num_images"] == 1797
    image = Image.open(tmp_path / "a" / "0" / "0000.png")
    assert (image.mode, image.size) == ("RGB", (20, 20))
    assert np.asarray(image).max() > 200 and np.asarray(image).min() < 10  # strokes span the range
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_digits_bad_size(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="digits_size"):
        create_raw_dataset("digits", tmp_path / "raw", digits_size=0)
    assert_nothing_left(tmp_path)


# --------------------------------------------------------------------------------------------- download


@pytest.fixture
def served_flowers(server, tmp_path: Path) -> tuple[str, str]:
    """A flowers-like tar.gz on the local server: (url, sha256)."""
    archive = write_tar(server.root / "flower_photos.tgz", flower_members())
    return server.url("flower_photos.tgz"), sha256_of(archive)


def test_url_download_good_checksum(server, served_flowers, tmp_path: Path) -> None:
    url, digest = served_flowers
    work = tmp_path / "work"
    summary = create_raw_dataset(url, work / "raw", sha256=digest.upper())  # case does not matter
    assert tree(work / "raw") == FLOWER_TREE
    assert summary == {
        "source": url,
        "kind": "url",
        "sha256": digest,
        "classes": ["daisy", "roses"],
        "num_classes": 2,
        "counts": {"daisy": 2, "roses": 1},
        "num_images": 3,
    }
    assert server.hits["/flower_photos.tgz"] == 1
    assert_nothing_left(work, {"raw"})


def test_url_bad_checksum_leaves_nothing_and_keeps_old_output(server, served_flowers, tmp_path) -> None:
    url, digest = served_flowers
    work = tmp_path / "work"
    (work / "raw" / "old").mkdir(parents=True)
    (work / "raw" / "old" / "x.png").write_bytes(b"previous")
    wrong = "0" * 64
    with pytest.raises(DataSourceError) as info:
        create_raw_dataset(url, work / "raw", sha256=wrong)
    message = str(info.value)
    assert url in message and wrong in message and digest in message and "data.sha256" in message
    assert tree(work / "raw") == {"old/x.png": b"previous"}
    assert_nothing_left(work, {"raw"})


def test_url_bad_checksum_without_previous_output(server, served_flowers, tmp_path) -> None:
    url, _ = served_flowers
    with pytest.raises(DataSourceError, match="sha256 mismatch"):
        create_raw_dataset(url, tmp_path / "work" / "raw", sha256="f" * 64)
    assert_nothing_left(tmp_path / "work")


@pytest.mark.parametrize("failures", [[500], [503, 429], ["short"], ["slow"]])
def test_url_transient_errors_are_retried(server, served_flowers, tmp_path, failures) -> None:
    url, digest = served_flowers
    server.plan["/flower_photos.tgz"] = list(failures)
    timeout = 1.0 if "slow" in failures else 30.0  # the server stalls 3 s once, then answers at once
    create_raw_dataset(url, tmp_path / "raw", sha256=digest, retries=3, timeout=timeout)
    assert server.hits["/flower_photos.tgz"] == len(failures) + 1
    assert tree(tmp_path / "raw") == FLOWER_TREE


def test_url_gives_up_after_retries(server, served_flowers, tmp_path) -> None:
    url, digest = served_flowers
    server.plan["/flower_photos.tgz"] = [500] * 10
    with pytest.raises(DataSourceError, match=r"failed after 3 attempt\(s\): HTTP 500") as info:
        create_raw_dataset(url, tmp_path / "work" / "raw", sha256=digest, retries=2)
    assert url in str(info.value)
    assert server.hits["/flower_photos.tgz"] == 3
    assert_nothing_left(tmp_path / "work")


def test_url_404_fails_fast(server, tmp_path) -> None:
    url = server.url("missing.tgz")
    with pytest.raises(DataSourceError, match="HTTP 404") as info:
        create_raw_dataset(url, tmp_path / "work" / "raw", sha256="a" * 64, retries=5)
    assert url in str(info.value)
    assert server.hits["/missing.tgz"] == 1
    assert_nothing_left(tmp_path / "work")


def test_url_connection_refused_is_retried_then_reported(tmp_path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip"
    with pytest.raises(DataSourceError, match=r"failed after 2 attempt\(s\)"):
        create_raw_dataset(url, tmp_path / "work" / "raw", sha256="a" * 64, retries=1, timeout=2)
    assert_nothing_left(tmp_path / "work")


def test_url_without_sha256_is_refused_before_downloading(server, served_flowers, tmp_path) -> None:
    url, _ = served_flowers
    with pytest.raises(DataSourceError, match=r"no sha256 checksum given for .*data\.sha256"):
        create_raw_dataset(url, tmp_path / "work" / "raw")
    assert server.hits["/flower_photos.tgz"] == 0
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_malformed_sha256(tmp_path) -> None:
    with pytest.raises(DataSourceError, match="64 hexadecimal"):
        create_raw_dataset("https://example.invalid/a.zip", tmp_path / "raw", sha256="abc")


# ------------------------------------------------------------------------------------- local archives


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tar.bz2", "w:bz2"),
                                         (".tar.xz", "w:xz"), (".tgz", "w:gz")])
def test_local_tar_formats(tmp_path, suffix, mode) -> None:
    archive = write_tar(tmp_path / f"flowers{suffix}", flower_members(), mode=mode)
    summary = create_raw_dataset(str(archive), tmp_path / "work" / "raw")
    assert summary["kind"] == "archive" and summary["sha256"] == sha256_of(archive)
    assert tree(tmp_path / "work" / "raw") == FLOWER_TREE


def test_local_zip_nested_root_with_macosx_and_checksum(tmp_path) -> None:
    members = flower_members("dl/flower_photos/") + [
        ("__MACOSX/dl/flower_photos/daisy/._a.png", b"junk"),
        ("dl/README.md", b"readme"),
        ("dl/flower_photos/docs/about.md", b"not a class"),
    ]
    archive = write_zip(tmp_path / "flowers.zip", members)
    summary = create_raw_dataset(str(archive), tmp_path / "work" / "raw", sha256=sha256_of(archive))
    assert summary["classes"] == ["daisy", "roses"] and summary["ignored_folders"] == ["docs"]
    assert tree(tmp_path / "work" / "raw") == FLOWER_TREE
    with pytest.raises(DataSourceError, match="sha256 mismatch"):
        create_raw_dataset(str(archive), tmp_path / "work" / "raw2", sha256="b" * 64)
    assert_nothing_left(tmp_path / "work", {"raw"})


def test_class_root_at_top_level(tmp_path) -> None:
    archive = write_zip(tmp_path / "a.zip", [("cats/1.PNG", png_bytes(1)), ("dogs/2.jpeg", png_bytes(2)),
                                             ("LICENSE", b"x")])
    summary = create_raw_dataset(str(archive), tmp_path / "raw")
    assert summary["counts"] == {"cats": 1, "dogs": 1}
    assert sorted(tree(tmp_path / "raw")) == ["cats/1.PNG", "dogs/2.jpeg"]


def test_internal_symlink_is_materialized(tmp_path) -> None:
    link = tarfile.TarInfo("flower_photos/roses/d.png")
    link.type, link.linkname = tarfile.SYMTYPE, "../daisy/a.png"
    archive = write_tar(tmp_path / "f.tar", flower_members() + [link], mode="w")
    create_raw_dataset(str(archive), tmp_path / "raw")
    assert tree(tmp_path / "raw")["roses/d.png"] == FLOWER_TREE["daisy/a.png"]


def test_ambiguous_class_roots_are_refused(tmp_path) -> None:
    members = flower_members("data/train/") + flower_members("data/val/")
    archive = write_zip(tmp_path / "a.zip", members)
    with pytest.raises(DataSourceError, match=r"data/train, data/val"):
        create_raw_dataset(str(archive), tmp_path / "work" / "raw")
    assert_nothing_left(tmp_path / "work")


def test_archive_without_class_folders(tmp_path) -> None:
    archive = write_zip(tmp_path / "flat.zip", [("a.png", png_bytes(1)), ("b.png", png_bytes(2))])
    with pytest.raises(DataSourceError, match="no class folders with images found in .*flat.zip"):
        create_raw_dataset(str(archive), tmp_path / "work" / "raw")
    assert_nothing_left(tmp_path / "work")


def test_not_an_archive_and_corrupt_archive(tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataSourceError, match="notes.txt is not a zip or tar"):
        create_raw_dataset(str(text), tmp_path / "work" / "raw")
    good = write_zip(tmp_path / "good.zip", flower_members())
    broken = tmp_path / "broken.zip"
    data = good.read_bytes()
    broken.write_bytes(data[:40] + b"\0" * 200 + data[240:])  # intact directory, corrupt member data
    with pytest.raises(DataSourceError, match="broken.zip"):
        create_raw_dataset(str(broken), tmp_path / "work" / "raw")
    assert_nothing_left(tmp_path / "work")


# --------------------------------------------------------------------------------- hostile archives


def _tar_link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "member,named",
    [
        (("flower_photos/../../evil.png", b"x"), "flower_photos/../../evil.png"),
        (("../evil.png", b"x"), "../evil.png"),
        (("/tmp/stl-absolute-evil.png", b"x"), "/tmp/stl-absolute-evil.png"),
        (_tar_link("flower_photos/daisy/link.png", "../../../outside.png"), "flower_photos/daisy/link.png"),
        (_tar_link("flower_photos/daisy/abs.png", "/etc/passwd"), "flower_photos/daisy/abs.png"),
        (_tar_link("flower_photos/daisy/hard.png", "../x.png", hard=True), "flower_photos/daisy/hard.png"),
    ],
    ids=["dotdot-nested", "dotdot", "absolute", "symlink-escape", "symlink-absolute", "hardlink-escape"],
)
def test_hostile_tar_is_refused(tmp_path, member, named) -> None:
    (tmp_path / "outside.png").write_bytes(b"secret")
    archive = write_tar(tmp_path / "evil.tar.gz", flower_members() + [member])
    with pytest.raises(DataSourceError, match="refusing to extract") as info:
        create_raw_dataset(str(archive), tmp_path / "work" / "raw")
    assert repr(named) in str(info.value) and "evil.tar.gz" in str(info.value)
    assert_nothing_left(tmp_path / "work")
    assert not list(tmp_path.rglob("evil.png")) and not Path("/tmp/stl-absolute-evil.png").exists()


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so external_attr carries the file type
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize(
    "member,named",
    [
        (("../evil.png", b"x"), "../evil.png"),
        (("flower_photos/daisy/../../../evil.png", b"x"), "flower_photos/daisy/../../../evil.png"),
        (("/tmp/stl-absolute-evil.png", b"x"), "/tmp/stl-absolute-evil.png"),
        (("C:/evil.png", b"x"), "C:/evil.png"),
        (_zip_symlink("flower_photos/daisy/link.png", "../../../x.png"), "flower_photos/daisy/link.png"),
        (_zip_symlink("flower_photos/daisy/abs.png", "/etc/passwd"), "flower_photos/daisy/abs.png"),
    ],
    ids=["dotdot", "dotdot-nested", "absolute", "drive", "symlink-escape", "symlink-absolute"],
)
def test_hostile_zip_is_refused(tmp_path, member, named) -> None:
    archive = write_zip(tmp_path / "evil.zip", flower_members() + [member])
    with pytest.raises(DataSourceError, match="refusing to extract") as info:
        create_raw_dataset(str(archive), tmp_path / "work" / "raw")
    assert repr(named) in str(info.value)
    assert_nothing_left(tmp_path / "work")
    assert not list(tmp_path.rglob("evil.png")) and not Path("/tmp/stl-absolute-evil.png").exists()


def test_hostile_download_leaves_nothing(server, tmp_path) -> None:
    archive = write_zip(server.root / "evil.zip", flower_members() + [("../evil.png", b"x")])
    with pytest.raises(DataSourceError, match="'../evil.png'"):
        create_raw_dataset(server.url("evil.zip"), tmp_path / "work" / "raw", sha256=sha256_of(archive))
    assert_nothing_left(tmp_path / "work")


# ---------------------------------------------------------------------------------------- local folders


def test_local_folder_is_copied_without_symlinks(tmp_path) -> None:
    src = tmp_path / "photos" / "flower_photos"
    for rel, data in FLOWER_TREE.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "LICENSE.txt").write_text("CC-BY")
    (tmp_path / "elsewhere.png").write_bytes(png_bytes(9))
    os.symlink(tmp_path / "elsewhere.png", src / "roses" / "linked.png")
    os.symlink(tmp_path / "missing.png", src / "roses" / "dangling.png")
    summary = create_raw_dataset(str(tmp_path / "photos"), tmp_path / "work" / "raw")
    assert summary["kind"] == "folder" and summary["counts"] == {"daisy": 2, "roses": 2}
    assert tree(tmp_path / "work" / "raw") == {**FLOWER_TREE, "roses/linked.png": png_bytes(9)}
    assert (src / "roses" / "linked.png").is_symlink()  # the source is untouched


def test_existing_output_replaced_on_success(tmp_path, make_tree) -> None:
    src = make_tree(tmp_path / "src", {"a": 1, "b": 1})
    out = make_tree(tmp_path / "work" / "raw", {"stale": 2})
    create_raw_dataset(str(src), out)
    assert sorted(tree(out)) == ["a/000.png", "b/000.png"]
    assert_nothing_left(tmp_path / "work", {"raw"})


def test_folder_overlapping_output_is_refused(tmp_path, make_tree) -> None:
    src = make_tree(tmp_path / "src", {"a": 1, "b": 1})
    with pytest.raises(DataSourceError, match="overlap"):
        create_raw_dataset(str(src), src / "raw")
    archive = write_zip(src / "a.zip", flower_members())
    with pytest.raises(DataSourceError, match="overlap"):
        create_raw_dataset(str(archive), src)
    assert archive.is_file()


@pytest.mark.parametrize("source,match", [("ftp://example.com/a.zip", "unsupported data source"),
                                          ("no/such/place", "not 'digits', an http")])
def test_unknown_sources(tmp_path, source, match) -> None:
    with pytest.raises(DataSourceError, match=match):
        create_raw_dataset(source, tmp_path / "raw")
    assert_nothing_left(tmp_path)
