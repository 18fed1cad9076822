"""Data config -> train/val/test ImageRecords, for every supported source."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from fastcap.data.coco import DataError, ImageRecord, check_images, load_coco_captions, load_karpathy

FORMATS = ("synthetic", "coco", "karpathy", "corpus")


@dataclass
class DataConfig:
    name: str = "synthetic"
    format: str = "synthetic"          # synthetic | coco | karpathy | corpus (tar shards, or TSV/JSONL + image folder)
    # built-in caption world
    root: str = "outputs/data"
    variant: str = "clean"             # clean | web
    num_train: int = 8000
    num_val: int = 250
    num_test: int = 250
    image_size: int = 64               # size the world's JPEGs are drawn at
    seed: int = 0
    # real data (the seed's keys)
    train_annotations: str | None = None
    val_annotations: str | None = None
    test_annotations: str | None = None
    image_dir: str | None = None
    karpathy_split: str | None = None  # dataset_coco.json / dataset_flickr30k.json
    # loading
    batch_size: int = 32
    num_workers: int = 0
    pin_memory: bool = False
    seq_per_img: int = 5
    min_word_count: int = 1
    augment: bool = True
    skip_bad_images: bool = False
    cache_features: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataError(f"unknown data config key(s) {sorted(unknown)}; known: {sorted(known)}")
        cfg = cls(**d)
        if cfg.format not in FORMATS:
            raise DataError(f"data.format='{cfg.format}' is not one of {FORMATS}")
        return cfg


def load_splits(cfg: DataConfig, splits: tuple[str, ...] = ("train", "val"), log=print) -> dict[str, list[ImageRecord]]:
    """Records of each requested split, image files checked to exist."""
    out = {}
    if cfg.format == "synthetic":
        from fastcap.data.world import ensure_world

        folder = ensure_world(cfg.root, variant=cfg.variant, num_train=cfg.num_train, num_val=cfg.num_val,
                              num_test=cfg.num_test, image_size=cfg.image_size, seed=cfg.seed, log=log)
        for s in splits:
            out[s] = load_coco_captions(folder / f"captions_{s}.json", folder / "images")
    elif cfg.format == "karpathy":
        if not cfg.karpathy_split or not cfg.image_dir:
            raise DataError(f"data={cfg.name} needs data.karpathy_split=PATH (the Karpathy split JSON) "
                            "and data.image_dir=PATH")
        for s in splits:
            out[s] = load_karpathy(cfg.karpathy_split, cfg.image_dir, s)
    elif cfg.format == "corpus":
        from fastcap.data.corpus import CorpusRecords
        from fastcap.data.shards import ShardRecords, is_shard_spec

        for s in splits:
            path = getattr(cfg, f"{s}_annotations")
            if path and is_shard_spec(path):
                out[s] = ShardRecords(path)  # webdataset tar shards: images inside, no image_dir
                continue
            if not path or not cfg.image_dir:
                raise DataError(f"data.format=corpus needs data.{s}_annotations=PATH (webdataset .tar shards, or a "
                                ".tsv/.jsonl captions file or a COCO captions .json with data.image_dir=PATH)")
            if Path(path).suffix.lower() in (".tsv", ".jsonl", ".txt"):
                out[s] = CorpusRecords(path, cfg.image_dir)  # lazy: image files are checked when read
            else:
                out[s] = check_images(load_coco_captions(path, cfg.image_dir), cfg.skip_bad_images, log)
        return out
    else:  # coco
        if cfg.karpathy_split:
            if not cfg.image_dir:
                raise DataError("data.karpathy_split needs data.image_dir (the folder holding train2014/, val2014/)")
            for s in splits:
                out[s] = load_karpathy(cfg.karpathy_split, cfg.image_dir, s)
        else:
            for s in splits:
                ann = getattr(cfg, f"{s}_annotations")
                if not ann or not cfg.image_dir:
                    raise DataError(f"data=coco needs data.{s}_annotations=PATH (a COCO captions JSON) and "
                                    "data.image_dir=PATH (the folder its file_names are relative to)")
                out[s] = load_coco_captions(ann, cfg.image_dir)
    for s, recs in out.items():
        out[s] = check_images(recs, cfg.skip_bad_images, log)
        if not out[s]:
            raise DataError(f"the {s} split has no usable images")
    return out


def references(records: list[ImageRecord]) -> dict[int, list[str]]:
    return {r.image_id: list(r.captions) for r in records}

