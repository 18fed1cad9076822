"""What every entry point shares: config to plain dict, Hydra job info, clean errors.

Errors in the user's input (data, checkpoints, config values, NaN loss) end the
program with a one-paragraph message and exit code 2, not a traceback
(FASTCAP_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers: nothing below the entry point sees OmegaConf."""
    return OmegaConf.to_container(cfg, resolve=True)


def job_from_hydra():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fastcap.train.recipe import Job

    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith(("hydra.", "logger."))]
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    return Job(out_dir=Path(hc.runtime.output_dir), name=",".join(overrides) or "default", group=group)


def user_errors() -> tuple[type[BaseException], ...]:
    from fastcap.data.coco import DataError
    from fastcap.eval.metrics import EvaluationError
    from fastcap.train.checkpoint import CheckpointError
    from fastcap.train.loop import TrainingError
    from fastcap.device import ConfigError

    return DataError, CheckpointError, TrainingError, ConfigError, EvaluationError, ValueError


def guarded(fn: Callable[[], T]) -> T:
    from fastcap.train.loop import Interrupted

    try:
        return fn()
    except Interrupted as e:
        print(f"\n{e}\nResume with: training.resume_checkpoint={e.path}", file=sys.stderr)
        sys.exit(128 + int(e.signum))
    except user_errors() as e:
        if os.environ.get("FASTCAP_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        if in_multirun():
            # Let Hydra mark this job failed: the basic sweeper then stops at this batch (the chain relies
            # on it), and Optuna records a failed trial instead of losing the whole study.
            raise JobFailed(str(e).splitlines()[0]) from None
        sys.exit(2)


class JobFailed(Exception):
    """A multirun job stopped on a user error (already printed)."""


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False
