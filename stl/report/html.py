"""One self-contained HTML report: every figure and image embedded as a data URI, inline CSS, no scripts
and no external URLs, so the file can be mailed, attached to an MLflow run or opened offline, complete.
All text from data (class names, params, paths) is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stl.io import write_bytes_atomic

_THUMB = 192  # px: sample images are downscaled to this box before embedding
# Known figures in reading order, with their headings; any other figure goes to "Other figures".
_FIGURE_SECTIONS = (
    ("training_curves", "Training curves"),
    ("roc", "ROC curves"),
    ("confusion", "Confusion matrix"),
    ("confusion_normalized", "Confusion matrix (row-normalised)"),
    ("per_class", "Per-class metrics"),
)
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1.5em;color:#222;line-height:1.4}
h1{margin-top:0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
img.fig{max-width:100%;height:auto;border:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:.8em}
.sample{border:3px solid #2e7d32;border-radius:4px;padding:.3em;width:200px;font-size:.8em;text-align:center}
.sample.wrong{border-color:#c62828;background:#fdecea}
.sample img{max-width:192px;max-height:192px}
.sample img.px{width:128px;height:auto;image-rendering:pixelated}
.wrongtxt{color:#c62828;font-weight:bold}
.note{color:#666;font-size:.85em}
details{margin:.5em 0}
"""


def render_report(out_path: Path, *, title: str, summary: Mapping[str, Any], params: Mapping[str, Any],
                  metrics: Mapping[str, Any], history: Mapping[str, Sequence[Mapping[str, Any]]],
                  per_class: Sequence[Mapping[str, Any]], figures: Mapping[str, Path | bytes],
                  samples: Sequence[Mapping[str, Any]],
                  token_maps: Sequence[Mapping[str, Any]] | None = None,
                  notes: Sequence[str] = ()) -> Path:
    """Write the report to ``out_path`` atomically and return it.

    ``summary``: run facts shown first (model, dataset, run id...). ``params``: nested or flat, shown
    flattened (``train.lr``). ``metrics``: ``{group: {name: value}}`` such as reports/metrics.json
    (``test`` and, for token models, ``test_fused``); one column per group. ``history``: per-phase lists of
    per-epoch dicts. ``per_class``: table rows. ``figures``: name -> PNG path or bytes
    (``training_curves``, ``roc``, ``confusion``, ``confusion_normalized``, ``per_class``, others appended).
    ``samples``: dicts with ``image`` (path, encoded bytes or array), ``label``, ``pred``, optional
    ``prob``, ``path``, ``correct``.
    ``token_maps``: dicts with ``figure`` (PNG path or bytes) and optional ``caption``.
    ``notes``: caveats of the evaluation (absent classes, ...), listed under the metrics.
    """
    parts: list[str] = [f"<h1>{_e(title)}</h1>"]
    parts.append(_section("Run summary", _kv_table(summary) if summary else _note("no summary")))
    parts.append(_section("Metrics", _metrics_table(metrics) + "".join(_note(n) for n in notes)))
    for key, heading in _FIGURE_SECTIONS:
        if key == "training_curves":
            body = _figure(figures[key], heading) if key in figures else _note("no training curves figure")
            body += _history_tables(history)
            parts.append(_section(heading, body))
        elif key in figures:
            parts.append(_section(heading, _figure(figures[key], heading)))
    if per_class:
        parts.append(_section("Per-class table", _rows_table(per_class)))
    parts.append(_section("Sample predictions", _samples(samples)))
    if token_maps:
        body = _note("Per-token class (colour) and confidence (opacity; numbers in %) of the token labeler "
                     "and the student on the same image.")
        for item in token_maps:
            caption = item.get("caption", "")
            body += (f"<figure>{_figure(item['figure'], str(caption))}"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
        parts.append(_section("Token-label maps", body))
    extra = [key for key in figures if key not in dict(_FIGURE_SECTIONS)]
    if extra:
        parts.append(_section("Other figures", "".join(
            f"<h3>{_e(key)}</h3>{_figure(figures[key], key)}" for key in extra)))
    parts.append(_section("Parameters", _kv_table(flatten(params)) if params else _note("no parameters")))
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    out_path = Path(out_path)
    write_bytes_atomic(out_path, doc)
    return out_path


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = v
    return out


def data_uri(data: Path | bytes, mime: str | None = None) -> str:
    """``data:<mime>;base64,...`` of a file or of bytes (PNG, JPEG, GIF or WebP recognised by magic)."""
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else bytes(data)
    mime = mime or _sniff(raw)
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{_e(heading)}</h2>\n{body}\n</section>"


def _note(text: str) -> str:
    return f"<p class=\"note\">{_e(text)}</p>"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return f"<td>{_e('' if v is None else v)}</td>"
    if isinstance(v, (int, np.integer)):
        return f"<td class=\"num\">{int(v)}</td>"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        text = "n/a" if not math.isfinite(f) else f"{f:.4f}" if abs(f) >= 1e-3 or f == 0 else f"{f:.3g}"
        return f"<td class=\"num\">{text}</td>"
    if isinstance(v, (list, tuple)):
        return f"<td>{_e(', '.join(str(x) for x in v))}</td>"
    return f"<td>{_e(v)}</td>"


def _kv_table(d: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(key)}</th>{_cell(v)}</tr>" for key, v in d.items())
    return f"<table>{rows}</table>"


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    groups = {g: v for g, v in metrics.items() if isinstance(v, Mapping)}
    if not groups:
        flat = {key: v for key, v in metrics.items() if not isinstance(v, (Mapping, list))}
        return _kv_table(flat) if flat else _note("no metrics")
    names: list[str] = []
    for values in groups.values():
        names += [n for n, v in values.items() if n not in names and not isinstance(v, (Mapping, list))]
    head = "<tr><th>metric</th>" + "".join(f"<th>{_e(g)}</th>" for g in groups) + "</tr>"
    body = "".join(f"<tr><th>{_e(n)}</th>" + "".join(_cell(groups[g].get(n)) for g in groups) + "</tr>"
                   for n in names)
    note = ""
    if any("fused" in g for g in groups):
        note = _note("fused = class-token logits + w * max over tokens of the token logits (the STL "
                     "reference's robustness evaluation); test uses the class token only. The robustness "
                     "figures score the fused prediction (token models) on a sample of the test split.")
    return f"<table>{head}{body}</table>{note}"


def _rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cols: list[str] = []
    for row in rows:
        cols += [key for key in row if key not in cols]
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in cols) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _history_tables(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    out = ""
    for phase, rows in history.items():
        if rows:
            out += (f"<details><summary>{_e(phase)}: {len(rows)} epochs (table)</summary>"
                    f"{_rows_table(rows)}</details>")
    return out


def _figure(fig: Path | bytes, alt: str) -> str:
    return f"<img class=\"fig\" alt=\"{_e(alt)}\" src=\"{data_uri(fig)}\">"


def _samples(samples: Sequence[Mapping[str, Any]]) -> str:
    if not samples:
        return _note("no samples")
    wrong = sum(1 for s in samples if not _correct(s))
    cards = []
    for s in samples:
        ok = _correct(s)
        prob = s.get("prob")
        prob_txt = f" ({float(prob):.2f})" if isinstance(prob, (int, float, np.floating)) else ""
        path = s.get("path")
        img = s.get("image")
        img_html = ""
        if img is not None:
            uri, small = _image_uri(img)
            cls_attr = ' class="px"' if small else ""
            img_html = f"<img{cls_attr} alt=\"{_e(path or 'sample')}\" src=\"{uri}\">"
        pred_attr = "" if ok else ' class="wrongtxt"'
        cards.append(
            f"<div class=\"sample{'' if ok else ' wrong'}\">{img_html}"
            f"<div>true: <b>{_e(s.get('label'))}</b></div>"
            f"<div{pred_attr}>pred: <b>{_e(s.get('pred'))}</b>{_e(prob_txt)}</div>"
            + (f"<div class=\"note\">{_e(Path(str(path)).name)}</div>" if path else "") + "</div>")
    return (_note(f"{len(samples)} test images, {wrong} wrong (red).")
            + f"<div class=\"grid\">{''.join(cards)}</div>")


def _correct(s: Mapping[str, Any]) -> bool:
    return bool(s.get("correct", s.get("label") == s.get("pred")))


def _image_uri(image: Any) -> tuple[str, bool]:
    """An embedded thumbnail of a path, encoded bytes or array (JPEG for photos, PNG otherwise), and whether
    the image is tiny (digits at 32 px), to be upscaled without smoothing."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        from stl.data import load_image_rgb

        im = load_image_rgb(image)  # as the model reads it: upright per EXIF, 16-bit scaled, alpha on white
    elif isinstance(image, (bytes, bytearray)):
        im = Image.open(io.BytesIO(image))
    else:
        from stl.report.figures import to_display_image

        a = to_display_image(image)
        if a.dtype != np.uint8:
            a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
        im = Image.fromarray(a)
    im.load()
    small = max(im.size) < 96
    im.thumbnail((_THUMB, _THUMB))
    buf = io.BytesIO()
    if im.mode in ("RGB", "L") and min(im.size) >= 64:
        im.save(buf, format="JPEG", quality=85)
        return data_uri(buf.getvalue(), "image/jpeg"), small
    if im.mode not in ("RGB", "L", "RGBA", "LA"):
        im = im.convert("RGBA")
    im.save(buf, format="PNG")
    return data_uri(buf.getvalue(), "image/png"), small


def _sniff(raw: bytes) -> str:
    if raw.startswith(b"\x89PNG"):
        return "image/png"
    if raw.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError("embedded figure is not a PNG, JPEG, GIF or WebP image")
