"""Batched caption decoding over a split, and the evaluation of the result."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastcap.data.coco import ImageDataset, ImageRecord, collate
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
