"""Per-layer quantization sensitivity: measured (one layer at a time) and Hessian-based."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .fake import check_bits, dequantize_weight, quantize_weight
from .modules import _get, _mha_children, _QuantBase, layer_weights

DEFAULT_INCLUDE: tuple[type, ...] = (nn.Linear, nn.Conv2d, nn.Embedding, nn.MultiheadAttention)


def quantizable_layers(model: nn.Module, include: tuple[type, ...] = DEFAULT_INCLUDE) -> list[str]:
    """Qualified names of all quantizable layers, in ``named_modules`` order.

    ``nn.MultiheadAttention`` is included by default and counts as one layer (fused in_proj +
    out_proj); its ``out_proj`` is never listed on its own (see ``fastcap.quant.modules``).
    Drop MHA from ``include`` to leave attention float. Already-converted integer layers are
    skipped; QAT twins are listed (they subclass the float layers).
    """
    inside = _mha_children(model)
    out = []
    for name, m in model.named_modules():
        if name in inside or isinstance(m, _QuantBase):
            continue
        if isinstance(m, include):
            out.append(name)
    return out


def layer_params(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, int]:
    """Number of quantized weight elements per layer (biases excluded: they stay float).

    A weight tied between two layers is counted for each of them.
    """
    names = quantizable_layers(model) if layers is None else list(layers)
    return {n: int(sum(w.numel() for w in layer_weights(_get(model, n)))) for n in names}


def layer_channels(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, int]:
    """Number of per-channel scales each layer stores when quantized (its weight rows)."""
    names = quantizable_layers(model) if layers is None else list(layers)
    return {n: int(sum(w.shape[0] for w in layer_weights(_get(model, n)))) for n in names}


def _fq(w: Tensor, bits: int) -> Tensor:
    codes, scales = quantize_weight(w, bits, axis=0)
    return dequantize_weight(codes, scales, axis=0, dtype=w.dtype)


def layer_sensitivity(model: nn.Module, layers: Sequence[str], evaluate: Callable[[nn.Module], float],
                      bits: Sequence[int] = (4, 8)) -> dict[str, dict[int, float]]:
    """Increase of ``evaluate(model)`` when ONE layer's weight is fake-quantized to ``b`` bits.

    The baseline (unmodified model) is evaluated once. Each layer's weights are overwritten in
    place and restored from a clone of that layer alone, so the original values come back
    bit-exactly (even if ``evaluate`` raises) and no model copy is made. 16 bits is recorded as
    0 without evaluating. Weights tied between layers are perturbed for both uses.
    Cost: ``1 + len(layers) * len(bits <16)`` calls of ``evaluate``.
    """
    widths = [check_bits(b) for b in bits]
    base = float(evaluate(model))
    out: dict[str, dict[int, float]] = {}
    for name in layers:
        weights = layer_weights(_get(model, name))
        originals = [w.detach().clone() for w in weights]
        res: dict[int, float] = {}
        try:
            for b in widths:
                if b == 16:
                    res[b] = 0.0
                    continue
                with torch.no_grad():
                    for w, orig in zip(weights, originals):
                        w.copy_(_fq(orig, b))
                res[b] = float(evaluate(model)) - base
        finally:
            with torch.no_grad():
                for w, orig in zip(weights, originals):
                    w.copy_(orig)
        out[name] = res
    return out


@contextmanager
def _double_backward_safe_attention():
    """Force the math SDPA kernel: fused CPU/GPU attention kernels (flash, efficient) have no
    double backward, which Hessian-vector products need (e.g. torchvision ViT's MHA)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: only the math kernel exists for double backward anyway
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def hessian_trace(model: nn.Module, layers: Sequence[str], loss_fn: Callable[[nn.Module], Tensor],
                  n_samples: int = 8, seed: int = 0) -> dict[str, float]:
    """Hutchinson estimate of ``tr(H_l)`` for each layer's weight block (HAWQ-V2).

    ``tr(H_l) = E_v[v_l^T (H v)_l]`` with Rademacher ``v`` over all selected weights at once:
    the cross-layer terms vanish in expectation, so one Hessian-vector product (double
    backward through the gradient graph) per sample serves every layer. Frozen weights are
    made differentiable for the duration of the call. Put the model in eval mode first if
    dropout should not add noise.
    """
    mods = {n: _get(model, n) for n in layers}
    params: list[Tensor] = []
    index: dict[int, int] = {}
    owners: dict[str, list[int]] = {}
    for n, m in mods.items():
        for w in layer_weights(m):
            if id(w) not in index:
                index[id(w)] = len(params)
                params.append(w)
            owners.setdefault(n, []).append(index[id(w)])
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        with _double_backward_safe_attention():
            loss = loss_fn(model)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        traces = torch.zeros(len(params), dtype=torch.float64)
        gens: dict[torch.device, torch.Generator] = {}
        for _ in range(int(n_samples)):
            vs = []
            for i in live:
                dev = params[i].device
                if dev not in gens:
                    gens[dev] = torch.Generator(device=dev).manual_seed(seed)
                v = torch.randint(0, 2, params[i].shape, generator=gens[dev], device=dev).to(params[i].dtype) * 2 - 1
                vs.append(v)
            if not live:
                break
            hvs = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], grad_outputs=vs,
                                      retain_graph=True, allow_unused=True)
            for j, i in enumerate(live):
                if hvs[j] is not None:
                    traces[i] += float((vs[j] * hvs[j]).sum())
        traces /= max(int(n_samples), 1)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return {n: float(sum(traces[i] for i in idx)) for n, idx in owners.items()}


def hessian_sensitivity(model: nn.Module, layers: Sequence[str],
                        loss_fn: Callable[[nn.Module], Tensor] | None = None, *,
                        traces: dict[str, float] | None = None, bits: Sequence[int] = (4, 8),
                        n_samples: int = 8, seed: int = 0) -> dict[str, dict[int, float]]:
    """Second-order estimate of the loss increase, same layout as :func:`layer_sensitivity`.

    ``Δ_l(b) = ½ · tr(H_l)/n_l · ||W_l − Q_b(W_l)||²`` (HAWQ-V2's average-trace form: the
    Taylor term ½ ΔWᵀHΔW with H replaced by its mean eigenvalue). Uses ``traces`` if given,
    otherwise computes them with :func:`hessian_trace`. A negative trace estimate (sampling
    noise, or a model far from a minimum where H is indefinite) is clamped to 0: the estimator
    is only meaningful for PSD blocks, and a negative "sensitivity" would tell the allocator
    that quantization helps.
    """
    widths = [check_bits(b) for b in bits]
    if traces is None:
        if loss_fn is None:
            raise ValueError("hessian_sensitivity needs loss_fn or precomputed traces")
        traces = hessian_trace(model, layers, loss_fn, n_samples=n_samples, seed=seed)
    out: dict[str, dict[int, float]] = {}
    for name in layers:
        weights = layer_weights(_get(model, name))
        n = sum(w.numel() for w in weights)
        mean_tr = max(float(traces[name]), 0.0) / max(n, 1)
        res = {}
        for b in widths:
            if b == 16:
                res[b] = 0.0
                continue
            err = sum(float((w.detach().float() - _fq(w.detach(), b).float()).pow(2).sum()) for w in weights)
            res[b] = 0.5 * mean_tr * err
        out[name] = res
    return out
