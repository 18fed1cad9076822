"""Exact mixed-precision bit allocation (multiple-choice knapsack)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import reduce

import numpy as np
from torch import nn

from .fake import check_bits
from .modules import _get, layer_weights
from .pack import model_size_bytes
from .sensitivity import layer_channels, layer_params, quantizable_layers

MB = 1_000_000  # max_size_mb is in SI megabytes (os.path.getsize(...) / 1e6)
SCALE_BYTES = 4  # float32 per-channel scale


def size_terms(model: nn.Module, layers: Sequence[str] | None = None) -> dict:
    """Inputs for a byte-exact ``max_size_mb`` budget: ``params``, ``channels`` (scales per
    layer) and ``fixed_bytes`` (everything in the state_dict that is not an allocatable weight:
    biases, norms, other layers, buffers, measured on the float model)."""
    names = quantizable_layers(model) if layers is None else list(layers)
    seen: set[int] = set()
    weight_bytes = 0
    for n in names:
        for w in layer_weights(_get(model, n)):
            if w.data_ptr() in seen:
                continue
            seen.add(w.data_ptr())
            weight_bytes += w.numel() * w.element_size()
    return {"params": layer_params(model, names), "channels": layer_channels(model, names),
            "fixed_bytes": model_size_bytes(model) - weight_bytes}


def _sens(s: Mapping, b: int) -> float:
    if b in s:
        return float(s[b])
    if str(b) in s:
        return float(s[str(b)])
    if b == 16:
        return 0.0  # float is the reference: no measured loss increase
    raise ValueError(f"sensitivity at {b} bits is missing for a layer; measure it or drop {b} from choices")


def allocate_bits(sensitivity: Mapping[str, Mapping[int, float]], params: Mapping[str, int], *,
                  avg_bits: float | None = None, max_size_mb: float | None = None,
                  choices: Sequence[int] = (4, 8), channels: Mapping[str, int] | None = None,
                  fixed_bytes: int = 0, solver: str = "auto") -> dict[str, int]:
    """Bit width per layer minimising total sensitivity under a size budget, solved exactly.

    Layers are the keys of ``sensitivity``. Budgets (at least one):

    * ``avg_bits``: ``Σ params_l·b_l ≤ avg_bits·Σ params_l`` — weight bits only (scales and
      biases not counted, the usual meaning of "average bits").
    * ``max_size_mb``: bytes ``Σ params_l·b_l/8 + [b_l<16]·channels_l·4 + fixed_bytes`` ≤
      ``max_size_mb·1e6``. Scale overhead is counted only when ``channels`` is given and the rest
      of the model only through ``fixed_bytes`` (get both from :func:`size_terms`).

    Formulated as a multiple-choice knapsack (binary ``x[l,b]``, one choice per layer) and
    solved with ``scipy.optimize.milp`` (HiGHS, zero relative gap) or, with ``solver="dp"`` /
    without scipy, by dynamic programming over integer bit costs (one budget only). Missing
    sensitivities at 16 bits count as 0. Raises ``ValueError`` for widths other than 4/8/16 and
    for budgets below the all-narrowest allocation (the message gives that minimum).
    """
    widths = sorted({check_bits(b) for b in choices})
    if avg_bits is None and max_size_mb is None:
        raise ValueError("allocate_bits needs a budget: avg_bits and/or max_size_mb")
    layers = list(sensitivity)
    if not layers:
        return {}
    missing = [n for n in layers if n not in params]
    if missing:
        raise ValueError(f"params missing for layers {missing[:5]}")
    P = np.array([int(params[n]) for n in layers], dtype=np.int64)
    C = np.array([int(channels.get(n, 0)) if channels else 0 for n in layers], dtype=np.int64)
    S = np.array([[_sens(sensitivity[n], b) for b in widths] for n in layers], dtype=np.float64)
    if not np.isfinite(S).all():
        raise ValueError("sensitivities must be finite")

    # Each budget is an integer cost matrix (in bits) and a capacity; integers keep the
    # feasibility test exact whatever the solver's tolerances.
    budgets: list[tuple[str, np.ndarray, int]] = []
    total_p = int(P.sum())
    if avg_bits is not None:
        cost = P[:, None] * np.array(widths, dtype=np.int64)[None, :]
        budgets.append(("avg_bits", cost, math.floor(avg_bits * total_p + 1e-9 * max(total_p, 1))))
    if max_size_mb is not None:
        scale_bits = np.array([SCALE_BYTES * 8 if b < 16 else 0 for b in widths], dtype=np.int64)
        cost = P[:, None] * np.array(widths, dtype=np.int64)[None, :] + C[:, None] * scale_bits[None, :]
        budgets.append(("max_size_mb", cost, math.floor((max_size_mb * MB - fixed_bytes) * 8 + 1e-6)))

    for kind, cost, cap in budgets:
        need = int(cost.min(axis=1).sum())
        if need > cap:
            lo_bits = need / max(total_p, 1) if kind == "avg_bits" else None
            if kind == "avg_bits":
                raise ValueError(
                    f"infeasible budget: avg_bits={avg_bits} but the minimum achievable with choices {tuple(widths)} "
                    f"is {lo_bits:.4f} average bits")
            raise ValueError(
                f"infeasible budget: max_size_mb={max_size_mb} but the minimum achievable size with choices "
                f"{tuple(widths)} is {(need / 8 + fixed_bytes) / MB:.4f} MB")

    if solver not in ("auto", "milp", "dp"):
        raise ValueError(f"solver must be 'auto', 'milp' or 'dp', got {solver!r}")
    pick = None
    if solver in ("auto", "milp"):
        try:
            pick = _solve_milp(S, budgets)
        except ImportError:
            if solver == "milp":
                raise
    if pick is None:
        if len(budgets) != 1:
            raise ValueError("the DP fallback handles one budget; give avg_bits or max_size_mb, or install scipy")
        pick = _solve_dp(S, budgets[0][1], budgets[0][2])
    return {n: widths[k] for n, k in zip(layers, pick)}


def _solve_milp(S: np.ndarray, budgets: list[tuple[str, np.ndarray, int]]) -> list[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    L, K = S.shape
    # Shifting each layer's row by its minimum is free (exactly one choice per layer) and keeps
    # the objective well scaled for HiGHS's absolute tolerances.
    Sh = S - S.min(axis=1, keepdims=True)
    span = Sh.max()
    c = (Sh / span * 1e3 if span > 0 else Sh).ravel()
    rows = np.repeat(np.arange(L), K)
    one = LinearConstraint(csr_matrix((np.ones(L * K), (rows, np.arange(L * K))), shape=(L, L * K)), 1, 1)
    caps = [cap for _, _, cap in budgets]
    for _ in range(4):
        cons = [one]
        for (_, cost, _), cap in zip(budgets, caps):
            base = cost.min(axis=1)
            extra = (cost - base[:, None]).astype(np.float64)
            room = float(cap - int(base.sum()))
            norm = max(room, float(extra.max()), 1.0)
            cons.append(LinearConstraint(extra.ravel()[None, :] / norm, -np.inf, room / norm))
        res = milp(c, integrality=np.ones(L * K), bounds=Bounds(0, 1), constraints=cons,
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise RuntimeError(f"MILP solver failed: {res.message}")
        pick = [int(k) for k in np.argmax(res.x.reshape(L, K), axis=1)]
        over = [int(cost[np.arange(L), pick].sum()) - cap for (_, cost, cap) in budgets]
        if all(o <= 0 for o in over):
            return pick
        # Solver feasibility tolerance let a tiny violation through: tighten and re-solve.
        caps = [cap - max(o, 0) - 1 for cap, o in zip(caps, over)]
    raise RuntimeError("MILP kept violating the budget by tolerance; use solver='dp'")


def _solve_dp(S: np.ndarray, cost: np.ndarray, cap: int) -> list[int]:
    L, K = S.shape
    base = cost.min(axis=1)
    extra = cost - base[:, None]
    room = cap - int(base.sum())
    nz = [int(v) for v in extra.ravel() if v > 0]
    g = reduce(math.gcd, nz, 0) or 1
    units = room // g
    ext = (extra // g).astype(np.int64)
    max_need = int(ext.max(axis=1).sum())
    units = min(units, max_need)  # more room than the widest allocation needs is useless
    if units * L > 2e8:
        raise RuntimeError(f"DP table too large ({L} layers x {units} units); install scipy for the MILP solver")
    # dp[u] = least sensitivity of the layers so far using at most u units.
    dp = np.zeros(units + 1)
    choice = np.zeros((L, units + 1), dtype=np.int8)
    for l in range(L):
        new = np.full(units + 1, np.inf)
        for k in range(K):
            e = int(ext[l, k])
            if e > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[e:] = dp[: units + 1 - e] + S[l, k]
            better = cand < new
            new[better] = cand[better]
            choice[l, better] = k
        dp = new
    u = units
    pick = [0] * L
    for l in range(L - 1, -1, -1):
        k = int(choice[l, u])
        pick[l] = k
        u -= int(ext[l, k])
    return pick
