"""Entry points as a user runs them: evaluate, quantize, caption, SIGTERM + resume, W&B offline."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import COCO_MINI, FIXTURES, ROOT, TINY, run_cli
from fastcap.train.checkpoint import load_checkpoint

DEMO = FIXTURES / "coco-caption-example"


@pytest.mark.skipif(not DEMO.is_dir(), reason="coco-caption-example fixture not present")
def test_evaluate_scores_a_results_file_like_the_official_toolkit(tmp_path):
    r = run_cli([f"results={DEMO}/captions_val2014_fakecap_results.json",
                 f"annotations={DEMO}/captions_val2014_fakecap_gt_tokenized_coco_format.json",
                 f"hydra.run.dir={tmp_path}"], module="fastcap.evaluate")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert round(m["CIDEr"], 3) == 0.600 and round(m["Bleu_4"], 3) == 0.191
    assert "CIDEr" in r.stdout


def test_evaluate_quantize_and_caption_a_trained_checkpoint(trained, tmp_path):
    best = trained / "checkpoints" / "best_checkpoint.pth.tar"
    r = run_cli([f"checkpoint={best}", "split=test", "decode.beam_size=2", "eval.meteor=false",
                 f"hydra.run.dir={tmp_path / 'eval'}"], module="fastcap.evaluate")
    assert r.returncode == 0, r.stderr
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= json.loads((tmp_path / "eval" / "metrics.json").read_text()).keys()
    assert (tmp_path / "eval" / "captions_test.json").exists() and (tmp_path / "eval" / "gallery.html").exists()

    qpath = tmp_path / "quantized_model.pth"
    r = run_cli([f"checkpoint={best}", f"output_path={qpath}", "quantize.calib_images=8", "eval_images=8",
                 "eval.meteor=false", f"hydra.run.dir={tmp_path / 'quant'}"], module="fastcap.quantize")
    assert r.returncode == 0, r.stderr
    assert "sensitiv" in r.stdout.lower() and "bits" in r.stdout and "ptq_mixed" in r.stdout
    report = json.loads((tmp_path / "quant" / "quant_report.json").read_text())
    assert report["allocation"] and (tmp_path / "quant" / "sensitivity.png").stat().st_size > 1000
    assert load_checkpoint(qpath)["kind"] == "quantized"

    r = run_cli([f"checkpoint={qpath}", f"images={COCO_MINI}/images"], module="fastcap.caption")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "\t" in line]
    assert len(lines) == 51 and all(line.split("\t")[1] for line in lines)

    r = run_cli([f"checkpoint={qpath}", f"output_path={tmp_path / 'again.pth'}", f"hydra.run.dir={tmp_path / 'q2'}"],
                module="fastcap.quantize")
    assert r.returncode == 2 and "is a quantized model" in r.stderr and "Traceback" not in r.stderr


def test_quantize_rejects_bad_bits_and_impossible_budgets(trained, tmp_path):
    best = trained / "checkpoints" / "best_checkpoint.pth.tar"
    r = run_cli([f"checkpoint={best}", "quantize.bits=[3,8]", f"hydra.run.dir={tmp_path}"], module="fastcap.quantize")
    assert r.returncode == 2 and "only 4, 8 and 16 bits" in r.stderr
    r = run_cli([f"checkpoint={best}", "quantize.avg_bits=2", "evaluate=false", "quantize.calib_images=4",
                 f"hydra.run.dir={tmp_path}"], module="fastcap.quantize")
    assert r.returncode == 2 and "minimum" in r.stderr.lower()
    r = run_cli([f"checkpoint={tmp_path / 'missing.pth.tar'}", f"hydra.run.dir={tmp_path}"], module="fastcap.quantize")
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


@pytest.mark.slow
def test_sigterm_writes_a_resumable_checkpoint_and_resume_matches(tmp_path, data_root):
    """Kill a real training process with SIGTERM mid-run; resume; same weights as an uninterrupted run."""
    args = TINY + [f"data.root={data_root}", "data.num_train=64", "training.num_epochs=3"]
    full = run_cli(args + [f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "fastcap", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = run_dir / "checkpoints" / "checkpoint.pth.tar"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:  # wait for the end of epoch 1
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resumable checkpoint written" in err and "training.resume_checkpoint=" in err
    assert load_checkpoint(ckpt)["epoch"] < 3
    resumed = run_cli(args + [f"hydra.run.dir={run_dir}", f"training.resume_checkpoint={ckpt}"])
    assert resumed.returncode == 0, resumed.stderr
    import torch

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint.pth.tar")["model"]
    b = load_checkpoint(ckpt)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["CIDEr"] == \
        pytest.approx(json.loads((run_dir / "metrics.json").read_text())["CIDEr"])


def test_wandb_offline_run_holds_the_metrics(tmp_path, data_root):
    args = [a for a in TINY if a != "logger=none"] + [f"data.root={data_root}", "training.num_epochs=1",
                                                     "training.log_every=1", f"hydra.run.dir={tmp_path}"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    keys = set()
    for rec in read_wandb_records(runs[0]):
        if rec.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    assert {"train/loss", "val/CIDEr", "val/Bleu_4"} <= keys


def read_wandb_records(path):
    """Records of a .wandb file. wandb no longer ships a Python reader; the format is a 7-byte
    header (':W&B', magic, version) then LevelDB log blocks of 32 KiB holding protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec
