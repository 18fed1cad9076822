"""COCO-format caption data: loading with clear errors, and the training dataset.

Real COCO, the Karpathy splits, Flickr8k/30k and the built-in caption world
all end up as a list of `ImageRecord`s, so the rest of FastCap has one path.
We read the JSON ourselves instead of torchvision's CocoCaptions because that
needs pycocotools and reports bad files as bare KeyErrors; users need the file
and the fault named.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fastcap.data.vocab import PAD_ID, Vocab


class DataError(Exception):
    """Bad input data; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: str
    captions: tuple[str, ...]
    # An image stored inside `path` (a tar shard): its bytes are path[offset : offset + size].
    member: str = ""
    offset: int = -1
    size: int = 0


def _read_json(path: str | Path, what: str) -> object:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path} is not valid JSON: {e}") from None


def load_coco_captions(annotations: str | Path, image_dir: str | Path) -> list[ImageRecord]:
    """Read a COCO captions file (captions_*.json) and check it fully."""
    data = _read_json(annotations, "annotation file")
    where = f"annotation file {annotations}"
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{where} is not COCO captions format: expected a JSON object with "
                        "'images' and 'annotations' lists")
    images, anns = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(anns, list):
        raise DataError(f"{where}: 'images' and 'annotations' must be lists")
    files: dict[int, str] = {}
    for k, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DataError(f"{where}: images[{k}] needs 'id' and 'file_name'")
        files[im["id"]] = im["file_name"]
    caps: dict[int, list[str]] = {i: [] for i in files}
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise DataError(f"{where}: annotations[{k}] needs 'image_id' and 'caption'")
        if not isinstance(a["caption"], str):
            raise DataError(f"{where}: annotations[{k}] caption is not a string: {a['caption']!r}")
        if not a["caption"].strip():
            raise DataError(f"{where}: annotations[{k}] (image {a['image_id']}) has an empty caption")
        if a["image_id"] not in caps:
            raise DataError(f"{where}: annotations[{k}] points at image id {a['image_id']}, "
                            "which is not in 'images'")
        caps[a["image_id"]].append(a["caption"])
    records = [ImageRecord(i, str(Path(image_dir) / files[i]), tuple(c)) for i, c in caps.items() if c]
    if not records:
        raise DataError(f"{where} has no images with captions")
    return records


def load_karpathy(split_json: str | Path, image_dir: str | Path, split: str) -> list[ImageRecord]:
    """Read a Karpathy split file (dataset_coco.json / dataset_flickr30k.json).

    'restval' is folded into 'train', as every Karpathy-split paper does.
    """
    data = _read_json(split_json, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"Karpathy split file {split_json}: expected an object with an 'images' list")
    wanted = {"train": ("train", "restval")}.get(split, (split,))
    records = []
    for k, im in enumerate(data["images"]):
        try:
            if im["split"] not in wanted:
                continue
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            caps = tuple(s["raw"] for s in im["sentences"])
            image_id = im.get("cocoid", im.get("imgid", k))
        except (KeyError, TypeError):
            raise DataError(f"Karpathy split file {split_json}: images[{k}] needs 'split', 'filename' "
                            "and 'sentences' with 'raw' captions") from None
        records.append(ImageRecord(int(image_id), str(Path(image_dir) / rel), caps))
    if not records:
        raise DataError(f"Karpathy split file {split_json} has no images in split '{split}'")
    return records


def check_images(records: list[ImageRecord], skip_bad: bool, log=print) -> list[ImageRecord]:
    """Fail on (or drop, with skip_bad) records whose image file does not exist."""
    missing = [r for r in records if not os.path.isfile(r.path)]
    if not missing:
        return records
    if not skip_bad:
        first = ", ".join(r.path for r in missing[:3])
        raise DataError(f"{len(missing)} image file(s) missing, e.g. {first}; check data.image_dir "
                        "or set data.skip_bad_images=true to skip them")
    log(f"warning: skipping {len(missing)} image(s) whose file is missing, e.g. {missing[0].path}")
    return [r for r in records if os.path.isfile(r.path)]


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def member_bytes(rec: ImageRecord) -> bytes:
    """The encoded image of a record stored inside a tar shard (rec.offset >= 0)."""
    with open(rec.path, "rb") as f:
        f.seek(rec.offset)
        return f.read(rec.size)


def read_image(rec: ImageRecord) -> Image.Image:
    """A record's image, from its own file or from its member of a tar shard."""
    if rec.offset < 0:
        return load_image(rec.path)
    try:
        with Image.open(io.BytesIO(member_bytes(rec))) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {rec.member} in tar shard {rec.path}: {e}") from None


class CaptionDataset(Dataset):
    """(image, up to `seq_per_img` encoded captions) per image.

    Randomness (augmentation, which captions) comes from a generator seeded by
    (seed, epoch, index), so a resumed run sees exactly the samples the
    uninterrupted one would have, whatever the number of workers.
    """

    def __init__(self, records: list[ImageRecord], vocab: Vocab, transform, *, max_len: int = 20,
                 seq_per_img: int = 5, seed: int = 0, skip_bad_images: bool = False) -> None:
        self.records, self.vocab, self.transform = records, vocab, transform
        self.max_len, self.seq_per_img, self.seed = max_len, seq_per_img, seed
        self.skip_bad_images = skip_bad_images
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int, rec: ImageRecord):
        return read_image(rec)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        rec = self.records[index]
        try:
            img = self._load(index, rec)
        except DataError:
            if self.skip_bad_images:
                return None
            raise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF)
            x = self.transform(img) if self.transform is not None else img
            order = torch.randperm(len(rec.captions)).tolist()
        # Cycle through the captions when an image has fewer than seq_per_img.
        chosen = [rec.captions[order[k % len(order)]] for k in range(self.seq_per_img)]
        tokens = torch.full((self.seq_per_img, self.max_len), PAD_ID, dtype=torch.long)
        for k, c in enumerate(chosen):
            ids = self.vocab.encode(c, self.max_len)
            tokens[k, : len(ids)] = torch.tensor(ids)
        return {"image": x, "tokens": tokens, "index": index}


class ImageDataset(Dataset):
    """Images only, for decoding and evaluation."""

    def __init__(self, records: list[ImageRecord], transform, skip_bad_images: bool = False) -> None:
        self.records, self.transform, self.skip_bad_images = records, transform, skip_bad_images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        try:
            img = read_image(self.records[index])
        except DataError:
            if self.skip_bad_images:
                return None
            raise
        return {"image": self.transform(img), "index": index}


def collate(items: list[dict | None]) -> dict:
    """Stack a batch, counting the items dropped as unreadable images."""
    good = [it for it in items if it is not None]
    out: dict = {"skipped": len(items) - len(good)}
    if good:
        out["image"] = torch.stack([it["image"] for it in good])
        out["index"] = torch.tensor([it["index"] for it in good])
        if "tokens" in good[0]:
            out["tokens"] = torch.stack([it["tokens"] for it in good])
    return out
