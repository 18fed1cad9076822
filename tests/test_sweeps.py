"""Hydra multirun sweeps of the real entry point: basic launcher, Optuna sweeper, submitit launcher.

Every job is a tiny training run (conftest.TINY, 1 epoch, no METEOR). The plugin tests skip when
`pip install -e ".[sweep]"` has not been run.

Hydra's basic launcher keeps the jobs' return values in memory only, so the sweeps here add a
Hydra callback (RecordReturn, below; found through PYTHONPATH=tests) that writes each job's
return value to <job dir>/return_value.json: that is how the tests see that `python -m fastcap`
returns the best val CIDEr, the number every sweeper optimises.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, TINY, run_cli

SWEEP_TINY = [a for a in TINY if not a.startswith("training.lr=")] + [
    "training.num_epochs=1", "eval.meteor=false"]
RECORD = "+hydra.callbacks.record._target_=test_sweeps.RecordReturn"
TESTS_ON_PATH = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}


class RecordReturn:
    """Hydra callback: <job dir>/return_value.json = {"status": ..., "value": what the task returned}."""

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        ok = job_return.status.name == "COMPLETED"
        out = Path(config.hydra.runtime.output_dir) / "return_value.json"
        out.write_text(json.dumps({"status": job_return.status.name,
                                   "value": job_return.return_value if ok else repr(job_return._return_value)}))


def sweep(args: list[str], sweep_dir: Path, data_root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    r = run_cli(["-m", *SWEEP_TINY, f"data.root={data_root}", f"hydra.sweep.dir={sweep_dir}", RECORD, *args],
                timeout=timeout, env={**TESTS_ON_PATH, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_jobs(sweep_dir: Path, n: int) -> list[dict]:
    """n job folders, each a complete training run whose returned value is its best val CIDEr."""
    dirs = job_dirs(sweep_dir)
    assert [d.name for d in dirs] == [f"{i}_scratch_fastcap_tiny" for i in range(n)]
    out = []
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        assert (d / "checkpoints" / "best_checkpoint.pth.tar").is_file()
        assert (d / "checkpoints" / "checkpoint.pth.tar").is_file()
        ret = json.loads((d / "return_value.json").read_text())
        assert ret["status"] == "COMPLETED", ret
        assert isinstance(ret["value"], float) and ret["value"] == pytest.approx(metrics["CIDEr"])
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        out.append({"dir": d, "metrics": metrics, "value": ret["value"], "overrides": overrides})
    return out


@pytest.mark.slow
def test_basic_multirun_runs_each_job_in_its_own_folder_and_wandb_run(tmp_path, data_root):
    from test_cli import read_wandb_records

    sweep_dir = tmp_path / "sweep"
    sweep(["logger=wandb", "logger.mode=offline", "logger.log_images=false", "logger.log_checkpoint=false",
           "training.lr=1e-3,3e-3"], sweep_dir, data_root)
    jobs = check_jobs(sweep_dir, 2)
    assert [next(o for o in j["overrides"] if o.startswith("training.lr=")) for j in jobs] == \
        ["training.lr=0.001", "training.lr=0.003"]
    multirun = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    assert multirun["hydra"]["mode"] == "MULTIRUN"
    assert "training.lr=1e-3,3e-3" in multirun["hydra"]["overrides"]["task"]

    runs = {}
    for j in jobs:  # one offline W&B run per job, in the job's folder, grouped by the sweep
        files = list((j["dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, files
        run = next(rec.run for rec in read_wandb_records(files[0]) if rec.WhichOneof("record_type") == "run")
        assert run.run_group == sweep_dir.name
        assert "training.lr=" in run.display_name and "logger." not in run.display_name
        runs[run.run_id] = run.display_name
    assert len(runs) == 2 and len(set(runs.values())) == 2


@pytest.mark.slow
def test_optuna_search_writes_the_best_trial(tmp_path, data_root):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='needs pip install -e ".[sweep]"')
    sweep_dir = tmp_path / "optuna"
    r = sweep(["hparams_search=optuna_lr", "hydra.sweeper.n_trials=2"], sweep_dir, data_root)
    assert "Sampler: TPESampler" in r.stdout + r.stderr
    jobs = check_jobs(sweep_dir, 2)
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    assert result["best_value"] == pytest.approx(max(j["value"] for j in jobs))
    best = result["best_params"]
    assert set(best) == {"training.lr", "training.weight_decay", "training.label_smoothing"}
    assert 1e-4 <= best["training.lr"] <= 3e-3
    assert 0.0 <= best["training.weight_decay"] <= 0.1 and 0.0 <= best["training.label_smoothing"] <= 0.2
    # each trial trained with the values Optuna sampled
    for j in jobs:
        sampled = dict(o.split("=", 1) for o in j["overrides"] if o.split("=", 1)[0] in best)
        assert set(sampled) == set(best)
        cfg = yaml.safe_load((j["dir"] / ".hydra" / "config.yaml").read_text())
        assert cfg["training"]["lr"] == pytest.approx(float(sampled["training.lr"]))


SUBMITIT_LOCAL = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_every_job(tmp_path, data_root):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install -e ".[sweep]"')
    sweep_dir = tmp_path / "submitit"
    sweep([*SUBMITIT_LOCAL, "training.lr=1e-3,3e-3"], sweep_dir, data_root)
    jobs = check_jobs(sweep_dir, 2)
    assert {j["metrics"]["epoch"] for j in jobs} == {1}
    assert len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) == 2  # each job ran in its own process


@pytest.mark.slow
def test_sigterm_to_a_submitit_job_leaves_a_resumable_checkpoint(tmp_path, data_root):
    """What scancel / a SLURM time limit does: SIGTERM to the job's process. fastcap runs in that
    process's main thread, so its handler writes checkpoint.pth.tar and the sweep reports the job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install -e ".[sweep]"')
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finds the job's process through /proc")
    sweep_dir = tmp_path / "cut"
    args = ["-m", *SWEEP_TINY, f"data.root={data_root}", f"hydra.sweep.dir={sweep_dir}", *SUBMITIT_LOCAL,
            "training.num_epochs=200", "training.val_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "fastcap", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ckpt = sweep_dir / "0_scratch_fastcap_tiny" / "checkpoints" / "checkpoint.pth.tar"
        deadline = time.time() + 300
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:  # end of epoch 1
            time.sleep(0.2)
        assert ckpt.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no checkpoint"
        job_pids = [pid for pid, cmd in processes(str(sweep_dir)) if "submitit.core._submit" in cmd]
        assert len(job_pids) == 1
        os.kill(job_pids[0], signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid, _ in processes(str(sweep_dir)):  # submitit's controller and job, if the sweep died first
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0  # the sweep does not pretend the job finished
    assert "resumable checkpoint written" in err and "training.resume_checkpoint=" in err
    job_err = "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.err"))
    assert "interrupted by SIGTERM" in job_err and "Traceback" not in job_err

    from fastcap.train.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)
    assert 1 <= state["epoch"] < 200


def processes(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of the running processes whose command line holds `marker`."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd:
            out.append((int(d.name), cmd))
    return out
