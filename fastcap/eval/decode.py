"""Batched caption decoding over a split, and the evaluation of the result."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastcap.data.coco import ImageDataset, ImageRecord, collate, member_bytes
from fastcap.data.vocab import Vocab


@dataclass
class DecodeConfig:
    beam_size: int = 1
    max_len: int = 20
    length_penalty: float = 0.0
    batch_size: int = 64


@torch.no_grad()
def decode_records(model: nn.Module, records: list[ImageRecord], vocab: Vocab, transform, cfg: DecodeConfig,
                   device: torch.device, num_workers: int = 0, skip_bad_images: bool = False) -> dict[int, str]:
    """Caption every record's image -> {image_id: caption}."""
    was_training = model.training
    model.eval()
    loader = DataLoader(ImageDataset(records, transform, skip_bad_images), batch_size=cfg.batch_size,
                        num_workers=num_workers, collate_fn=collate)
    out: dict[int, str] = {}
    for batch in loader:
        if "image" not in batch:
            continue
        seqs = model.generate(batch["image"].to(device), cfg.beam_size, cfg.max_len, cfg.length_penalty)
        for i, s in zip(batch["index"].tolist(), seqs.tolist()):
            out[records[i].image_id] = vocab.decode(s)
    model.train(was_training)
    return out


def write_results(captions: dict[int, str], path: str | Path) -> Path:
    """COCO results format: [{"image_id": int, "caption": str}]."""
    path = Path(path)
    path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()], indent=1))
    return path


def evaluate_records(model: nn.Module, records: list[ImageRecord], vocab: Vocab, transform, cfg: DecodeConfig,
                     device: torch.device, scorer, num_workers: int = 0,
                     skip_bad_images: bool = False) -> tuple[dict, dict, dict]:
    """Decode and score a split -> (corpus scores, per-image CIDEr, captions)."""
    caps = decode_records(model, records, vocab, transform, cfg, device, num_workers, skip_bad_images)
    refs = {r.image_id: list(r.captions) for r in records}
    scores, per_image = scorer.score({i: refs[i] for i in caps}, caps)
    return scores, per_image, caps


def _image_file(rec: ImageRecord, folder: Path) -> str:
    """A file holding the record's image: its own, or its tar shard member copied out (for the gallery and W&B)."""
    if rec.offset < 0:
        return rec.path
    dest = folder / Path(rec.member).name
    if not dest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(member_bytes(rec))
    return str(dest)


def write_report(out_dir: str | Path, split: str, records: list[ImageRecord], caps: dict[int, str],
                 per_image: dict[int, float], logger=None) -> list[dict]:
    """captions_<split>.json (COCO results) and gallery.html; the worst 50 also to the logger as a table."""
    from fastcap.eval.gallery import write_gallery

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(caps, out_dir / f"captions_{split}.json")
    by_id = {r.image_id: r for r in records}
    items = [{"image_path": _image_file(by_id[i], out_dir / "images"), "image_id": i, "caption": c,
              "references": list(by_id[i].captions), "cider": per_image.get(i, 0.0)} for i, c in caps.items()]
    write_gallery(out_dir / "gallery.html", items, title=f"FastCap captions ({split})")
    if logger is not None:
        logger.log_captions(f"{split}/captions", sorted(items, key=lambda it: it["cider"])[:50])
    return items
