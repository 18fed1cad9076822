"""Later stages through the one entry point: finetune, SCST, QAT; checkpoint loading rules."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_train
from fastcap.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_finetune_loads_weights_and_starts_a_fresh_optimisation(trained, tmp_path, data_root):
    best = trained / "checkpoints" / "best_checkpoint.pth.tar"
    logs = []
    from conftest import compose_cfg
    from fastcap.train.recipe import Job, train

    cfg = compose_cfg(["training=finetune", f"training.resume_checkpoint={best}", "training.num_epochs=1"], data_root)
    train(cfg, Job(tmp_path), log=logs.append)
    assert any("starting a fresh 'finetune' optimisation" in m for m in logs)
    state = load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pth.tar")
    assert state["stage"] == "finetune" and state["epoch"] == 1


def test_vocab_extend_grows_rows(trained, tmp_path, data_root):
    """Fine-tuning on data with new words (another world seed/variant) extends the vocabulary."""
    best = trained / "checkpoints" / "best_checkpoint.pth.tar"
    old = load_checkpoint(best)
    run_train(["training=finetune", f"training.resume_checkpoint={best}", "training.num_epochs=1",
               "training.vocab_mode=extend", "data=synthetic_web", "data.num_train=24", "data.seq_per_img=1"],
              tmp_path, data_root)
    new = load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pth.tar")
    assert new["vocab"][: len(old["vocab"])] == old["vocab"] and len(new["vocab"]) > len(old["vocab"])
    assert new["model"]["tok_emb.weight"].shape[0] == len(new["vocab"])


def test_other_model_shape_is_a_clear_error(trained, tmp_path, data_root):
    best = trained / "checkpoints" / "best_checkpoint.pth.tar"
    with pytest.raises(CheckpointError, match=r"(?s)does not fit this model.*blocks\.0\..*checkpoint \(") as info:
        run_train(["training=finetune", f"training.resume_checkpoint={best}", "model.d_model=48"], tmp_path, data_root)
    assert "strict_load=false" in str(info.value)
    run_train(["training=finetune", f"training.resume_checkpoint={best}", "model.n_layers=2",
               "training.strict_load=false", "training.num_epochs=1"], tmp_path / "loose", data_root)


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    data = (trained / "checkpoints" / "checkpoint.pth.tar").read_bytes()
    bad = tmp_path / "cut.pth.tar"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.tar is truncated, corrupt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a FastCap checkpoint"):
        load_checkpoint(other)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"format": "fastcap-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a safe FastCap checkpoint|truncated, corrupt"):
        load_checkpoint(path)


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint({"x": torch.ones(1)}, tmp_path / "c.pth.tar")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint({"x": torch.zeros(1)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth.tar"]


def test_scst_runs_and_reports_reward(trained, tmp_path, data_root):
    best = trained / "checkpoints" / "best_checkpoint.pth.tar"
    metrics = run_train(["training=finetune", f"training.resume_checkpoint={best}", "training.objective=scst",
                         "training.num_epochs=1", "training.scst.samples=3"], tmp_path, data_root)
    assert "CIDEr" in metrics


def test_qat_trains_with_fake_quant_and_saves_a_quantized_best(trained, tmp_path, data_root):
    best = trained / "checkpoints" / "best_checkpoint.pth.tar"
    run_train(["training=qat", f"training.resume_checkpoint={best}", "training.num_epochs=1",
               "training.quant.calib_images=8"], tmp_path, data_root)
    q = load_checkpoint(tmp_path / "checkpoints" / "best_checkpoint.pth.tar")
    assert q["kind"] == "quantized" and set(q["allocation"].values()) <= {4, 8}
    latest = load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pth.tar")
    assert any(k.endswith("qat_act_min") for k in latest["model"])
    # a quantized model cannot be trained further
    with pytest.raises(CheckpointError, match="is a quantized model"):
        run_train(["training=finetune", f"training.resume_checkpoint={tmp_path}/checkpoints/best_checkpoint.pth.tar"],
                  tmp_path / "again", data_root)


def test_qat_without_a_checkpoint_is_refused(tmp_path, data_root):
    from fastcap.device import ConfigError

    with pytest.raises(ConfigError, match="resume_checkpoint"):
        run_train(["training=qat"], tmp_path, data_root)


def test_nan_loss_is_a_clear_error(tmp_path, data_root):
    from fastcap.train.loop import TrainingError

    with pytest.raises(TrainingError, match="training diverged.*training.lr"):
        run_train(["training.lr=1e30", "training.grad_clip=0", "training.warmup_steps=1"], tmp_path, data_root)
