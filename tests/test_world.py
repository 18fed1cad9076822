"""Tests for the procedural caption world (fastcap.data.world)."""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from fastcap.data.world import ensure_world

SMALL = dict(num_train=20, num_val=5, num_test=5, image_size=32)
SPLITS = ("train", "val", "test")


def _make(root: Path, **kw) -> tuple[Path, list[str]]:
    logs: list[str] = []
    folder = ensure_world(root, **{**SMALL, **kw}, log=logs.append)
    return folder, logs


def _load(folder: Path, split: str) -> dict:
    return json.loads((folder / f"captions_{split}.json").read_text())


@pytest.mark.parametrize("variant,per_image", [("clean", 5), ("web", 1)])
def test_files_are_valid_coco_captions(tmp_path: Path, variant: str, per_image: int) -> None:
    folder, _ = _make(tmp_path, variant=variant)
    assert folder.parent == tmp_path and folder.name.startswith(f"{variant}-")
    assert (folder / "manifest.json").is_file()
    image_ids, ann_ids = set(), set()
    for split, n in zip(SPLITS, (20, 5, 5)):
        data = _load(folder, split)
        assert set(data) == {"info", "licenses", "images", "annotations"}
        assert data["licenses"] == [] and isinstance(data["info"], dict)
        assert len(data["images"]) == n
        for im in data["images"]:
            assert set(im) == {"id", "file_name", "width", "height"}
            assert (im["width"], im["height"]) == (32, 32)
            assert "/" not in im["file_name"] and im["file_name"].endswith(".jpg")
            with Image.open(folder / "images" / im["file_name"]) as img:
                assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
                img.load()
            assert im["id"] not in image_ids  # unique across splits
            image_ids.add(im["id"])
        per = collections.Counter()
        for ann in data["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"}
            assert ann["id"] not in ann_ids
            ann_ids.add(ann["id"])
            per[ann["image_id"]] += 1
            cap = ann["caption"]
            assert re.fullmatch(r"[a-z0-9]+( [a-z0-9]+)*", cap), cap
            assert len(cap.split()) <= 20, cap
        assert set(per) == {im["id"] for im in data["images"]}
        assert set(per.values()) == {per_image}
    assert len(list((folder / "images").glob("*.jpg"))) == 30


def test_other_image_sizes(tmp_path: Path) -> None:
    for size in (96, 224):
        folder, _ = _make(tmp_path, num_train=2, num_val=1, num_test=1, image_size=size)
        im = _load(folder, "train")["images"][0]
        with Image.open(folder / "images" / im["file_name"]) as img:
            assert img.size == (size, size)


def test_deterministic(tmp_path: Path) -> None:
    a, _ = _make(tmp_path / "a")
    b, _ = _make(tmp_path / "b")
    assert a.name == b.name
    for split in SPLITS:
        assert (a / f"captions_{split}.json").read_bytes() == (b / f"captions_{split}.json").read_bytes()
    for f in sorted((a / "images").iterdir()):
        assert f.read_bytes() == (b / "images" / f.name).read_bytes()
    c, _ = _make(tmp_path / "a", seed=1)
    assert c != a and _load(c, "train") != _load(a, "train")


def test_cache_is_reused(tmp_path: Path) -> None:
    folder, logs = _make(tmp_path)
    assert any("generating" in m for m in logs)
    mtime = os.stat(folder / "manifest.json").st_mtime_ns
    again, logs2 = _make(tmp_path)
    assert again == folder
    assert not any("generating" in m for m in logs2)
    assert os.stat(folder / "manifest.json").st_mtime_ns == mtime
    assert not list(tmp_path.glob(".*tmp*"))  # temp folder was renamed, nothing left behind


def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    folder, _ = _make(tmp_path)
    reference = (folder / "captions_train.json").read_bytes()
    (folder / "manifest.json").unlink()
    (folder / "captions_train.json").write_text("{truncated")
    rebuilt, logs = _make(tmp_path)
    assert rebuilt == folder
    assert any("incomplete" in m for m in logs)
    assert (folder / "manifest.json").is_file()
    assert (folder / "captions_train.json").read_bytes() == reference


def test_missing_images_count_as_incomplete(tmp_path: Path) -> None:
    folder, _ = _make(tmp_path)
    next((folder / "images").glob("*.jpg")).unlink()
    _, logs = _make(tmp_path)
    assert any("incomplete" in m for m in logs)
    assert len(list((folder / "images").glob("*.jpg"))) == 30


def test_stale_temp_folder_is_cleaned(tmp_path: Path) -> None:
    folder, _ = _make(tmp_path)
    stale = tmp_path / f".{folder.name}.tmp-999999999"  # no such pid
    (stale / "images").mkdir(parents=True)
    (folder / "manifest.json").unlink()
    _make(tmp_path)
    assert not stale.exists()


def test_caption_variety(tmp_path: Path) -> None:
    folder, _ = _make(tmp_path, num_train=50, num_val=0, num_test=0)
    caps = [a["caption"] for a in _load(folder, "train")["annotations"]]
    assert len(caps) == 250
    assert len(set(caps)) > 100
    assert collections.Counter(caps).most_common(1)[0][1] <= 0.05 * len(caps)
    # The five references of one image should be five different phrasings.
    by_image = collections.defaultdict(set)
    for a in _load(folder, "train")["annotations"]:
        by_image[a["image_id"]].add(a["caption"])
    assert all(len(v) == 5 for v in by_image.values())


def test_web_captions_are_short_and_noisy(tmp_path: Path) -> None:
    folder, _ = _make(tmp_path, variant="web", num_train=200, num_val=0, num_test=0, image_size=16)
    caps = [a["caption"] for a in _load(folder, "train")["annotations"]]
    assert max(len(c.split()) for c in caps) <= 12
    assert len(set(caps)) > 100
    vague = {"some shapes", "abstract picture", "colorful shapes", "geometric shapes", "abstract art",
             "simple shapes", "untitled", "image", "picture", "graphic design", "pattern"}
    n_vague = sum(c in vague or c.startswith("shapes on") for c in caps)
    assert 5 <= n_vague <= 45  # ~10% of 200


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ensure_world(tmp_path, variant="noisy", log=lambda m: None)
    with pytest.raises(ValueError):
        ensure_world(tmp_path, num_train=-1, log=lambda m: None)


def test_a_constant_caption_scores_near_zero_cider(tmp_path):
    """The built-in world cannot be solved by always saying the same thing."""
    import json

    from fastcap.eval.metrics import CaptionScorer

    folder = ensure_world(tmp_path, num_train=300, num_val=200, num_test=2, image_size=32, log=lambda *_: None)
    val = json.loads((folder / "captions_val.json").read_text())
    refs: dict[int, list[str]] = {}
    for a in val["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    train = json.loads((folder / "captions_train.json").read_text())
    from collections import Counter

    common = Counter(a["caption"] for a in train["annotations"]).most_common(1)[0][0]
    with CaptionScorer(meteor=False, log=lambda *_: None) as scorer:
        constant, _ = scorer.score(refs, {i: common for i in refs})
        own, _ = scorer.score(refs, {i: r[0] for i, r in refs.items()})
    assert constant["CIDEr"] < 0.1
    assert own["CIDEr"] > 2.0  # one human-like reference against the other four
