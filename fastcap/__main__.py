"""python -m fastcap: compose the config, train the configured stage.

    python -m fastcap                                   # built-in data, scratch training
    python -m fastcap training=finetune training.resume_checkpoint=PATH
    python -m fastcap -m training.lr=1e-4,3e-4          # a Hydra multirun sweep

Returns the best val CIDEr so Hydra sweepers can optimise it.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fastcap.cli import guarded, job_from_hydra, plain


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from fastcap.train.recipe import train

    metrics = guarded(lambda: train(plain(cfg), job_from_hydra()))
    return float(metrics.get("CIDEr", 0.0))


if __name__ == "__main__":
    main()
