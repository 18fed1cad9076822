"""Tests for fastcap.eval.gallery.write_gallery."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest

from fastcap.eval.gallery import write_gallery

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "coco-mini" / "images"


def _items() -> list[dict]:
    if not IMAGES.is_dir():
        pytest.skip(f"coco-mini images not found at {IMAGES}")
    paths = sorted(IMAGES.glob("*.jpg"))[:3]
    if len(paths) < 3:
        pytest.skip("need 3 coco-mini images")
    ciders = [0.9, 0.1, 0.5]
    captions = ["a good caption", "<script>alert('x')</script> & more", "a middling caption"]
    return [
        {"image_path": str(p), "image_id": int(p.stem), "caption": c,
         "references": ["a reference <b>bold</b>", "another one"], "cider": s}
        for p, c, s in zip(paths, captions, ciders)
    ]


def test_gallery_order_escaping_and_images(tmp_path: Path) -> None:
    items = _items()
    out = write_gallery(tmp_path / "sub" / "gallery.html", items, title="Val <epoch 3>")
    page = out.read_text(encoding="utf-8")

    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<title>Val &lt;epoch 3&gt;</title>" in page
    assert "3 images, mean CIDEr 0.500" in page

    ids = [int(m) for m in re.findall(r"<td>(\d+)</td>", page)]
    by_score = sorted(items, key=lambda i: i["cider"])
    assert ids == [i["image_id"] for i in by_score]  # worst first
    assert [float(s) for s in re.findall(r'<td class="score">([\d.]+)</td>', page)] == [0.1, 0.5, 0.9]

    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 3
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(uris[0]))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= 160
    assert "http" not in page.replace("http-equiv", "")  # no external assets


def test_missing_or_broken_image_gives_placeholder(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items = [
        {"image_path": str(tmp_path / "missing.jpg"), "image_id": 1, "caption": "x", "references": [], "cider": 0.2},
        {"image_path": str(broken), "image_id": 2, "caption": "y", "references": ["r"], "cider": 0.1},
    ]
    page = write_gallery(tmp_path / "g.html", items).read_text(encoding="utf-8")
    assert page.count('class="placeholder"') == 2
    assert "missing.jpg" in page and "data:image/jpeg" not in page
