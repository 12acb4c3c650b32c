"""Build the raw dataset (one folder per class, image files inside) from where the user's images live.

Sources: the embedded scikit-learn digits (no download), an http(s) archive pinned by sha256, a local archive,
or a local folder. Whatever the source, `out_dir` ends up holding one folder per class directly in it, and a
failure leaves nothing behind: everything is built in a temporary directory beside `out_dir` and swapped in
only when complete, so DVC never caches a half-written dataset.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import re
import shutil
import ssl
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from stl.io import atomic_output_dir, file_sha256

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSourceError",
    "create_raw_dataset",
    "find_class_root",
]

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
     ".pbm", ".pnm"}
)
_IGNORED_DIRS = frozenset({"__MACOSX"})
_CHUNK = 1 << 20
_BACKOFF_SECONDS = 1.0  # first retry delay; doubles each attempt (tests set it to 0)
_MAX_BACKOFF_SECONDS = 30.0
_MAX_SEARCH_DEPTH = 8


class DataSourceError(ValueError):
    """A data source could not be turned into a raw dataset; the message says which source and what to do."""


def create_raw_dataset(
    source: str,
    out_dir: Path,
    sha256: str = "",
    digits_size: int = 32,
    retries: int = 3,
    timeout: float = 60.0,
) -> dict:
    """Build `out_dir` (one folder per class) from `source` and return a summary of what it holds.

    `source` is "digits", an http(s) URL of a zip/tar archive (requires `sha256`), a local archive (checked
    against `sha256` when given) or a local folder (copied without symlinks). Class folders nested inside the
    archive or folder (e.g. `flower_photos/daisy/*.jpg`) are found and moved to the top. `retries` is the
    number of extra attempts after a transient download error. On failure `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    source = str(source).strip()
    expected = _normalize_sha256(sha256, source)
    kind = _source_kind(source)
    if kind == "digits" and (not isinstance(digits_size, int) or digits_size < 1):
        raise DataSourceError(f"digits_size must be a positive integer (pixels), got {digits_size!r}")
    if kind == "url" and not expected:
        raise DataSourceError(
            f"no sha256 checksum given for {source}: downloads must be pinned. Compute it once "
            f"(e.g. `curl -L {source} | sha256sum`) and put the value in params.yaml under data.sha256."
        )
    if kind in ("folder", "archive"):
        _check_no_overlap(Path(source).expanduser(), out_dir)

    summary: dict = {"source": source, "kind": kind}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", suffix=".scratch", dir=out_dir.parent) as tmp,
        atomic_output_dir(out_dir) as staging,
    ):
        scratch = Path(tmp)
        ignored: list[str] = []
        if kind == "digits":
            _write_digits(staging, digits_size)
        elif kind == "folder":
            folder = Path(source).expanduser()
            ignored = _move_classes(find_class_root(folder, source), staging, copy=True)
        else:
            if kind == "url":
                archive = scratch / "download"
                actual = _download(source, archive, retries=retries, timeout=timeout)
            else:
                archive = Path(source).expanduser()
                actual = file_sha256(archive)
            if expected and actual != expected:
                raise DataSourceError(
                    f"sha256 mismatch for {source}: expected {expected}, got {actual}. The file is not the "
                    f"one pinned in params.yaml data.sha256: check the source, then update data.sha256 if "
                    f"the new file is the one you want."
                )
            summary["sha256"] = actual
            extracted = scratch / "extracted"
            extracted.mkdir()
            _extract_archive(archive, extracted, source)
            _materialize_symlinks(extracted, source)
            ignored = _move_classes(find_class_root(extracted, source), staging, copy=False)
        counts = {d.name: _count_images(d) for d in sorted(staging.iterdir()) if d.is_dir()}
    summary.update(
        classes=list(counts), num_classes=len(counts), counts=counts, num_images=sum(counts.values())
    )
    if ignored:
        summary["ignored_folders"] = ignored
    return summary


def find_class_root(root: Path, label: str = "") -> Path:
    """Return the shallowest directory under `root` whose subdirectories hold image files.

    This finds `flower_photos/` in an archive of `flower_photos/<class>/*.jpg` (+ LICENSE.txt), whatever the
    nesting. Two candidates at the same depth (e.g. `train/` and `val/`) are ambiguous and refused.
    """
    root = Path(root)
    label = label or str(root)
    level = [root]
    for _ in range(_MAX_SEARCH_DEPTH + 1):
        candidates = [d for d in level if any(_has_direct_images(c) for c in _subdirs(d))]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            names = ", ".join(str(c.relative_to(root)) for c in candidates)
            raise DataSourceError(
                f"{label} holds several folders of class folders ({names}); cannot tell which one is the "
                f"dataset. "
                f"Point the source at one of them, or repack it with one folder per class."
            )
        level = [c for d in level for c in _subdirs(d)]
        if not level:
            break
    raise DataSourceError(
        f"no class folders with images found in {label}: expected <class name>/<image files> "
        f"(e.g. daisy/1.jpg, roses/2.jpg), possibly inside one top-level folder."
    )


# ---------------------------------------------------------------------------------------------- sources


def _source_kind(source: str) -> str:
    if source == "digits":
        return "digits"
    if re.match(r"^https?://", source, flags=re.IGNORECASE):
        return "url"
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", source):
        raise DataSourceError(
            f"unsupported data source {source!r}: use 'digits', an http(s) URL, or a local archive or folder"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "archive"
    raise DataSourceError(
        f"data source {source!r} is not 'digits', an http(s) URL, nor an existing file or folder: "
        f"check the path (relative paths are relative to the working directory, {Path.cwd()})."
    )


def _normalize_sha256(value: str, source: str) -> str:
    value = (value or "").strip().lower()
    value = value.removeprefix("sha256:")
    if value and not re.fullmatch(r"[0-9a-f]{64}", value):
        raise DataSourceError(
            f"sha256 for {source} must be 64 hexadecimal characters, got {value!r}: fix params data.sha256"
        )
    return value


def _check_no_overlap(source: Path, out_dir: Path) -> None:
    """Refuse a source inside the output (replaced on success) or an output inside the source folder."""
    src, out = source.resolve(), out_dir.resolve()
    if src == out or src in out.parents or out in src.parents:
        raise DataSourceError(
            f"the source {source} and the output folder {out_dir} overlap: move the source outside "
            f"{out_dir} (and the output outside the source) and point data.source at its new place."
        )


def _write_digits(out: Path, size: int) -> None:
    """Render scikit-learn's 1797 8x8 digits as RGB PNGs so the default pipeline needs no download."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name in range(10):
        (out / str(name)).mkdir()
    resample = Image.Resampling.BICUBIC  # smooth strokes when upscaling; exact copy when size == 8
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        values = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        image = Image.fromarray(values)  # uint8 2-D -> mode "L"
        if size != values.shape[0]:
            image = image.resize((size, size), resample)
        image.convert("RGB").save(out / str(int(target)) / f"{index:04d}.png")


# --------------------------------------------------------------------------------------------- download


class _TransientError(Exception):
    """A failure worth retrying (connection trouble, timeout, HTTP 5xx/429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _download(url: str, dest: Path, retries: int, timeout: float) -> str:
    """Stream `url` to `dest`, retrying transient failures with exponential backoff; return its sha256."""
    attempts = max(0, int(retries)) + 1
    for attempt in range(attempts):
        try:
            return _download_once(url, dest, timeout)
        except _TransientError as err:
            if attempt + 1 >= attempts:
                raise DataSourceError(
                    f"downloading {url} failed after {attempts} attempt(s): {err}. Check the URL and your "
                    f"network, then run the stage again."
                ) from err
            delay = min(_BACKOFF_SECONDS * 2**attempt, _MAX_BACKOFF_SECONDS)
            if err.retry_after is not None:
                delay = min(max(delay, err.retry_after), _MAX_BACKOFF_SECONDS)
            _log.warning("download of %s failed (%s); retrying in %.1f s", url, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _download_once(url: str, dest: Path, timeout: float) -> str:
    from tqdm.auto import tqdm

    from stl import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"stl/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as file:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest, received = hashlib.sha256(), 0
            name = posixpath.basename(urllib.parse.urlsplit(url).path) or url
            disable = True if os.environ.get("CI") else None  # None: tqdm shows the bar only on a TTY
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                      disable=disable, leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise _TransientError(f"connection closed after {received} of {total} bytes")
            return digest.hexdigest()
    except urllib.error.HTTPError as err:
        err.close()  # it holds the response's socket
        if err.code == 429 or err.code >= 500:
            retry_after = err.headers.get("Retry-After") if err.headers else None
            wait = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise _TransientError(f"HTTP {err.code} {err.reason}", wait) from err
        raise DataSourceError(
            f"downloading {url} failed: HTTP {err.code} {err.reason}. This is not transient: check the URL "
            f"in params.yaml (data.source) and that it is publicly reachable."
        ) from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            raise DataSourceError(f"downloading {url} failed: {err.reason} (TLS, not retried)") from err
        raise _TransientError(f"{err.reason}") from err
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
        raise _TransientError(f"{type(err).__name__}: {err}") from err


# -------------------------------------------------------------------------------------------- extraction


def _extract_archive(archive: Path, dest: Path, label: str) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) archive after refusing any member that would land outside `dest`."""
    try:
        if tarfile.is_tarfile(archive):  # before zip: a tar may end with a zip member's directory record
            _extract_tar(archive, dest, label)
        elif zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, label)
        else:
            raise DataSourceError(
                f"{label} is not a zip or tar(.gz/.bz2/.xz) archive: point data.source at an archive of "
                f"class folders, or at a folder."
            )
    except DataSourceError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise DataSourceError(
            f"cannot extract {label}: {type(err).__name__}: {err}. The archive may be corrupt or truncated; "
            f"download it again or check the file."
        ) from err


def _unsafe(label: str, member: str, why: str) -> DataSourceError:
    return DataSourceError(
        f"refusing to extract {label}: member {member!r} {why}. The archive is unsafe; use a trusted one."
    )


def _check_member_name(name: str, label: str) -> str:
    """Return the member's normalized relative POSIX path, refusing absolute paths and `..` components."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise _unsafe(label, name, "has an absolute path")
    if ".." in posix.split("/"):
        raise _unsafe(label, name, "has a '..' component that leaves the output folder")
    normalized = posixpath.normpath(posix)
    return "" if normalized == "." else normalized


def _check_link_target(member: str, target: str, relative_to_member: bool, label: str) -> None:
    posix = target.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise _unsafe(label, member, f"links to the absolute path {target!r}")
    base = posixpath.dirname(posixpath.normpath(member.replace("\\", "/"))) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, posix))
    if resolved == ".." or resolved.startswith("../"):
        raise _unsafe(label, member, f"links to {target!r}, outside the output folder")


def _extract_tar(archive: Path, dest: Path, label: str) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            _check_member_name(member.name, label)
            if member.issym():
                _check_link_target(member.name, member.linkname, True, label)
            elif member.islnk():
                _check_link_target(member.name, member.linkname, False, label)
            elif not (member.isfile() or member.isdir()):
                raise _unsafe(label, member.name, "is a device, FIFO or other special file")
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(dest, members=members, filter="data")
            except tarfile.FilterError as err:
                raise _unsafe(label, err.tarinfo.name, f"is refused by the tar data filter ({err})") from err
        else:  # Python without PEP 706: our own checks above are the whole defence
            tar.extractall(dest, members=members)


def _extract_zip(archive: Path, dest: Path, label: str) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        plan = []
        for info in infos:
            rel = _check_member_name(info.filename, label)
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            target = ""
            if is_link:
                target = zf.read(info).decode("utf-8", errors="replace")
                _check_link_target(info.filename, target, True, label)
            plan.append((info, rel, is_link, target))
        root = dest.resolve()
        for info, rel, is_link, target in plan:
            if not rel:
                continue
            path = dest / rel
            if root not in path.resolve().parents:  # e.g. a member written through an earlier symlink
                raise _unsafe(label, info.filename, "resolves outside the output folder")
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if is_link:
                os.symlink(target, path)
                continue
            with zf.open(info) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def _materialize_symlinks(root: Path, label: str) -> None:
    """Replace symlinks inside the extracted tree by copies of their targets, so the dataset is link-free."""
    real_root = root.resolve()
    links = [Path(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if Path(d, n).is_symlink()]
    for link in sorted(links, key=lambda p: len(p.parts), reverse=True):
        target = link.resolve()
        if target != real_root and real_root not in target.parents:
            raise _unsafe(label, str(link.relative_to(root)), "is a link resolving outside the output folder")
        link.unlink()
        if target.is_file():
            shutil.copyfile(target, link)
        elif target.is_dir():
            shutil.copytree(target, link, symlinks=False)
        # a dangling link is dropped


# --------------------------------------------------------------------------------------- class folders


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIRS


def _subdirs(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir() and not _is_hidden(p.name))
    except OSError:
        return []


def _has_direct_images(directory: Path) -> bool:
    try:
        return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in directory.iterdir())
    except OSError:
        return False


def _move_classes(class_root: Path, out: Path, copy: bool) -> list[str]:
    """Put every class folder of `class_root` directly in `out` (moved from scratch, or copied).

    Folders without any image file (e.g. `docs/`) are not classes: they are left out and their names returned.
    """
    ignored = []
    for class_dir in _subdirs(class_root):
        if not _count_images(class_dir):
            _log.warning("ignoring %s: it holds no image files, so it is not a class folder", class_dir)
            ignored.append(class_dir.name)
            continue
        if copy:
            _copy_tree(class_dir, out / class_dir.name)
        else:
            os.replace(class_dir, out / class_dir.name)
    return ignored


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a user's folder as regular files (symlinks followed once, loops and dangling links skipped)."""
    seen: set[str] = set()
    for current, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        target_dir = dst / Path(current).relative_to(src)
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            path = Path(current) / name
            if not path.exists():
                _log.warning("skipping dangling symlink %s", path)
                continue
            shutil.copyfile(path, target_dir / name)


def _count_images(directory: Path) -> int:
    return sum(
        1 for d, _, files in os.walk(directory) for n in files if Path(n).suffix.lower() in IMAGE_EXTENSIONS
        and not n.startswith(".") and Path(d, n).is_file()
    )
