"""Web-style pre-training corpora: an image folder plus a captions TSV or JSONL file (CC3M / SBU style).

The file is never held in memory: one pass records the byte offset of each line
(8 bytes per pair), and records are read by seeking. That keeps the dataset
map-style, so shuffling, DDP sharding and exact mid-epoch resume work as for
COCO, while a corpus of millions of pairs stays a few MB of RAM.

    TSV:   <image path relative to image_dir>\t<caption>      (a header line 'image\tcaption' is skipped)
    JSONL: {"image": "<path>", "caption": "<text>"}          (also accepts "file_name"/"url" and "text")
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fastcap.data.coco import DataError, ImageRecord

_IMAGE_KEYS, _CAPTION_KEYS = ("image", "file_name", "filename"), ("caption", "text")


class CorpusRecords(Sequence):
    """A lazy, random-access list of ImageRecords over a TSV/JSONL captions file."""

    def __init__(self, path: str | Path, image_dir: str | Path) -> None:
        self.path, self.image_dir = Path(path), Path(image_dir)
        if not self.path.is_file():
            raise DataError(f"corpus file not found: {self.path}")
        self.jsonl = self.path.suffix.lower() in (".jsonl", ".json")
        self._fh = None
        offsets = []
        with open(self.path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if len(self.offsets) and not self.jsonl and self._raw(0).lower().startswith("image\t"):
            self.offsets = self.offsets[1:]  # header line
        if not len(self.offsets):
            raise DataError(f"corpus file {self.path} has no image-caption pairs")
        self[0]  # fail early, with the line number, on a malformed first line

    def __len__(self) -> int:
        return len(self.offsets)

    def _raw(self, i: int) -> str:
        if self._fh is None or self._pid != os.getpid():  # a DataLoader worker needs its own handle
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[i]))
        return self._fh.readline().decode("utf-8").rstrip("\r\n")

    def __getitem__(self, i: int) -> ImageRecord:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        line = self._raw(i)
        where = f"corpus file {self.path}, pair {i + 1}"
        if self.jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            image = next((obj[k] for k in _IMAGE_KEYS if k in obj), None) if isinstance(obj, dict) else None
            caption = next((obj[k] for k in _CAPTION_KEYS if k in obj), None) if isinstance(obj, dict) else None
        else:
            image, _, caption = line.partition("\t")
        if not image or not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{where}: expected an image path and a non-empty caption, got {line[:120]!r}")
        return ImageRecord(i, str(self.image_dir / image), (caption,))

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fh": None}
