"""Load a captioner from a checkpoint, float or quantized, with its vocabulary."""
from __future__ import annotations

from pathlib import Path

import torch

from fastcap.data.vocab import Vocab
from fastcap.model.captioner import FastCap, ModelConfig
from fastcap.train.checkpoint import CheckpointError, load_checkpoint, load_model_weights


def build_from_state(state: dict, source: str = "checkpoint") -> FastCap:
    """A FastCap with the checkpoint's own architecture and weights (quantized layers if it is quantized)."""
    model = FastCap(ModelConfig.from_dict(state["model_config"]))
    if state.get("kind") == "quantized":
        from fastcap.quant import load_quantized

        return load_quantized(model, state["quant"])
    from fastcap.quant import strip_qat_state

    load_model_weights(model, strip_qat_state(state["model"]), source=source)
    return model


def load_captioner(path: str | Path, device: torch.device | str = "cpu") -> tuple[FastCap, Vocab, dict]:
    """(model in eval mode on `device`, its vocabulary, the raw checkpoint dict)."""
    state = load_checkpoint(path)
    if "model_config" not in state or "vocab" not in state:
        raise CheckpointError(f"{path} has no model config or vocabulary; it is not a FastCap model checkpoint")
    model = build_from_state(state, f"checkpoint {path}")
    return model.to(device).eval(), Vocab(state["vocab"]), state


def require_float(state: dict, path: str | Path, what: str) -> None:
    if state.get("kind") == "quantized":
        raise CheckpointError(f"{path} is a quantized model; {what} needs the float checkpoint it was made from "
                              "(e.g. checkpoints/best_checkpoint.pth.tar of a float training run)")
