"""Experiment logging: Weights & Biases (offline by default) or nothing.

One W&B run per Hydra job, always finished, so multirun jobs never merge.
Only rank 0 logs. Offline runs land in <run dir>/wandb and upload later with
`wandb sync <run dir>/wandb/offline-run-*`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoggerConfig:
    name: str = "none"        # wandb | none
    project: str = "fastcap"
    entity: str | None = None
    mode: str = "offline"     # offline | online | disabled
    group: str | None = None  # W&B group; default: the multirun sweep's folder name
    log_images: bool = True
    log_checkpoint: bool = True


class NullLogger:
    run = None

    def log(self, data: dict, step: int | None = None) -> None: ...
    def log_captions(self, key: str, rows: list[dict], step: int | None = None) -> None: ...
    def log_image(self, key: str, path: str | Path) -> None: ...
    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None: ...
    def log_artifact(self, path: str | Path, name: str, kind: str) -> None: ...
    def summary(self, data: dict) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class WandbLogger(NullLogger):
    def __init__(self, cfg: LoggerConfig, *, out_dir: Path, run_name: str, group: str | None, job_type: str,
                 config: dict) -> None:
        import wandb

        if cfg.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got '{cfg.mode}'")
        self.wandb, self.cfg = wandb, cfg
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(out_dir),
                              name=run_name, group=cfg.group or group, job_type=job_type, config=config,
                              reinit="create_new", settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, data: dict, step: int | None = None) -> None:
        self.run.log(data, step=step)

    def log_captions(self, key: str, rows: list[dict], step: int | None = None) -> None:
        cols = ["image_id", "image", "caption", "references", "CIDEr"]
        table = self.wandb.Table(columns=cols)
        for r in rows:
            img = self.wandb.Image(r["image_path"]) if self.cfg.log_images else None
            table.add_data(r["image_id"], img, r["caption"], " | ".join(r["references"]), r["cider"])
        self.run.log({key: table}, step=step)

    def log_image(self, key: str, path: str | Path) -> None:
        self.run.log({key: self.wandb.Image(str(path))})

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)})

    def log_artifact(self, path: str | Path, name: str, kind: str) -> None:
        if not self.cfg.log_checkpoint:
            return
        art = self.wandb.Artifact(name, type=kind)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def summary(self, data: dict) -> None:
        self.run.summary.update(data)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def build_logger(cfg: LoggerConfig, *, rank: int = 0, **kwargs) -> NullLogger:
    if rank != 0 or cfg.name == "none":
        return NullLogger()
    if cfg.name != "wandb":
        raise ValueError(f"logger.name must be 'wandb' or 'none', got '{cfg.name}'")
    return WandbLogger(cfg, **kwargs)
