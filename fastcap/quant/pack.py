"""Storage: int4 nibble packing, byte accounting and the quantized checkpoint payload."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

STATE_FORMAT = "fastcap.quant"
STATE_VERSION = 1


def pack_int4(codes: Tensor) -> Tensor:
    """Pack signed 4-bit codes (in [-8, 7]) two per ``torch.uint8`` byte along the LAST dim.

    Element ``2i`` goes to the low nibble and ``2i+1`` to the high nibble of byte ``i``, in
    two's complement. An odd last dimension is padded with a zero nibble, so a tensor of shape
    ``(..., n)`` packs to ``(..., ceil(n / 2))``. Packing row by row (rather than the flattened
    tensor) lets an embedding gather whole packed rows without unpacking the table.
    """
    if codes.ndim == 0:
        codes = codes.reshape(1)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_int4 expects integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    nib = codes.to(torch.int16).bitwise_and(0xF).to(torch.uint8)
    if nib.shape[-1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    lo, hi = nib[..., 0::2], nib[..., 1::2]
    return lo.bitwise_or(hi.bitwise_left_shift(4)).contiguous()


def unpack_int4(packed: Tensor, numel_or_shape: int | Sequence[int] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_int4`; returns ``torch.int8`` codes.

    ``numel_or_shape`` is the shape of the codes before packing; an int ``n`` means they were
    1-D with ``n`` elements (``packed`` is then 1-D too). Only the last dimension is padded, so
    ``packed.shape[:-1]`` must equal ``shape[:-1]``.
    """
    shape = (int(numel_or_shape),) if isinstance(numel_or_shape, int) else tuple(int(s) for s in numel_or_shape)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects torch.uint8, got {packed.dtype}")
    if len(shape) == 0:
        shape_2 = (1,)
    else:
        shape_2 = shape
    if tuple(packed.shape[:-1]) != shape_2[:-1] or packed.shape[-1] != (shape_2[-1] + 1) // 2:
        raise ValueError(f"packed tensor of shape {tuple(packed.shape)} does not hold codes of shape {shape}")
    lo = packed.bitwise_and(0xF)
    hi = packed.bitwise_right_shift(4)
    nib = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1)[..., : shape_2[-1]]
    codes = nib.to(torch.int8)
    codes = codes - (codes >= 8).to(torch.int8) * 16
    return codes.reshape(shape)


def _tensors(obj: Any):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def model_size_bytes(model_or_state: nn.Module | Mapping[str, Any] | Tensor) -> int:
    """Bytes of all tensors a model (its ``state_dict``) or a payload stores.

    Tensors sharing memory (tied weights, shared quantized buffers) are counted once, as
    ``torch.save`` stores them once. Non-tensor metadata (allocation dict, strings) is ignored:
    it is a few hundred bytes. For a converted model, layers kept at 16 bits are float32 in
    memory but float16 in :func:`quantized_state`; measure the payload for the on-disk size.
    """
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for t in _tensors(model_or_state):
        if t.device.type == "meta":
            key = (id(t), t.numel(), t.dtype)
        else:
            key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return int(total)


def quantized_state(model: nn.Module) -> dict[str, Any]:
    """Checkpoint payload of a model returned by :func:`fastcap.quant.convert`.

    Contains only tensors, ints, strings, lists and dicts (loadable with
    ``torch.load(..., weights_only=True)``)::

        {"format": "fastcap.quant", "version": 1,
         "allocation": {layer: bits}, "act_bits": {layer: 0 | 4..8},
         "fp16_keys": [state_dict keys stored as float16],
         "state_dict": {...}}

    Weights of layers allocated 16 bits are stored as float16 (``convert`` already rounded
    them, so a reloaded model is bit-identical); everything else is stored as in memory.
    """
    from .modules import QUANT_META_ATTR, layer_weight_names

    meta = getattr(model, QUANT_META_ATTR, None)
    if meta is None:
        raise ValueError("quantized_state: model was not converted with fastcap.quant.convert")
    sd = model.state_dict()
    fp16_keys: list[str] = []
    halves: dict[int, Tensor] = {}
    for name, bits in meta["allocation"].items():
        if bits != 16:
            continue
        mod = model.get_submodule(name) if name else model
        for rel in layer_weight_names(mod):
            key = f"{name}.{rel}" if name else rel
            t = sd.get(key)
            if t is None or t.dtype == torch.float16 or not t.is_floating_point():
                continue
            if t.numel() and float(t.detach().abs().max()) > torch.finfo(torch.float16).max:
                continue  # would overflow; convert() left it in full precision too
            # Tied weights: convert once so torch.save still stores one copy.
            half = halves.get(t.data_ptr())
            if half is None:
                half = halves[t.data_ptr()] = t.detach().to(torch.float16)
            sd[key] = half
            fp16_keys.append(key)
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "allocation": {str(k): int(v) for k, v in meta["allocation"].items()},
        "act_bits": {str(k): int(v) for k, v in meta["act_bits"].items()},
        "fp16_keys": fp16_keys,
        "state_dict": dict(sd),
    }


def load_quantized(model_float_skeleton: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Convert a freshly built float model to the stored layout and load the payload.

    The skeleton's float weights are not quantized (they are overwritten), so building it with
    random init is fine. Returns the model (the same object unless the root itself was a
    quantized layer).
    """
    from .modules import _convert

    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError("load_quantized: not a fastcap.quant payload (missing format tag)")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise ValueError(f"load_quantized: payload version {state['version']} is newer than supported {STATE_VERSION}")
    allocation = {str(k): int(v) for k, v in state["allocation"].items()}
    act_bits = {str(k): int(v) for k, v in state.get("act_bits", {}).items()}
    model = _convert(model_float_skeleton, allocation, empty=True, act_bits_map=act_bits)
    model.load_state_dict(state["state_dict"], strict=True)
    return model
