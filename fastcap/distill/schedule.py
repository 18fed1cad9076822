"""The progressive curriculum: how much each teacher counts at training progress t.

Teachers are indexed weakest (0) to strongest (J-1). A "focus" point moves from
teacher 0 to teacher J-1 as t goes from 0 to 1, and each teacher's weight is
its closeness to the focus:

    step     focus jumps: training is cut into J equal phases, phase m uses teacher m alone
    linear   focus c(t) = t (J-1);                 w_j = max(0, 1 - |j - c|)
    cosine   focus c(t) = (J-1) (1 - cos(pi t)) / 2 (slow start and end, fast middle)
    average  w_j = 1/J for all t: plain multi-teacher KD, the baseline

With two teachers `linear` is w = (1-t, t). The weights always sum to 1.
"""
from __future__ import annotations

import math

SCHEDULES = ("step", "linear", "cosine", "average")


def teacher_weights(schedule: str, progress: float, num_teachers: int) -> list[float]:
    """Mixing weights of the teachers (weakest first) at progress in [0, 1]."""
    if schedule not in SCHEDULES:
        raise ValueError(f"training.distill.schedule={schedule!r}: use one of {SCHEDULES}")
    if num_teachers < 1:
        raise ValueError("teacher_weights needs at least one teacher")
    n = num_teachers
    t = min(1.0, max(0.0, float(progress)))
    if n == 1:
        return [1.0]
    if schedule == "average":
        return [1.0 / n] * n
    if schedule == "step":
        phase = min(n - 1, int(t * n))
        return [1.0 if j == phase else 0.0 for j in range(n)]
    shaped = t if schedule == "linear" else (1 - math.cos(math.pi * t)) / 2
    focus = shaped * (n - 1)
    w = [max(0.0, 1.0 - abs(j - focus)) for j in range(n)]
    total = sum(w)  # 1 up to rounding; renormalise so callers can rely on it
    return [x / total for x in w]
