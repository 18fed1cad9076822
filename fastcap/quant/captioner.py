"""FastCap glue around the generic quantization library.

Sensitivity is measured as the increase of teacher-forced token NLL on a fixed
calibration set of training images with their reference captions.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastcap.data.coco import CaptionDataset, collate
from fastcap.data.vocab import PAD_ID
from fastcap.quant.allocate import allocate_bits
from fastcap.quant.modules import convert
from fastcap.quant.pack import quantized_state
from fastcap.quant.sensitivity import hessian_sensitivity, layer_params, layer_sensitivity, quantizable_layers

ALLOWED_BITS = (4, 8, 16)


@dataclass
class QuantConfig:
    sensitivity: str = "nll"           # nll | hessian
    bits: tuple[int, ...] = (4, 8)     # widths a layer may get (16 = keep float16)
    avg_bits: float | None = 5.0
    max_size_mb: float | None = None
    calib_images: int = 64
    activations: str = "dynamic"       # dynamic (per-batch int8, fast kernels) | static (calibrated ranges)
    act_bits: int = 8                  # QAT activation fake-quant width

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        cfg = cls(**{**d, "bits": tuple(int(b) for b in d.get("bits", (4, 8)))})
        bad = [b for b in cfg.bits if b not in ALLOWED_BITS]
        if bad:
            raise ValueError(f"quantize.bits={list(cfg.bits)}: only 4, 8 and 16 bits are supported, not {bad}")
        if cfg.sensitivity not in ("nll", "hessian"):
            raise ValueError(f"quantize.sensitivity={cfg.sensitivity!r}: use 'nll' or 'hessian'")
        if cfg.activations not in ("dynamic", "static"):
            raise ValueError(f"quantize.activations={cfg.activations!r}: use 'dynamic' or 'static'")
        return cfg


def calibration_batch(records, vocab, transform, max_len: int, n: int, device) -> dict:
    """The first n training images with all their reference captions (5 slots), as one fixed batch."""
    ds = CaptionDataset(records[:n], vocab, transform, max_len=max_len, seq_per_img=5, seed=0)
    batch = collate([ds[i] for i in range(len(ds))])
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def token_nll(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["image"], batch["tokens"])
    tgt = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=PAD_ID)


def analyse(model: nn.Module, batch: dict, cfg: QuantConfig, log=print) -> tuple[dict, dict, dict]:
    """(sensitivity {layer: {bits: ΔNLL}}, params {layer: n}, allocation {layer: bits})."""
    model.eval()
    layers = quantizable_layers(model)
    measured = tuple(b for b in cfg.bits if b != 16)
    if cfg.sensitivity == "hessian":
        sens = hessian_sensitivity(model, layers, lambda m: token_nll(m, batch), bits=measured)
    else:
        with torch.no_grad():
            sens = layer_sensitivity(model, layers, lambda m: float(token_nll(m, batch)), bits=measured)
    params = layer_params(model, layers)
    allocation = allocate_bits(sens, params, avg_bits=cfg.avg_bits, max_size_mb=cfg.max_size_mb, choices=cfg.bits)
    return sens, params, allocation


def ptq(model: nn.Module, allocation: dict, cfg: QuantConfig, batch: dict | None = None) -> nn.Module:
    """A converted (integer) copy of `model`; static activation ranges come from the calibration batch."""
    qmodel = copy.deepcopy(model).eval()
    calibration = None
    if cfg.activations == "static" and batch is not None:
        calibration = lambda m: m(batch["image"], batch["tokens"])  # noqa: E731
    with torch.no_grad():
        return convert(qmodel, allocation, calibration, static_act=cfg.activations == "static")


def quantized_checkpoint(qmodel: nn.Module, source_state: dict, **extra) -> dict:
    """A loadable checkpoint of a converted model: config, vocabulary and the packed payload."""
    return {"kind": "quantized", "stage": source_state.get("stage"), "model_config": source_state["model_config"],
            "vocab": source_state["vocab"], "config": source_state.get("config", {}),
            "quant": quantized_state(qmodel), **extra}
