"""Small per-stage hooks around the shared loop.

A hook may replace the model (QAT swaps in fake-quant layers), supply the
objective (distillation holds teachers) and act once training is done (QAT
converts the best model to its real quantized form).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
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


@dataclass
class QATHook(StageHook):
    """Trains with fake quantization; at the end the best model is converted to the real integer format."""
    allocation: dict = field(default_factory=dict)
    quant_cfg: object = None
    extra: dict = field(default_factory=dict)
    log: Callable = print

    def finish(self, model: nn.Module, out_dir: Path, metrics: dict) -> None:
        from fastcap.quant import convert, model_size_bytes
        from fastcap.quant.captioner import quantized_checkpoint
        from fastcap.train.checkpoint import save_checkpoint

        qmodel = convert(copy.deepcopy(model).eval(), self.allocation)  # uses the ranges learned in QAT
        path = save_checkpoint(quantized_checkpoint(qmodel, {**self.extra, "stage": "qat"}, metrics=metrics,
                                                    allocation=self.allocation),
                               out_dir / "checkpoints" / "best_checkpoint.pth.tar")
        self.log(f"QAT: best model converted to its quantized form ({model_size_bytes(qmodel) / 1e6:.2f} MB of "
                 f"tensors) and saved as {path}; the latest fake-quant state stays in checkpoint.pth.tar")


def build(stage: str, tcfg: dict, cfg: dict, *, model: nn.Module, vocab, train_records, device, out_dir: Path,
          start: dict | None, extra: dict, log=print) -> StageHook:
    mode = tcfg.get("mode", "standard")
    if mode not in MODES:
        raise ConfigError(f"training.mode={mode!r}: use one of {MODES}")
    if mode == "pmtd":
        from fastcap.distill import build_pmtd

        return StageHook(model, build_pmtd(tcfg, student=model, vocab=vocab, train_records=train_records,
                                           device=device, log=log, data=cfg["data"]))
    if stage == "qat":
        return build_qat(tcfg, cfg, model=model, vocab=vocab, train_records=train_records, device=device,
                         start=start, extra=extra, log=log)
    return StageHook(model)


def build_qat(tcfg: dict, cfg: dict, *, model, vocab, train_records, device, start, extra, log) -> QATHook:
    from fastcap.data.transforms import eval_transform
    from fastcap.quant import allocation_from_report, format_report, prepare_qat
    from fastcap.quant.captioner import QuantConfig, analyse, calibration_batch

    if start is None:
        raise ConfigError("training=qat needs training.resume_checkpoint=PATH, the full-precision model to "
                          "fine-tune with quantization (e.g. .../checkpoints/best_checkpoint.pth.tar)")
    q = dict(tcfg.get("quant", {}))
    report = q.pop("report", None)
    qcfg = QuantConfig.from_dict(q)
    if report:
        if not Path(report).is_file():
            raise ConfigError(f"training.quant.report={report}: file not found (it is the quant_report.json "
                              "written by python -m fastcap.quantize); or set it to null to compute the allocation")
        allocation = allocation_from_report(json.loads(Path(report).read_text()))
        log(f"QAT: bit allocation of {len(allocation)} layers read from {report}")
    else:
        batch = calibration_batch(train_records, vocab, eval_transform(model.cfg.encoder.image_size),
                                  model.cfg.max_len, qcfg.calib_images, device)
        sens, params, allocation = analyse(model.to(device), batch, qcfg, log)
        log("QAT: bit allocation computed from layer sensitivity:\n" + format_report(sens, allocation, params))
    model = prepare_qat(model, allocation, act_bits=qcfg.act_bits)
    return QATHook(model, allocation=allocation, quant_cfg=qcfg, extra=extra, log=log)
