"""python -m fastcap.caption checkpoint=PATH images=PATH_OR_DIR: one caption per image, printed."""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from fastcap.cli import guarded, plain

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(path: str) -> list[Path]:
    from fastcap.data.coco import DataError

    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"no JPEG/PNG images in {p}")
        return files
    if not p.is_file():
        raise DataError(f"image or folder not found: {p}")
    return [p]


def caption_images(cfg: dict) -> list[tuple[str, str]]:
    from fastcap.data.coco import load_image
    from fastcap.data.transforms import eval_transform
    from fastcap.device import ConfigError, resolve_device
    from fastcap.model.load import load_captioner

    if not cfg["checkpoint"] or not cfg["images"]:
        raise ConfigError("usage: python -m fastcap.caption checkpoint=PATH images=PATH_OR_DIR")
    device = resolve_device(cfg["device"])
    model, vocab, _ = load_captioner(cfg["checkpoint"], device)
    tf = eval_transform(model.cfg.encoder.image_size)
    files = list_images(cfg["images"])
    out = []
    for i in range(0, len(files), cfg["batch_size"]):
        chunk = files[i:i + cfg["batch_size"]]
        x = torch.stack([tf(load_image(str(f))) for f in chunk]).to(device)
        seqs = model.generate(x, cfg["beam_size"], cfg["max_len"], cfg["length_penalty"])
        for f, s in zip(chunk, seqs.tolist()):
            out.append((str(f), vocab.decode(s)))
            print(f"{f}\t{out[-1][1]}", flush=True)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="caption")
def main(cfg: DictConfig) -> None:
    guarded(lambda: caption_images(plain(cfg)))


if __name__ == "__main__":
    main()
