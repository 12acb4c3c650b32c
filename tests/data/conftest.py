"""Fixtures for the data tests: tiny images, class-folder trees, archives and a local HTTP server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stl.data import sources

from .helpers import LocalServer, png_bytes


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries are tested for their count, not their delay."""
    monkeypatch.setattr(sources, "_BACKOFF_SECONDS", 0.0)


@pytest.fixture
def make_png() -> Callable[..., Path]:
    def make(path: Path, seed: int = 0, size: tuple[int, int] = (8, 8)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(seed, size))
        return path

    return make


@pytest.fixture
def make_tree(make_png: Callable[..., Path]) -> Callable[..., Path]:
    """Write `{class: n_images}` as `<root>/<class>/<i>.png` and return root."""

    def make(root: Path, counts: dict[str, int]) -> Path:
        for c, (name, n) in enumerate(counts.items()):
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_png(root / name / f"{i:03d}.png", seed=1000 * c + i)
        return root

    return make


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    root = tmp_path / "served"
    root.mkdir()
    local = LocalServer(root)
    try:
        yield local
    finally:
        local.close()
