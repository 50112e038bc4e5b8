"""Learning-rate schedules shared by the NumPy and the torch trainers (no torch import).

Stateless: the rate of step ``s`` is a function of ``s``, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "onecycle", "linear")


def lr_at(cfg, step: int) -> float:
    """Learning rate of step ``step`` (0-based) for a config with ``learning_rate``,
    ``max_steps``, ``warmup_steps``, ``schedule`` and (for onecycle) ``lr_start``/``lr_end``,
    the rates at either end as fractions of the peak, and ``lr_peak``, the fraction of the
    steps its rise takes: linear warm-up, then the schedule."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "linear":
        return peak * (1 - t)
    if cfg.schedule == "onecycle":  # triangle: lr_start -> 1 over the first lr_peak (25%), then to lr_end
        n = max(1, cfg.max_steps - cfg.warmup_steps)
        up = max(1, round(getattr(cfg, "lr_peak", 0.25) * n))
        s = step - cfg.warmup_steps  # with ends at 0, neither the first nor the last step has rate 0
        a, b = cfg.lr_start, cfg.lr_end
        if s < up:
            return peak * (a + (1 - a) * (s + 1) / up)
        return peak * (b + (1 - b) * (n - s) / max(1, n - up))
    return peak


LOOKAHEAD_DECAY = 0.95  # per step; an update every k steps uses 0.95**k, scaled by the schedule


def lookahead_decay(cfg, step: int) -> float | None:
    """The decay of the Lookahead update after step ``step`` (1-based, steps done) for a config
    with ``lookahead`` (every k steps; 0: off) and ``max_steps``, or None for no update: every
    k steps 0.95**k · (step / max_steps)³, so the slow weights follow the fast ones closely
    early on and average over more steps as the rate falls; after the last step 1 (the final
    weights are the slow ones) unless an update falls there anyway."""
    k = cfg.lookahead
    if not k:
        return None
    if step % k == 0:
        return LOOKAHEAD_DECAY**k * (step / cfg.max_steps) ** 3
    return 1.0 if step == cfg.max_steps else None
