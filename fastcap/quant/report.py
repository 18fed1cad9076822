"""Human- and machine-readable summaries of a sensitivity analysis and bit allocation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .allocate import MB

_BITS_COLOURS = {4: "#d62728", 8: "#1f77b4", 16: "#2ca02c"}


def _sens(s: Mapping, b: int) -> float | None:
    v = s.get(b, s.get(str(b)))
    return None if v is None else float(v)


def _widths(sensitivity: Mapping[str, Mapping]) -> list[int]:
    return sorted({int(b) for s in sensitivity.values() for b in s})


def _summary(allocation: Mapping[str, int], params: Mapping[str, int]) -> dict[str, float]:
    names = [n for n in allocation if n in params]
    total = sum(int(params[n]) for n in names)
    bits = sum(int(params[n]) * int(allocation[n]) for n in names)
    return {
        "layers": len(names),
        "params": total,
        "avg_bits": bits / total if total else 0.0,
        "weight_bytes": bits / 8,
        "fp32_weight_bytes": 4.0 * total,
    }


def format_report(sensitivity: Mapping[str, Mapping[int, float]], allocation: Mapping[str, int],
                  params: Mapping[str, int]) -> str:
    """Aligned text table (layer, params, Δ per measured width, chosen bits), most sensitive
    layer (at the narrowest width) first, with a footer of average bits and weight size.

    Sizes count weight bits only (per-channel scales, biases and non-quantized layers are
    not included); compare files with :func:`fastcap.quant.model_size_bytes`.
    """
    widths = [b for b in _widths(sensitivity) if b != 16] or _widths(sensitivity)
    key_b = widths[0] if widths else None

    def order(n: str) -> float:
        v = _sens(sensitivity[n], key_b) if key_b is not None else None
        return -(v if v is not None and math.isfinite(v) else -math.inf)

    names = sorted(sensitivity, key=order)
    head = ["layer", "params"] + [f"Δ@{b}bit" for b in widths] + ["bits"]
    rows = []
    for n in names:
        cells = [n, f"{int(params.get(n, 0)):,}"]
        for b in widths:
            v = _sens(sensitivity[n], b)
            cells.append("-" if v is None else f"{v:.4g}")
        cells.append(str(allocation.get(n, "-")))
        rows.append(cells)
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells))

    sep = "-" * len(fmt(head))
    s = _summary(allocation, params)
    counts = {}
    for n in allocation:
        counts[int(allocation[n])] = counts.get(int(allocation[n]), 0) + 1
    mix = ", ".join(f"{c}x{b}bit" for b, c in sorted(counts.items()))
    footer = (f"{s['layers']} layers ({mix}), {s['params']:,} weights: average {s['avg_bits']:.3f} bits, "
              f"{s['weight_bytes'] / MB:.3f} MB of weights vs {s['fp32_weight_bytes'] / MB:.3f} MB fp32 "
              f"({s['fp32_weight_bytes'] / max(s['weight_bytes'], 1):.2f}x smaller; scales/biases not counted)")
    return "\n".join([fmt(head), sep] + [fmt(r) for r in rows] + [sep, footer])


def plot_sensitivity(sensitivity: Mapping[str, Mapping[int, float]], allocation: Mapping[str, int],
                     path: str | Path, bits: int | None = None) -> Path:
    """Bar chart of per-layer sensitivity (at ``bits``, default the narrowest measured width)
    in model order, bars coloured by the allocated width; the next width is overlaid as dots.
    Log scale when the positive values span more than two decades (values <= 0 are drawn at the
    smallest positive value, hatched). Saved as PNG; returns the path."""
    # Figure + Agg canvas directly instead of pyplot: no global backend switch, no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    widths = [b for b in _widths(sensitivity) if b != 16]
    b0 = bits if bits is not None else (widths[0] if widths else 4)
    names = list(sensitivity)
    vals = [(_sens(sensitivity[n], b0) or 0.0) for n in names]
    other = [b for b in widths if b != b0]
    pos = [v for v in vals if v > 0]
    log = bool(pos) and max(pos) / min(pos) > 100
    floor = min(pos) if pos else 1e-12
    shown = [v if (v > 0 or not log) else floor for v in vals]

    n = len(names)
    fig = Figure(figsize=(max(8.0, 0.28 * n + 2.5), 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [_BITS_COLOURS.get(int(allocation.get(nm, 0)), "#7f7f7f") for nm in names]
    bars = ax.bar(range(n), shown, color=colours, edgecolor="black", linewidth=0.3)
    for bar, v in zip(bars, vals):
        if log and v <= 0:
            bar.set_hatch("//")
    handles = [Patch(color=_BITS_COLOURS.get(b, "#7f7f7f"), label=f"{b}-bit")
               for b in sorted({int(allocation[nm]) for nm in names if nm in allocation})]
    if log and any(v <= 0 for v in vals):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="Δ ≤ 0 (drawn at floor)"))
    if other:
        b1 = other[0]
        ov = [_sens(sensitivity[nm], b1) for nm in names]
        xs = [i for i, v in enumerate(ov) if v is not None and (v > 0 or not log)]
        ax.scatter(xs, [ov[i] for i in xs], color="black", s=12, zorder=3, label=f"Δ at {b1} bits")
        handles.append(ax.collections[-1])
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=90, fontsize=7 if n > 30 else 8)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel(f"loss increase, weights at {b0} bits")
    ax.set_title("Per-layer quantization sensitivity (colour = allocated bits)")
    ax.grid(axis="y", alpha=0.3, which="major")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)  # never covers bars
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _clean(v: Any) -> Any:
    return v if v is None or math.isfinite(v) else None


def report_dict(sensitivity: Mapping[str, Mapping[int, float]], allocation: Mapping[str, int],
                params: Mapping[str, int]) -> dict[str, Any]:
    """JSON-serialisable report (bit widths as string keys, non-finite numbers as null)."""
    layers = []
    for n, s in sensitivity.items():
        layers.append({
            "name": n,
            "params": int(params.get(n, 0)),
            "sensitivity": {str(int(b)): _clean(float(v)) for b, v in s.items()},
            "bits": None if n not in allocation else int(allocation[n]),
        })
    summ = _summary(allocation, params)
    return {
        "layers": layers,
        "allocation": {str(n): int(b) for n, b in allocation.items()},
        "avg_bits": summ["avg_bits"],
        "total_params": summ["params"],
        "weight_bytes": summ["weight_bytes"],
        "fp32_weight_bytes": summ["fp32_weight_bytes"],
    }


def allocation_from_report(d: Mapping[str, Any]) -> dict[str, int]:
    """The ``{layer: bits}`` allocation stored in a :func:`report_dict`."""
    if "allocation" in d:
        return {str(n): int(b) for n, b in d["allocation"].items()}
    return {str(x["name"]): int(x["bits"]) for x in d["layers"] if x.get("bits") is not None}
