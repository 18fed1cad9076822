"""Shared test helpers: compose the real configs (as the entry point does) with tiny sizes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = ROOT.parent / "shared" / "fixtures"
COCO_MINI = FIXTURES / "coco-mini"

# A model and data set small enough for a training job to take seconds on 2 cores.
TINY = [
    "logger=none",
    "model=fastcap_tiny",
    "model.encoder.image_size=32",
    "model.encoder.width=32",
    "model.encoder.depth=1",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.dropout=0.1",
    "data.num_train=24",
    "data.num_val=8",
    "data.num_test=8",
    "data.image_size=32",
    "data.batch_size=8",
    "training.num_epochs=2",
    "training.warmup_steps=2",
    "training.lr=3e-3",
    "eval.max_images=0",
    "eval.meteor=false",  # the METEOR JVM costs ~15 s of CPU per job; test_tiny_job_writes_every_output keeps it
]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One built-in-world cache for the whole session (generation is deterministic)."""
    return tmp_path_factory.mktemp("world")


def compose_cfg(overrides: list[str], data_root: Path | None = None) -> dict:
    extra = [f"data.root={data_root}"] if data_root is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=TINY + extra + overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def run_train(overrides: list[str], out_dir: Path, data_root: Path | None = None) -> dict:
    from fastcap.train.recipe import Job, train

    return train(compose_cfg(overrides, data_root), Job(out_dir=out_dir, name="test"), log=lambda *_: None)


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, module: str = "fastcap",
            env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_root) -> Path:
    """A tiny scratch run whose checkpoints later stages start from."""
    out = tmp_path_factory.mktemp("scratch")
    run_train([], out, data_root)
    return out
