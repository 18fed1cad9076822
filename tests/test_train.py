"""End-to-end training jobs on tiny real configs: outputs, resume, clean CLI errors."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import ROOT, compose_cfg, run_cli, run_train
from fastcap.train.checkpoint import load_checkpoint

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def test_tiny_job_writes_every_output(tmp_path, data_root):
    best = run_train(["eval.meteor=true"], tmp_path, data_root)
    for name in ("checkpoint.pth.tar", "best_checkpoint.pth.tar"):
        state = torch.load(tmp_path / "checkpoints" / name, weights_only=True)  # must be safe to load
        for key in ("model", "optimizer", "scheduler", "epoch", "step", "rng", "vocab", "config", "model_config"):
            assert key in state, f"{name} lacks {key}"
    assert load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pth.tar")["epoch"] == 2
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for k in METRICS + ("epoch",):
        assert k in metrics
    assert 0.0 <= metrics["Bleu_1"] <= 1.0 and metrics["epoch"] in (1, 2)
    assert best["CIDEr"] == pytest.approx(metrics["CIDEr"])
    results = json.loads((tmp_path / "captions_val.json").read_text())
    assert len(results) == 8 and all(isinstance(r["caption"], str) and "image_id" in r for r in results)
    assert (tmp_path / "gallery.html").read_text().count("<img") >= 8


def _weights(path):
    return load_checkpoint(path)["model"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, data_root, monkeypatch):
    """A run stopped by SIGTERM mid-epoch and resumed ends bit-identical to one never stopped (CPU)."""
    run_train([], tmp_path / "full", data_root)

    import fastcap.train.objectives as objectives

    calls = {"n": 0}
    original = objectives.CrossEntropy.__call__

    def interrupting(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, second batch
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batch)

    from fastcap.train.loop import Interrupted

    monkeypatch.setattr(objectives.CrossEntropy, "__call__", interrupting)
    with pytest.raises(Interrupted) as info:
        run_train([], tmp_path / "cut", data_root)
    monkeypatch.setattr(objectives.CrossEntropy, "__call__", original)
    ckpt = tmp_path / "cut" / "checkpoints" / "checkpoint.pth.tar"
    assert info.value.path == ckpt
    state = load_checkpoint(ckpt)
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    run_train([f"training.resume_checkpoint={ckpt}"], tmp_path / "cut", data_root)

    a, b = _weights(tmp_path / "full/checkpoints/checkpoint.pth.tar"), _weights(ckpt)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_unknown_override_and_group_option_fail_clearly():
    r = run_cli(["training.no_such_key=1"], timeout=120)
    assert r.returncode != 0 and "no_such_key" in r.stderr
    r = run_cli(["model=fastcap_huge"], timeout=120)
    assert r.returncode != 0 and "fastcap_huge" in r.stderr and "fastcap_tiny" in r.stderr


def test_bad_config_value_is_a_short_error(tmp_path):
    r = run_cli(["logger=none", "training.precision=fp8", f"hydra.run.dir={tmp_path}",
                 f"data.root={tmp_path / 'w'}", "data.num_train=4", "data.num_val=2", "data.num_test=2"], timeout=300)
    assert r.returncode == 2
    assert "training.precision" in r.stderr and "Traceback" not in r.stderr


def test_every_training_config_composes():
    for stage in ("scratch", "pretrain", "finetune", "distill", "qat"):
        cfg = compose_cfg([f"training={stage}"])
        assert cfg["training"]["stage"] == stage
    assert (ROOT / "conf" / "config.yaml").exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, data_root):
    """torchrun with 2 gloo processes: one output dir, rank 0 saves and logs, the data is sharded."""
    import subprocess
    import sys
    from conftest import TINY

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = TINY + [f"data.root={data_root}", "data.batch_size=4", f"hydra.run.dir={tmp_path}"]
    r = subprocess.run(torchrun + ["-m", "fastcap", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pth.tar")
    # 24 images / 2 ranks / batch 4 = 3 steps per epoch, 2 epochs
    assert state["step"] == 6 and state["epoch"] == 2
    assert (tmp_path / "metrics.json").exists()
    assert (r.stdout + r.stderr).count("best checkpoint (epoch") == 1  # only rank 0 evaluates and prints


def test_cached_features_train_without_the_image_pipeline(tmp_path, data_root, monkeypatch):
    import fastcap.data.coco as coco

    best = run_train(["model.encoder.freeze=true", "data.augment=false", "data.cache_features=true"],
                     tmp_path, data_root)
    assert (tmp_path / "feature_cache" / "train.npy").exists() and "CIDEr" in best
    # a second run reuses the cache: no training image is decoded again (only val images)
    loaded = []
    monkeypatch.setattr(coco, "load_image", lambda p: loaded.append(p) or coco.Image.new("RGB", (32, 32)))
    run_train(["model.encoder.freeze=true", "data.augment=false", "data.cache_features=true",
               "training.num_epochs=1"], tmp_path, data_root)
    assert all("/val_" in p for p in loaded), loaded[:3]


def test_cached_features_refuse_augmentation(tmp_path, data_root):
    from fastcap.device import ConfigError

    with pytest.raises(ConfigError, match="model.encoder.freeze=true and data.augment=false"):
        run_train(["data.cache_features=true"], tmp_path, data_root)


def test_ema_and_early_stopping(tmp_path, data_root):
    logs = []
    from conftest import compose_cfg
    from fastcap.train.recipe import Job, train

    cfg = compose_cfg(["training.ema_decay=0.9", "training.patience=1", "training.num_epochs=4",
                       "training.lr=1e-9", "training.warmup_steps=1"], data_root)
    train(cfg, Job(tmp_path), log=logs.append)
    state = load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pth.tar")
    assert state["ema"] is not None
    # with a learning rate of 1e-9 val CIDEr cannot improve after epoch 1: patience 1 stops at epoch 2
    assert any("early stopping" in m for m in logs) and state["epoch"] == 2
