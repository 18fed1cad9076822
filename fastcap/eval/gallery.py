"""A self-contained HTML caption gallery (thumbnails inlined, worst CIDEr first)."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

__all__ = ["write_gallery"]

THUMB_SIZE = 160

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.img { width: 170px; }
.placeholder { width: 160px; height: 120px; background: #eee; color: #888; display: flex;
  align-items: center; justify-content: center; font-size: 12px; text-align: center; }
.caption { font-weight: bold; }
.refs { margin: 0; padding-left: 1.2em; color: #555; }
.score { font-variant-numeric: tabular-nums; }
"""


def _thumbnail_data_uri(image_path: str | Path) -> str | None:
    """Base64 JPEG data URI of a thumbnail, or None when the image cannot be read."""
    try:
        from PIL import Image

        with Image.open(image_path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
    except Exception:
        # A gallery is a diagnostic aid; one bad file must not lose the whole page.
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cider_value(item: dict[str, Any]) -> float:
    try:
        value = float(item.get("cider", float("nan")))
    except (TypeError, ValueError):
        value = float("nan")
    return value


def _sort_key(item: dict[str, Any]) -> tuple[bool, float]:
    value = _cider_value(item)
    # Items without a usable score go last so the worst real captions stay on top.
    return (math.isnan(value), value if not math.isnan(value) else 0.0)


def _row(item: dict[str, Any]) -> str:
    esc = html.escape
    image_path = item.get("image_path")
    uri = _thumbnail_data_uri(image_path) if image_path else None
    if uri is not None:
        image_cell = f'<img src="{uri}" alt="image {esc(str(item.get("image_id", "")))}">'
    else:
        name = Path(str(image_path)).name if image_path else "no image path"
        image_cell = f'<div class="placeholder">image unavailable<br>{esc(name)}</div>'
    refs = item.get("references") or []
    refs_html = "".join(f"<li>{esc(str(r))}</li>" for r in refs)
    value = _cider_value(item)
    score = "n/a" if math.isnan(value) else f"{value:.3f}"
    return (
        "<tr>"
        f'<td class="img">{image_cell}</td>'
        f'<td>{esc(str(item.get("image_id", "")))}</td>'
        f'<td class="caption">{esc(str(item.get("caption", "")))}</td>'
        f'<td><ul class="refs">{refs_html}</ul></td>'
        f'<td class="score">{score}</td>'
        "</tr>"
    )


def write_gallery(path: str | Path, items: list[dict], title: str = "FastCap captions") -> Path:
    """Write an HTML page of thumbnails, generated captions, references and CIDEr.

    Items are ``{"image_path", "image_id", "caption", "references", "cider"}``; rows are
    sorted by CIDEr, worst first. Returns the written path.
    """
    path = Path(path)
    ordered = sorted(items, key=_sort_key)
    values = [v for v in (_cider_value(i) for i in items) if not math.isnan(v)]
    mean = f"{sum(values) / len(values):.3f}" if values else "n/a"
    esc = html.escape
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{esc(title)}</h1>",
            f'<p class="summary">{len(items)} images, mean CIDEr {mean} (sorted worst first)</p>',
            "<table>",
            "<tr><th>Image</th><th>Id</th><th>Generated caption</th><th>References</th><th>CIDEr</th></tr>",
            *(_row(item) for item in ordered),
            "</table>",
            "</body>",
            "</html>",
            "",
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
