"""Cached encoder features (data.cache_features=true).

With a frozen encoder and no augmentation, the encoder's output for an image
never changes, so it is computed once into a memory-mapped .npy file and later
epochs read it instead of decoding, resizing and encoding the image again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fastcap.data.coco import CaptionDataset, ImageDataset, ImageRecord, collate


@torch.no_grad()
def cache_features(encoder: nn.Module, records: list[ImageRecord], transform, path: str | Path,
                   device: torch.device, batch_size: int = 64, log=print) -> np.memmap:
    """Encoder outputs [N, S, C] for every record, written to (or reused from) `path`."""
    path = Path(path)
    done = path.with_suffix(".done")
    if path.exists() and done.exists() and int(done.read_text()) == len(records):
        log(f"using cached encoder features {path}")
        return np.load(path, mmap_mode="r")
    encoder.eval()
    loader = DataLoader(ImageDataset(records, transform), batch_size=batch_size, collate_fn=collate)
    out = None
    for batch in loader:
        feats = encoder(batch["image"].to(device)).float().cpu().numpy()
        if out is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                            shape=(len(records),) + feats.shape[1:])
        out[batch["index"].numpy()] = feats
    out.flush()
    done.write_text(str(len(records)))  # written last: a half-written cache is never reused
    log(f"cached encoder features of {len(records)} images in {path} ({out.nbytes / 1e6:.0f} MB)")
    return np.load(path, mmap_mode="r")


class FeatureDataset(CaptionDataset):
    """CaptionDataset whose 'image' is the cached encoder output [S, C] instead of pixels."""

    def __init__(self, features: np.ndarray, *args, **kwargs) -> None:
        super().__init__(*args, transform=None, **kwargs)
        self.features = features

    def _load(self, index: int, rec: ImageRecord) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[index]))
