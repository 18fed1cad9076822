"""WebDataset tar shards (what img2dataset writes): `<key>.jpg` + `<key>.txt` (or `<key>.json`) per pair.

Why not the `webdataset` package's reader: it streams samples as an
IterableDataset, which would give up what every other FastCap source has
(seeded per-epoch shuffling, DistributedSampler sharding, exact mid-epoch
resume). Uncompressed tar members sit at fixed byte offsets, so one pass over
the tar headers (the data is seeked over, not read) gives a random-access index
of a few dozen bytes per pair, and a shard set larger than memory stays
map-style. The shard files themselves are the standard format: the package's
`webdataset.TarWriter` / `ShardWriter` and img2dataset write them.

    python -m fastcap training=pretrain data=corpus "data.train_annotations='/data/cc3m/{00000..00331}.tar'" ...
(a brace range, quoted for Hydra; or a glob, a folder of .tar files, or one .tar)
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fastcap.data.coco import DataError, ImageRecord

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shard_spec(spec: str) -> bool:
    """True for a .tar file, a brace/glob pattern of them, or a folder holding them."""
    p = str(spec)
    return p.endswith(".tar") or ".tar.gz" in p or ".tgz" in p or bool(_BRACES.search(p)) or \
        (os.path.isdir(p) and any(f.endswith(".tar") for f in os.listdir(p)))


def expand_shards(spec: str) -> list[str]:
    """'a/{000..012}.tar' (zero-padded ranges, as webdataset writes them), 'a/*.tar', 'a/' or 'a/x.tar'."""
    spec = str(spec)
    m = _BRACES.search(spec)
    if m:
        lo, hi = m.group(1), m.group(2)
        names = [spec[: m.start()] + str(i).zfill(len(lo)) + spec[m.end():] for i in range(int(lo), int(hi) + 1)]
        paths = [p for n in names for p in expand_shards(n)]
    elif os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).glob("*.tar"))
    elif any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
    else:
        paths = [spec]
    if not paths:
        raise DataError(f"no tar shards match {spec!r} (give a .tar file, a folder of them, a glob or "
                        "a brace range like 'shards/{00000..00099}.tar')")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the extension starts at the first dot of the file's base name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def _caption(raw: str, is_json: bool, where: str) -> str:
    """The caption of a .txt member, or the 'caption' / 'text' string of a .json one."""
    if is_json:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: caption .json is not valid JSON ({e})") from None
        raw = next((obj[k] for k in ("caption", "text") if isinstance(obj, dict) and k in obj), None)
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"{where}: empty caption (expected a non-empty .txt, or .json with a 'caption' string)")
    return raw.strip()


class ShardRecords(Sequence):
    """A lazy, random-access list of ImageRecords over uncompressed webdataset tar shards."""

    def __init__(self, spec: str) -> None:
        self.shards = expand_shards(spec)
        rows = []  # (shard, image offset, image size, caption offset, caption size, caption is json)
        for s, path in enumerate(self.shards):
            if path.endswith((".gz", ".tgz")):
                raise DataError(f"tar shard {path} is compressed: random access needs uncompressed .tar shards "
                                "(webdataset's default; re-pack with `gunzip`)")
            if not os.path.isfile(path):
                raise DataError(f"tar shard not found: {path}")
            pending: dict[str, dict] = {}
            try:
                with tarfile.open(path, "r:") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        key, ext = _split_key(info.name)
                        entry = pending.setdefault(key, {})
                        if ext in IMAGE_EXTS:
                            entry["image"] = (info.offset_data, info.size)
                        elif ext in CAPTION_EXTS and "caption" not in entry:
                            entry["caption"] = (info.offset_data, info.size, ext == "json")
            except tarfile.TarError as e:
                raise DataError(f"tar shard {path} cannot be read: {e}") from None
            for key, entry in pending.items():
                if "image" not in entry or "caption" not in entry:
                    what = "image (.jpg/.png/.webp)" if "image" not in entry else "caption (.txt/.json)"
                    raise DataError(f"tar shard {path}: sample '{key}' has no {what}; each sample needs both")
                rows.append((s, *entry["image"], *entry["caption"]))
        if not rows:
            raise DataError(f"tar shards {spec!r} hold no image-caption samples")
        self.index = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> ImageRecord:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s, img_off, img_size, cap_off, cap_size, is_json = (int(v) for v in self.index[i])
        with open(self.shards[s], "rb") as f:  # one open per sample: the member's name (its header), the caption
            f.seek(img_off - tarfile.BLOCKSIZE)
            member = f.read(100).split(b"\0", 1)[0].decode("utf-8", "replace")  # not kept in memory
            f.seek(cap_off)
            raw = f.read(cap_size).decode("utf-8")
        where = f"tar shard {self.shards[s]}, sample '{_split_key(member)[0]}'"
        return ImageRecord(i, self.shards[s], (_caption(raw, bool(is_json), where),), member=member,
                           offset=img_off, size=img_size)

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(len(self)):
            yield self[i]
