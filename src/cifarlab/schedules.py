"""Learning-rate schedules shared by the NumPy and the torch trainers (no torch import).

Stateless: the rate of step ``s`` is a function of ``s``, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "onecycle", "linear")


def lr_at(cfg, step: int) -> float:
    """Learning rate of step ``step`` (0-based) for a config with ``learning_rate``,
    ``max_steps``, ``warmup_steps`` and ``schedule``: linear warm-up, then the schedule."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "linear":
        return peak * (1 - t)
    if cfg.schedule == "onecycle":  # triangle: up over the first 25%, then down towards 0
        n = max(1, cfg.max_steps - cfg.warmup_steps)
        up = max(1, round(0.25 * n))
        s = step - cfg.warmup_steps  # neither the first nor the last step is spent at rate 0
        return peak * ((s + 1) / up if s < up else (n - s) / max(1, n - up))
    return peak
