"""Small per-stage hooks around the shared loop.

A hook may replace the model (QAT swaps in fake-quant layers), supply the
objective (distillation holds teachers) and act once training is done (QAT
converts the best model to its real quantized form).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from fastcap.device import ConfigError

MODES = ("standard", "pmtd")


@dataclass
class StageHook:
    model: nn.Module
    objective: Callable | None = None

    def finish(self, model: nn.Module, out_dir: Path, metrics: dict) -> None:
        """Called with the best model loaded, after the final evaluation."""


def build(stage: str, tcfg: dict, cfg: dict, *, model: nn.Module, vocab, train_records, device, out_dir: Path,
          log=print) -> StageHook:
    mode = tcfg.get("mode", "standard")
    if mode not in MODES:
        raise ConfigError(f"training.mode={mode!r}: use one of {MODES}")
    if mode == "pmtd":
        from fastcap.distill import build_pmtd

        return StageHook(model, build_pmtd(tcfg, student=model, vocab=vocab, train_records=train_records,
                                           device=device, log=log))
    return StageHook(model)
