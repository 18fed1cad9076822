"""Layer twins for QAT (fake quantization) and for real quantized inference, plus the swaps.

Supported layers: ``nn.Linear`` (and subclasses), ``nn.Conv2d`` (any groups, incl.
depthwise), ``nn.Embedding`` and ``nn.MultiheadAttention``.

MultiheadAttention is handled as ONE unit addressed by the MHA module's name: its fused
``in_proj_weight`` (or separate q/k/v weights) and its ``out_proj`` share the bit width.
``out_proj`` cannot be swapped on its own because ``MultiheadAttention.forward`` reads
``self.out_proj.weight`` directly instead of calling ``out_proj``; a QAT twin there would be
silently ignored, so naming ``<mha>.out_proj`` in an allocation is an error. MHA layers are
weight-only quantized (no activation fake-quant: the attention math runs in float).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fake import (
    WEIGHT_BITS,
    check_bits,
    dequantize_weight,
    fake_quant_act,
    fake_quant_lastdim,
    fake_quant_weight,
    quantize_weight,
)
from .pack import pack_int4, unpack_int4

QUANT_META_ATTR = "_fastcap_quant_meta"
ACT_MIN, ACT_MAX = "qat_act_min", "qat_act_max"
DEFAULT_ACT_MOMENTUM = 0.01

_SUPPORTED = (nn.Linear, nn.Conv2d, nn.Embedding, nn.MultiheadAttention)


# --------------------------------------------------------------------------- helpers
def layer_weight_names(mod: nn.Module) -> list[str]:
    """Names (relative to ``mod``) of the weight tensors quantized for this layer."""
    if isinstance(mod, (QuantMultiheadAttention,)):
        return [n for n in mod._qspecs] + ["out_proj.weight"]
    if isinstance(mod, nn.MultiheadAttention):
        if mod._qkv_same_embed_dim:
            names = ["in_proj_weight"]
        else:
            names = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return names + ["out_proj.weight"]
    return ["weight"]


def _resolve(mod: nn.Module, rel: str) -> tuple[nn.Module, str]:
    owner, _, pname = rel.rpartition(".")
    return (mod.get_submodule(owner) if owner else mod), pname


def layer_weights(mod: nn.Module) -> list[Tensor]:
    """The weight tensors quantized for a (float or QAT) layer, in a fixed order."""
    out = []
    for rel in layer_weight_names(mod):
        owner, pname = _resolve(mod, rel)
        out.append(getattr(owner, pname))
    return out


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def _set(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(_get(root, parent), child, new)
    return root


def _mha_children(model: nn.Module) -> set[str]:
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            for cname, _ in m.named_modules():
                if cname:
                    out.add(f"{name}.{cname}" if name else cname)
    return out


def _clone_into(cls: type, mod: nn.Module) -> nn.Module:
    """New ``cls`` instance sharing ``mod``'s parameters and attributes (no re-init).

    Copying ``__dict__`` keeps every attribute a subclass or torchvision may have set (and
    hooks), and shallow-copying the dicts lets us add/remove entries without touching ``mod``.
    """
    new = cls.__new__(cls)
    d = {}
    for k, v in mod.__dict__.items():
        d[k] = copy.copy(v) if isinstance(v, (dict, set)) else v
    new.__dict__.update(d)
    return new


def _validate(model: nn.Module, allocation: Mapping[str, int]) -> dict[str, int]:
    alloc = {str(k): check_bits(v) for k, v in allocation.items()}
    names = dict(model.named_modules())
    unknown = [n for n in alloc if n not in names]
    if unknown:
        raise ValueError(f"allocation names layers that are not in the model: {unknown[:5]}")
    inside = _mha_children(model)
    for n in alloc:
        if n in inside and alloc[n] != 16:
            raise ValueError(
                f"{n!r} is inside an nn.MultiheadAttention, whose forward bypasses its submodules; "
                f"allocate bits to the MultiheadAttention module itself instead"
            )
        m = names[n]
        if alloc[n] != 16 and not isinstance(m, _SUPPORTED + (_QuantBase,)):
            raise ValueError(f"layer {n!r} of type {type(m).__name__} is not quantizable")
    return alloc


@contextmanager
def _swap_params(swaps: list[tuple[nn.Module, str, Tensor]]):
    """Temporarily replace registered parameters by (differentiable) tensors."""
    saved = []
    try:
        for owner, pname, t in swaps:
            saved.append((owner, pname, owner._parameters[pname]))
            owner._parameters[pname] = t
        yield
    finally:
        for owner, pname, p in reversed(saved):
            owner._parameters[pname] = p


# --------------------------------------------------------------------------- QAT twins
class _ActObserver:
    """Mixin: EMA-tracked per-tensor input range and asymmetric fake quantization.

    Buffers start at (+inf, -inf) = "never observed"; then the input passes through unchanged.
    In training mode the range is updated (first batch sets it, later ones blend with
    ``act_momentum``) before quantizing; in eval mode it is frozen.
    """

    act_bits: int | None
    act_momentum: float

    def _init_act(self, act_bits: int | None, device: torch.device | None, momentum: float) -> None:
        if act_bits is not None and not 2 <= int(act_bits) <= 8:
            raise ValueError(f"act_bits must be None or in [2, 8], got {act_bits}")
        self.act_bits = None if act_bits is None else int(act_bits)
        self.act_momentum = float(momentum)
        if ACT_MIN not in self._buffers:
            self.register_buffer(ACT_MIN, torch.tensor(math.inf, device=device))
            self.register_buffer(ACT_MAX, torch.tensor(-math.inf, device=device))

    def _fq_input(self, x: Tensor) -> Tensor:
        if not self.act_bits:
            return x
        lo, hi = getattr(self, ACT_MIN), getattr(self, ACT_MAX)
        if self.training:
            with torch.no_grad():
                xd = x.detach()
                bmin, bmax = xd.min().float(), xd.max().float()
                seen = torch.isfinite(lo)
                m = self.act_momentum
                lo.copy_(torch.where(seen, lo + m * (bmin - lo), bmin))
                hi.copy_(torch.where(seen, hi + m * (bmax - hi), bmax))
        elif not bool(torch.isfinite(hi)):
            return x
        return fake_quant_act(x, lo, hi, self.act_bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # A float checkpoint has no activation ranges: keep "never observed" instead of failing.
        for b in (ACT_MIN, ACT_MAX):
            if prefix + b in missing_keys:
                missing_keys.remove(prefix + b)

    @classmethod
    def from_float(cls, mod: nn.Module, bits: int, act_bits: int | None = 8,
                   act_momentum: float = DEFAULT_ACT_MOMENTUM) -> nn.Module:
        """The fake-quant twin of a float Linear / Conv2d, sharing its parameters."""
        new = _clone_into(cls, mod)
        new.bits = check_bits(bits, WEIGHT_BITS)
        new._init_act(act_bits, mod.weight.device, act_momentum)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, act_bits={self.act_bits}"


class QATLinear(_ActObserver, nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized (STE) and input fake-quantized (EMA range)."""

    bits: int

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._fq_input(x), fake_quant_weight(self.weight, self.bits), self.bias)


class QATConv2d(_ActObserver, nn.Conv2d):
    """``nn.Conv2d`` twin (any groups) with fake-quantized weight and input."""

    bits: int

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._fq_input(x), fake_quant_weight(self.weight, self.bits), self.bias)


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` twin: looked-up rows are fake-quantized with their per-row scale."""

    bits: int

    @classmethod
    def from_float(cls, mod: nn.Embedding, bits: int) -> "QATEmbedding":
        new = _clone_into(cls, mod)
        new.bits = check_bits(bits, WEIGHT_BITS)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return fake_quant_lastdim(super().forward(x), self.bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


class QATMultiheadAttention(nn.MultiheadAttention):
    """MHA twin: projection weights are fake-quantized (weight-only) and swapped in per call."""

    bits: int

    @classmethod
    def from_float(cls, mod: nn.MultiheadAttention, bits: int) -> "QATMultiheadAttention":
        new = _clone_into(cls, mod)
        new.bits = check_bits(bits, WEIGHT_BITS)
        return new

    def forward(self, *args: Any, **kwargs: Any):
        swaps = []
        for rel in layer_weight_names(self):
            owner, pname = _resolve(self, rel)
            swaps.append((owner, pname, fake_quant_weight(owner._parameters[pname], self.bits)))
        with _swap_params(swaps):
            return super().forward(*args, **kwargs)


_QAT_TYPES = (QATLinear, QATConv2d, QATEmbedding, QATMultiheadAttention)


def prepare_qat(model: nn.Module, allocation: Mapping[str, int], act_bits: int | None = 8,
                act_momentum: float = DEFAULT_ACT_MOMENTUM) -> nn.Module:
    """Swap each allocated layer (bits 4/8) in place for its fake-quant twin.

    The twins share the original ``Parameter`` objects (optimizers built before the swap keep
    working, tied weights stay tied) and keep the ``weight``/``bias`` state_dict keys; Linear
    and Conv2d twins add ``qat_act_min``/``qat_act_max`` buffers (tolerated as missing when a
    float checkpoint is loaded; see :func:`strip_qat_state` for the way back). Layers allocated
    16 bits stay float. ``act_bits=None`` disables activation fake quantization. Returns the
    model (a new object only if the root module itself was allocated).
    """
    alloc = _validate(model, allocation)
    for name, bits in alloc.items():
        mod = _get(model, name)
        if bits == 16:
            continue
        if isinstance(mod, _QuantBase):
            raise ValueError(f"{name!r} is already converted to integers; QAT needs the float model")
        if isinstance(mod, _QAT_TYPES):
            mod.bits = bits
            if isinstance(mod, _ActObserver):
                mod._init_act(act_bits, None, act_momentum)
            continue
        if isinstance(mod, nn.MultiheadAttention):
            new = QATMultiheadAttention.from_float(mod, bits)
        elif isinstance(mod, nn.Linear):
            new = QATLinear.from_float(mod, bits, act_bits, act_momentum)
        elif isinstance(mod, nn.Conv2d):
            new = QATConv2d.from_float(mod, bits, act_bits, act_momentum)
        else:
            new = QATEmbedding.from_float(mod, bits)
        model = _set(model, name, new)
    return model


def strip_qat_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the QAT activation-range buffers so the weights load into a plain float model."""
    return {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in (ACT_MIN, ACT_MAX)}


# --------------------------------------------------------------------------- integer layers
class _QuantBase(nn.Module):
    """Holds quantized weights as buffers ``<name>_q`` (int8 codes, or int4 packed row-wise in
    uint8) and ``<name>_scale`` (float32 per output channel), and serves ``<name>`` as the
    dequantized float tensor so code that reads ``layer.weight`` directly (MHA, tied output
    heads) keeps working.

    The dequantized tensor is cached in a non-persistent attribute (``cache_dequant``): the
    int layout is what a checkpoint stores, and recomputing the float weight every call would
    make int4/conv layers several times slower than float. Set ``cache_dequant = False`` on a
    module (or the class) to trade that speed for memory.
    """

    cache_dequant: bool = True

    def _init_store(self) -> None:
        self.__dict__["_qspecs"] = {}
        self.__dict__["_qcache"] = {}

    def _add_qweight(self, name: str, w: Tensor, bits: int, empty: bool = False, shared: dict | None = None) -> None:
        """Quantize float weight ``w`` and register ``<name>_q`` / ``<name>_scale``.

        ``empty=True`` only allocates buffers of the right layout (to be filled by
        ``load_state_dict``). ``shared`` maps id(float weight) -> (codes, scale) so weights tied
        in the float model stay one tensor (stored once by ``torch.save``).
        """
        shape = tuple(w.shape)
        rows = shape[0] if len(shape) else 1
        cols = int(math.prod(shape[1:])) if len(shape) > 1 else 1
        key = id(w)
        if shared is not None and key in shared:
            q, s = shared[key]
        elif empty:
            qshape = (rows, cols) if bits == 8 else (rows, (cols + 1) // 2)
            q = torch.zeros(qshape, dtype=torch.int8 if bits == 8 else torch.uint8, device=w.device)
            s = torch.ones(rows, dtype=torch.float32, device=w.device)
        else:
            codes, s = quantize_weight(w.detach(), bits, axis=0)
            codes = codes.reshape(rows, cols)
            q = codes if bits == 8 else pack_int4(codes)
        if shared is not None:
            shared[key] = (q, s)
        self.register_buffer(f"{name}_q", q)
        self.register_buffer(f"{name}_scale", s)
        self._qspecs[name] = (shape, bits, w.dtype)

    def _dequant(self, name: str) -> Tensor:
        shape, bits, dtype = self._qspecs[name]
        q, s = self._buffers[f"{name}_q"], self._buffers[f"{name}_scale"]
        # Buffer versions change on load_state_dict/in-place edits, data_ptr on .to(device).
        key = (q.data_ptr(), q._version, s.data_ptr(), s._version)
        hit = self._qcache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        codes = q if bits == 8 else unpack_int4(q, (q.shape[0], int(math.prod(shape[1:])) if len(shape) > 1 else 1))
        w = dequantize_weight(codes, s, axis=0, dtype=dtype).reshape(shape)
        if self.cache_dequant:
            self._qcache[name] = (key, w)
        return w

    def __getstate__(self):
        # Caches are derived data (and fbgemm's packed weights cannot be deep-copied/pickled).
        state = super().__getstate__()
        state["_qcache"] = {}
        for k in ("_packed_cache", "_act_key"):
            state.pop(k, None)
        return state

    def __getattr__(self, name: str):
        specs = self.__dict__.get("_qspecs")
        if specs is not None and name in specs:
            return self._dequant(name)
        return super().__getattr__(name)

    def _act_range(self) -> tuple[Tensor, Tensor] | None:
        if not getattr(self, "act_bits", None):
            return None
        lo, hi = self._buffers[ACT_MIN], self._buffers[ACT_MAX]
        key = (hi._version, lo._version, hi.data_ptr())
        cached = self.__dict__.get("_act_key")
        if cached is None or cached[0] != key:
            ok = bool(torch.isfinite(hi)) and bool(torch.isfinite(lo))
            self.__dict__["_act_key"] = (key, ok)
            cached = self.__dict__["_act_key"]
        return (lo, hi) if cached[1] else None

    def _register_act(self, act_bits: int | None, act_range: tuple[Tensor, Tensor] | None,
                      device: torch.device | None) -> None:
        # Ranges are always registered (inf/-inf = dynamic) so the state_dict layout does not
        # depend on calibration; act_bits (0 = none) travels in the payload's metadata.
        self.act_bits = int(act_bits) if act_bits else None
        lo = torch.tensor(math.inf, device=device) if act_range is None else act_range[0].detach().clone().float()
        hi = torch.tensor(-math.inf, device=device) if act_range is None else act_range[1].detach().clone().float()
        self.register_buffer(ACT_MIN, lo.reshape(()))
        self.register_buffer(ACT_MAX, hi.reshape(()))

    @property
    def bits(self) -> int:
        return next(iter(self._qspecs.values()))[1]


class QuantLinear(_QuantBase):
    """int8 / int4 Linear.

    int8 without a static activation range runs fbgemm's dynamic-quantization kernel
    (``torch.ops.quantized.linear_dynamic``) when the input has at least
    ``fast_int8_min_rows`` rows: activations are quantized per call to 7 bits
    (``reduce_range=True``, avoiding int16 saturation in AVX2's u8*s8 multiply-add) and
    multiplied with the int8 weights. Measured on the dev machine (AVX2, 1 thread, 512x512,
    best of 40 interleaved runs): batch 1 float 40 us vs fbgemm 61 us (its per-call activation
    quantization dominates a GEMV), batch 4 94 vs 70, batch 32 248 vs 170, batch 128 805 vs
    492. Hence small inputs (autoregressive decoding with a KV cache) take the dequantized
    float path (cached weight, float speed, weight-only int8 and more accurate). Rejected:
    ``torch._int_mm`` (no fast CPU kernel without VNNI, ~30x slower than float),
    ``torch._weight_int8pack_mm`` and torchao 0.18's Int8DynamicActivationInt8Weight (both
    5-100x slower than float here). Prepacking needs torch's deprecated quantized-tensor API;
    the int8 codes stay the source of truth and any kernel failure falls back to float.

    With a static range (from QAT or calibration) the input is fake-quantized on exactly the
    grid QAT trained with and multiplied by the dequantized (cached) weight: bit-faithful to
    the QAT model. fbgemm's static fp32-output kernel would saturate on AVX2 with full 8-bit
    activations, so it is not used. int4 always dequantizes (cached).
    """

    use_fast_int8: bool = True
    fast_int8_min_rows: int = 4

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int,
                 act_bits: int | None = None, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_store()
        self._add_qweight("weight", torch.empty(out_features, in_features, dtype=dtype, device=device),
                          check_bits(bits, WEIGHT_BITS), empty=True)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._register_act(act_bits, None, device)

    @classmethod
    def from_float(cls, mod: nn.Linear, bits: int, act_bits: int | None = None,
                   act_range: tuple[Tensor, Tensor] | None = None, empty: bool = False,
                   shared: dict | None = None) -> "QuantLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = mod.in_features, mod.out_features
        new._init_store()
        w = mod.weight
        new._add_qweight("weight", w, check_bits(bits, WEIGHT_BITS), empty, shared)
        new.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        new._register_act(act_bits, act_range, w.device)
        new.training = mod.training
        return new

    def _packed(self):
        q, s, b = self._buffers["weight_q"], self._buffers["weight_scale"], self.bias
        key = (q.data_ptr(), q._version, s._version, None if b is None else (b.data_ptr(), b._version))
        hit = self.__dict__.get("_packed_cache")
        if hit is not None and hit[0] == key:
            return hit[1]
        with warnings.catch_warnings():
            # Quantized-tensor creation is deprecated in torch>=2.10 but is the only way to
            # prepack for the fbgemm kernel; silence it here only.
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                q, s.double(), torch.zeros_like(s, dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qw, None if b is None else b.detach().float())
        self.__dict__["_packed_cache"] = (key, packed)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        rng = self._act_range()
        if rng is not None:
            x = fake_quant_act(x, rng[0], rng[1], self.act_bits)
        elif (self.bits == 8 and self.use_fast_int8 and x.device.type == "cpu" and x.dtype == torch.float32
              and not (x.requires_grad and torch.is_grad_enabled())
              and x.shape[-1] == self.in_features and x.numel() >= self.fast_int8_min_rows * self.in_features):
            try:
                y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).contiguous(), self._packed(), True)
                return y.reshape(*x.shape[:-1], self.out_features)
            except (RuntimeError, AttributeError, NotImplementedError) as e:  # no fbgemm/qnnpack build
                warnings.warn(f"QuantLinear: int8 kernel unavailable ({e}); using dequantized float path")
                type(self).use_fast_int8 = False
        w = self.weight
        b = self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, act_bits={self.act_bits}"


class QuantConv2d(_QuantBase):
    """int8 / int4 Conv2d (any groups). Computes with the dequantized cached weight: torch has
    no CPU int8 conv with float output short of fully static NHWC quantized graphs, and the
    cached float conv is exactly as fast as the original layer."""

    @classmethod
    def from_float(cls, mod: nn.Conv2d, bits: int, act_bits: int | None = None,
                   act_range: tuple[Tensor, Tensor] | None = None, empty: bool = False,
                   shared: dict | None = None) -> "QuantConv2d":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, a, getattr(mod, a))
        new._init_store()
        w = mod.weight
        new._add_qweight("weight", w, check_bits(bits, WEIGHT_BITS), empty, shared)
        new.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        new._register_act(act_bits, act_range, w.device)
        new.training = mod.training
        return new

    def forward(self, x: Tensor) -> Tensor:
        rng = self._act_range()
        if rng is not None:
            x = fake_quant_act(x, rng[0], rng[1], self.act_bits)
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, bits={self.bits}, act_bits={self.act_bits}")


class QuantEmbedding(_QuantBase):
    """int8 / int4 Embedding: gathers code rows (packed rows for int4) and dequantizes only
    the looked-up rows, so no float table is materialized for lookups."""

    @classmethod
    def from_float(cls, mod: nn.Embedding, bits: int, empty: bool = False,
                   shared: dict | None = None) -> "QuantEmbedding":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_embeddings, new.embedding_dim = mod.num_embeddings, mod.embedding_dim
        new.padding_idx = mod.padding_idx
        if mod.max_norm is not None:
            raise ValueError("QuantEmbedding does not support max_norm (it renormalizes the table in place)")
        new._init_store()
        w = mod.weight
        new._add_qweight("weight", w, check_bits(bits, WEIGHT_BITS), empty, shared)
        new.act_bits = None
        new.training = mod.training
        return new

    def forward(self, idx: Tensor) -> Tensor:
        shape, bits, dtype = self._qspecs["weight"]
        q, s = self._buffers["weight_q"], self._buffers["weight_scale"]
        rows = q[idx]
        if bits == 4:
            rows = unpack_int4(rows, (*idx.shape, self.embedding_dim))
        return (rows.to(torch.float32) * s[idx].unsqueeze(-1)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


class QuantMultiheadAttention(_QuantBase, nn.MultiheadAttention):
    """MHA with int projection weights. ``in_proj_weight`` (or q/k/v) is served dequantized by
    ``__getattr__`` and ``out_proj`` is a :class:`QuantLinear`, so the unmodified
    ``nn.MultiheadAttention.forward`` (including its fused fast path) runs on them."""

    @classmethod
    def from_float(cls, mod: nn.MultiheadAttention, bits: int, empty: bool = False,
                   shared: dict | None = None) -> "QuantMultiheadAttention":
        names = [n for n in layer_weight_names(mod) if n != "out_proj.weight"]
        new = _clone_into(cls, mod)
        new._init_store()
        for n in names:
            w = new._parameters.pop(n)
            new._add_qweight(n, w, check_bits(bits, WEIGHT_BITS), empty, shared)
        new._modules["out_proj"] = QuantLinear.from_float(mod.out_proj, bits, empty=empty, shared=shared)
        new.act_bits = None
        return new

    def forward(self, *args: Any, **kwargs: Any):
        return nn.MultiheadAttention.forward(self, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, bits={self.bits}"


_QUANT_TYPES = (QuantLinear, QuantConv2d, QuantEmbedding, QuantMultiheadAttention)


# --------------------------------------------------------------------------- convert
def _calibrate(model: nn.Module, names: list[str], calibration: Callable[[nn.Module], None]) -> dict[str, tuple[Tensor, Tensor]]:
    """Run ``calibration(model)`` in eval/no-grad mode recording each layer's input min/max."""
    ranges: dict[str, list[Tensor]] = {}
    handles = []

    def hook_for(name: str):
        def hook(_mod, inputs):
            x = inputs[0].detach()
            lo, hi = x.min().float(), x.max().float()
            if name in ranges:
                ranges[name][0] = torch.minimum(ranges[name][0], lo)
                ranges[name][1] = torch.maximum(ranges[name][1], hi)
            else:
                ranges[name] = [lo, hi]
        return hook

    for n in names:
        handles.append(_get(model, n).register_forward_pre_hook(hook_for(n)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calibration(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (r[0], r[1]) for n, r in ranges.items()}


def convert(model: nn.Module, allocation: Mapping[str, int],
            calibration: Callable[[nn.Module], None] | None = None, *, calib_act_bits: int = 8,
            static_act: bool = True) -> nn.Module:
    """Replace allocated layers (in place) by their integer twins.

    bits 8 -> int8 codes (``torch.int8`` buffer); bits 4 -> int4 codes packed two per
    ``torch.uint8``; both with float32 per-output-channel scales and float biases. bits 16 ->
    the layer stays float, its weight rounded to float16 precision (that is how
    :func:`quantized_state` stores it). Layers not in ``allocation`` are untouched.

    Activation ranges for Linear/Conv2d: QAT layers (from :func:`prepare_qat`) bring their EMA
    ranges and act_bits; other layers get ranges from ``calibration`` (a callable that runs
    forward passes on the model; per-layer min/max over everything it feeds, ``calib_act_bits``
    bits). Layers with a range quantize their input on that grid; layers without one run
    int8 Linear with dynamic per-batch activations and everything else weight-only.
    ``static_act=False`` ignores all ranges (fastest int8 kernel everywhere).

    Weights tied between allocated layers (e.g. embedding and output head) are quantized once
    and share buffers; if the allocation gives them different widths the wider one is used.
    """
    return _convert(model, allocation, calibration=calibration, calib_act_bits=calib_act_bits, static_act=static_act)


def _convert(model: nn.Module, allocation: Mapping[str, int], *, calibration: Callable[[nn.Module], None] | None = None,
             calib_act_bits: int = 8, static_act: bool = True, empty: bool = False,
             act_bits_map: Mapping[str, int] | None = None) -> nn.Module:
    alloc = _validate(model, allocation)

    # Tied weights must get one width; pick the widest (most accurate) and say so.
    owners: dict[int, list[str]] = {}
    for name, bits in alloc.items():
        for w in layer_weights(_get(model, name)) if not isinstance(_get(model, name), _QuantBase) else []:
            owners.setdefault(id(w), []).append(name)
    for names in owners.values():
        widths = {alloc[n] for n in names}
        if len(widths) > 1:
            wide = max(widths)
            warnings.warn(f"layers {names} share a weight but were allocated {sorted(widths)} bits; using {wide}")
            for n in names:
                alloc[n] = wide

    calib: dict[str, tuple[Tensor, Tensor]] = {}
    if calibration is not None and static_act and not empty:
        targets = [n for n, b in alloc.items() if b != 16
                   and isinstance(_get(model, n), (nn.Linear, nn.Conv2d))
                   and not (isinstance(_get(model, n), _ActObserver) and _get(model, n).act_bits
                            and bool(torch.isfinite(getattr(_get(model, n), ACT_MAX))))]
        calib = _calibrate(model, targets, calibration)

    shared: dict[int, tuple[Tensor, Tensor]] = {}
    act_meta: dict[str, int] = {}
    rounded: set[int] = set()
    for name, bits in alloc.items():
        mod = _get(model, name)
        if isinstance(mod, _QuantBase):
            raise ValueError(f"layer {name!r} is already converted")
        if bits == 16:
            if not empty:
                for w in layer_weights(mod):
                    if id(w) in rounded or not w.is_floating_point():
                        continue
                    rounded.add(id(w))
                    if w.numel() and float(w.detach().abs().max()) <= torch.finfo(torch.float16).max:
                        with torch.no_grad():
                            w.copy_(w.to(torch.float16))
            if isinstance(mod, _QAT_TYPES):  # back to the plain float class
                base = {QATLinear: nn.Linear, QATConv2d: nn.Conv2d, QATEmbedding: nn.Embedding,
                        QATMultiheadAttention: nn.MultiheadAttention}[type(mod)]
                plain = _clone_into(base, mod)
                plain._buffers.pop(ACT_MIN, None)
                plain._buffers.pop(ACT_MAX, None)
                model = _set(model, name, plain)
            continue

        act_bits: int | None = None
        act_range = None
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and not isinstance(mod, _QuantBase):
            if act_bits_map is not None:
                act_bits = act_bits_map.get(name) or None
            elif static_act:
                if isinstance(mod, _ActObserver) and mod.act_bits and bool(torch.isfinite(getattr(mod, ACT_MAX))):
                    act_bits, act_range = mod.act_bits, (getattr(mod, ACT_MIN), getattr(mod, ACT_MAX))
                elif name in calib:
                    act_bits, act_range = int(calib_act_bits), calib[name]
        act_meta[name] = act_bits or 0

        if isinstance(mod, nn.MultiheadAttention):
            new = QuantMultiheadAttention.from_float(mod, bits, empty=empty, shared=shared)
        elif isinstance(mod, nn.Linear):
            new = QuantLinear.from_float(mod, bits, act_bits, act_range, empty=empty, shared=shared)
        elif isinstance(mod, nn.Conv2d):
            new = QuantConv2d.from_float(mod, bits, act_bits, act_range, empty=empty, shared=shared)
        else:
            new = QuantEmbedding.from_float(mod, bits, empty=empty, shared=shared)
        new.train(mod.training)
        model = _set(model, name, new)

    prev = getattr(model, QUANT_META_ATTR, None) or {"allocation": {}, "act_bits": {}}
    meta = {"allocation": {**prev["allocation"], **alloc}, "act_bits": {**prev["act_bits"], **act_meta}}
    setattr(model, QUANT_META_ATTR, meta)
    return model
