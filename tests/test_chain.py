"""The whole chain (pretrain -> finetune -> distill -> quantize -> QAT) as Hydra multiruns, smoke-sized."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_chain_smoke_runs_every_stage_and_summarises(tmp_path):
    out = tmp_path / "chain"
    r = subprocess.run([sys.executable, "experiments/chain.py", "--recipe", "chain_smoke", "--out", str(out),
                        "logger=none", f"data.root={tmp_path / 'data'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["pretrain", "finetune", "distill", "baseline", "quantize", "qat"]
    for teacher in ("fastcap_small", "fastcap_base"):
        assert (out / "finetune" / teacher / "checkpoints" / "best_checkpoint.pth.tar").exists()
    summary = (out / "summary.md").read_text()
    for row in ("| finetune | fastcap_base", "| baseline (no teachers) | fastcap_tiny", "| distill | fastcap_tiny",
                "| ptq | fastcap_tiny", "| qat | fastcap_tiny"):
        assert row in summary
    assert "CPU ms/image" in summary and "FastCap chain summary" in r.stdout


def test_a_failing_stage_stops_the_chain(tmp_path):
    out = tmp_path / "chain"
    r = subprocess.run([sys.executable, "experiments/chain.py", "--recipe", "chain_smoke", "--out", str(out),
                        "logger=none", "training.precision=fp8"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "stage 'pretrain' failed" in r.stderr
    assert json.loads((out / "manifest.json").read_text())["failed"] == "pretrain"
    assert not (out / "finetune").exists()
