"""Builders for the data tests: PNG bytes, archives (including hostile ones) and a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int = 0, size: tuple[int, int] = (8, 8)) -> bytes:
    """A small RGB PNG whose pixels depend on `seed` (so files differ)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    """Write a tar archive from (name, data) pairs and ready-made TarInfo entries (links, odd names)."""
    with tarfile.open(path, mode) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def flower_members(prefix: str = "flower_photos/") -> list[tuple[str, bytes]]:
    """An archive laid out like the TensorFlow flowers one: classes one level down, a stray LICENSE."""
    return [
        (f"{prefix}LICENSE.txt", b"CC-BY"),
        (f"{prefix}daisy/a.png", png_bytes(1)),
        (f"{prefix}daisy/b.png", png_bytes(2)),
        (f"{prefix}roses/c.png", png_bytes(3)),
    ]


class LocalServer:
    """Serves files from `root`; `plan[path]` is a list of failures to send before serving the file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.plan: dict[str, list[int | str]] = {}
        self.hits: Counter[str] = Counter()
        handler = functools.partial(_Handler, directory=str(root))
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: LocalServer

    def handle_error(self, request, client_address) -> None:  # a client that timed out is expected
        pass


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        owner.hits[path] += 1
        plan = owner.plan.get(path)
        step = plan.pop(0) if plan else None
        if step == "slow":
            time.sleep(3.0)
        elif step == "short":  # promise more bytes than are sent, then hang up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
            return
        elif isinstance(step, int):
            self.send_error(step)
            return
        super().do_GET()
