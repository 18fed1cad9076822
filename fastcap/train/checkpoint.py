"""Checkpoints: atomic save, safe load, and the rules for loading into a model.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
`torch.load(weights_only=True)` reads it and a checkpoint file can never run
code. It carries the model config and vocabulary, so it is self-describing.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

FORMAT = "fastcap-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the fault."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def saved_size(obj) -> int:
    """Bytes `torch.save` writes for obj (how big a file of it would be)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def load_checkpoint(path: str | Path) -> dict:
    """Load a FastCap checkpoint safely (weights_only), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a safe FastCap checkpoint ({msg})") \
            from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a FastCap checkpoint (no '{FORMAT}' marker)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer FastCap (format version {state['version']})")
    return state


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], *, strict: bool = True,
                       source: str = "checkpoint", log=print) -> None:
    """Copy weights into `model`, naming every tensor whose shape or presence differs.

    strict=False loads the tensors that match and reports the rest.
    """
    own = model.state_dict()
    shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if (shape or missing or unexpected) and strict:
        lines = shape[:10] + [f"{k}: not in checkpoint" for k in missing[:5]] + \
            [f"{k}: not in model" for k in unexpected[:5]]
        raise CheckpointError(
            f"{source} does not fit this model ({len(shape)} shape mismatch(es), {len(missing)} missing, "
            f"{len(unexpected)} unexpected):\n  " + "\n  ".join(lines) +
            "\nUse the model config the checkpoint was trained with, or training.strict_load=false "
            "to load only the matching tensors")
    fitting = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    if not strict and (shape or missing or unexpected):
        log(f"warning: strict_load=false: loaded {len(fitting)} tensors from {source}; skipped "
            f"{len(shape)} with other shapes, {len(missing)} missing, {len(unexpected)} unexpected")


def rng_state() -> dict:
    # Data randomness is seeded per (seed, epoch, index), so the torch generators are all there is to keep.
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
